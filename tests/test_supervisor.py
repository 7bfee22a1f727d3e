"""The engine supervisor as a state machine: boot, death, rebuild, budget, stop (no vLLM).

It builds the shared test double (``fake_engine.py``) through its ``open_engine`` seam and
runs the real warm-up on it. The same paths run on the real engine in test_watchdog.py
(a killed engine core rebuilt in-process; past the budget, exit 1) and test_notify.py.
"""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
from fake_engine import FakeEngine, FakeOpener
from prometheus_client import CollectorRegistry

from qwenbox.config import Config, ConfigError, RecoveryConfig
from qwenbox.exitcode import ExitCode
from qwenbox.lifecycle import Lifecycle, Phase
from qwenbox.metrics import Metrics
from qwenbox.supervisor import EngineSupervisor, failure_halt
from qwenbox.systemd import Notifier


class Rig:
    """A supervisor over ``opener`` with the phases it went through and the halts it asked for."""

    def __init__(self, opener: FakeOpener, **recovery: float) -> None:
        self.cfg = dataclasses.replace(Config(), recovery=RecoveryConfig(**recovery))
        self.lifecycle = Lifecycle()
        self.phases: list[Phase] = []
        self.lifecycle.observe(lambda old, new, detail: old != new and self.phases.append(new))
        self.metrics = Metrics(CollectorRegistry())
        self.halts: list = []
        self.opener = opener
        self.sized: list = []              # (the phase when it came, the Sizing)
        self.sup = EngineSupervisor(lambda: self.cfg, self.lifecycle, self.metrics, Notifier(None, None),
                                    busy=lambda: 0, halt=self.halts.append, open_engine=opener,
                                    on_sized=lambda s: self.sized.append((self.lifecycle.phase, s)))

    def restarts(self, outcome: str) -> float | None:
        return self.metrics.registry.get_sample_value("qwenbox_engine_restarts_total", {"outcome": outcome})

    async def until(self, cond) -> None:
        async with asyncio.timeout(30):
            while not cond():
                await asyncio.sleep(0.001)


def run(coro):
    return asyncio.run(coro)


def test_first_boot_goes_loading_warming_ready_with_its_figures():
    async def main():
        engine = FakeEngine()
        rig = Rig(FakeOpener(engine))
        assert rig.sup.engine is None
        await rig.sup.start()
        assert rig.phases == [Phase.LOADING, Phase.WARMING, Phase.READY]
        assert rig.sup.engine is engine
        figures = rig.sup.health()["cold_start"]
        assert {"import_s", "engine_s", "warmup_s", "first_token_s", "total_s"} <= figures.keys()
        assert engine.generated >= len(rig.cfg.warmup_buckets), "the warm-up ran on the engine"
        await rig.sup.stop()
        assert engine.closed and rig.sup.engine is None
        await rig.sup.stop()                      # idempotent
        assert engine.calls.count(("close", None)) == 1
    run(main())


def test_a_death_is_rebuilt_within_the_budget_and_past_it_halts():
    async def main():
        first, second = FakeEngine(), FakeEngine()
        rig = Rig(FakeOpener(first, second), max_restarts=1, window_s=600.0)
        await rig.sup.start()
        rig.sup.engine_died("engine core process 1 has exited")
        await rig.until(lambda: rig.sup.engine is second and rig.lifecycle.phase == Phase.READY)
        assert first.closed and rig.halts == [] and rig.restarts("recovered") == 1
        assert rig.phases[-2:] == [Phase.RECOVERING, Phase.READY]
        recovery = rig.sup.health()["recovery"]
        assert recovery["rebuilds"] == 1 and recovery["last_recovery_s"] >= 0
        rig.sup.engine_died("again")               # the second within the window: over budget
        assert len(rig.halts) == 1 and rig.halts[0].exit_code == ExitCode.ENGINE_FAILED
        assert "recovery.max_restarts = 1" in rig.halts[0].reason and rig.restarts("over_budget") == 1
        await rig.sup.stop()
    run(main())


