"""Idle standby: put an idle engine to sleep, wake it on the next request.

Contract:
- ``Standby`` holds no engine: it asks ``engine()`` (the supervisor's attached engine) each
  time, so one standby serves every engine the process builds.
- ``run()`` (a task) puts the engine to sleep (vLLM sleep level 1: weights to CPU RAM,
  KV cache freed) once no API request has been in flight for ``idle_sleep_after_s``;
  the phase becomes ``sleeping``. Only API requests count as activity: /health and
  /metrics never wake the engine or reset the timer.
- ``ensure_awake()`` is awaited by every request before it touches the engine: on a
  sleeping engine it wakes it (one wake for any number of concurrent requests),
  re-prefills the system prompt (``rewarm``), records the wake time and goes back to
  ``ready``. Sleep and wake hold one lock, so a request never meets a half-asleep engine.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from . import eventlog
from .config import StandbyConfig
from .engine_protocol import ServingEngine
from .eventlog import Event
from .lifecycle import Lifecycle, Phase

log = logging.getLogger("qwenbox.standby")


class Standby:
    def __init__(self, settings: Callable[[], StandbyConfig], lifecycle: Lifecycle,
                 engine: Callable[[], ServingEngine | None], busy: Callable[[], int],
                 rewarm: Callable[[ServingEngine], Awaitable[None]],
                 on_wake: Callable[[float], None] = lambda s: None,
                 on_sleep: Callable[[float], None] = lambda s: None) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.engine = engine
        self.busy = busy
        self.rewarm = rewarm
        self.on_wake, self.on_sleep = on_wake, on_sleep
        self.last_activity = time.monotonic()
        self.lock = asyncio.Lock()
        self.last_wake_s: float | None = None

    @property
    def cfg(self) -> StandbyConfig:
        return self.settings()

    @property
    def enabled(self) -> bool:
        return self.cfg.idle_sleep_after_s > 0

    def health(self) -> dict[str, object]:
        if not self.enabled:
            return {}
        return {"standby": {"idle_s": round(self.idle_for(), 1), "sleep_after_s": self.cfg.idle_sleep_after_s,
                            "last_wake_s": self.last_wake_s}}

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last_activity

    async def run(self) -> None:
        if not self.enabled:
            return
        poll = min(1.0, self.cfg.idle_sleep_after_s / 4)
        while True:
            await asyncio.sleep(poll)
            if (self.lifecycle.phase == Phase.READY and not self.busy()
                    and self.idle_for() >= self.cfg.idle_sleep_after_s):
                await self._sleep()

    async def _sleep(self) -> None:
        async with self.lock:
            # re-check under the lock: a request may have arrived while we waited for it
            engine = self.engine()
            if (engine is None or self.lifecycle.phase != Phase.READY or self.busy()
                    or self.idle_for() < self.cfg.idle_sleep_after_s):
                return
            t0 = time.monotonic()
            await engine.sleep(self.cfg.sleep_level)
            took = time.monotonic() - t0
            self.lifecycle.to(Phase.SLEEPING, f"idle for {self.idle_for():.0f}s; wakes on the next request")
            # sleep_level, not level: ``level`` is event()'s own logging-level argument
            eventlog.event(Event.SLEEP, sleep_level=self.cfg.sleep_level, sleep_s=round(took, 3))
            self.on_sleep(took)

    async def ensure_awake(self) -> None:
        self.touch()
        if self.lifecycle.phase != Phase.SLEEPING and not self.lock.locked():
            return
        async with self.lock:
            engine = self.engine()
            if engine is None or self.lifecycle.phase != Phase.SLEEPING:
                return
            t0 = time.monotonic()
            await engine.wake_up()
            await self.rewarm(engine)
            took = time.monotonic() - t0
            self.last_wake_s = took
            self.lifecycle.to(Phase.READY, f"awake (wake {took:.2f}s)")
            eventlog.event(Event.WAKE, wake_s=round(took, 3))
            self.on_wake(took)
            self.touch()
