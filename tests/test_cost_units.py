"""Unit tests of the pure cost-control pieces: admission, session tracking, shaping, standby.

Admission and standby are state machines: they are driven here with asyncio and, for
standby, a stand-in engine that only records calls (the real engine's sleep is covered
by test_cost_control.py where the backend can sleep)."""
import asyncio
import dataclasses
import logging
import time

import pytest
from fake_engine import FakeEngine

from qwenbox import shaping
from qwenbox.admission import Admission, Rejected, SessionTracker
from qwenbox.config import AdmissionConfig, Config, SessionsConfig, StandbyConfig
from qwenbox.lifecycle import Lifecycle, Phase
from qwenbox.standby import Standby


def run(coro):
    return asyncio.run(coro)


def adm(in_flight=4, queued=4, tokens=1000, timeout=5.0, share=0.25, keepalive=120.0):
    return Admission(AdmissionConfig(max_in_flight=in_flight, max_queued=queued,
                                     max_queued_prompt_tokens=tokens, queue_timeout_s=timeout),
                     SessionsConfig(keepalive_s=keepalive, reserved_share=share))


def test_anonymous_traffic_fills_every_slot_and_sessions_get_extra_ones():
    async def main():
        a = adm(in_flight=4, queued=4, share=0.25)   # anonymous: 4 running, 3 queued; sessions: +1 slot
        for _ in range(4):
            await a.acquire(10, False)
        assert a.in_flight == 4                      # no idle reserve when no session competes
        waiters = [asyncio.create_task(a.acquire(10, False)) for _ in range(3)]
        await asyncio.sleep(0)
        assert a.queued == 3
        with pytest.raises(Rejected) as e:
            await a.acquire(10, False)
        assert e.value.reason == "queue_full"
        # an active session still runs at once, in a slot beyond max_in_flight
        await a.acquire(10, True)
        assert a.in_flight == 5
        # a second one waits, but ahead of every anonymous waiter
        s2 = asyncio.create_task(a.acquire(10, True))
        await asyncio.sleep(0)
        assert a.queued == 4
        a.release()                                  # 4 in flight: the session waiter goes first
        await s2
        assert a.in_flight == 5 and a.queued == 3
        for _ in range(2):
            a.release()                              # 3 in flight: room below max_in_flight for one anonymous
        await asyncio.sleep(0)
        assert a.in_flight == 4 and a.queued == 2
        for _ in range(4):
            a.release()
        got = await asyncio.gather(*waiters)
        assert len(got) == 3 and a.queued == 0 and a.in_flight == 2   # two granted by those releases
        for _ in range(2):
            a.release()
        assert a.in_flight == 0 and a.queued_tokens == 0
    run(main())


def test_sessions_jump_the_queue():
    async def main():
        a = adm(in_flight=1, queued=8, share=0.0)
        await a.acquire(1, False)          # the one slot is taken
        order = []

        async def go(tag, active):
            sl = await a.acquire(1, active)
            order.append(tag)
            return sl
        anon = asyncio.create_task(go("anon", False))
        await asyncio.sleep(0)
        sess = asyncio.create_task(go("session", True))
        await asyncio.sleep(0)
        a.release()
        await sess
        a.release()
        await anon
        a.release()
        assert order == ["session", "anon"]
    run(main())


def test_queued_token_budget_and_timeout_and_cancel():
    async def main():
        a = adm(in_flight=1, queued=10, tokens=100, timeout=0.2, share=0.0)
        await a.acquire(5, False)          # the one slot is taken
        with pytest.raises(Rejected) as e:
            await a.acquire(101, False)
        assert e.value.reason == "queued_tokens_full"
        with pytest.raises(Rejected) as e:
            await a.acquire(50, False)
        assert e.value.reason == "queue_timeout"
        assert a.queued == 0 and a.queued_tokens == 0
        t = asyncio.create_task(a.acquire(50, False))
        while a.queued == 0:               # until it waits in the queue
            await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert a.queued == 0 and a.queued_tokens == 0
        a.release()
        assert a.in_flight == 0
    run(main())