def test_a_failed_rebuild_halts_with_exit_1():
    async def main():
        rig = Rig(FakeOpener(fail=RuntimeError("CUDA error: out of memory"), fail_on=2))
        await rig.sup.start()
        rig.sup.engine_died("engine died")
        await rig.until(lambda: rig.halts)
        (h,) = rig.halts
        assert h.exit_code == ExitCode.ENGINE_FAILED and not h.now and "out of memory" in h.reason
        assert rig.restarts("failed") == 1 and rig.sup.engine is None
        await rig.sup.stop()
    run(main())


def test_a_death_while_not_serving_halts_without_a_rebuild():
    async def main():
        rig = Rig(FakeOpener())
        await rig.sup.start()
        rig.lifecycle.to(Phase.DRAINING)
        rig.sup.engine_died("engine died")
        assert len(rig.halts) == 1 and len(rig.opener.built) == 1
        await rig.sup.stop()
    run(main())


def test_a_rebuild_past_its_timeout_halts_at_once():
    async def main():
        rig = Rig(FakeOpener(), timeout_s=1.0)
        await rig.sup.start()
        rig.opener.release = asyncio.Event()       # the new build hangs (a stuck CUDA init)
        rig.sup.engine_died("engine died")
        await rig.until(lambda: rig.halts)
        assert rig.halts[0].now and rig.halts[0].exit_code == ExitCode.ENGINE_FAILED
        assert "recovery.timeout_s" in rig.halts[0].reason
        rig.opener.release.set()
        await rig.sup.stop()
    run(main())


def test_a_stop_during_the_first_build_closes_what_the_build_made():
    async def main():
        engine = FakeEngine()
        rig = Rig(FakeOpener(engine))
        rig.opener.release = asyncio.Event()
        boot = asyncio.create_task(rig.sup.start())
        await rig.until(lambda: rig.opener.started == 1)
        boot.cancel()
        await asyncio.sleep(0)
        assert not boot.done(), "the build cannot be interrupted: it is let finish"
        rig.opener.release.set()
        with pytest.raises(asyncio.CancelledError):
            await boot
        assert engine.closed and rig.sup.engine is None and Phase.READY not in rig.phases
    run(main())


def test_a_setting_the_engine_refuses_is_a_config_halt():
    async def main():
        rig = Rig(FakeOpener(fail=ConfigError("no sleep mode here", key="engine.enable_sleep_mode"), fail_on=1))
        with pytest.raises(ConfigError) as e:
            await rig.sup.start()
        assert failure_halt("engine failed to start", e.value).exit_code == ExitCode.CONFIG
        assert failure_halt("engine failed to start", RuntimeError("x")).exit_code == ExitCode.ENGINE_FAILED
    run(main())


def test_every_engine_built_is_sized_before_it_serves():
    """Admission must never serve an engine it was not sized for: step (b) of sizing reaches
    ``on_sized`` before the engine is attached and the phase is ready, on the first boot and
    after a rebuild (whose engine may report another KV cache)."""
    async def main():
        small, big = FakeEngine(kv_cache_tokens=64 * 640), FakeEngine(kv_cache_tokens=1024 * 640)
        rig = Rig(FakeOpener(small, big))
        await rig.sup.start()
        ((phase, s),) = rig.sized
        assert phase == Phase.WARMING and s.facts.kv_cache_tokens == 64 * 640
        assert 1 <= s.max_in_flight.value <= 64 and s.max_in_flight.auto
        assert rig.sup.health()["sizing"]["kv_cache_tokens"] == 64 * 640
        rig.sup.engine_died("engine died")
        await rig.until(lambda: rig.sup.engine is big and rig.lifecycle.phase == Phase.READY)
        phase, s2 = rig.sized[-1]
        assert phase == Phase.RECOVERING and s2.max_in_flight.value > s.max_in_flight.value
        rig.sup.resize()                           # a reload: step (b) again, same engine
        assert rig.sized[-1][1].max_in_flight == s2.max_in_flight
        await rig.sup.stop()
    run(main())
