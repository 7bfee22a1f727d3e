"""The orchestrator: start-up, serve until halted, shutdown.

Contract: ``Daemon(cfg).run()`` (a coroutine) returns the process exit code of the one
``Halt`` that ended it: 0 after a clean stop, 1 when the engine failed to start or died
past its rebuild budget (systemd restarts us), 78 when the engine build refused a setting;
a listener that cannot be bound raises ``ListenerError`` (the CLI's exit 69).

- Start-up starts the owners in order - ``Watchdog``, ``Frontend`` (sockets bound first,
  so clients get 503 + Retry-After rather than "connection refused" while the model loads;
  with systemd's socket they rather wait in its queue), ``EngineSupervisor`` (the first
  boot: loading, warming, ready) - and shutdown stops them in reverse order.
- Every way out is ``halt(Halt)``: a stop signal (drain first), an engine failure (no
  drain: the engine goes first, so /health says ``failed`` until the exit), or, when
  waiting would never end, ``Halt(now=True)``: the engine's processes are killed and the
  process exits at once. The first halt decides, except that a failure outranks a clean stop.
- This is the only module that handles signals. The handlers only queue the signal; one
  task dispatches them to ``handle_<name>``: TERM/INT halt with a drain (a second one:
  at once), HUP reloads the settings that need no engine restart.
- The daemon wires the owners and owns none of their state; /health is their parts.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Protocol

import psutil

from . import eventlog, sizing
from .admission import Admission
from .api.app import make_app
from .config import Config, ConfigError, load as load_config, reloaded
from .eventlog import Event
from .exitcode import ExitCode, Halt
from .frontend import Frontend
from .gate import Gate
from .lifecycle import Lifecycle, Phase
from .listeners import ListenerError, limit_accept_errors, limit_server_errors
from .metrics import Metrics
from .supervisor import EngineSupervisor, failure_halt
from .systemd import Notifier
from .watchdog import Watchdog

log = logging.getLogger("qwenbox.daemon")

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Service(Protocol):
    """An owner the daemon starts and stops: started in order, stopped in reverse."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def _log_engine_failure(h: Halt) -> None:
    """``event=engine_failed`` for a halt that the engine caused (not a listener error)."""
    if h.exit_code in (ExitCode.ENGINE_FAILED, ExitCode.CONFIG):
        eventlog.event(Event.ENGINE_FAILED, logging.ERROR, reason=h.reason)


