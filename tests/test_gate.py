"""The gate and admission's ticket: pure state machines, driven with asyncio (the real
daemon runs them in test_api.py, test_cost_control.py and test_lifecycle_daemon.py)."""
import asyncio

import pytest

from qwenbox.admission import Admission, Rejected
from qwenbox.config import AdmissionConfig, SessionsConfig
from qwenbox.gate import Gate, NotServing
from qwenbox.lifecycle import Lifecycle, Phase
from qwenbox.metrics import Metrics
from prometheus_client import CollectorRegistry


class AbortRecorder:
    def __init__(self):
        self.aborted = []

    async def abort(self, rid):
        self.aborted.append(rid)


def ready_gate() -> Gate:
    lc = Lifecycle()
    for p in (Phase.LOADING, Phase.WARMING, Phase.READY):
        lc.to(p)
    gate = Gate(lc)
    gate.attach(AbortRecorder(), None)
    return gate


def test_refusal_follows_the_phase():
    lc = Lifecycle()
    gate = Gate(lc)
    assert gate.refusal()[1] == "model_loading"
    with pytest.raises(NotServing):
        asyncio.run(gate.serving_engine())
    for p in (Phase.LOADING, Phase.WARMING, Phase.READY):
        lc.to(p)
    assert gate.refusal() is None
    lc.to(Phase.DRAINING)
    assert gate.refusal()[1] == "shutting_down"
    gate.finish_accepted = True               # socket activation: accepted connections are served
    assert gate.refusal() is None


def test_wait_idle_and_drain_abort():
    async def main():
        gate = ready_gate()
        release = asyncio.Event()

        async def request(rid):
            async with gate.track():
                with gate.running(rid):
                    await release.wait()
                    gate.raise_if_aborted(rid)

        tasks = [asyncio.create_task(request(f"r{i}")) for i in range(3)]
        while gate.in_flight < 3:
            await asyncio.sleep(0)
        assert not await gate.wait_idle(0.01)
        assert await gate.abort_all("drain timeout") == 3
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, NotServing) and r.code == "shutting_down" for r in results)
        assert await gate.wait_idle(1) and gate.in_flight == 0 and not gate.running_ids
        assert sorted(gate.engine.aborted) == ["r0", "r1", "r2"]
    asyncio.run(main())


def test_admit_yields_a_ticket_tracks_the_session_and_counts_rejections():
    async def main():
        metrics = Metrics(CollectorRegistry())
        a = Admission(AdmissionConfig(max_in_flight=1, max_queued=0, max_queued_prompt_tokens=0),
                      SessionsConfig(keepalive_s=60, reserved_share=0.0), metrics)
        async with a.admit(10, "s1") as ticket:
            assert ticket.priority == 1 and not ticket.session_active and ticket.queued_s == 0.0
            assert metrics.registry.get_sample_value("qwenbox_requests_in_flight") == 1
            with pytest.raises(Rejected) as e:
                async with a.admit(10, None):
                    pass
            assert e.value.reason == "queue_full"
        assert a.in_flight == 0 and metrics.registry.get_sample_value(
            "qwenbox_rejections_total", {"reason": "queue_full"}) == 1
        async with a.admit(10, "s1") as again:           # the session's last turn ended just now
            assert again.session_active and again.priority == 0
        assert a.health()["active_sessions"] == 1
    asyncio.run(main())


class StubEngine:
    """Yields ``outputs``; raises EngineDead after ``die_after`` of them (None: never)."""

    def __init__(self, outputs=("a", "b"), die_after=None):
        self.outputs, self.die_after, self.dead, self.calls = list(outputs), die_after, False, 0

    async def generate(self, gen):
        from qwenbox.engine import EngineDead
        self.calls += 1
        for i, out in enumerate(self.outputs):
            if self.die_after is not None and i >= self.die_after:
                self.dead = True
                raise EngineDead("engine core died")
            yield out
        if self.die_after is not None and self.die_after >= len(self.outputs):
            self.dead = True
            raise EngineDead("engine core died")


def recovering_gate(hold_s: float) -> tuple[Gate, Lifecycle]:
    lc = Lifecycle()
    for p in (Phase.LOADING, Phase.WARMING, Phase.READY):
        lc.to(p)
    return Gate(lc, hold_s=lambda: hold_s), lc


def test_requests_are_held_while_the_engine_is_rebuilt_and_get_the_new_one():
    async def main():
        gate, lc = recovering_gate(hold_s=60)
        old, new = StubEngine(), StubEngine()
        gate.attach(old, None)
        lc.to(Phase.RECOVERING, "engine died")
        gate.detach()
        assert gate.refusal() is None            # let through the readiness gate, then held
        held = asyncio.create_task(gate.serving_engine())
        await asyncio.sleep(0)
        assert not held.done()
        gate.attach(new, None)
        await asyncio.sleep(0)
        assert not held.done()                   # attached, but not serving until ready
        lc.to(Phase.READY, "recovered")
        assert await held is new
    asyncio.run(main())


def test_a_hold_ends_in_503_after_hold_s_or_when_the_daemon_gives_up():
    async def main():
        gate, lc = recovering_gate(hold_s=0.05)
        lc.to(Phase.RECOVERING, "engine died")
        with pytest.raises(NotServing) as e:
            await gate.serving_engine()
        assert e.value.code == "engine_restarting"
        gate2, lc2 = recovering_gate(hold_s=60)
        lc2.to(Phase.RECOVERING, "engine died")
        held = asyncio.create_task(gate2.serving_engine())
        await asyncio.sleep(0)
        lc2.to(Phase.FAILED, "rebuild failed")
        with pytest.raises(NotServing) as e:
            await held
        assert e.value.code == "engine_failed"
        gate3, lc3 = recovering_gate(hold_s=0)   # holding off: refused at the readiness gate
        lc3.to(Phase.RECOVERING, "engine died")
        assert gate3.refusal()[1] == "engine_restarting"
    asyncio.run(main())


def test_a_request_whose_engine_died_before_its_first_output_is_resubmitted_once():
    from qwenbox.engine import EngineDead

    async def collect(gate, engine):
        return [d async for d in gate.generate(engine, object())]

    async def main():
        gate, lc = recovering_gate(hold_s=60)
        dead, new = StubEngine(die_after=0), StubEngine(outputs=("x", "y"))
        gate.attach(dead, None)
        task = asyncio.create_task(collect(gate, dead))
        while not dead.dead:
            await asyncio.sleep(0)
        lc.to(Phase.RECOVERING, "engine died")
        gate.detach()
        gate.attach(new, None)
        lc.to(Phase.READY, "recovered")
        assert await task == ["x", "y"] and (dead.calls, new.calls) == (1, 1)
        # after its first output a death is the client's error: nothing is sent twice
        half = StubEngine(outputs=("a", "b"), die_after=1)
        gate.attach(half, None)
        with pytest.raises(EngineDead):
            await collect(gate, half)
    asyncio.run(main())
