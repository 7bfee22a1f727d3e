"""The engine supervisor: the only holder of engines, from the first build to the last close.

Contract:
- ``EngineSupervisor(...)``; ``await start()`` is the first boot: phase ``loading`` (the
  engine is built: vLLM imported once per process, weights, compile, KV cache; every step
  gives systemd more time), ``warming`` (``warmup.run``), then the engine is attached and
  the phase is ``ready``. It raises what the build raised; a build cancelled by a stop
  never leaves an engine running (the build thread cannot be interrupted: it is let finish,
  then what it made is closed).
- ``engine`` is the engine to use now, or None while none is attached (loading, a rebuild,
  stopped). ``wait_changed(timeout)`` returns on the next attach, detach or phase change
  (the gate holds requests on it). ``ensure_awake()`` wakes a sleeping engine (idle
  standby, ``standby.py``); ``note_activity()`` tells the standby an API request ended.
- ``engine_died(why)`` (the watchdog's report, once per engine): while serving and within
  ``recovery.max_restarts`` per ``recovery.window_s``, the engine is rebuilt in-process
  (phase ``recovering``; ``event=engine_died`` ... ``event=engine_recovered``): what is
  left of it is disposed of (core processes killed and reaped, so their GPU memory is free
  before the new engine sizes its KV cache), a new one built and warmed like the first.
  Past the budget, when the rebuild fails, or when the engine was not serving, ``halt`` is
  called with ``ExitCode.ENGINE_FAILED``; past ``recovery.timeout_s`` with ``now=True``.
- ``await stop()``: a rebuild in progress is cancelled (and waited for), the standby loop
  stopped, the engine detached (from then on the watchdog judges only the event loop) and
  closed. Idempotent.
- Sizing (``sizing.py``): every build runs step (a) (the engine's scheduler limits for the
  device) and, once the engine is warm, step (b) (the admission limits from its KV cache,
  its warm-up speed and ``[sizing]``); the result goes to ``on_sized`` before the engine
  is attached, so admission never serves an engine it was not sized for. ``resize()``
  runs step (b) again on the current settings (a reload).
- ``health()``: the cold-start figures, the warm-up, the rebuilds so far, the sizing, the
  standby's and the engine's own parts. Every figure and metric about engines is written here.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import psutil

from . import eventlog, sizing, warmup
from .config import Config, ConfigError
from .engine_protocol import EngineOpener, FigureValue, ServingEngine
from .eventlog import Event
from .exitcode import ExitCode, Halt
from .lifecycle import Lifecycle, Phase
from .metrics import Metrics
from .standby import Standby
from .systemd import Notifier

log = logging.getLogger("qwenbox.supervisor")

_CLOSE_TIMEOUT_S = 30.0
_REAP_TIMEOUT_S = 10.0

Figures = dict[str, FigureValue]
# what sizing's step (b) reads of a built engine: its limits, what it reports, its warm-up speed
SizingBasis = tuple[sizing.EngineLimits, sizing.EngineFacts, sizing.Throughput | None]
_STATUS_PHASES = ("import_s", "engine_s", "warmup_s")    # the phases READY=1's STATUS names


async def open_vllm_engine(cfg: Config, on_step: Callable[[str], None]) -> ServingEngine:
    """The production opener: vLLM's AsyncLLM in this process (``engine.Engine``)."""
    from .engine import Engine
    return await Engine.open(cfg, on_step=on_step)


def failure_halt(why: str, exc: BaseException | None) -> Halt:
    """An engine that could not be built or rebuilt: exit 1 (systemd restarts us), or exit 78
    when the engine build refused a setting (restarting cannot help)."""
    code = ExitCode.CONFIG if isinstance(exc, ConfigError) else ExitCode.ENGINE_FAILED
    return Halt(f"{why}: {type(exc).__name__}: {exc}" if exc is not None else why, code)


async def dispose(dead: ServingEngine) -> None:
    """What is left of an engine that is done with (dead, or a tuning trial): its core
    processes killed and reaped, so their GPU memory is free for the next one, its client
    side closed."""
    procs = dead.core_processes()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    await asyncio.to_thread(psutil.wait_procs, procs, _REAP_TIMEOUT_S)
    await close(dead)


async def close(engine: ServingEngine) -> None:
    """Shut ``engine`` down, within _CLOSE_TIMEOUT_S; a failure is logged, never raised."""
    try:
        await asyncio.wait_for(engine.close(), timeout=_CLOSE_TIMEOUT_S)
    except Exception as e:
        log.warning("engine shutdown: %r", e)


