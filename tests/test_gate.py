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
        a = Admission(AdmissionConfig(max_in_flight=1, max_queued=0), SessionsConfig(keepalive_s=60,
                                                                                      reserved_share=0.0), metrics)
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
