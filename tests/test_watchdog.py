"""qwenbox/watchdog.py on its own: the verdict rules, pings, and the way out (no vLLM).

Time is passed in explicitly (``check(now=...)``), so the rules are tested without waiting;
engine-core processes are real child processes, stopped and killed for real.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest
from fake_engine import FakeEngine

from conftest import wait_for
from qwenbox.config import WatchdogConfig
from qwenbox.lifecycle import Lifecycle, Phase
from qwenbox.watchdog import Watchdog


class FakeNotifier:
    def __init__(self, watchdog_sec: float | None = 6.0) -> None:
        self.watchdog_interval_s = watchdog_sec / 2 if watchdog_sec else None
        self.pings: list[float] = []

    def watchdog(self) -> bool:
        self.pings.append(time.monotonic())
        return True


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield psutil.Process(p.pid)
    p.kill()
    p.wait()


def ready_lifecycle() -> Lifecycle:
    lc = Lifecycle()
    for p in (Phase.LOADING, Phase.WARMING, Phase.READY):
        lc.to(p)
    return lc


def make(engine, watchdog_sec=6.0, stall=10.0, exit_after=100.0, active=(), lifecycle=None):
    """A watchdog over ``engine`` as the attached engine; ``gate`` is what it reads (the
    attached engine, the running ids) and the deaths it reported; ``fatal`` its halts."""
    gate = SimpleNamespace(engine=engine, running_ids=set(active), deaths=[])
    fatal: list[str] = []

    def halt(h):
        assert h.now and h.exit_code == 1, h    # nobody watches: leave at once, exit 1
        fatal.append(h.reason)
    wd = Watchdog(lifecycle or ready_lifecycle(), lambda: gate.engine, lambda: gate.running_ids,
                  FakeNotifier(watchdog_sec), settings=lambda: WatchdogConfig(stall, exit_after),
                  halt=halt, on_engine_dead=gate.deaths.append)
    return wd, gate, fatal


def wait_status(proc: psutil.Process, want, timeout: float = 10.0) -> None:
    """Wait until the process is in a state (or, with want=("not", status), out of it)."""
    if isinstance(want, tuple):
        wait_for(lambda: proc.status() != want[1], timeout, f"process {proc.pid} to leave {want[1]}")
    else:
        wait_for(lambda: proc.status() == want, timeout, f"process {proc.pid} to be {want}")


def test_healthy_idle_engine_pings_every_half_watchdogsec(child):
    wd, _, _ = make(FakeEngine(procs=[child]))
    t = time.monotonic()
    for dt in (0, 1, 2, 3, 4, 5, 6, 7):
        assert wd.check(now=t + dt).healthy
    assert wd.pings == 3                           # at 0, 3 and 6 s: WatchdogSec/2
    h = wd.health()["watchdog"]
    assert h["healthy"] and h["pinging"] and h["watchdog_sec"] == 6.0 and h["pending"] is False


def test_stopped_engine_process_is_unhealthy_until_continued(child):
    wd, _, _ = make(FakeEngine(procs=[child]))
    t = time.monotonic()
    assert wd.check(now=t).healthy and wd.pings == 1
    child.send_signal(signal.SIGSTOP)
    wait_status(child, psutil.STATUS_STOPPED)
    v = wd.check(now=t + 3.5)
    assert not v.healthy and f"{child.pid} is stopped" in v.reason
    assert wd.pings == 1, "pinged for a frozen engine"
    assert wd.health()["watchdog"]["healthy"] is False
    assert "stopped" in wd.health()["watchdog"]["reason"]
    child.send_signal(signal.SIGCONT)
    wait_status(child, ("not", psutil.STATUS_STOPPED))
    assert wd.check(now=t + 4).healthy and wd.pings == 2


def test_exited_engine_process_and_engine_error_are_unhealthy(child):
    eng = FakeEngine(procs=[child])
    wd, gate, _ = make(eng)
    eng.dead = True
    assert "fatal error" in wd.check().reason
    assert gate.deaths == ["the engine reported a fatal error"]   # reported at once
    eng.dead = False
    child.kill()
    child.wait(5)
    assert "has exited" in wd.check().reason
    assert wd.pings == 0
    assert len(gate.deaths) == 1, "an engine death is reported once"


def test_frozen_engine_is_not_reported_dead(child):
    wd, gate, _ = make(FakeEngine(procs=[child]))
    child.send_signal(signal.SIGSTOP)
    wait_status(child, psutil.STATUS_STOPPED)
    assert not wd.check().healthy
    assert gate.deaths == [], "a stopped engine is the watchdog's (systemd's) case, not a death"
    child.send_signal(signal.SIGCONT)


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
    wd, gate, _ = make(eng, stall=10.0)
    assert wd.check(now=t + 60).healthy                 # idle for a minute: nothing pending
    gate.running_ids.add("req-1")
    assert wd.check(now=t + 61).healthy
    v = wd.check(now=t + 72)
    assert not v.healthy and v.pending, v


def test_slow_client_after_the_engine_finished_is_not_a_stall():
    """The engine stepped after the request arrived and has nothing running: a client that
    reads its stream slowly keeps the request open, but the engine is fine."""
    eng = FakeEngine()
    t = time.monotonic()
    wd, gate, _ = make(eng, stall=10.0)
    wd.check(now=t)
    gate.running_ids.add("req-slow")
    eng.progress.steps, eng.progress.last_step_monotonic = 5, t + 0.5   # stepped after admission
    for dt in (1, 30, 300):
        v = wd.check(now=t + dt)
        assert v.healthy and not v.pending, v


def test_unhealthy_too_long_calls_on_fatal_once_and_never_before_2x_watchdogsec(child):
    eng = FakeEngine(procs=[child])
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
    """systemd enforces WatchdogSec while the unit stops: once the supervisor detaches its
    engine to close it, only the event loop counts, and a last ping goes out before exit."""
    eng = FakeEngine(procs=[child])
    wd, gate, _ = make(eng)
    t = time.monotonic()
    wd.check(now=t)
    gate.engine = None                  # detached, then closed: its death is no news
    eng.dead = True
    child.kill()
    child.wait(5)
    assert wd.check(now=t + 3).healthy and wd.pings == 2 and gate.deaths == []
    assert wd.health()["watchdog"]["engine_attached"] is False

    async def started_then_stopped():
        await wd.start()
        await asyncio.sleep(0)          # let the loop's first check run
        before = wd.pings
        await wd.stop(final_ping=True)
        return before, wd.pings

    before, after = asyncio.run(started_then_stopped())
    assert after == before + 1


def test_no_pings_and_no_health_part_before_the_first_ready():
    """Started first (so it outlives every other part at shutdown), the watchdog is armed by
    the first ``ready``, as systemd's is by READY=1: nothing is pinged during loading."""
    lc = Lifecycle()
    wd, gate, _ = make(None, lifecycle=lc)
    t = time.monotonic()
    for phase in (Phase.LOADING, Phase.WARMING):
        lc.to(phase)
        assert wd.check(now=t).healthy and wd.pings == 0 and wd.health() == {}
        t += 10
    gate.engine = FakeEngine()
    lc.to(Phase.READY)
    assert wd.check(now=t).healthy and wd.pings == 1 and wd.health()["watchdog"]["pinging"]
    lc.to(Phase.RECOVERING)
    gate.engine = None
    assert wd.check(now=t + 3).healthy and wd.pings == 2, "a rebuild is progress: the pings go on"