class EngineSupervisor:
    def __init__(self, settings: Callable[[], Config], lifecycle: Lifecycle, metrics: Metrics,
                 notifier: Notifier, busy: Callable[[], int], halt: Callable[[Halt], None],
                 on_sized: Callable[[sizing.Sizing], None] = lambda s: None,
                 open_engine: EngineOpener = open_vllm_engine) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.notifier = notifier
        self.halt = halt
        self.busy = busy
        self.on_sized = on_sized
        self.open_engine = open_engine
        self.standby = Standby(lambda: settings().standby, lifecycle, engine=lambda: self._engine, busy=busy,
                               rewarm=self._rewarm, on_sleep=lambda s: metrics.sleeps.inc(), on_wake=self._on_wake)
        self._engine: ServingEngine | None = None
        self._changed = asyncio.Event()
        self._t0 = time.monotonic()
        self.cold_start: Figures = {}
        self.warmup: warmup.WarmupFigures | None = None
        self.recovery: dict[str, object] = {}        # the rebuilds so far, the last one's figures
        self._rebuilds: list[float] = []              # monotonic start times of the rebuilds in the window
        self._rebuilding: asyncio.Task[None] | None = None
        self._standby_loop: asyncio.Task[None] | None = None
        self._stopped = False
        self.sizing: sizing.Sizing | None = None
        self._basis: SizingBasis | None = None
        lifecycle.observe(lambda old, new, detail: self._notify())

    # ------------------------------------------------------------ what others ask
    @property
    def engine(self) -> ServingEngine | None:
        return self._engine

    async def wait_changed(self, timeout: float) -> bool:
        """True on the next attach, detach or phase change; False when ``timeout`` passed first."""
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), max(0.0, timeout))
            return True
        except TimeoutError:
            return False

    async def ensure_awake(self) -> None:
        await self.standby.ensure_awake()

    def note_activity(self) -> None:
        self.standby.touch()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _attach(self, engine: ServingEngine | None) -> None:
        self._engine = engine
        self._notify()

    # ------------------------------------------------------------ first boot
    async def start(self) -> None:
        cfg = self.settings()
        self.lifecycle.to(Phase.LOADING, "importing vLLM")
        engine, report, basis = await self._build(self._start_step,
                                                  lambda: self.lifecycle.to(Phase.WARMING, "warm-up"))
        self.warmup = report.as_dict()
        self.cold_start = {**self._boot_figures(engine, report), "total_s": round(time.monotonic() - self._t0, 3)}
        self.metrics.set_cold_start(self.cold_start)
        eventlog.event(Event.COLD_START, model=cfg.model.name, **self.cold_start, warmup_steps=len(report.steps))
        self._serve(engine, basis, self._ready_status())

    def _start_step(self, detail: str) -> None:
        """A start-up step begins: give systemd more time, tell humans (STATUS)."""
        self.notifier.extend_timeout(self.settings().server.start_step_timeout_s)
        self.lifecycle.note(detail)

    async def _build(self, step: Callable[[str], None], warming: Callable[[], None]
                     ) -> tuple[ServingEngine, warmup.WarmupReport, SizingBasis]:
        """Open an engine with sizing's step (a), warm it, read what step (b) needs of it.
        A failure or a cancellation never leaves it running."""
        cfg = self.settings()
        limits = sizing.engine_limits(cfg, await asyncio.to_thread(sizing.probe_device))
        opening = asyncio.ensure_future(self.open_engine(sizing.apply_engine(cfg, limits), step))
        try:
            engine = await asyncio.shield(opening)
        except asyncio.CancelledError:      # the build thread cannot be interrupted:
            engine = await opening          # let it finish, then close what it made
            await close(engine)
            raise
        eventlog.event(Event.ENGINE_LOADED, vllm=engine.version, device=engine.device,
                       core_pids=engine.core_pids(), **engine.figures())
        try:
            warming()
            report = await warmup.run(engine, cfg, on_step=lambda i, n, name: step(f"warming {i}/{n}: {name}"))
            basis = (limits, sizing.EngineFacts.from_engine(engine, limits),
                     sizing.throughput_from_warmup(report, cfg.warmup.decode_steps))
        except BaseException:
            await dispose(engine)
            raise
        return engine, report, basis

    @staticmethod
    def _boot_figures(engine: ServingEngine, report: warmup.WarmupReport) -> Figures:
        figures = engine.figures()
        figures["warmup_s"] = round(report.total_s, 3)
        if report.steps:
            figures["first_token_s"] = round(report.steps[0].ttft_s, 3)
        return figures

    def _serve(self, engine: ServingEngine, basis: SizingBasis, status: str) -> None:
        """Size admission for ``engine`` (step b), attach it and serve from it: phase ready,
        the standby loop."""
        self._basis = basis
        self.resize()
        self._attach(engine)
        self.lifecycle.to(Phase.READY, status)
        if self._standby_loop is None or self._standby_loop.done():
            self._standby_loop = asyncio.create_task(self.standby.run(), name="qwenbox-standby")

    def resize(self) -> None:
        """Sizing's step (b) on the current settings for the engine last built; its result to
        ``on_sized``, the log and /health. Nothing before the first engine is built."""
        if self._basis is None:
            return
        limits, facts, throughput = self._basis
        self.sizing = sizing.size(self.settings(), limits, facts, throughput)
        self.on_sized(self.sizing)
        eventlog.event(Event.SIZING, **self.sizing.as_dict())
        for line in self.sizing.lines():
            log.info("sizing: %s", line)

    def _ready_status(self) -> str:
        p = self.cold_start
        parts = ", ".join(f"{k[:-2]} {v:.1f}s" for k in _STATUS_PHASES if isinstance(v := p.get(k), (int, float)))
        return f"serving {self.settings().model.name}; cold start {p.get('total_s', 0):.1f}s ({parts})"

    # ------------------------------------------------------------ death and rebuild
    def engine_died(self, why: str) -> None:
        rc = self.settings().recovery
        now = time.monotonic()
        self._rebuilds = [t for t in self._rebuilds if now - t < rc.window_s]
        if self._stopped or (self._rebuilding is not None and not self._rebuilding.done()):
            return
        if not self.lifecycle.phase.serves_requests:
            self.halt(Halt(f"engine died: {why}", ExitCode.ENGINE_FAILED))
        elif len(self._rebuilds) >= rc.max_restarts:
            self.metrics.engine_restarts.labels("over_budget").inc()
            self.halt(Halt(f"engine died: {why}; {len(self._rebuilds)} rebuild(s) in the last {rc.window_s:g}s "
                           f"already (recovery.max_restarts = {rc.max_restarts}): exiting for a fresh start",
                           ExitCode.ENGINE_FAILED))
        else:
            self._rebuilds.append(now)
            self._rebuilding = asyncio.create_task(self._rebuild(why, now), name="qwenbox-rebuild")

    async def _rebuild(self, why: str, t0: float) -> None:
        rc = self.settings().recovery
        n = len(self._rebuilds)
        self.lifecycle.to(Phase.RECOVERING, f"engine died ({why}); rebuilding it ({n} of {rc.max_restarts} "
                                            f"allowed in {rc.window_s:g}s)")
        eventlog.event(Event.ENGINE_DIED, logging.ERROR, reason=why, rebuild=n, max_restarts=rc.max_restarts,
                       window_s=rc.window_s, in_flight=self.busy())
        rebuilds = self.recovery.get("rebuilds", 0)
        self.recovery.update(rebuilds=(rebuilds if isinstance(rebuilds, int) else 0) + 1, last_reason=why,
                             in_window=n, max_restarts=rc.max_restarts, window_s=rc.window_s)
        dead = self._engine
        self._attach(None)
        # Not asyncio.timeout: cancelling the build waits for its thread, which is what hangs.
        build = asyncio.ensure_future(self._replace(dead))
        try:
            done, _ = await asyncio.wait([build], timeout=rc.timeout_s)
        except asyncio.CancelledError:      # stopped: the build finishes, then closes what it made
            build.cancel()
            await asyncio.wait([build])
            raise
        if not done:
            self.metrics.engine_restarts.labels("failed").inc()
            # the engine build runs in a thread that cannot be interrupted: leave at once
            self.halt(Halt(f"engine rebuild took longer than recovery.timeout_s ({rc.timeout_s:g}s)",
                           ExitCode.ENGINE_FAILED, now=True))
            return
        try:
            engine, report, basis = build.result()
        except Exception as e:
            self.metrics.engine_restarts.labels("failed").inc()
            log.error("engine rebuild failed", exc_info=e)
            self.halt(failure_halt("engine rebuild failed", e))
            return
        took = time.monotonic() - t0
        figures = {k: v for k, v in self._boot_figures(engine, report).items() if k.endswith("_s")}
        self.recovery.update(last_recovery_s=round(took, 3), last_phases=figures)
        self.metrics.engine_restarts.labels("recovered").inc()
        self.metrics.last_recovery.set(took)
        eventlog.event(Event.ENGINE_RECOVERED, seconds=round(took, 3), rebuild=n, **figures)
        self._serve(engine, basis, self._ready_status())

    async def _replace(self, dead: ServingEngine | None
                       ) -> tuple[ServingEngine, warmup.WarmupReport, SizingBasis]:
        if dead is not None:
            await dispose(dead)
        return await self._build(self.lifecycle.note, lambda: self.lifecycle.note("warm-up"))

    # ------------------------------------------------------------ standby
    async def _rewarm(self, engine: ServingEngine) -> None:
        await warmup.prefill_system_prompt(engine, self.settings())

    def _on_wake(self, seconds: float) -> None:
        self.metrics.wake.observe(seconds)
        self.metrics.last_wake.set(seconds)

    # ------------------------------------------------------------ stop
    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for task in (self._rebuilding, self._standby_loop):
            if task is not None and not task.done():
                task.cancel()
                # a rebuild finishes an engine build in progress and closes that engine
                await asyncio.wait([task], timeout=self.settings().recovery.timeout_s)
        engine = self._engine
        self._attach(None)
        if engine is not None:
            await close(engine)

    # ------------------------------------------------------------ /health
    def health(self) -> dict[str, object]:
        body: dict[str, object] = {"cold_start": self.cold_start, "warmup": self.warmup or {}}
        if self.sizing is not None:
            body["sizing"] = self.sizing.as_dict()
        if self.recovery:
            body["recovery"] = self.recovery
        body.update(self.standby.health())
        if self._engine is not None:
            body.update(self._engine.health())
        return body