class Daemon:
    def __init__(self, cfg: Config, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier.from_environ()
        self.lifecycle = Lifecycle()
        self.metrics = Metrics()
        self.admission = Admission(sizing.unsized(cfg.admission), cfg.sessions, self.metrics)
        self.supervisor = EngineSupervisor(lambda: self.cfg, self.lifecycle, self.metrics, self.notifier,
                                           busy=lambda: self.gate.in_flight, halt=self.halt, on_sized=self._sized)
        self.gate = Gate(self.lifecycle, self.supervisor, hold_s=lambda: self.cfg.recovery.hold_requests_s)
        self.watchdog = Watchdog(self.lifecycle, lambda: self.supervisor.engine, lambda: self.gate.running_ids,
                                 self.notifier, settings=lambda: self.cfg.watchdog, halt=self.halt,
                                 on_engine_dead=self.supervisor.engine_died)
        self.frontend = Frontend(lambda: self.cfg, make_app(lambda: self.cfg, self.gate, self.admission,
                                                            self.metrics, self.health))
        self._halt: Halt | None = None
        self._halted = asyncio.Event()
        self._started: list[Service] = []
        self._signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._stop_signals = 0
        self._t0 = time.monotonic()
        self.lifecycle.observe(self._on_phase)
        self.lifecycle.observe(lambda old, new, detail: self.metrics.set_phase(new))
        self.metrics.set_phase(self.lifecycle.phase)

    # ---------------------------------------------------------------- run
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        dispatcher = self._install_signals(loop)
        limit_accept_errors(loop)
        limit_server_errors()
        try:
            await self._startup()
            await self._halted.wait()
        except ListenerError as e:
            self.halt(Halt(str(e), ExitCode.UNAVAILABLE))
            raise
        finally:
            await self._shutdown()
            dispatcher.cancel()
        return int(self._outcome().exit_code)

    async def _startup(self) -> None:
        for service in (self.watchdog, self.frontend):
            self._started.append(service)
            await service.start()
        self._started.append(self.supervisor)
        boot = asyncio.create_task(self.supervisor.start(), name="qwenbox-boot")
        halted = asyncio.create_task(self._halted.wait())
        await asyncio.wait({boot, halted}, return_when=asyncio.FIRST_COMPLETED)
        halted.cancel()
        if not boot.done():     # stopped while starting: the build finishes, then what it made is closed
            self._enter_draining("stop requested during start-up")
            boot.cancel()
            await asyncio.wait([boot])
            if not boot.cancelled() and (exc := boot.exception()) is not None:
                log.info("start-up ended during stop: %r", exc)
        elif (exc := boot.exception()) is not None:
            log.error("engine failed to start", exc_info=exc)
            self.halt(failure_halt("engine failed to start", exc))
        else:
            await self.frontend.accept_now()      # queued connections are served from READY=1 on

    def _outcome(self) -> Halt:
        return self._halt or Halt("stopped", ExitCode.OK)

    # ---------------------------------------------------------------- the way out
    def halt(self, h: Halt) -> None:
        """End the daemon for ``h``'s reason with its exit code (see the module's contract)."""
        if h.now:
            self._exit_now(h)
        if self._halt is not None and (self._halt.failed or not h.failed):
            return
        self._halt = h
        if h.failed:
            _log_engine_failure(h)
            if self.lifecycle.can(Phase.FAILED):
                self.lifecycle.to(Phase.FAILED, h.reason)
        self._halted.set()

    def _exit_now(self, h: Halt) -> None:
        if self._halt is not None and self._halt.failed:
            h = Halt(self._halt.reason, self._halt.exit_code, now=True)
        elif h.failed:
            _log_engine_failure(h)
        log.warning("exiting now: %s", h.reason)
        # every child: the engine's cores, and those of an engine still being built
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.frontend.remove_own_socket()
        logging.shutdown()
        os._exit(h.exit_code)

    # ---------------------------------------------------------------- signals
    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[None]:
        """The handlers only queue the signal; the dispatcher task handles it on the loop."""
        for sig in (*_STOP_SIGNALS, signal.SIGHUP):
            loop.add_signal_handler(sig, self._signals.put_nowait, sig)
        return asyncio.create_task(self._dispatch_signals(), name="qwenbox-signals")

    async def _dispatch_signals(self) -> None:
        while True:
            sig = await self._signals.get()
            getattr(self, f"handle_{sig.name.removeprefix('SIG').lower()}")()

    def handle_term(self) -> None:
        self._stop_requested(signal.SIGTERM)

    def handle_int(self) -> None:
        self._stop_requested(signal.SIGINT)

    def _stop_requested(self, sig: signal.Signals) -> None:
        self._stop_signals += 1
        if self._stop_signals > 1:
            self.halt(Halt(f"second {sig.name}: exiting now without draining", ExitCode.INTERRUPTED, now=True))
        log.info("%s: draining", sig.name)
        self.halt(Halt(f"{sig.name}: stop requested", ExitCode.OK, drain=True))

    def handle_hup(self) -> None:
        """Re-read the config file and apply what needs no engine restart (config.RELOADABLE).
        A bad file is logged and the running config stays."""
        announce = self.lifecycle.phase.serves_requests   # never READY=1 before warm-up is done
        if announce:
            self.notifier.reloading(f"reloading {self.cfg.source}")
        try:
            note = self._reload()
        except ConfigError as e:
            eventlog.event(Event.RELOAD, logging.ERROR, ok=False, error=str(e))
            note = f"reload failed, running config kept: {e}"
        if announce:
            self.notifier.ready(f"{self.lifecycle.phase.value}: {self.lifecycle.detail}; {note}")

    def _reload(self) -> str:
        old = self.cfg
        cfg, applied, ignored = reloaded(old, load_config(old.source, dict(old.overrides)))
        if cfg.logging != old.logging:
            try:
                eventlog.setup(cfg.logging.level, cfg.logging.format, cfg.logging.file)
            except OSError as e:
                eventlog.setup(old.logging.level, old.logging.format, old.logging.file)
                raise ConfigError(f"cannot open the log file: {e}", file=old.source, key="logging.file") from e
        self.cfg = cfg
        self.admission.configure(sizing.unsized(cfg.admission), cfg.sessions)
        self.supervisor.resize()       # [sizing] or an "auto" key may have changed
        eventlog.event(Event.RELOAD, ok=True, applied=applied, needs_restart=ignored)
        return f"reloaded {len(applied)} setting(s)" + (f"; needs a restart: {', '.join(ignored)}" if ignored else "")

    def _sized(self, s: sizing.Sizing) -> None:
        """The supervisor sized the engine it built: its numbers go into the config, and
        admission serves with them from here on."""
        self.cfg = sizing.apply(self.cfg, s)
        self.admission.configure(self.cfg.admission, self.cfg.sessions)

    # ---------------------------------------------------------------- observers
    def _on_phase(self, old: Phase, new: Phase, detail: str) -> None:
        status = f"{new.value}: {detail}" if detail else new.value
        if old != new:
            eventlog.event(Event.PHASE, phase=new.value, previous=old.value, detail=detail,
                           since_start_s=round(time.monotonic() - self._t0, 3))
        if new == Phase.READY and old != Phase.READY:
            self.notifier.ready(status)
        elif new == Phase.DRAINING and old != Phase.DRAINING:
            self.notifier.stopping(status)
        else:
            self.notifier.status(status)

    # ---------------------------------------------------------------- /health
    def health(self) -> dict[str, object]:
        """/health, assembled from what each owner reports about itself."""
        phase = self.lifecycle.phase
        body: dict[str, object] = {"status": phase.value, "ready": phase.serves_requests,
                                   "detail": self.lifecycle.detail, "model": self.cfg.model.name,
                                   "uptime_s": round(time.monotonic() - self._t0, 3)}
        body.update(self.gate.health())
        body.update(self.admission.health())
        body.update(self.supervisor.health())
        body.update(self.watchdog.health())
        return body

    # ---------------------------------------------------------------- shutdown
    def _enter_draining(self, detail: str) -> None:
        if self.lifecycle.can(Phase.DRAINING) and self.lifecycle.phase != Phase.DRAINING:
            self.lifecycle.to(Phase.DRAINING, detail)

    async def _shutdown(self) -> None:
        """Stop accepting, drain (a stop request only), then every owner in reverse order of
        start: the engine, the HTTP front (aiohttp's own steps, our socket file), the watchdog."""
        h = self._outcome()
        finish_accepted = self.frontend.handover and self.lifecycle.phase == Phase.READY
        await self.frontend.stop_accepting()
        self._enter_draining(f"finishing {self.gate.in_flight} request(s)")
        if h.drain:
            await self.gate.drain(self.cfg.server.drain_timeout_s, finish_accepted=finish_accepted)
        while self._started:
            await self._started.pop().stop()
        if self.lifecycle.can(Phase.STOPPED):
            self.lifecycle.to(Phase.STOPPED, f"exit {int(h.exit_code)}")
        eventlog.event(Event.STOPPED, exit_code=int(h.exit_code), uptime_s=round(time.monotonic() - self._t0, 3))