def test_without_systemd_no_pings_but_a_verdict(child):
    wd, _, _ = make(FakeEngine(procs=[child]), watchdog_sec=None, exit_after=5.0)
    assert wd.check().healthy and wd.notifier.pings == [] and wd.exit_after_s == 5.0
    assert wd.health()["watchdog"]["pinging"] is False


def test_a_blocked_event_loop_sends_no_pings(child):
    """The ping comes from the event loop: while it is blocked, systemd hears nothing."""
    async def pings_reach(wd, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(wd.notifier.pings) < n:
            assert time.monotonic() < deadline, f"only {len(wd.notifier.pings)} pings, waited for {n}"
            await asyncio.sleep(0.05)

    async def main():
        wd, _, _ = make(FakeEngine(procs=[child]), watchdog_sec=0.4)     # a ping every 0.2 s
        await wd.start()
        await pings_reach(wd, 2)
        before = len(wd.notifier.pings)
        t_block = time.monotonic()
        time.sleep(1.0)                                   # the loop is stuck (this IS the test)
        t_unblock = time.monotonic()
        await pings_reach(wd, before + 1)                 # and pings again once it runs
        await wd.stop(final_ping=False)
        return before, t_block, t_unblock, wd.notifier.pings, wd.max_loop_lag_s

    before, t_block, t_unblock, pings, lag = asyncio.run(main())
    assert before >= 2
    assert not [p for p in pings if t_block < p < t_unblock]     # nothing ran while it was blocked
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
        with contextlib.suppress(psutil.NoSuchProcess):     # gone, reaped: survived it has not
            assert frozen.status() == psutil.STATUS_ZOMBIE, "the frozen engine core survived"
        events = [e for e in map(parse_line, d.log_text().splitlines()) if e]
        assert any(e.get("event") == "watchdog" and e.get("action") == "exit" for e in events)
        assert any(e.get("event") == "engine_failed" and e.get("reason", "").startswith("watchdog: ")
                   for e in events)
    finally:
        if frozen is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(psutil.Error):
                    frozen.send_signal(sig)
        d.stop()


def _engine_core(h: dict) -> psutil.Process:
    return next(p for p in map(psutil.Process, h["engine"]["core_pids"])
                if p.cmdline() and p.cmdline()[0].startswith("VLLM::EngineCore"))


@pytest.mark.engine
def test_engine_sigkill_is_rebuilt_in_process_and_requests_after_it_are_served(tmp_path, demo_model):
    """An engine core SIGKILLed under load: the same daemon process (socket, imports kept)
    rebuilds the engine, warms it and serves again. /health says "recovering" meanwhile;
    every request sent after the kill is answered 200 (held, or resubmitted when it died
    with the engine before its first token). `qwenbox logs` on its log counts the death,
    the rebuild and what it took. Figures printed: kill -> first answer."""
    from helpers import Clients, Daemon, chat_body, jrequest, request
    from qwenbox.eventlog import parse_line
    from qwenbox.tools import logs

    d = Daemon(tmp_path / "d", sections={"recovery": {"max_restarts": 1, "window_s": 600.0}})
    clients = None
    try:
        d.start()
        h = d.wait_ready()
        pid = d.proc.pid
        clients = Clients(d.sock, 3, chat_body(8)).start()
        wait_for(lambda: clients.count_ok() >= 6, 120, lambda: f"answers before the kill: {clients.results[-3:]}")
        t_kill = time.monotonic()
        _engine_core(h).send_signal(signal.SIGKILL)
        seen = wait_for(lambda: (b := jrequest(d.sock, "GET", "/health", timeout=10))[2]["status"] == "recovering"
                        and b, 60, lambda: f"/health to say recovering:\n{d.tail()}")
        status, _, body = seen
        assert status == 503 and "engine died" in body["detail"] and body["recovery"]["in_window"] == 1, body
        h2 = d.wait_ready(timeout=240)
        t_ready = time.monotonic()
        wait_for(lambda: sum(1 for r in list(clients.results) if r["t0"] > t_ready and r.get("status") == 200) >= 3,
                 120, lambda: f"answers to requests sent after the rebuild: {clients.results[-3:]}")
        results = clients.stop()
        clients = None
        after = [r for r in results if r["t0"] > t_kill]
        lost = [r for r in after if r.get("status") != 200]
        first_ok = min(r["t1"] for r in after if r.get("status") == 200)
        at_kill = [r for r in results if r["t0"] <= t_kill < r["t1"]]
        print(f"\nengine SIGKILL, rebuilt in-process: first answer {first_ok - t_kill:.1f}s after the kill; "
              f"rebuild {h2['recovery']['last_recovery_s']}s ({h2['recovery']['last_phases']}); "
              f"{len(after)} requests sent after the kill, {len(lost)} not 200; {len(at_kill)} in flight at the "
              f"kill: {[r.get('status') for r in at_kill]}")
        assert d.proc.poll() is None and d.proc.pid == pid, "the daemon process itself must survive"
        assert not lost, lost[:5]
        assert h2["engine"]["core_pids"] and set(h2["engine"]["core_pids"]).isdisjoint(h["engine"]["core_pids"])
        events = [e for e in map(parse_line, d.log_text().splitlines()) if e]
        assert [e["event"] for e in events if e.get("event") in ("engine_died", "engine_recovered")] == \
            ["engine_died", "engine_recovered"]
        metrics = request(d.sock, "GET", "/metrics")[2].decode()
        assert 'qwenbox_engine_restarts_total{outcome="recovered"} 1.0' in metrics
        # the analyzer on this log: one engine death, the one rebuild /health counts, recovered
        rep = logs.analyze(logs.read_files([str(d.log_path)]))
        rebuilds, deaths = rep["engine_rebuilds"], rep["errors"]["engine_death"]
        print(f"qwenbox logs: {rebuilds['count']} rebuild(s), {rebuilds['recovered']} recovered, "
              f"{rebuilds['seconds']}; engine deaths {deaths.get('by_reason')}")
        assert deaths["count"] == rebuilds["count"] == h2["recovery"]["rebuilds"] == 1, (deaths, rebuilds)
        assert deaths["by_reason"] == {logs.REBUILT: 1}
        assert (rebuilds["recovered"], rebuilds["failed"], rebuilds["unfinished"]) == (1, 0, 0)
        [rebuild] = rebuilds["each"]
        # the line carries 6 significant digits of /health's figures
        assert rebuild["seconds"] == pytest.approx(h2["recovery"]["last_recovery_s"], rel=1e-5)
        assert rebuild["seconds"] > 0 and rebuilds["seconds"]["n"] == 1
        assert rebuilds["seconds"]["max"] == rebuild["seconds"]
        assert rebuild["phases"] and rebuild["phases"] == pytest.approx(h2["recovery"]["last_phases"], rel=1e-5)
        assert rebuild["in_flight"] is not None and "Engine rebuilds in-process: 1 (1 recovered" in logs.render(rep)

        # The budget (max_restarts = 1 in 600 s) is spent: the next death is an exit 1.
        _engine_core(h2).send_signal(signal.SIGKILL)
        assert d.proc.wait(120) == 1, d.tail()
        assert "recovery.max_restarts = 1" in d.log_text()
        # that second death was no rebuild: two engine deaths, still one rebuild
        rep = logs.analyze(logs.read_files([str(d.log_path)]))
        assert rep["errors"]["engine_death"]["count"] == 2 and rep["engine_rebuilds"]["count"] == 1, rep["errors"]
        assert rep["errors"]["engine_death"]["by_reason"][logs.REBUILT] == 1
    finally:
        if clients is not None:
            clients.stop()
        d.stop()


@pytest.mark.engine
def test_without_rebuilds_a_dead_engine_exits_1_and_health_says_failed_until_then(tmp_path, demo_model):
    """recovery.max_restarts = 0: an engine core SIGKILLed makes the daemon fail and exit 1
    (systemd restarts it); until the exit, /health answers (503, "failed")."""
    from helpers import Daemon, jrequest

    d = Daemon(tmp_path / "d", sections={"recovery": {"max_restarts": 0}})
    try:
        d.start()
        _engine_core(d.wait_ready()).send_signal(signal.SIGKILL)
        seen = None
        deadline = time.monotonic() + 60
        while seen is None and d.proc.poll() is None and time.monotonic() < deadline:
            try:
                status, _, body = jrequest(d.sock, "GET", "/health", timeout=10)
            except OSError:
                break                                   # the listener is gone: the process is exiting
            if body["status"] == "failed":
                seen = (status, body)
        assert seen is not None, f"/health never said failed before the exit:\n{d.tail()}"
        assert seen[0] == 503 and "engine died" in seen[1]["detail"], seen
        assert d.proc.wait(120) == 1, d.tail()
    finally:
        d.stop()
