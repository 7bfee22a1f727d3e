"""qwenbox/watchdog.py on its own: the verdict rules, pings, and the way out (no vLLM).

Time is passed in explicitly (``check(now=...)``), so the rules are tested without waiting;
engine-core processes are real child processes, stopped and killed for real.
"""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

from qwenbox.config import WatchdogConfig
from qwenbox.generation import Progress
from qwenbox.watchdog import Watchdog


class FakeNotifier:
    def __init__(self, watchdog_sec: float | None = 6.0) -> None:
        self.watchdog_interval_s = watchdog_sec / 2 if watchdog_sec else None
        self.pings: list[float] = []

    def watchdog(self) -> bool:
        self.pings.append(time.monotonic())
        return True


class FakeEngine:
    def __init__(self, procs=()) -> None:
        self.dead = False
        self.progress = Progress()
        self.procs = list(procs)

    def core_processes(self):
        return self.procs


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield psutil.Process(p.pid)
    p.kill()
    p.wait()


def make(engine, watchdog_sec=6.0, stall=10.0, exit_after=100.0, active=()):
    ctx = SimpleNamespace(engine=engine, active=set(active), health_checks={})
    fatal: list[str] = []
    wd = Watchdog(ctx, FakeNotifier(watchdog_sec), settings=lambda: WatchdogConfig(stall, exit_after),
                  on_fatal=fatal.append)
    return wd, ctx, fatal


def test_healthy_idle_engine_pings_every_half_watchdogsec(child):
    wd, ctx, _ = make(FakeEngine([child]))
    t = time.monotonic()
    for dt in (0, 1, 2, 3, 4, 5, 6, 7):
        assert wd.check(now=t + dt).healthy
    assert wd.pings == 3                           # at 0, 3 and 6 s: WatchdogSec/2
    h = ctx.health_checks["watchdog"]
    assert h["healthy"] and h["pinging"] and h["watchdog_sec"] == 6.0 and h["pending"] is False


def test_stopped_engine_process_is_unhealthy_until_continued(child):
    wd, ctx, _ = make(FakeEngine([child]))
    t = time.monotonic()
    assert wd.check(now=t).healthy and wd.pings == 1
    child.send_signal(signal.SIGSTOP)
    for _ in range(50):
        if child.status() == psutil.STATUS_STOPPED:
            break
        time.sleep(0.02)
    v = wd.check(now=t + 3.5)
    assert not v.healthy and f"{child.pid} is stopped" in v.reason
    assert wd.pings == 1, "pinged for a frozen engine"
    assert ctx.health_checks["watchdog"]["healthy"] is False
    assert "stopped" in ctx.health_checks["watchdog"]["reason"]
    child.send_signal(signal.SIGCONT)
    time.sleep(0.1)
    assert wd.check(now=t + 4).healthy and wd.pings == 2


def test_exited_engine_process_and_engine_error_are_unhealthy(child):
    eng = FakeEngine([child])
    wd, _, _ = make(eng)
    eng.dead = True
    assert "fatal error" in wd.check().reason
    eng.dead = False
    child.kill()
    child.wait(5)
    assert "has exited" in wd.check().reason
    assert wd.pings == 0


def test_running_requests_without_steps_is_a_stall():
    eng = FakeEngine()
    wd, _, _ = make(eng, stall=10.0)
    t = time.monotonic()
    eng.progress.running, eng.progress.steps, eng.progress.last_step_monotonic = 2, 100, t
    assert wd.check(now=t + 9).healthy
    v = wd.check(now=t + 11)
    assert not v.healthy and v.pending and "not stepped for 11s" in v.reason
    eng.progress.steps, eng.progress.last_step_monotonic = 101, t + 11.5      # it moves again
    assert wd.check(now=t + 12).healthy


def test_request_admitted_to_a_silent_engine_is_a_stall():
    """An idle engine that hangs shows no running requests: a new request it never steps on counts."""
    eng = FakeEngine()
    eng.progress.last_step_monotonic = t = time.monotonic()
    wd, ctx, _ = make(eng, stall=10.0)
    assert wd.check(now=t + 60).healthy                 # idle for a minute: nothing pending
    ctx.active.add("req-1")
    assert wd.check(now=t + 61).healthy
    v = wd.check(now=t + 72)
    assert not v.healthy and v.pending, v


def test_slow_client_after_the_engine_finished_is_not_a_stall():
    """The engine stepped after the request arrived and has nothing running: a client that
    reads its stream slowly keeps the request open, but the engine is fine."""
    eng = FakeEngine()
    t = time.monotonic()
    wd, ctx, _ = make(eng, stall=10.0)
    wd.check(now=t)
    ctx.active.add("req-slow")
    eng.progress.steps, eng.progress.last_step_monotonic = 5, t + 0.5   # stepped after admission
    for dt in (1, 30, 300):
        v = wd.check(now=t + dt)
        assert v.healthy and not v.pending, v


