"""The sd_notify and socket-activation protocols, read off real sockets.

Unit tests of ``Notifier`` and ``take_listen_fds`` (UTF-8, the environment they consume,
abstract sockets, silence without systemd), then one real daemon whose NOTIFY_SOCKET is a
datagram socket this test binds: the exact order and content of its datagrams through
start-up, watchdog pings, two SIGHUP reloads (one good, one bad file) and SIGTERM.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_for
from helpers import Daemon, jrequest, write_config
from qwenbox.eventlog import parse_line
from qwenbox.systemd import Notifier, take_listen_fds

SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)


class NotifySocket:
    """A bound AF_UNIX datagram socket that records (monotonic time, sender pid, text)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if not path.startswith("@"):
            self.sock.bind(path)
        else:
            self.sock.bind("\0" + path[1:])
        self.sock.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)   # like systemd: who sent it?
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, int | None, str]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop:
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            with self._cond:
                self.messages.append((time.monotonic(), pid, data.decode("utf-8")))
                self._cond.notify_all()

    def texts(self) -> list[str]:
        with self._cond:
            return [m[2] for m in self.messages]

    def wait_for(self, pred, timeout: float, start: int = 0) -> int:
        """Index of the first message from ``start`` on that satisfies ``pred``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(start, len(self.messages)):
                    if pred(self.messages[i][2]):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no such notify message in {timeout}s; got {self.texts()[start:]}")
                self._cond.wait(left)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        if not self.path.startswith("@"):
            with contextlib.suppress(OSError):
                os.unlink(self.path)


# ---------------------------------------------------------------- Notifier, no daemon
def test_notifier_consumes_env_and_sends_utf8(tmp_path, monkeypatch):
    ns = NotifySocket(str(tmp_path / "notify"))
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", ns.path)
        monkeypatch.setenv("WATCHDOG_USEC", "30000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        n = Notifier.from_environ()
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            assert var not in os.environ, f"{var} left for child processes to inherit"
        assert n.enabled and n.watchdog_usec == 30_000_000 and n.watchdog_interval_s == 15.0
        cjk = "正在加载 通义千问 Qwen3-4B（预热 3/5）"  # noqa: RUF001 (fullwidth parentheses: CJK text on purpose)
        assert n.status(cjk)
        assert n.send(STATUS="line one\nline two")          # one datagram field per line: flattened
        assert n.watchdog()
        assert n.ready("ready: 就绪")
        ns.wait_for(lambda t: t.startswith("READY=1"), 5)
        got = ns.texts()
        assert got == [f"STATUS={cjk}", "STATUS=line one line two", "WATCHDOG=1", "READY=1\nSTATUS=ready: 就绪"]
        assert {m[1] for m in ns.messages} == {os.getpid()}
        n.close()
        assert not n.send(STATUS="after close")
    finally:
        ns.close()


def test_notifier_abstract_socket(monkeypatch):
    name = f"@qwenbox-test-notify-{os.getpid()}"
    ns = NotifySocket(name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        n = Notifier.from_environ()
        try:
            assert n.enabled and n.status("abstract ✓")
            ns.wait_for(lambda t: True, 5)
            assert ns.texts() == ["STATUS=abstract ✓"]
        finally:
            n.close()
    finally:
        ns.close()


def test_notifier_silent_without_systemd(monkeypatch):
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)
    n = Notifier.from_environ()
    assert not n.enabled and n.watchdog_interval_s is None
    assert n.ready("x") is False and n.watchdog() is False and n.extend_timeout(5) is False


def test_notifier_watchdog_for_another_pid_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    monkeypatch.setenv("WATCHDOG_USEC", "6000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    n = Notifier.from_environ()
    assert n.watchdog_usec is None                   # sd_watchdog_enabled(3): not ours
    assert "WATCHDOG_PID" not in os.environ and "NOTIFY_SOCKET" not in os.environ
    assert n.status("nobody listens") is False       # a dead notify socket never raises


_LISTEN_PROBE = r"""
import json, os, socket, sys
sys.path.insert(0, sys.argv[1])
from qwenbox.systemd import take_listen_fds
socks = take_listen_fds()
print(json.dumps({"names": [s.getsockname() for s in socks],
                  "inheritable": [s.get_inheritable() for s in socks],
                  "env": sorted(k for k in os.environ if k.startswith("LISTEN_"))}))
