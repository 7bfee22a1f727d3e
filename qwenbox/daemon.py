"""The orchestrator: signals -> bind -> engine -> warm-up -> READY -> serve -> drain -> stop.

Contract: ``Daemon(cfg).run()`` (a coroutine) returns the process exit code:
0 after a clean stop, 1 when the engine failed to start or died (systemd restarts us).
This is the only module that handles signals: SIGTERM/SIGINT start a graceful drain,
a second one forces a fast exit; SIGHUP reloads the non-engine settings.
The listener is bound before the engine loads, so clients get 503 + Retry-After (not
"connection refused") while the model loads. With systemd's socket (socket activation) new
connections rather wait in the socket's queue, up to ``server.queue_while_loading_s`` after
start, and the daemon stops accepting as soon as it drains: a restart costs clients
latency, not errors. The watchdog (``watchdog.py``) pings systemd only while healthy and
is the one place that notices an engine death (the daemon then fails and exits 1).

The daemon wires the owners together and owns none of their state: ``Gate`` (refusal,
in-flight, drain-abort), ``Admission`` (slots, sessions), ``Listeners`` (sockets,
connection cap), ``Watchdog``, ``Standby``, ``Metrics``; /health is their parts assembled.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from aiohttp import web

from . import eventlog, warmup
from .admission import Admission
from .api.app import make_app
from .config import Config, ConfigError, load as load_config, reloaded
from .exitcode import ExitCode
from .gate import Gate
from .lifecycle import Lifecycle, Phase
from .listeners import Listeners, limit_accept_errors, limit_server_errors, raise_fd_limit
from .metrics import Metrics
from .standby import Standby
from .systemd import Notifier
from .watchdog import Watchdog

log = logging.getLogger("qwenbox.daemon")

_ACCEPTED_GRACE_S = 0.5   # socket activation: time for just-accepted connections to send their request
_ABORTED_GRACE_S = 5.0    # after drain-abort: time for the aborted requests to answer their clients


class Daemon:
    def __init__(self, cfg: Config, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier.from_environ()
        self.lifecycle = Lifecycle()
        self.metrics = Metrics()
        self.gate = Gate(self.lifecycle)
        self.admission = Admission(cfg.admission, cfg.sessions, self.metrics)
        self.listeners = Listeners(cfg.server, cfg.socket_mode_int, cfg.server.retry_after_s)
        self.watchdog = Watchdog(self.gate, self.notifier, settings=lambda: self.cfg.watchdog,
                                 on_fatal=self._watchdog_fatal,
                                 on_engine_dead=lambda why: self._fail(f"engine died: {why}"))
        self.engine: Any = None
        self.standby: Standby | None = None
        self.cold_start: dict[str, Any] = {}
        self.warmup: dict[str, Any] = {}
        self.exit_code = ExitCode.OK
        self._stop = asyncio.Event()
        self._fatal: str | None = None
        self._signals = 0
        self._opener: asyncio.Task | None = None
        self._t0 = time.monotonic()
        self.lifecycle.observe(self._on_phase)
        self.lifecycle.observe(lambda old, new, detail: self.metrics.set_phase(new))
        self.metrics.set_phase(self.lifecycle.phase)

    # ---------------------------------------------------------------- observers
    def _on_phase(self, old: Phase, new: Phase, detail: str) -> None:
        status = f"{new.value}: {detail}" if detail else new.value
        if old != new:
            eventlog.event("phase", phase=new.value, previous=old.value, detail=detail,
                           since_start_s=round(time.monotonic() - self._t0, 3))
        if new == Phase.READY and old != Phase.READY:
            self.notifier.ready(status)
        elif new == Phase.DRAINING and old != Phase.DRAINING:
            self.notifier.stopping(status)
        else:
            self.notifier.status(status)

    def _step(self, detail: str) -> None:
        """A start-up step begins: tell humans (STATUS) and give systemd more time."""
        self.notifier.extend_timeout(self.cfg.server.start_step_timeout_s)
        self.lifecycle.note(detail)

    # ---------------------------------------------------------------- signals
    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload)

    def _on_stop_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now without draining", signal.Signals(sig).name)
            self._force_exit()
        log.info("%s: draining", signal.Signals(sig).name)
        self._stop.set()

    def _force_exit(self) -> None:
        if self.engine is not None:
            for pid in self.engine.core_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.listeners.remove_own_socket()
        logging.shutdown()
        os._exit(ExitCode.ENGINE_FAILED if self._fatal else ExitCode.INTERRUPTED)

    def _watchdog_fatal(self, why: str) -> None:
        """Frozen or stalled for exit_after_s and no systemd watchdog killed us: exit 1 now
        (a drain would wait on the hung engine)."""
        self._fatal = f"watchdog: {why}"
        eventlog.event("engine_failed", level=logging.ERROR, reason=self._fatal)
        self._force_exit()

    def _reload(self) -> None:
        """SIGHUP: re-read the config file and apply what needs no engine restart
        (config.RELOADABLE). A bad file is logged and the running config stays."""
        announce = self.lifecycle.phase.serves_requests   # never READY=1 before warm-up is done
        if announce:
            self.notifier.reloading(f"reloading {self.cfg.source}")
        old = self.cfg
        try:
            cfg, applied, ignored = reloaded(old, load_config(old.source, dict(old.overrides)))
            if cfg.logging != old.logging:
                try:
                    eventlog.setup(cfg.logging.level, cfg.logging.format, cfg.logging.file)
                except OSError as e:
                    eventlog.setup(old.logging.level, old.logging.format, old.logging.file)
                    raise ConfigError(f"cannot open the log file: {e}", file=old.source, key="logging.file")
        except ConfigError as e:
            eventlog.event("reload", level=logging.ERROR, ok=False, error=str(e))
            note = f"reload failed, running config kept: {e}"
        else:
            self.cfg = cfg
            self.admission.configure(cfg.admission, cfg.sessions)
            eventlog.event("reload", ok=True, applied=applied, needs_restart=ignored)
            note = f"reloaded {len(applied)} setting(s)" + (
                f"; needs a restart: {', '.join(ignored)}" if ignored else "")
        if announce:
            self.notifier.ready(f"{self.lifecycle.phase.value}: {self.lifecycle.detail}; {note}")

    # ---------------------------------------------------------------- /health
    def health(self) -> dict[str, Any]:
        """/health, assembled from what each owner reports about itself."""
        phase = self.lifecycle.phase
        body: dict[str, Any] = {"status": phase.value, "ready": phase.serves_requests,
                                "detail": self.lifecycle.detail, "model": self.cfg.model.name,
                                "uptime_s": round(time.monotonic() - self._t0, 3)}
        body.update(self.gate.health())
        body.update(self.admission.health())
        body.update(cold_start=self.cold_start, warmup=self.warmup)
        if self.standby is not None:
            body.update(self.standby.health())
        if self.engine is not None:
            body.update(self.engine.health())
        if self.watchdog.started:
            body.update(self.watchdog.health())
        return body

    # ---------------------------------------------------------------- start
    async def _start_engine(self) -> None:
        from .engine import Engine

        self.lifecycle.to(Phase.LOADING, "importing vLLM")
        self.engine = await Engine.open(self.cfg, on_step=self._step)
        self.cold_start = self.engine.cold_start.as_dict()
        eventlog.event("engine_loaded", vllm=self.engine.version, device=self.engine.device,
                       core_pids=self.engine.core_pids(), **self.cold_start)

        self.lifecycle.to(Phase.WARMING, "warm-up")
        report = await warmup.run(self.engine, self.cfg,
                                  on_step=lambda i, n, name: self._step(f"warming {i}/{n}: {name}"))
        self.warmup = report.as_dict()
        self.engine.cold_start.phases["warmup_s"] = report.total_s
        first = next((s for s in report.steps), None)
        if first is not None:
            self.engine.cold_start.phases["first_token_s"] = first.ttft_s
        self.engine.cold_start.phases["total_s"] = time.monotonic() - self._t0
        self.cold_start = self.engine.cold_start.as_dict()
        self.metrics.set_cold_start(self.cold_start)
        eventlog.event("cold_start", model=self.cfg.model.name, **self.cold_start,
                       warmup_steps=len(report.steps))
        self.standby = Standby(
            self.cfg.standby, self.lifecycle, self.engine, busy=lambda: self.gate.in_flight,
            rewarm=lambda: warmup.prefill_system_prompt(self.engine, self.cfg),
            on_sleep=lambda s: self.metrics.sleeps.inc(), on_wake=self._on_wake)
        self.gate.attach(self.engine, self.standby)

    def _on_wake(self, seconds: float) -> None:
        self.metrics.wake.observe(seconds)
        self.metrics.last_wake.set(seconds)

    def _ready_status(self) -> str:
        p = self.engine.cold_start.phases
        parts = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in p.items() if k not in ("total_s", "first_token_s"))
        return f"serving {self.cfg.model.name}; cold start {p.get('total_s', 0):.1f}s ({parts})"

    # ---------------------------------------------------------------- run
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        limit_accept_errors(loop)
        limit_server_errors()
        fd_limit = raise_fd_limit()
        self.listeners.bind()
        app = make_app(lambda: self.cfg, self.gate, self.admission, self.metrics, self.health)
        app.on_response_prepare.append(self._close_after_response)
        server = self.cfg.server
        runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, access_log=None,
                               shutdown_timeout=server.drain_timeout_s + _ABORTED_GRACE_S,
                               keepalive_timeout=server.idle_timeout_s)
        await runner.setup()
        self.listeners.sites(runner, fd_limit)
        hold = server.queue_while_loading_s if self.listeners.handover else 0.0
        self._opener = asyncio.create_task(self.listeners.start(after=hold))
        if not hold:
            await self._opener
        eventlog.event("listening", sockets=self.listeners.describe(), pid=os.getpid(),
                       socket_activation=self.listeners.handover, queue_while_loading_s=hold,
                       max_connections=self.listeners.cap, open_files_limit=fd_limit)

        startup = asyncio.create_task(self._start_engine())
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({startup, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if startup.done() and startup.exception() is None and not self._stop.is_set():
                await self.listeners.start()      # queued connections are served from READY=1 on
                self.lifecycle.to(Phase.READY, self._ready_status())
                self.watchdog.start()
                standby = asyncio.create_task(self.standby.run())
                await stop_wait
                standby.cancel()
            elif startup.done() and startup.exception() is not None:
                exc = startup.exception()
                self._fail("engine failed to start", exc)
                if isinstance(exc, ConfigError):   # e.g. a setting this engine build refuses
                    self.exit_code = ExitCode.CONFIG
            elif not startup.done():  # stopped while loading: let the load thread finish, then close cleanly
                self.lifecycle.to(Phase.DRAINING, "stop requested during start-up")
                try:
                    await startup
                except Exception as e:
                    log.info("start-up ended during stop: %r", e)
        finally:
            await self._shutdown(runner)
        return int(self.exit_code)

    def _fail(self, why: str, exc: BaseException | None = None) -> None:
        if self._fatal is not None:
            return
        self._fatal = why
        self.exit_code = ExitCode.ENGINE_FAILED
        eventlog.event("engine_failed", level=logging.ERROR, reason=why,
                       error=f"{type(exc).__name__}: {exc}" if exc else None)
        if exc is not None:
            log.error("%s", why, exc_info=exc)
        if self.lifecycle.can(Phase.FAILED):
            self.lifecycle.to(Phase.FAILED, why)
        self._stop.set()

    async def _close_after_response(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.listeners.closing:      # no keep-alive reuse of a connection to a draining instance
            response.force_close()

    async def _shutdown(self, runner: web.AppRunner) -> None:
        """Drain, then aiohttp's own shutdown steps (stop the sites, close idle connections,
        wait for handlers), then the engine, then what is left on disk. After an engine
        failure the engine goes first and the listeners last."""
        self.listeners.closing = True
        if self._opener is not None:
            self._opener.cancel()
        if self.listeners.handover:
            await self.listeners.stop_accepting()
        if self.lifecycle.can(Phase.DRAINING) and self.lifecycle.phase != Phase.DRAINING:
            self.gate.finish_accepted = self.listeners.handover and self.lifecycle.phase == Phase.READY
            self.lifecycle.to(Phase.DRAINING, f"finishing {self.gate.in_flight} request(s)")
        if self._fatal is None:
            await self._drain()
            await runner.cleanup()
            await self._close_engine()
        else:
            # Nothing to drain; close the dead engine first, so that /health keeps answering
            # "failed" (and requests a 503) until the moment the process exits.
            await self._close_engine()
            await runner.cleanup()
        self.watchdog.stop(final_ping=True)
        self.listeners.remove_own_socket()
        if self.lifecycle.can(Phase.STOPPED):
            self.lifecycle.to(Phase.STOPPED, "exit %d" % self.exit_code)
        eventlog.event("stopped", exit_code=int(self.exit_code), uptime_s=round(time.monotonic() - self._t0, 3))

    async def _close_engine(self) -> None:
        self.watchdog.closing()     # systemd still enforces WatchdogSec while we stop
        if self.engine is not None:
            try:
                await asyncio.wait_for(self.engine.close(), timeout=30)
            except Exception as e:
                log.warning("engine shutdown: %r", e)

    async def _drain(self) -> None:
        """In-flight requests finish up to drain_timeout_s; the rest are aborted (503)."""
        if self.gate.finish_accepted:
            # Connections accepted just before we stopped accepting may not have sent their
            # request yet: give them a moment to become in-flight requests.
            await asyncio.sleep(_ACCEPTED_GRACE_S)
        if await self.gate.wait_idle(self.cfg.server.drain_timeout_s):
            return
        n = await self.gate.abort_all("the server is shutting down; drain_timeout passed")
        log.warning("drain timeout: aborted %d request(s)", n)
        await self.gate.wait_idle(_ABORTED_GRACE_S)
