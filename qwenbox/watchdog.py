"""The watchdog: ``WATCHDOG=1`` only while the daemon is really healthy.

Contract:
- ``Watchdog(lifecycle, engine, running_ids, notifier, settings, halt, on_engine_dead)``;
  ``engine()`` is the engine attached now (the supervisor's; None while none is), and
  ``running_ids()`` the requests handed to it (the gate's). ``settings()`` returns the
  current ``WatchdogConfig`` (so a SIGHUP reload applies at the next check). ``start()``
  runs the check loop as a task on the running event loop, ``stop(final_ping)`` cancels it.
  The daemon starts it first and stops it last, so that it keeps pinging while the daemon
  starts and stops its other parts; it is armed (pings, and shows in /health) from the
  first ``ready`` on, as systemd's own watchdog is armed by READY=1.
- Twice a second the loop judges the evidence (``evaluate``), keeps the verdict for
  /health (``health()``), logs every change of verdict as ``event=watchdog``, and, while
  healthy and armed, sends ``WATCHDOG=1`` every WatchdogSec/2. The ping is sent by the
  event loop itself: a blocked loop sends nothing and systemd's WatchdogSec fires. There
  is no other thread that could ping for a daemon that does not answer.
- Unhealthy means any of: the engine reports a fatal error; an engine-core process has
  exited or is stopped (SIGSTOP, a debugger); work is pending and the engine has not
  stepped for ``stall_timeout_s``. Work is pending when the engine's last step reported
  running or waiting requests, or when a request was handed to the engine
  (``running_ids``) after its last step. A request that the engine has finished but whose
  client reads slowly is not pending: a slow client can never make the watchdog kill the
  service.
- This loop is the one place that polls the engine's liveness. A dead engine (a fatal
  error, or a core process gone) is reported once per engine through
  ``on_engine_dead(reason)``: the supervisor rebuilds it in-process (phase ``recovering``)
  or, past its restart budget, halts the daemon (exit 1). While no engine is attached
  (loading, a rebuild, and once the engine is closed on purpose at shutdown) only the
  event loop is judged and the pings go on: a rebuild is the supervisor's own progress,
  bounded by ``recovery.timeout_s``. For a frozen or stalled engine the watchdog only
  stops pinging and systemd kills us (``Result=watchdog``, then ``Restart=on-failure``).
  If the verdict stays unhealthy for ``exit_after_s`` (never less than 2 x WatchdogSec,
  so systemd acts first when it watches), ``halt`` is called once with an immediate
  ``Halt`` (exit 1): the way out when nobody watches.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from . import eventlog
from .config import WatchdogConfig
from .engine_protocol import ServingEngine
from .eventlog import Event
from .exitcode import ExitCode, Halt
from .lifecycle import Lifecycle, Phase
from .systemd import Notifier

log = logging.getLogger("qwenbox.watchdog")

_FROZEN = (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


@dataclass
class Verdict:
    healthy: bool = True
    reasons: list[str] = field(default_factory=list)
    engine_dead: bool = False       # a fatal error or a core process gone: no recovery here
    pending: bool = False
    stalled_for_s: float = 0.0
    steps: int = 0
    last_step_age_s: float | None = None

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


class Watchdog:
    def __init__(self, lifecycle: Lifecycle, engine: Callable[[], ServingEngine | None],
                 running_ids: Callable[[], set[str]], notifier: Notifier, settings: Callable[[], WatchdogConfig],
                 halt: Callable[[Halt], None] = lambda h: None,
                 on_engine_dead: Callable[[str], None] = lambda why: None) -> None:
        self.engine = engine
        self.running_ids = running_ids
        self.notifier = notifier
        self.settings = settings
        self.halt = halt
        self.on_engine_dead = on_engine_dead
        self.armed = lifecycle.phase == Phase.READY
        lifecycle.observe(self._on_phase)
        self.ping_interval = notifier.watchdog_interval_s      # WatchdogSec/2, None without one
        # Twice a second: an engine death is noticed (and answered) within half a second.
        self.tick = min(0.5, self.ping_interval / 2) if self.ping_interval else 0.5
        self.pings = 0
        self.last_ping: float | None = None
        self.verdict = Verdict()
        self.unhealthy_since: float | None = None
        self.max_loop_lag_s = 0.0
        self._seen: dict[str, float] = {}       # request id -> earliest time it may have been admitted
        self._prev_tick = time.monotonic()
        self._fatal_called = False
        self._dead_reported: ServingEngine | None = None   # the engine whose death was reported
        self._judged: ServingEngine | None = None          # the engine the request bookkeeping belongs to
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ the loop
    def _on_phase(self, old: Phase, new: Phase, detail: str) -> None:
        if new == Phase.READY:
            self.armed = True

    async def start(self) -> None:
        self._prev_tick = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="qwenbox-watchdog")

    async def stop(self, final_ping: bool = True) -> None:
        """Stop the loop; ``final_ping``: one last ping (armed only) before the process exits."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
            if final_ping and self.armed and self.ping_interval and self.notifier.watchdog():
                self.pings += 1

    async def _run(self) -> None:
        self.check()
        while True:
            due = time.monotonic() + self.tick
            await asyncio.sleep(self.tick)
            lag = time.monotonic() - due
            self.max_loop_lag_s = max(self.max_loop_lag_s, lag)
            if lag > self.tick:
                log.warning("event loop was blocked for %.1fs", lag)
            self.check()

    def check(self, now: float | None = None) -> Verdict:
        """One round: judge, publish, log a change, ping if healthy and due."""
        now = time.monotonic() if now is None else now
        v = self.evaluate(now)
        was = self.verdict
        self.verdict = v
        if v.healthy != was.healthy or (not v.healthy and v.reasons != was.reasons):
            eventlog.event(Event.WATCHDOG, logging.INFO if v.healthy else logging.ERROR,
                           healthy=v.healthy, reason=v.reason or None, pings=self.pings,
                           watchdog_sec=self.watchdog_sec)
        engine = self.engine()
        if v.engine_dead and self._dead_reported is not engine:
            self._dead_reported = engine
            self.on_engine_dead(v.reason)
        if v.healthy:
            self.unhealthy_since = None
            if self.armed and self.ping_interval and (self.last_ping is None
                                                      or now - self.last_ping >= self.ping_interval):
                if self.notifier.watchdog():
                    self.pings += 1
                self.last_ping = now
        else:
            if self.unhealthy_since is None:
                self.unhealthy_since = now
            limit = self.exit_after_s
            if limit and now - self.unhealthy_since >= limit and not self._fatal_called:
                self._fatal_called = True
                why = f"unhealthy for {now - self.unhealthy_since:.0f}s: {v.reason}"
                eventlog.event(Event.WATCHDOG, logging.ERROR, healthy=False, action="exit", reason=why)
                self.halt(Halt(f"watchdog: {why}", ExitCode.ENGINE_FAILED, now=True))
        return v

    # ------------------------------------------------------------ the evidence
    @property
    def watchdog_sec(self) -> float | None:
        return self.ping_interval * 2 if self.ping_interval else None

    @property
    def exit_after_s(self) -> float:
        limit = self.settings().exit_after_s
        if limit and self.watchdog_sec:
            limit = max(limit, 2 * self.watchdog_sec)
        return limit

    def evaluate(self, now: float) -> Verdict:
        engine = self.engine()
        v = Verdict()
        if engine is None:
            self._prev_tick = now
            return v
        if engine is not self._judged:           # a rebuilt engine: start its evidence afresh
            self._judged = engine
            self._seen.clear()
        if engine.dead:
            v.engine_dead = True
            v.reasons.append("the engine reported a fatal error")
        for p in engine.core_processes():
            try:
                status = p.status()
            except psutil.NoSuchProcess:
                status = psutil.STATUS_DEAD
            except psutil.Error as e:
                log.debug("cannot read engine process %s: %r", p.pid, e)
                continue
            if status in _GONE:
                v.engine_dead = True
                v.reasons.append(f"engine core process {p.pid} has exited")
            elif status in _FROZEN:
                v.reasons.append(f"engine core process {p.pid} is stopped ({status})")

        prog = engine.progress
        v.steps = prog.steps
        last_step = prog.last_step_monotonic or 0.0
        v.last_step_age_s = round(now - last_step, 3) if last_step else None
        # Requests handed to the engine since the last step: a new id might have arrived at any
        # time since the previous tick, so date it then (a step after that may have served it).
        active = set(self.running_ids())
        for rid in active - self._seen.keys():
            self._seen[rid] = self._prev_tick
        for rid in self._seen.keys() - active:
            del self._seen[rid]
        self._prev_tick = now
        unacked = [t for t in self._seen.values() if t > last_step]
        if prog.running + prog.waiting > 0 and last_step:
            v.pending, v.stalled_for_s = True, now - last_step
        if unacked:
            v.pending = True
            v.stalled_for_s = max(v.stalled_for_s, now - min(unacked))
        stall = self.settings().stall_timeout_s
        if v.pending and v.stalled_for_s > stall:
            v.reasons.append(f"work is pending and the engine has not stepped for {v.stalled_for_s:.0f}s "
                             f"(stall_timeout_s {stall:g})")
        v.stalled_for_s = round(v.stalled_for_s, 3)
        v.healthy = not v.reasons
        return v

    def health(self, now: float | None = None) -> dict[str, object]:
        """The verdict as /health shows it (``{"watchdog": {...}}``), once armed."""
        return {"watchdog": self.as_dict(now)} if self.armed else {}

    def as_dict(self, now: float | None = None) -> dict[str, object]:
        now = time.monotonic() if now is None else now
        v = self.verdict
        return {
            "healthy": v.healthy, "reason": v.reason or None,
            "pinging": bool(self.ping_interval) and v.healthy,
            "engine_attached": self.engine() is not None,
            "watchdog_sec": self.watchdog_sec, "pings": self.pings,
            "last_ping_s_ago": round(now - self.last_ping, 3) if self.last_ping is not None else None,
            "unhealthy_for_s": round(now - self.unhealthy_since, 3) if self.unhealthy_since is not None else 0.0,
            "pending": v.pending, "stalled_for_s": v.stalled_for_s,
            "stall_timeout_s": self.settings().stall_timeout_s, "engine_steps": v.steps,
            "last_step_s_ago": v.last_step_age_s, "max_loop_lag_s": round(self.max_loop_lag_s, 3),
        }