def test_unhealthy_too_long_calls_on_fatal_once_and_never_before_2x_watchdogsec(child):
    eng = FakeEngine([child])
    wd, _, fatal = make(eng, watchdog_sec=30.0, exit_after=10.0)
    assert wd.exit_after_s == 60.0                      # systemd's watchdog gets to act first
    eng.dead = True
    t = time.monotonic()
    wd.check(now=t)
    wd.check(now=t + 59)
    assert fatal == []
    wd.check(now=t + 61)
    wd.check(now=t + 70)
    assert len(fatal) == 1 and "fatal error" in fatal[0]


def test_closing_the_engine_on_purpose_keeps_the_pings(child):
    """systemd enforces WatchdogSec while the unit stops: once the daemon closes its engine
    deliberately, only the event loop counts, and a last ping goes out before exit."""
    eng = FakeEngine([child])
    wd, ctx, _ = make(eng)
    t = time.monotonic()
    wd.check(now=t)
    wd.closing()
    eng.dead = True
    child.kill()
    child.wait(5)
    assert wd.check(now=t + 3).healthy and wd.pings == 2
    assert ctx.health_checks["watchdog"]["closing"] is True

    async def started_then_stopped():
        wd.start()
        await asyncio.sleep(0.05)
        before = wd.pings
        wd.stop(final_ping=True)
        return before, wd.pings

    before, after = asyncio.run(started_then_stopped())
    assert after == before + 1


def test_without_systemd_no_pings_but_a_verdict(child):
    wd, ctx, fatal = make(FakeEngine([child]), watchdog_sec=None, exit_after=5.0)
    assert wd.check().healthy and wd.notifier.pings == [] and wd.exit_after_s == 5.0
    assert ctx.health_checks["watchdog"]["pinging"] is False


def test_a_blocked_event_loop_sends_no_pings(child):
    """The ping comes from the event loop: while it is blocked, systemd hears nothing."""
    async def main():
        wd, _, _ = make(FakeEngine([child]), watchdog_sec=0.4)     # a ping every 0.2 s
        wd.start()
        await asyncio.sleep(0.6)
        before = len(wd.notifier.pings)
        t_block = time.monotonic()
        time.sleep(1.0)                                   # the loop is stuck
        t_unblock = time.monotonic()
        await asyncio.sleep(0.5)
        wd.stop()
        return before, t_block, t_unblock, wd.notifier.pings, wd.max_loop_lag_s

    before, t_block, t_unblock, pings, lag = asyncio.run(main())
    assert before >= 2
    assert not [p for p in pings if t_block < p < t_unblock - 0.01]
    assert len(pings) > before and lag >= 0.9


@pytest.mark.engine
def test_frozen_engine_without_systemd_makes_the_daemon_exit_1(tmp_path, demo_model):
    """Nobody watches (no NOTIFY_SOCKET): a frozen engine core still ends in exit 1, with
    the frozen process killed, after watchdog.exit_after_s."""
    from helpers import Daemon, jrequest
    from qwenbox.eventlog import parse_line

    d = Daemon(tmp_path / "d", sections={"watchdog": {"exit_after_s": 3.0}})
    frozen = None
    try:
        d.start()
        h = d.wait_ready()
        assert h["watchdog"]["healthy"] and h["watchdog"]["pinging"] is False, h["watchdog"]
        cores = [psutil.Process(p) for p in h["engine"]["core_pids"]]
        frozen = next(p for p in cores if p.cmdline() and p.cmdline()[0].startswith("VLLM::EngineCore"))
        t0 = time.monotonic()
        frozen.send_signal(signal.SIGSTOP)
        verdict = None
        while verdict is None and time.monotonic() - t0 < 30:
            wd = jrequest(d.sock, "GET", "/health", timeout=10)[2]["watchdog"]
            verdict = wd if not wd["healthy"] else None
            time.sleep(0.2)
        rc = d.proc.wait(120)
        took = time.monotonic() - t0
        print(f"\nfrozen engine, no systemd: verdict {verdict['reason']!r}; exit {rc} after {took:.1f}s")
        assert verdict and "is stopped" in verdict["reason"]
        assert rc == 1, d.tail()
        try:
            assert frozen.status() == psutil.STATUS_ZOMBIE, "the frozen engine core survived"
        except psutil.NoSuchProcess:
            pass
        events = [e for e in map(parse_line, d.log_text().splitlines()) if e]
        assert any(e.get("event") == "watchdog" and e.get("action") == "exit" for e in events)
        assert any(e.get("event") == "engine_failed" and e.get("reason", "").startswith("watchdog: ")
                   for e in events)
    finally:
        if frozen is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    frozen.send_signal(sig)
                except psutil.Error:
                    pass
        d.stop()
