"""The orchestrator: signals -> bind -> engine -> warm-up -> READY -> serve -> drain -> stop.

Contract: ``Daemon(cfg).run()`` (a coroutine) returns the process exit code:
0 after a clean stop, 1 when the engine failed to start or died (systemd restarts us).
This is the only module that handles signals: SIGTERM/SIGINT start a graceful drain,
a second one forces a fast exit; SIGHUP reloads the non-engine settings.
The listener is bound before the engine loads, so clients get 503 + Retry-After (not
"connection refused") while the model loads. With systemd's socket (socket activation) new
connections rather wait in the socket's queue, up to ``server.queue_while_loading_s`` after
start, and the daemon stops accepting as soon as it drains: a restart costs clients
latency, not errors. The watchdog (``watchdog.py``) pings systemd only while healthy.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from . import eventlog, warmup
from .api.app import ServiceContext, make_app
from .config import Config, ConfigError, load as load_config, reloaded
from .lifecycle import Lifecycle, Phase
from .standby import Standby
from .systemd import Notifier, take_listen_fds
from .watchdog import Watchdog

log = logging.getLogger("qwenbox.daemon")

EXIT_OK, EXIT_ENGINE_FAILED, EXIT_CONFIG = 0, 1, 78
_ACCEPTED_GRACE_S = 0.5   # socket activation: time for just-accepted connections to send their request


class ListenerError(RuntimeError):
    pass


def bind_unix(path: str, mode: int, backlog: int = 1024) -> socket.socket:
    """Bind a unix stream socket at ``path`` with ``mode``, replacing only a STALE socket.

    A live socket (another server answers) or a non-socket file at the path is an error:
    we never unlink something we do not own.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(p))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale socket %s", path)
            p.unlink(missing_ok=True)
        except OSError as e:
            raise ListenerError(f"cannot probe existing socket {path}: {e}") from e
        else:
            raise ListenerError(f"another server is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # the socket is never, even briefly, more open than `mode`
    try:
        sock.bind(str(p))
    finally:
        os.umask(old)
    os.chmod(p, mode)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def bind_tcp(hostport: str, backlog: int = 1024) -> socket.socket:
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Daemon:
    def __init__(self, cfg: Config, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier.from_environ()
        self.lifecycle = Lifecycle()
        self.ctx = ServiceContext(cfg, self.lifecycle)
        self.watchdog = Watchdog(self.ctx, self.notifier, settings=lambda: self.cfg.watchdog,
                                 on_fatal=self._watchdog_fatal)
        self.engine: Any = None
        self.standby: Standby | None = None
        self.exit_code = EXIT_OK
        self._stop = asyncio.Event()
        self._fatal: str | None = None
        self._signals = 0
        self._own_socket: str | None = None
        self._handover = False      # serving on sockets systemd passed (LISTEN_FDS)
        self._sites: list[web.SockSite] = []
        self._sites_open = False
        self._opener: asyncio.Task | None = None
        self._closing = False       # shutting down: accept nothing new, close connections after use
        self._t0 = time.monotonic()
        self.lifecycle.observe(self._on_phase)

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
        self._remove_own_socket()
        logging.shutdown()
        os._exit(EXIT_ENGINE_FAILED if self._fatal else 130)

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
            self.ctx.reconfigure(cfg)
            eventlog.event("reload", ok=True, applied=applied, needs_restart=ignored)
            note = f"reloaded {len(applied)} setting(s)" + (
                f"; needs a restart: {', '.join(ignored)}" if ignored else "")
        if announce:
            self.notifier.ready(f"{self.lifecycle.phase.value}: {self.lifecycle.detail}; {note}")

    # ---------------------------------------------------------------- listeners
    def _listeners(self) -> list[socket.socket]:
        inherited = take_listen_fds()
        if inherited:
            log.info("serving on %d socket(s) from systemd", len(inherited))
            self._handover = True
            for s in inherited:
                s.setblocking(False)
            return inherited
        socks = []
        if self.cfg.server.socket:
            socks.append(bind_unix(self.cfg.server.socket, self.cfg.socket_mode_int))
            self._own_socket = self.cfg.server.socket
        if self.cfg.server.tcp:
            socks.append(bind_tcp(self.cfg.server.tcp))
        return socks

    async def _open_sites(self, after: float = 0.0) -> None:
        """Start accepting (at once, or ``after`` seconds of queueing in systemd's socket)."""
        if after:
            await asyncio.sleep(after)
            if not self._sites_open and not self._closing:
                log.info("still starting after %.0fs: accepting connections, 503 until ready", after)
        if self._sites_open or self._closing:
            return
        self._sites_open = True
        for site in self._sites:
            await site.start()

    async def _stop_accepting(self, runner: web.AppRunner) -> None:
        """Socket activation: close our copy of the listener; systemd keeps the socket and its
        queue, and the next instance accepts what arrives from now on."""
        for site in list(runner.sites):
            await site.stop()

    async def _close_after_response(self, request: web.Request, response: web.StreamResponse) -> None:
        if self._closing:        # no keep-alive reuse of a connection to a draining instance
            response.force_close()

    def _remove_own_socket(self) -> None:
        if self._own_socket:
            try:
                os.unlink(self._own_socket)
            except OSError:
                pass
            self._own_socket = None

    # ---------------------------------------------------------------- start
    async def _start_engine(self) -> None:
        from .engine import Engine

        self.lifecycle.to(Phase.LOADING, "importing vLLM")
        self.engine = await Engine.open(self.cfg, on_step=self._step)
        self.ctx.engine = self.engine
        self.ctx.cold_start = self.engine.cold_start.as_dict()
        eventlog.event("engine_loaded", vllm=self.engine.version, device=self.engine.device,
                       core_pids=self.engine.core_pids(), **self.ctx.cold_start)

        self.lifecycle.to(Phase.WARMING, "warm-up")
        report = await warmup.run(self.engine, self.cfg,
                                  on_step=lambda i, n, name: self._step(f"warming {i}/{n}: {name}"))
        self.ctx.warmup = report.as_dict()
        self.engine.cold_start.phases["warmup_s"] = report.total_s
        first = next((s for s in report.steps), None)
        if first is not None:
            self.engine.cold_start.phases["first_token_s"] = first.ttft_s
        self.engine.cold_start.phases["total_s"] = time.monotonic() - self._t0
        self.ctx.cold_start = self.engine.cold_start.as_dict()
        self.ctx.metrics.set_cold_start(self.ctx.cold_start)
        eventlog.event("cold_start", model=self.cfg.model.name, **self.ctx.cold_start,
                       warmup_steps=len(report.steps))
        self.ctx.standby = self.standby = Standby(
            self.cfg.standby, self.lifecycle, self.engine, busy=lambda: self.ctx.in_flight,
            rewarm=lambda: warmup.prefill_system_prompt(self.engine, self.ctx.cfg),
            on_sleep=lambda s: self.ctx.metrics.sleeps.inc(), on_wake=self._on_wake)

    def _on_wake(self, seconds: float) -> None:
        self.ctx.metrics.wake.observe(seconds)
        self.ctx.metrics.last_wake.set(seconds)

    def _ready_status(self) -> str:
        p = self.engine.cold_start.phases
        parts = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in p.items() if k not in ("total_s", "first_token_s"))
        return f"serving {self.cfg.model.name}; cold start {p.get('total_s', 0):.1f}s ({parts})"

    # ---------------------------------------------------------------- run
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        socks = self._listeners()
        app = make_app(self.ctx)
        app.on_response_prepare.append(self._close_after_response)
        runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, access_log=None,
                               shutdown_timeout=self.cfg.server.drain_timeout_s + 5)
        await runner.setup()
        self._sites = [web.SockSite(runner, s, backlog=socket.SOMAXCONN,
                                    shutdown_timeout=self.cfg.server.drain_timeout_s + 5) for s in socks]
        hold = self.cfg.server.queue_while_loading_s if self._handover else 0.0
        self._opener = asyncio.create_task(self._open_sites(after=hold))
        if not hold:
            await self._opener
        eventlog.event("listening", sockets=[str(s.getsockname()) for s in socks], pid=os.getpid(),
                       socket_activation=self._handover, queue_while_loading_s=hold)

        startup = asyncio.create_task(self._start_engine())
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({startup, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if startup.done() and startup.exception() is None:
                await self._open_sites()      # queued connections are served from READY=1 on
                self.lifecycle.to(Phase.READY, self._ready_status())
                self.watchdog.start()
                tasks = [asyncio.create_task(self._monitor_engine()), asyncio.create_task(self.standby.run())]
                await stop_wait
                for t in tasks:
                    t.cancel()
            elif startup.done():
                exc = startup.exception()
                self._fail("engine failed to start", exc)
                if isinstance(exc, ConfigError):   # e.g. a setting this engine build refuses
                    self.exit_code = EXIT_CONFIG
            else:  # stopped while loading: let the load thread finish, then close cleanly
                self.lifecycle.to(Phase.DRAINING, "stop requested during start-up")
                try:
                    await startup
                except Exception as e:
                    log.info("start-up ended during stop: %r", e)
        finally:
            await self._shutdown(runner)
        return self.exit_code

    def _fail(self, why: str, exc: BaseException | None = None) -> None:
        self._fatal = why
        self.exit_code = EXIT_ENGINE_FAILED
        eventlog.event("engine_failed", level=logging.ERROR, reason=why,
                       error=f"{type(exc).__name__}: {exc}" if exc else None)
        if exc is not None:
            log.error("%s", why, exc_info=exc)
        if self.lifecycle.can(Phase.FAILED):
            self.lifecycle.to(Phase.FAILED, why)
        self._stop.set()

    async def _monitor_engine(self) -> None:
        """Engine death is fatal: stop serving and exit non-zero so systemd restarts us."""
        while True:
            await asyncio.sleep(0.5)
            gone = self.engine.exited_core_pids()
            if self.engine.dead or gone:
                self._fail(f"engine core died (pids {gone})" if gone else "engine reported a fatal error")
                return

    async def _shutdown(self, runner: web.AppRunner) -> None:
        self._closing = True
        if self._opener is not None:
            self._opener.cancel()
        if self._handover:
            await self._stop_accepting(runner)
        if self.lifecycle.can(Phase.DRAINING) and self.lifecycle.phase != Phase.DRAINING:
            self.ctx.finish_accepted = self._handover and self.lifecycle.phase == Phase.READY
            self.lifecycle.to(Phase.DRAINING, f"finishing {self.ctx.in_flight} request(s)")
        if self._fatal is None:
            await self._drain()
        await runner.cleanup()
        self.watchdog.closing()     # systemd still enforces WatchdogSec while we stop
        if self.engine is not None:
            try:
                await asyncio.wait_for(self.engine.close(), timeout=30)
            except Exception as e:
                log.warning("engine shutdown: %r", e)
        self.watchdog.stop(final_ping=True)
        self._remove_own_socket()
        if self.lifecycle.can(Phase.STOPPED):
            self.lifecycle.to(Phase.STOPPED, "exit %d" % self.exit_code)
        eventlog.event("stopped", exit_code=self.exit_code, uptime_s=round(time.monotonic() - self._t0, 3))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.cfg.server.drain_timeout_s
        if self.ctx.finish_accepted:
            await asyncio.sleep(_ACCEPTED_GRACE_S)
        while self.ctx.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.ctx.in_flight:
            n = await self.ctx.abort_all("the server is shutting down; drain_timeout passed")
            log.warning("drain timeout: aborted %d request(s)", n)
            t = time.monotonic() + 5
            while self.ctx.in_flight and time.monotonic() < t:
                await asyncio.sleep(0.05)

