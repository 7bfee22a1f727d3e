"""The gate: whether a request may use the engine now, and the requests that are using it.

Contract:
- ``refusal()`` is ``(message, code)`` while the phase serves no requests (loading,
  warming, draining, failed), else ``None``. Under socket activation a draining instance
  still serves requests on connections it had accepted (``finish_accepted``): new ones
  wait in systemd's socket for the next instance.
- ``async with gate.track():`` wraps every API request that will use the engine; drain
  (``wait_idle``) and idle standby wait on ``in_flight``.
- ``await gate.serving_engine()`` is the engine, awake, or raises ``NotServing`` (503).
  While the engine is rebuilt after a crash (phase ``recovering``), a request is held up
  to ``hold_s()`` for the new engine instead of being refused (0 = refuse at once).
- ``gate.generate(engine, gen)`` is ``engine.generate(gen)``, resubmitted once to the new
  engine when the engine died before producing anything for this request: its client has
  seen no token, so nothing is lost and nothing is repeated.
- ``attach(engine, standby)`` / ``detach()``: the daemon hands over a new engine or takes
  away a dead one; held requests wake on every attach and phase change.
- ``with gate.running(rid):`` marks an admitted request as handed to the engine; the
  watchdog reads ``running_ids`` as evidence that work is pending.
- ``abort_all(why)`` (drain timed out) aborts every running request in the engine;
  ``raise_if_aborted(rid)`` turns that into a clean 503 for the request's client.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Callable, Iterator

from .engine import EngineDead
from .lifecycle import Lifecycle, Phase

_REFUSALS = {
    Phase.STARTING: ("the server is starting; the model is not loaded yet", "model_loading"),
    Phase.LOADING: ("the model is loading", "model_loading"),
    Phase.WARMING: ("the model is warming up", "model_loading"),
    Phase.RECOVERING: ("the engine is restarting after a failure", "engine_restarting"),
    Phase.DRAINING: ("the server is shutting down", "shutting_down"),
    Phase.STOPPED: ("the server is shutting down", "shutting_down"),
    Phase.FAILED: ("the engine failed; the service is restarting", "engine_failed"),
}


class NotServing(Exception):
    """The engine cannot take requests now (a 503 with Retry-After for the client)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message, self.code = message, code


class Gate:
    def __init__(self, lifecycle: Lifecycle, hold_s: Callable[[], float] = lambda: 0.0) -> None:
        self.lifecycle = lifecycle
        self.hold_s = hold_s
        self.engine: Any = None           # set by the daemon once loaded
        self.standby: Any = None
        self.finish_accepted = False
        self.in_flight = 0
        self.running_ids: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._aborted: set[str] = set()
        self._abort_reason = ""
        self._changed = asyncio.Event()     # set (and replaced) on every attach, detach, phase change
        lifecycle.observe(lambda old, new, detail: self._notify())

    def attach(self, engine: Any, standby: Any) -> None:
        self.engine, self.standby = engine, standby
        self._notify()

    def detach(self) -> None:
        self.engine, self.standby = None, None
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def refusal(self) -> tuple[str, str] | None:
        phase = self.lifecycle.phase
        if phase.serves_requests or (self.finish_accepted and phase == Phase.DRAINING):
            return None
        if phase == Phase.RECOVERING and self.hold_s() > 0:
            return None                       # held in serving_engine() until the new engine is up
        return _REFUSALS.get(phase, ("the server is not ready", "not_ready"))

    @contextlib.asynccontextmanager
    async def track(self) -> AsyncIterator[None]:
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
            if self.standby is not None:
                self.standby.touch()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return not self.in_flight

    async def serving_engine(self, dead: Any = None) -> Any:
        """The engine, awake. ``dead``: an engine that just died under this request; wait
        for its replacement rather than take it again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold_s()
        while True:
            refusal, engine = self.refusal(), self.engine
            if refusal is None and engine is not None and engine is not dead and not engine.dead:
                break
            if refusal is not None or not self._holding():
                raise NotServing(*(refusal or ("the model is loading", "model_loading")))
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise NotServing(f"the engine is restarting after a failure and was not back within "
                                 f"{self.hold_s():g}s", "engine_restarting") from None
        if self.standby is not None:
            await self.standby.ensure_awake()
        return engine

    def _holding(self) -> bool:
        """Requests wait while the engine is rebuilt, or while a dead engine is still attached
        (the watchdog notices within half a second and starts the rebuild)."""
        phase = self.lifecycle.phase
        return self.hold_s() > 0 and (phase == Phase.RECOVERING or phase.serves_requests)

    async def generate(self, engine: Any, gen: Any) -> AsyncIterator[Any]:
        produced = False
        try:
            async with contextlib.aclosing(engine.generate(gen)) as outputs:
                async for deltas in outputs:
                    produced = True
                    yield deltas
            return
        except EngineDead:
            if produced or not self._holding():
                raise
        engine = await self.serving_engine(dead=engine)
        async with contextlib.aclosing(engine.generate(gen)) as outputs:
            async for deltas in outputs:
                yield deltas

    @contextlib.contextmanager
    def running(self, rid: str) -> Iterator[None]:
        self.running_ids.add(rid)
        try:
            yield
        finally:
            self.running_ids.discard(rid)
            self._aborted.discard(rid)

    async def abort_all(self, why: str) -> int:
        rids = list(self.running_ids)
        self._aborted.update(rids)
        self._abort_reason = why
        for rid in rids:
            await self.engine.abort(rid)
        return len(rids)

    def raise_if_aborted(self, rid: str) -> None:
        if rid in self._aborted:
            raise NotServing(self._abort_reason or "aborted", "shutting_down")

    def health(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight}