"""


@pytest.mark.parametrize("own_pid", [True, False])
def test_take_listen_fds(tmp_path, own_pid):
    """LISTEN_FDS sockets start at fd 3 and are ours only when LISTEN_PID is our pid."""
    path = str(tmp_path / "activation.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    fd = srv.fileno()
    pid_expr = "$$" if own_pid else "1"
    try:
        out = subprocess.run(
            ["sh", "-c", f'LISTEN_PID={pid_expr} exec "$0" -c "$1" "$2"', sys.executable, _LISTEN_PROBE,
             str(Path(__file__).resolve().parent.parent)],
            env={**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "qwenbox.socket"},
            preexec_fn=lambda: os.dup2(fd, 3), pass_fds=(3,), capture_output=True, text=True, timeout=60)
    finally:
        srv.close()
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["env"] == [], "LISTEN_* left for the engine's children"
    if own_pid:
        assert got["names"] == [path] and got["inheritable"] == [False]
    else:
        assert got["names"] == []


def test_take_listen_fds_without_activation(monkeypatch):
    for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert take_listen_fds() == []


# ---------------------------------------------------------------- a real daemon
STEP_US = 120_000_000          # server.start_step_timeout_s = 120 -> EXTEND_TIMEOUT_USEC
WATCHDOG_US = 2_000_000        # WatchdogSec=2 -> a ping every second while healthy


def _child_env(pid: int) -> set[str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return set()
    return {kv.split(b"=", 1)[0].decode() for kv in raw.split(b"\0") if kv}


@pytest.mark.engine
def test_daemon_notify_sequence(tmp_path, demo_model):
    ns = NotifySocket(str(tmp_path / "notify.sock"))
    sections = {"server": {"start_step_timeout_s": 120.0}}
    d = Daemon(tmp_path / "d", sections=sections,
               env={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": str(WATCHDOG_US)})
    try:
        t0 = time.monotonic()
        d.start()
        # ---- start-up: STATUS and EXTEND_TIMEOUT_USEC only, READY=1 after the last warm-up step
        ready_i = ns.wait_for(lambda t: t.startswith("READY=1"), 300)
        health = jrequest(d.sock, "GET", "/health", timeout=10)
        t_ready = ns.messages[ready_i][0]
        msgs = ns.texts()
        before = msgs[:ready_i]
        print(f"\nnotify: READY=1 {t_ready - t0:.1f}s after exec; {len(before)} datagrams before it:")
        for m in before:
            print("   ", m)
        assert health[0] == 200 and health[2]["status"] == "ready", health
        assert health[2]["warmup"] and "warmup_s" in health[2]["cold_start"], "READY=1 before warm-up ended"
        ext = f"EXTEND_TIMEOUT_USEC={STEP_US}"
        assert before[:5] == [
            "STATUS=loading: importing vLLM", ext,        # the step's note repeats the phase's: not sent again
            ext, "STATUS=loading: loading weights, compiling, allocating the KV cache",
            "STATUS=warming: warm-up"], before
        warm = before[5:]
        assert len(warm) >= 4 and len(warm) % 2 == 0, warm
        steps = []
        for extend, status in zip(warm[::2], warm[1::2], strict=True):
            assert extend == ext, warm                        # every step first buys more time
            m = re.fullmatch(r"STATUS=warming: warming (\d+)/(\d+): .+", status)
            assert m, status
            steps.append((int(m.group(1)), int(m.group(2))))
        n = steps[0][1]
        assert steps == [(i, n) for i in range(1, n + 1)], steps
        ready = msgs[ready_i].split("\n")
        assert ready[0] == "READY=1" and len(ready) == 2, ready
        assert re.fullmatch(r"STATUS=ready: serving qwenbox-demo; cold start [\d.]+s \(import [\d.]+s, "
                            r"engine [\d.]+s, warmup [\d.]+s\)", ready[1]), ready[1]
        assert not any("WATCHDOG=1" in m for m in before)

        # ---- the protocols' variables never reach vLLM's children
        pids = health[2]["engine"]["core_pids"]
        assert pids
        for pid in pids:
            leaked = _child_env(pid) & {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                        "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
            assert not leaked, f"engine child {pid} inherited {leaked}"

        # ---- watchdog: pings from the daemon's own pid, about every WatchdogSec/2, once ready
        first = ns.wait_for(lambda t: t == "WATCHDOG=1", 10, ready_i)
        last = ns.wait_for(lambda t: t == "WATCHDOG=1", 10, first + 1)
        last = ns.wait_for(lambda t: t == "WATCHDOG=1", 10, last + 1)
        pings = [m for m in ns.messages[ready_i:] if m[2] == "WATCHDOG=1"]
        gaps = [round(b[0] - a[0], 2) for a, b in itertools.pairwise(pings)]
        print(f"notify: {len(pings)} WATCHDOG=1 after READY, gaps {gaps} s (WatchdogSec=2)")
        verdict = jrequest(d.sock, "GET", "/health")[2]["watchdog"]
        assert verdict["healthy"] and verdict["pinging"] and verdict["watchdog_sec"] == 2.0, verdict
        assert {m[1] for m in ns.messages} == {d.proc.pid}, "a datagram came from another process"

        # ---- SIGHUP with a good file: RELOADING=1, then READY=1; the new limit applies
        body = {"model": "qwenbox-demo", "prompt": "hi", "max_tokens": 2, "n": 2}
        assert jrequest(d.sock, "POST", "/v1/completions", body)[0] == 200
        write_config(d.config, {**sections, "limits": {"max_n": 1}, "engine": {"max_num_seqs": 8}})
        mark = len(ns.texts())
        d.proc.send_signal(signal.SIGHUP)
        i = ns.wait_for(lambda t: t.startswith("READY=1"), 30, mark)
        reload_msgs = [t for t in ns.texts()[mark:i + 1] if t != "WATCHDOG=1"]
        print("notify: SIGHUP ->", reload_msgs)
        assert reload_msgs[0] == f"RELOADING=1\nSTATUS=reloading {d.config}"
        assert reload_msgs[1].startswith("READY=1\nSTATUS=ready: serving qwenbox-demo; cold start "), reload_msgs
        assert reload_msgs[1].endswith("; reloaded 1 setting(s); needs a restart: engine.max_num_seqs")
        assert len(reload_msgs) == 2
        status, _, err = jrequest(d.sock, "POST", "/v1/completions", body)
        assert status == 400 and "cap of 1" in err["error"]["message"], err

        # ---- SIGHUP with a broken file: logged with its error, the running config stays
        d.config.write_text(d.config.read_text().replace("max_n = 1", 'max_n = "many"'))
        mark = len(ns.texts())
        d.proc.send_signal(signal.SIGHUP)
        i = ns.wait_for(lambda t: t.startswith("READY=1"), 30, mark)
        reload_msgs = [t for t in ns.texts()[mark:i + 1] if t != "WATCHDOG=1"]
        print("notify: bad SIGHUP ->", reload_msgs)
        assert reload_msgs[0] == f"RELOADING=1\nSTATUS=reloading {d.config}"
        assert re.search(r"; reload failed, running config kept: .*qwenbox\.toml:\d+: limits\.max_n: "
                         r"expected an integer, got 'many'$", reload_msgs[1]), reload_msgs[1]
        assert jrequest(d.sock, "POST", "/v1/completions", body)[0] == 400          # max_n is still 1
        assert jrequest(d.sock, "POST", "/v1/completions", {**body, "n": 1})[0] == 200

        def reload_events():
            return [e for e in map(parse_line, d.log_text().splitlines()) if e and e.get("event") == "reload"]
        # the log line and the datagram are written separately: wait for the line, do not assume it is there
        log = wait_for(lambda: (lambda evs: len(evs) >= 2 and evs)(reload_events()), 30,
                       lambda: f"two reload events in the log: {reload_events()}")
        assert [e["ok"] for e in log] == ["true", "false"], log
        assert "limits.max_n" in log[0]["applied"] and "engine.max_num_seqs" in log[0]["needs_restart"]
        assert "expected an integer" in log[1]["error"]

        # ---- SIGTERM: STOPPING=1 with the draining status, then stopped, exit 0
        mark = len(ns.texts())
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(120) == 0, d.tail()
        # every datagram was sent before the exit, but our reader thread may not have taken the
        # last ones off the socket yet: wait until it has the final one
        ns.wait_for(lambda t: t.startswith("STATUS=stopped"), 30, mark)
        stop_msgs = [t for t in ns.texts()[mark:] if t != "WATCHDOG=1"]
        print("notify: SIGTERM ->", stop_msgs)
        assert stop_msgs == ["STOPPING=1\nSTATUS=draining: finishing 0 request(s)", "STATUS=stopped: exit 0"]
    finally:
        d.stop()
        ns.close()
