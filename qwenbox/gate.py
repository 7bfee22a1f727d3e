"""The gate: whether a request may use the engine now, and the requests that are using it.

The gate holds no engine: it asks the engine supervisor (``EngineHolder``) for the one to
use now, and waits on it while none is attached.

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
  Held requests wake on every attach, detach and phase change (``EngineHolder.wait_changed``).
- ``with gate.running(rid):`` marks an admitted request as handed to the engine; the
  watchdog reads ``running_ids`` as evidence that work is pending.
- ``await drain(timeout, finish_accepted)``: the requests in flight finish up to ``timeout``
  seconds, the rest are aborted in the engine (``raise_if_aborted(rid)`` turns that into a
  clean 503 for the request's client). ``finish_accepted`` (socket activation, stopped while
  ready): connections accepted before the listener closed still get their requests served.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Protocol

from .engine import EngineDead
from .engine_protocol import ServingEngine
from .generation import Delta, GenerationRequest
from .lifecycle import Lifecycle, Phase

log = logging.getLogger("qwenbox.gate")

_ACCEPTED_GRACE_S = 0.5   # socket activation: time for just-accepted connections to send their request
_ABORTED_GRACE_S = 5.0    # after drain-abort: time for the aborted requests to answer their clients

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


class EngineHolder(Protocol):
    """What the gate asks of the engine supervisor."""

    @property
    def engine(self) -> ServingEngine | None: ...

    async def wait_changed(self, timeout: float) -> bool: ...

    async def ensure_awake(self) -> None: ...

    def note_activity(self) -> None: ...


class Gate:
    def __init__(self, lifecycle: Lifecycle, engines: EngineHolder, hold_s: Callable[[], float] = lambda: 0.0) -> None:
        self.lifecycle = lifecycle
        self.engines = engines
        self.hold_s = hold_s
        self.finish_accepted = False
        self.in_flight = 0
        self.running_ids: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._aborted: set[str] = set()
        self._abort_reason = ""

    @property
    def engine(self) -> ServingEngine | None:
        """The engine attached now (the supervisor's), awake or not; None while there is none."""
        return self.engines.engine

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
            self.engines.note_activity()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return not self.in_flight

    async def serving_engine(self, dead: ServingEngine | None = None) -> ServingEngine:
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
            if not await self.engines.wait_changed(deadline - loop.time()):
                raise NotServing(f"the engine is restarting after a failure and was not back within "
                                 f"{self.hold_s():g}s", "engine_restarting")
        await self.engines.ensure_awake()
        return engine

    def _holding(self) -> bool:
        """Requests wait while the engine is rebuilt, or while a dead engine is still attached
        (the watchdog notices within half a second and starts the rebuild)."""
        phase = self.lifecycle.phase
        return self.hold_s() > 0 and (phase == Phase.RECOVERING or phase.serves_requests)

    async def generate(self, engine: ServingEngine, gen: GenerationRequest) -> AsyncGenerator[list[Delta], None]:
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

    async def drain(self, timeout: float, finish_accepted: bool = False) -> None:
        """In-flight requests finish up to ``timeout``; the rest are aborted (503)."""
        self.finish_accepted = finish_accepted
        if finish_accepted:
            # Connections accepted just before the listener closed may not have sent their
            # request yet: give them a moment to become in-flight requests.
            await asyncio.sleep(_ACCEPTED_GRACE_S)
        if await self.wait_idle(timeout):
            return
        n = await self.abort_all("the server is shutting down; drain_timeout passed")
        log.warning("drain timeout: aborted %d request(s)", n)
        await self.wait_idle(_ABORTED_GRACE_S)

    async def abort_all(self, why: str) -> int:
        rids = list(self.running_ids)
        self._aborted.update(rids)
        self._abort_reason = why
        engine = self.engine
        if engine is not None:
            for rid in rids:
                await engine.abort(rid)
        return len(rids)

    def raise_if_aborted(self, rid: str) -> None:
        if rid in self._aborted:
            raise NotServing(self._abort_reason or "aborted", "shutting_down")

    def health(self) -> dict[str, object]:
        return {"in_flight": self.in_flight}
