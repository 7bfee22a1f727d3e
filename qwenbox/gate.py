"""The gate: whether a request may use the engine now, and the requests that are using it.

Contract:
- ``refusal()`` is ``(message, code)`` while the phase serves no requests (loading,
  warming, draining, failed), else ``None``. Under socket activation a draining instance
  still serves requests on connections it had accepted (``finish_accepted``): new ones
  wait in systemd's socket for the next instance.
- ``async with gate.track():`` wraps every API request that will use the engine; drain
  (``wait_idle``) and idle standby wait on ``in_flight``.
- ``await gate.serving_engine()`` is the engine, awake, or raises ``NotServing`` (503).
- ``with gate.running(rid):`` marks an admitted request as handed to the engine; the
  watchdog reads ``running_ids`` as evidence that work is pending.
- ``abort_all(why)`` (drain timed out) aborts every running request in the engine;
  ``raise_if_aborted(rid)`` turns that into a clean 503 for the request's client.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Iterator

from .lifecycle import Lifecycle, Phase

_REFUSALS = {
    Phase.STARTING: ("the server is starting; the model is not loaded yet", "model_loading"),
    Phase.LOADING: ("the model is loading", "model_loading"),
    Phase.WARMING: ("the model is warming up", "model_loading"),
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
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.engine: Any = None           # set by the daemon once loaded
        self.standby: Any = None
        self.finish_accepted = False
        self.in_flight = 0
        self.running_ids: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._aborted: set[str] = set()
        self._abort_reason = ""

    def attach(self, engine: Any, standby: Any) -> None:
        self.engine, self.standby = engine, standby

    def refusal(self) -> tuple[str, str] | None:
        phase = self.lifecycle.phase
        if phase.serves_requests or (self.finish_accepted and phase == Phase.DRAINING):
            return None
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

    async def serving_engine(self) -> Any:
        refusal = self.refusal()
        if refusal is not None or self.engine is None:
            raise NotServing(*(refusal or ("the model is loading", "model_loading")))
        if self.standby is not None:
            await self.standby.ensure_awake()
        return self.engine

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
