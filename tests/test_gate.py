"""The gate and admission's ticket: pure state machines, driven with asyncio (the real
daemon runs them in test_api.py, test_cost_control.py and test_lifecycle_daemon.py).
The gate asks a real ``EngineSupervisor`` for its engine; the supervisor builds the shared
test double (``fake_engine.py``)."""
import asyncio

import pytest
from fake_engine import FakeEngine, FakeOpener
from prometheus_client import CollectorRegistry

from qwenbox.admission import Admission, Rejected
from qwenbox.config import AdmissionConfig, Config, SessionsConfig
from qwenbox.gate import Gate, NotServing
from qwenbox.lifecycle import Lifecycle, Phase
from qwenbox.metrics import Metrics
from qwenbox.supervisor import EngineSupervisor
from qwenbox.systemd import Notifier


def supervised(opener: FakeOpener, hold_s: float = 0.0) -> tuple[Gate, EngineSupervisor, Lifecycle, list]:
    """A gate over a supervisor that builds ``opener``'s engines; ``halts``: what it gave up on."""
    lc, halts = Lifecycle(), []
    sup = EngineSupervisor(Config, lc, Metrics(CollectorRegistry()), Notifier(None, None), busy=lambda: 0,
                           halt=halts.append, open_engine=opener)
    return Gate(lc, sup, hold_s=lambda: hold_s), sup, lc, halts


async def until(cond) -> None:
    """Wait (with a deadline) for a state the supervisor's tasks reach."""
    async with asyncio.timeout(30):
        while not cond():
            await asyncio.sleep(0.001)


async def wait_phase(lc: Lifecycle, phase: Phase) -> None:
    await until(lambda: lc.phase == phase)


def test_refusal_follows_the_phase():
    async def main():
        gate, sup, lc, _ = supervised(FakeOpener())
        assert gate.refusal()[1] == "model_loading"
        with pytest.raises(NotServing):
            await gate.serving_engine()
        await sup.start()
        assert lc.phase == Phase.READY and gate.refusal() is None
        assert await gate.serving_engine() is sup.engine is not None
        lc.to(Phase.DRAINING)
        assert gate.refusal()[1] == "shutting_down"
        gate.finish_accepted = True               # socket activation: accepted connections are served
        assert gate.refusal() is None
    asyncio.run(main())


def test_wait_idle_and_drain_abort():
    async def main():
        gate, sup, _, _ = supervised(FakeOpener())
        await sup.start()
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
        assert sorted(rid for what, rid in sup.engine.calls if what == "abort") == ["r0", "r1", "r2"]
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


def test_requests_are_held_while_the_engine_is_rebuilt_and_get_the_new_one():
    async def main():
        old, new = FakeEngine(), FakeEngine()
        opener = FakeOpener(old, new)
        gate, sup, lc, halts = supervised(opener, hold_s=60)
        await sup.start()
        opener.release = asyncio.Event()         # the rebuild waits until the test lets it go
        sup.engine_died("engine core process 1 has exited")
        await until(lambda: old.closed)         # the dead engine is disposed of first
        assert lc.phase == Phase.RECOVERING and sup.engine is None
        assert gate.refusal() is None            # let through the readiness gate, then held
        held = asyncio.create_task(gate.serving_engine())
        await asyncio.sleep(0)
        assert not held.done()
        opener.release.set()
        assert await held is new and lc.phase == Phase.READY and halts == []
        assert sup.health()["recovery"]["rebuilds"] == 1
    asyncio.run(main())


def test_a_hold_ends_in_503_after_hold_s_or_when_the_daemon_gives_up():
    async def main():
        for hold_s, end in ((0.05, None), (60, Phase.FAILED)):
            opener = FakeOpener()
            gate, sup, lc, _ = supervised(opener, hold_s=hold_s)
            await sup.start()
            opener.release = asyncio.Event()     # the rebuild never finishes here
            sup.engine_died("engine died")
            await wait_phase(lc, Phase.RECOVERING)
            held = asyncio.create_task(gate.serving_engine())
            await asyncio.sleep(0)
            if end is not None:
                lc.to(end, "rebuild failed")
            with pytest.raises(NotServing) as e:
                await held
            assert e.value.code == ("engine_restarting" if end is None else "engine_failed")
            opener.release.set()                 # a stop lets a build in progress finish, then closes it
            await sup.stop()
            assert all(e.closed for e in opener.built)
        gate3, sup3, lc3, _ = supervised(FakeOpener(), hold_s=0)   # holding off: refused at the gate
        await sup3.start()
        lc3.to(Phase.RECOVERING, "engine died")
        assert gate3.refusal()[1] == "engine_restarting"
    asyncio.run(main())


def test_a_request_whose_engine_died_before_its_first_output_is_resubmitted_once():
    from qwenbox.engine import EngineDead
    from qwenbox.generation import GenerationRequest, Sampling

    def request() -> GenerationRequest:
        return GenerationRequest(request_id="r1", prompt_token_ids=[1, 2], sampling=Sampling(max_tokens=2))

    async def collect(gate, engine):
        return [d[0].text async for d in gate.generate(engine, request())]

    async def main():
        dying, new = FakeEngine(), FakeEngine(outputs=("x", "y"))
        gate, sup, _, _ = supervised(FakeOpener(dying, new), hold_s=60)
        await sup.start()
        dying.die_after, dying.calls = 0, []     # warmed up; the next request kills it
        task = asyncio.create_task(collect(gate, dying))
        while not dying.dead:
            await asyncio.sleep(0)
        sup.engine_died("the engine reported a fatal error")   # what the watchdog reports
        assert await task == ["x", "y"] and dying.generated == 1 and new.calls[-1] == ("generate", "r1")
        # after its first output a death is the client's error: nothing is sent twice
        new.die_after = 1
        with pytest.raises(EngineDead):
            await collect(gate, new)
    asyncio.run(main())
