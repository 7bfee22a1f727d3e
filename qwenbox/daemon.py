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
is the one place that notices an engine death. The daemon then rebuilds the engine in
the running process (phase ``recovering``: socket, imports and state kept, requests held
in the gate, warm-up again, ``ready``), unless ``recovery.max_restarts`` rebuilds already
happened within ``recovery.window_s``: then it fails and exits 1 for systemd to restart.

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

import psutil
from aiohttp import web

from . import eventlog
from .eventlog import Event, warmup
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
        self.gate = Gate(self.lifecycle, hold_s=lambda: self.cfg.recovery.hold_requests_s)
        self.admission = Admission(cfg.admission, cfg.sessions, self.metrics)
        self.listeners = Listeners(cfg.server, cfg.socket_mode_int, cfg.server.retry_after_s)
        self.watchdog = Watchdog(self.gate, self.notifier, settings=lambda: self.cfg.watchdog,
                                 on_fatal=self._watchdog_fatal,
                                 on_engine_dead=self._on_engine_dead)
        self.engine: Any = None
        self.standby: Standby | None = None
        self.cold_start: dict[str, Any] = {}
        self.warmup: dict[str, Any] = {}
        self.recovery: dict[str, Any] = {}        # /health: the rebuilds so far, the last one's figures
        self._rebuilds: list[float] = []          # monotonic times of the rebuilds started in the window
        self._recovering: asyncio.Task | None = None
        self._standby_task: asyncio.Task | None = None
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
            eventlog.event(Event.PHASE, phase=new.value, previous=old.value, detail=detail,
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
        # every child: the engine's cores, and those of an engine still being built
        for p in psutil.Process().children(recursive=True):
            try:
                p.kill()
            except psutil.Error:
                pass
        self.listeners.remove_own_socket()
        logging.shutdown()
        os._exit(ExitCode.ENGINE_FAILED if self._fatal else ExitCode.INTERRUPTED)

    def _watchdog_fatal(self, why: str) -> None:
        """Frozen or stalled for exit_after_s and no systemd watchdog killed us: exit 1 now
        (a drain would wait on the hung engine)."""
        self._fatal = f"watchdog: {why}"
        eventlog.event(Event.ENGINE_FAILED, level=logging.ERROR, reason=self._fatal)
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
            eventlog.event(Event.RELOAD, level=logging.ERROR, ok=False, error=str(e))
            note = f"reload failed, running config kept: {e}"
        else:
            self.cfg = cfg
            self.admission.configure(cfg.admission, cfg.sessions)
            eventlog.event(Event.RELOAD, ok=True, applied=applied, needs_restart=ignored)
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
        if self.recovery:
            body["recovery"] = self.recovery
        if self.standby is not None:
            body.update(self.standby.health())
        if self.engine is not None:
            body.update(self.engine.health())
        if self.watchdog.started:
            body.update(self.watchdog.health())
        return body

    # ---------------------------------------------------------------- start
    async def _start_engine(self) -> None:
        """First boot: loading -> warming; the cold-start figures."""
        self.lifecycle.to(Phase.LOADING, "importing vLLM")
        report = await self._build_engine(self._step, lambda: self.lifecycle.to(Phase.WARMING, "warm-up"))
        self.warmup = report.as_dict()
        self.engine.cold_start.phases["total_s"] = time.monotonic() - self._t0
        self.cold_start = self.engine.cold_start.as_dict()
        self.metrics.set_cold_start(self.cold_start)
        eventlog.event(Event.COLD_START, model=self.cfg.model.name, **self.cold_start,
                       warmup_steps=len(report.steps))

    async def _build_engine(self, step, warming) -> warmup.WarmupReport:
        """Open an engine (vLLM is imported once per process: a rebuild skips that), warm it,
        attach it with a new Standby. A failure or cancellation never leaves it running."""
        from .engine import Engine

        opening = asyncio.ensure_future(Engine.open(self.cfg, on_step=step))
        try:
            engine = await asyncio.shield(opening)
        except asyncio.CancelledError:       # stopped meanwhile: the build thread cannot be
            engine = await opening           # interrupted; let it finish, then close what it made
            await engine.close()
            raise
        self.engine = engine
        eventlog.event(Event.ENGINE_LOADED, vllm=engine.version, device=engine.device,
                       core_pids=engine.core_pids(), **engine.cold_start.as_dict())
        warming()
        report = await warmup.run(engine, self.cfg,
                                  on_step=lambda i, n, name: step(f"warming {i}/{n}: {name}"))
        engine.cold_start.phases["warmup_s"] = report.total_s
        first = next((s for s in report.steps), None)
        if first is not None:
            engine.cold_start.phases["first_token_s"] = first.ttft_s
        self.standby = Standby(
            self.cfg.standby, self.lifecycle, engine, busy=lambda: self.gate.in_flight,
            rewarm=lambda: warmup.prefill_system_prompt(engine, self.cfg),
            on_sleep=lambda s: self.metrics.sleeps.inc(), on_wake=self._on_wake)
        self.gate.attach(engine, self.standby)
        return report

    def _serve(self) -> None:
        """Ready from here: the phase, the standby loop."""
        self.lifecycle.to(Phase.READY, self._ready_status())
        self._standby_task = asyncio.create_task(self.standby.run())

    # ---------------------------------------------------------------- recovery
    def _on_engine_dead(self, why: str) -> None:
        """The watchdog saw the engine die. Serving: rebuild it in-process, within the budget
        of recovery.max_restarts per recovery.window_s. Otherwise: fail (exit 1)."""
        rc = self.cfg.recovery
        now = time.monotonic()
        self._rebuilds = [t for t in self._rebuilds if now - t < rc.window_s]
        if not self.lifecycle.phase.serves_requests:
            self._fail(f"engine died: {why}")
        elif len(self._rebuilds) >= rc.max_restarts:
            self.metrics.engine_restarts.labels("over_budget").inc()
            self._fail(f"engine died: {why}; {len(self._rebuilds)} rebuild(s) in the last {rc.window_s:g}s "
                       f"already (recovery.max_restarts = {rc.max_restarts}): exiting for a fresh start")
        else:
            self._rebuilds.append(now)
            self._recovering = asyncio.create_task(self._recover(why, now))

    async def _recover(self, why: str, t0: float) -> None:
        rc = self.cfg.recovery
        n = len(self._rebuilds)
        self.lifecycle.to(Phase.RECOVERING, f"engine died ({why}); rebuilding it ({n} of {rc.max_restarts} "
                                            f"allowed in {rc.window_s:g}s)")
        eventlog.event(Event.ENGINE_DIED, level=logging.ERROR, reason=why, rebuild=n, max_restarts=rc.max_restarts,
                       window_s=rc.window_s, in_flight=self.gate.in_flight)
        self.recovery.update(rebuilds=self.recovery.get("rebuilds", 0) + 1, last_reason=why,
                             in_window=n, max_restarts=rc.max_restarts, window_s=rc.window_s)
        if self._standby_task is not None:
            self._standby_task.cancel()
        dead, self.engine = self.engine, None
        self.gate.detach()
        try:
            async with asyncio.timeout(rc.timeout_s):
                await self._dispose(dead)
                await self._build_engine(self.lifecycle.note, lambda: self.lifecycle.note("warm-up"))
        except TimeoutError:
            # the engine build runs in a thread that cannot be interrupted: leave at once
            self._fatal = f"engine rebuild took longer than recovery.timeout_s ({rc.timeout_s:g}s)"
            self.metrics.engine_restarts.labels("failed").inc()
            eventlog.event(Event.ENGINE_FAILED, level=logging.ERROR, reason=self._fatal)
            self._force_exit()
        except Exception as e:
            self.metrics.engine_restarts.labels("failed").inc()
            self._fail("engine rebuild failed", e)
            return
        took = time.monotonic() - t0
        figures = {k: v for k, v in self.engine.cold_start.as_dict().items() if k.endswith("_s")}
        self.recovery.update(last_recovery_s=round(took, 3), last_phases=figures)
        self.metrics.engine_restarts.labels("recovered").inc()
        self.metrics.last_recovery.set(took)
        eventlog.event(Event.ENGINE_RECOVERED, seconds=round(took, 3), rebuild=n, **figures)
        self._serve()

    async def _dispose(self, dead: Any) -> None:
        """What is left of a dead engine: its other core processes killed (their GPU memory
        must be free before the new engine sizes its KV cache), its client side closed."""
        procs = dead.core_processes()
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        await asyncio.to_thread(psutil.wait_procs, procs, 10)
        try:
            await asyncio.wait_for(dead.close(), timeout=30)
        except Exception as e:
            log.warning("closing the dead engine: %r", e)

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
        eventlog.event(Event.LISTENING, sockets=self.listeners.describe(), pid=os.getpid(),
                       socket_activation=self.listeners.handover, queue_while_loading_s=hold,
                       max_connections=self.listeners.cap, open_files_limit=fd_limit)

        startup = asyncio.create_task(self._start_engine())
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({startup, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if startup.done() and startup.exception() is None and not self._stop.is_set():
                await self.listeners.start()      # queued connections are served from READY=1 on
                self._serve()
                self.watchdog.start()
                await stop_wait
                for task in (self._standby_task, self._recovering):
                    if task is not None:
                        task.cancel()
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
        eventlog.event(Event.ENGINE_FAILED, level=logging.ERROR, reason=why,
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
        if self._recovering is not None and not self._recovering.done():
            # cancelled above: it finishes an engine build in progress and closes that engine
            await asyncio.wait([self._recovering], timeout=self.cfg.recovery.timeout_s)
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
        eventlog.event(Event.STOPPED, exit_code=int(self.exit_code), uptime_s=round(time.monotonic() - self._t0, 3))

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