def test_session_tracker_keepalive_and_bound():
    t = SessionTracker(SessionsConfig(keepalive_s=120, max_tracked=2))
    assert not t.is_active("a") and not t.is_active(None)
    t.turn_started("a")
    assert t.is_active("a") and t.active_count() == 1
    t.turn_ended("a")
    assert t.is_active("a") and t.active_count() == 1
    for sid in ("b", "c"):
        t.turn_started(sid)
        t.turn_ended(sid)
    assert not t.is_active("a")          # forgotten: only 2 tracked
    assert t.active_count() == 2
    off = SessionTracker(SessionsConfig(keepalive_s=0))
    off.turn_started("x")
    assert not off.is_active("x")


def test_shaping_defaults():
    cfg = Config()
    short = shaping.defaults(cfg, "hello").sampling
    assert (short.max_tokens, short.temperature, short.top_p, short.presence_penalty) == (2048, 0.7, 0.95, 0.1)
    long = shaping.defaults(cfg, "x" * 501).sampling
    assert long.max_tokens == 1024
    for text in ("Please SUMMARIZE this", "tl;dr?", "请总结一下", "给个摘要"):
        d = shaping.defaults(cfg, "some text", text)
        assert d.sampling.temperature == 0.3 and d.intent == "summarize", text
    capped = dataclasses.replace(cfg, limits=dataclasses.replace(cfg.limits, max_tokens_cap=500))
    assert shaping.defaults(capped, "hi").sampling.max_tokens == 500


def test_fit_messages_drops_oldest_keeps_system_and_last():
    msgs = [{"role": "system", "content": "S"}] + [{"role": r, "content": str(i)} for i, r in
                                                  enumerate(["user", "assistant", "user", "assistant", "user"])]
    count = len
    kept, dropped = shaping.fit_messages(msgs, count, 3)
    assert dropped == 3 and kept[0]["role"] == "system" and kept[-1] == msgs[-1] and len(kept) == 3
    with pytest.raises(shaping.Overlong):
        shaping.fit_messages(msgs, count, 1)
    assert shaping.pad([5, 6], 4, 0) == [0, 0, 5, 6] and shaping.pad([5, 6], 0, 0) == [5, 6]


def test_standby_sleeps_when_idle_and_wakes_once_for_many(caplog):
    caplog.set_level(logging.INFO, logger="qwenbox.events")

    async def main():
        lc = Lifecycle()
        for p in (Phase.LOADING, Phase.WARMING, Phase.READY):
            lc.to(p)
        eng = FakeEngine()
        busy = {"n": 0}
        rewarms = []

        async def rewarm(engine):
            rewarms.append(engine)
        sb = Standby(lambda: StandbyConfig(idle_sleep_after_s=0.2), lc, lambda: eng, busy=lambda: busy["n"],
                     rewarm=rewarm)
        busy["n"] = 1                       # a request in flight: never sleep under it,
        sb.last_activity -= 60              # however long ago the last one started
        await sb._sleep()
        assert lc.phase == Phase.READY and eng.calls == []
        busy["n"] = 0
        sb.touch()
        task = asyncio.create_task(sb.run())
        deadline = time.monotonic() + 30
        while lc.phase != Phase.SLEEPING and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert lc.phase == Phase.SLEEPING and eng.calls == [("sleep", 1)]
        await asyncio.gather(*(sb.ensure_awake() for _ in range(5)))
        assert lc.phase == Phase.READY and eng.calls == [("sleep", 1), ("wake", None)] and rewarms == [eng]
        assert sb.last_wake_s is not None
        task.cancel()
    run(main())
    # the sleep is logged at INFO with its level as a field (it once went out at level 1, unseen)
    sleeps = [r for r in caplog.records if r.getMessage() == "sleep"]
    assert len(sleeps) == 1 and sleeps[0].levelno == logging.INFO
    assert sleeps[0].qb_fields["sleep_level"] == 1


def test_standby_disabled_never_sleeps():
    async def main():
        lc = Lifecycle()
        sb = Standby(lambda: StandbyConfig(idle_sleep_after_s=0), lc, FakeEngine, busy=lambda: 0,
                     rewarm=lambda engine: asyncio.sleep(0))
        await asyncio.wait_for(sb.run(), 1)   # returns at once when disabled
        assert not sb.enabled
    run(main())
