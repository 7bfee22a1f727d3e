"""systemd/qwenbox.{service,socket} under a REAL systemd manager (tests/systemd_manager.py).

One manager for the whole module (each daemon start costs ~30 s on 2 cores); the tests
run in file order and each leaves qwenbox.service running (or says so), so they share
cold starts: bad config, start, reload, restart under load, engine SIGKILL, frozen engine
(watchdog), stop during a stream. The shipped unit files are used as they are, plus one
drop-in per unit for what this machine lacks or the test needs faster (listed in
``SERVICE_DROPIN``). Figures are printed at the end of the module and written to
.run/systemd-test-figures.json. No timing is asserted and nothing waits a fixed time: every
step waits for the state it needs, and the generous deadlines only guard hangs.
"""
from __future__ import annotations

import contextlib
import grp
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from conftest import require_engine_marker, wait_for
from helpers import CHAT, ROOT, Clients, chat_body, jrequest, request, sse_events, write_config
from qwenbox.eventlog import parse_line
from systemd_manager import SystemdManager, unavailable_reason
from uistack import Browser, free_port, http as http_get, missing as ui_missing, wait_answer

UNITS = ROOT / "systemd"
SERVICE, SOCKET = "qwenbox.service", "qwenbox.socket"
UI_SERVICE = "qwenbox-ui.service"
CONFIG_NS = "/run/qwenbox-test/qwenbox.toml"      # where the service sees the test's config
WATCHDOG_SEC = 6


def under_manager(fn):
    """Runs under the real systemd manager, without starting the engine."""
    return pytest.mark.systemd(fn)


def engine_under_manager(fn):
    """Runs qwenbox.service, that is the real engine on the demo model, under the real systemd manager."""
    return pytest.mark.systemd(pytest.mark.engine(fn))

# The demo profile, with what this suite needs: socket activation ignores server.socket;
# a restart must queue for the whole demo cold start even on a busy 2-core machine; a
# short stall time; vLLM's cache left to the unit's XDG_CACHE_HOME (the production path).
UI_PYTHON = ROOT / ".venv-ui" / "bin" / "python"
TEST_SECTIONS = {
    "ui": {"python": str(UI_PYTHON), "state_dir": "/var/lib/qwenbox-ui", "start_wait_s": 600.0},
    "server": {"socket": "/run/qwenbox/qwenbox.sock", "drain_timeout_s": 20.0,
               "queue_while_loading_s": 180.0, "start_step_timeout_s": 120.0},
    "engine": {"cache_dir": ""},
    "watchdog": {"stall_timeout_s": 5.0, "exit_after_s": 60.0},
}


def _python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv if venv.exists() else Path(sys.executable))


def _service_dropin() -> str:
    py = _python()
    real = os.path.realpath(py)
    lines = ["# Test machine adaptations of the shipped qwenbox.service (tests/test_systemd_units.py).",
             "[Unit]",
             "# Started from a bare target: do not pull sysinit.target/basic.target into the namespace.",
             "DefaultDependencies=no",
             "# The suite starts the service about six times in a few minutes.",
             "StartLimitBurst=100",
             "[Service]",
             "# The checkout's venv and the demo config instead of /usr/bin/qwenbox and /etc/qwenbox.",
             "ExecStart=",
             f"ExecStart={py} -m qwenbox serve --config {CONFIG_NS}",
             "# This checkout's qwenbox, whatever the venv's editable install points at (git worktrees).",
             f"Environment=PYTHONPATH={ROOT}",
             "Environment=PYTHONDONTWRITEBYTECODE=1",
             "# A short watchdog so the frozen-engine test takes seconds.",
             f"WatchdogSec={WATCHDOG_SEC}",
             "# A watchdog SIGABRT must not write a core file of the daemon into the state dir.",
             "LimitCORE=0"]
    try:
        pwd.getpwnam("qwenbox")
    except KeyError:
        lines += ["# No static qwenbox user on this machine (the Debian package creates it).",
                  "User=root", "Group=root"]
    # The interpreter and the checkout (code, demo model) must be visible to the sandboxed
    # service wherever this test runs from: CI clones into a folder of its own choosing.
    places = {os.path.dirname(real), str(ROOT)}
    if any(p.startswith(("/root/", "/home/")) or p in ("/root", "/home") for p in places):
        lines += [f"# {', '.join(sorted(places))}: ProtectHome=yes would hide it.", "ProtectHome=read-only"]
    if any(p.startswith(("/tmp/", "/var/tmp/")) for p in places):
        lines += [f"# {', '.join(sorted(places))}: PrivateTmp=yes would hide it.", "PrivateTmp=no"]
    return "\n".join(lines) + "\n"


def _sandbox_visibility(paths: set[str]) -> list[str]:
    """Drop-in lines that keep ``paths`` (interpreters, the checkout) visible in the sandbox."""
    lines = []
    if any(p.startswith(("/root/", "/home/")) or p in ("/root", "/home") for p in paths):
        lines += [f"# {', '.join(sorted(paths))}: ProtectHome=yes would hide it.", "ProtectHome=read-only"]
    if any(p.startswith(("/tmp/", "/var/tmp/")) for p in paths):
        lines += [f"# {', '.join(sorted(paths))}: PrivateTmp=yes would hide it.", "PrivateTmp=no"]
    return lines


def _ui_dropin(port: int) -> str:
    lines = ["# Test machine adaptations of the shipped qwenbox-ui.service (tests/test_systemd_units.py).",
             "[Unit]", "DefaultDependencies=no", "[Service]",
             "# The checkout's venv and the test config instead of /usr/bin/qwenbox and /etc/qwenbox.",
             "ExecStart=", f"ExecStart={_python()} -m qwenbox ui --config {CONFIG_NS} --listen 127.0.0.1:{port}",
             "# This checkout's qwenbox, whatever the venv's editable install points at (git worktrees).",
             f"Environment=PYTHONPATH={ROOT}"]
    try:
        pwd.getpwnam("qwenbox-ui")
    except KeyError:
        lines += ["# No static qwenbox-ui user on this machine (the Debian package creates it).",
                  "User=root", "Group=root"]
    lines += _sandbox_visibility({os.path.dirname(os.path.realpath(_python())), str(ROOT),
                                  os.path.dirname(os.path.realpath(UI_PYTHON))})
    return "\n".join(lines) + "\n"


def _socket_dropin() -> str:
    lines = ["[Unit]", "DefaultDependencies=no"]
    try:
        grp.getgrnam("www-data")
    except KeyError:
        lines += ["[Socket]", "# No www-data group on this machine.", "SocketGroup=root"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the shared manager
@pytest.fixture(scope="module")
def sd(request, tmp_path_factory, demo_model):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"cannot run a real systemd manager: {reason}")
    work = tmp_path_factory.mktemp("systemd")
    dirs = {name: work / name for name in ("run-qwenbox", "etc", "var-lib", "var-cache")}
    for d in dirs.values():
        d.mkdir()
    config = write_config(dirs["etc"] / "qwenbox.toml", TEST_SECTIONS)
    m = SystemdManager(work, binds={dirs["run-qwenbox"]: "/run/qwenbox", dirs["etc"]: "/run/qwenbox-test",
                                    dirs["var-lib"]: "/var/lib", dirs["var-cache"]: "/var/cache"})
    m.start()
    env = SimpleNamespace(m=m, work=work, dirs=dirs, config=config, sock=str(dirs["run-qwenbox"] / "qwenbox.sock"),
                          figures={}, frozen=[])
    try:
        for unit in (SERVICE, SOCKET, UI_SERVICE):
            shutil.copy(UNITS / unit, m.units / unit)
        env.ui_port = free_port()
        m.write_dropin(UI_SERVICE, "test", _ui_dropin(env.ui_port))
        m.write_dropin(SERVICE, "test", _service_dropin())
        m.write_dropin(SOCKET, "test", _socket_dropin())
        m.mask("modprobe@nvidia_uvm.service")          # no NVIDIA module to load in a test namespace
        m.daemon_reload()
        yield env
    finally:
        for pid in env.frozen:                          # a test that failed half-way: thaw and kill ours
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        try:
            env.journal = m.journal(SERVICE)
            (work / "journal.txt").write_text(env.journal)
        except Exception:
            pass
        m.shutdown()
        out = ROOT / ".run" / "systemd-test-figures.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(env.figures, indent=2))
        tr = request.config.pluginmanager.getplugin("terminalreporter")
        if tr is not None and env.figures:
            tr.write_line("")
            tr.write_line(f"systemd figures (also in {out}):")
            for k, v in env.figures.items():
                tr.write_line(f"  {k}: {v}")


def service_ctl(sd, verb: str) -> None:
    """``systemctl start|restart qwenbox.service``: it starts the engine, so only engine tests may."""
    require_engine_marker(f"`systemctl {verb} {SERVICE}`")
    sd.m.systemctl(verb, SERVICE, timeout=300)


def ensure_active(sd) -> None:
    require_engine_marker(f"{SERVICE} (it may need a start)")
    st = sd.m.show(SERVICE, "ActiveState")
    if st["ActiveState"] != "active":
        sd.m.systemctl("reset-failed", SERVICE, check=False)
        service_ctl(sd, "start")
    assert sd.m.show(SERVICE, "ActiveState")["ActiveState"] == "active"


def engine_core(sd) -> psutil.Process:
    """The service's vLLM EngineCore process, as the host sees it."""
    for p in sd.m.descendants():
        try:
            if p.cmdline() and p.cmdline()[0].startswith("VLLM::EngineCore"):
                return p
        except psutil.Error:
            continue
    raise AssertionError("no VLLM::EngineCore process under the manager")


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE     # is_running(): not a reused pid
    except psutil.NoSuchProcess:
        return True


def main_pid(sd) -> int:
    return int(sd.m.show(SERVICE, "MainPID")["MainPID"])


def health(sd) -> dict:
    return jrequest(sd.sock, "GET", "/health", timeout=30)[2]


def wait_restarted(sd, old_pid: int, nrestarts: int, timeout: float = 300.0) -> float:
    """Wait until systemd has restarted the service (a new main process, active again); the seconds it took."""
    t0 = time.monotonic()

    def restarted() -> bool:
        st = sd.m.show(SERVICE, "ActiveState", "MainPID", "NRestarts")
        return (st["ActiveState"] == "active" and st["MainPID"] not in ("0", str(old_pid))
                and int(st["NRestarts"]) > nrestarts)

    wait_for(restarted, timeout, lambda: f"a restart: {sd.m.show(SERVICE, 'ActiveState', 'SubState', 'Result')}"
                                         f"\n{sd.m.journal(SERVICE)[-3000:]}")
    return time.monotonic() - t0


# ---------------------------------------------------------------- the unit files themselves
def _verify_target() -> tuple[list[str], str]:
    """The unit files to verify; with the Debian package absent, ExecStart's /usr/bin/qwenbox
    does not exist here, and verify says so: check a copy that names the checkout's entry point."""
    files = [str(UNITS / SERVICE), str(UNITS / SOCKET), str(UNITS / UI_SERVICE)]
    if os.access("/usr/bin/qwenbox", os.X_OK):
        return files, ""
    entry = ROOT / ".venv" / "bin" / "qwenbox"
    if not entry.exists():
        entry = Path(shutil.which("qwenbox") or "/bin/true")
    return files, str(entry)


def test_unit_files_verify_clean(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze")
    files, entry = _verify_target()
    if entry:   # /usr/bin/qwenbox comes with the package; verify checks that ExecStart exists
        copy = tmp_path / "units"
        copy.mkdir()
        for f in files:
            shutil.copy(f, copy)
        for svc in (copy / SERVICE, copy / UI_SERVICE):
            text = svc.read_text()
            assert text.count("ExecStart=/usr/bin/qwenbox ") == 1
            svc.write_text(text.replace("ExecStart=/usr/bin/qwenbox ", f"ExecStart={entry} "))
        files = [str(copy / SERVICE), str(copy / SOCKET), str(copy / UI_SERVICE)]
        print(f"\n/usr/bin/qwenbox is not installed here: verifying with ExecStart={entry}")
    r = subprocess.run(["systemd-analyze", "verify", *files], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_unit_files_say_what_the_issue_asks():
    svc = (UNITS / SERVICE).read_text()
    sock = (UNITS / SOCKET).read_text()
    unit, service = svc.split("[Service]")[0], svc.split("[Service]")[1].split("[Install]")[0]

    def has(text: str, line: str) -> bool:
        return re.search(rf"^{re.escape(line)}$", text, re.M) is not None

    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure", "RestartSec=5",
                 "RestartPreventExitStatus=78", "KillMode=mixed", "LimitCORE=0", "User=qwenbox",
                 "StateDirectory=qwenbox",
                 "CacheDirectory=qwenbox", "DevicePolicy=closed", "DeviceAllow=char-nvidia* rw",
                 "ExecReload=/bin/kill -HUP $MAINPID", "Environment=XDG_CACHE_HOME=/var/cache/qwenbox",
                 "Environment=HF_HOME=/var/lib/qwenbox/huggingface", "Environment=HOME=/var/lib/qwenbox",
                 "Environment=TRITON_CACHE_DIR=/var/cache/qwenbox/triton",
                 "Environment=TORCHINDUCTOR_CACHE_DIR=/var/cache/qwenbox/torchinductor"):
        assert has(service, line), line
    assert has(unit, "StartLimitIntervalSec=20min") and has(unit, "StartLimitBurst=5")
    assert not re.search(r"^(PrivateDevices|DynamicUser|RuntimeDirectory)=", svc, re.M)
    assert not re.search(r"^TimeoutStartSec=(infinity|0)$", svc, re.M)
    for line in ("ListenStream=/run/qwenbox/qwenbox.sock", "SocketGroup=www-data", "SocketMode=0660"):
        assert has(sock, line), line


def test_ui_unit_says_what_the_issue_asks():
    svc = (UNITS / UI_SERVICE).read_text()
    service = svc.split("[Service]")[1].split("[Install]")[0]

    def has(line: str) -> bool:
        return re.search(rf"^{re.escape(line)}$", service, re.M) is not None

    for line in ("ExecStart=/usr/bin/qwenbox ui --config /etc/qwenbox/qwenbox.toml", "User=qwenbox-ui",
                 "SupplementaryGroups=www-data", "StateDirectory=qwenbox-ui", "RestartPreventExitStatus=78",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateDevices=yes", "CapabilityBoundingSet="):
        assert has(line), line
    # the page must keep running (and say "the model is starting") while the daemon is down
    assert not re.search(r"^(Requires|BindsTo|PartOf)=qwenbox\.(service|socket)", svc, re.M)


@pytest.mark.parametrize("unit, limit", [(SERVICE, 4.0), (UI_SERVICE, 2.0)])
def test_security_exposure(unit, limit):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze")
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNITS / unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", r.stdout + r.stderr)
    assert m, r.stdout[-2000:] + r.stderr
    print(f"\n{unit}: systemd-analyze security --offline=yes: {m.group(1)} {m.group(2)}")
    assert float(m.group(1)) <= limit, "hardening regressed (qwenbox.service was 3.0, qwenbox-ui.service 1.1)"


# ---------------------------------------------------------------- under the real manager
@under_manager
def test_bad_config_exits_78_without_restart_loop(sd):
    good = sd.config.read_text()
    sd.config.write_text(good.replace("[limits]\n", '[limits]\nmax_n = "many"\n', 1))
    try:
        # Not an engine start: the daemon reads its config first and exits 78 before importing vLLM.
        r = sd.m.systemctl("start", SERVICE, check=False, timeout=120)
        assert r.returncode != 0, "a bad config started"
        # No waiting out RestartSec to show that no restart comes. systemd decides at the
        # moment the main process exits (service_enter_dead): a restart that is due puts the
        # unit in SubState=auto-restart and arms the RestartSec timer; an exit status in
        # RestartPreventExitStatus= leaves it in "failed" with no timer armed, and then
        # nothing restarts it. So wait for the manager to settle and read its decision.
        props = ("ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts")
        st = wait_for(lambda: (lambda st: st["SubState"] in ("failed", "auto-restart", "running") and st)(
            sd.m.show(SERVICE, *props)), 60, "the failed start to settle")
        print(f"\nbad config: {st}")
        assert st == {"ActiveState": "failed", "SubState": "failed", "Result": "exit-code",
                      "ExecMainStatus": "78", "NRestarts": "0"}, st
        journal = sd.m.journal(SERVICE)
        assert "limits.max_n: expected an integer" in journal, journal[-2000:]
        assert "Scheduled restart job" not in journal, journal[-2000:]
        assert sd.m.show(SOCKET, "ActiveState")["ActiveState"] == "active"    # the socket stays
        sd.figures["bad_config"] = f"exit {st['ExecMainStatus']}, {st['SubState']}, NRestarts {st['NRestarts']}"
    finally:
        sd.config.write_text(good)
        sd.m.systemctl("reset-failed", SERVICE, check=False)


@engine_under_manager
def test_start_returns_after_warmup_with_status(sd):
    # What systemd received while starting, from the manager itself: at debug level it logs
    # every notify message it accepts, in order. (Sampling StatusText with `systemctl show`
    # misses phases shorter than one round trip: warm-up steps take ~0.2 s here.)
    sd.m.systemctl("log-level", "debug")
    try:
        t0 = time.monotonic()
        service_ctl(sd, "start")
        took = time.monotonic() - t0
    finally:
        sd.m.systemctl("log-level", "info")
    h = jrequest(sd.sock, "GET", "/health", timeout=10)        # at once: no wait, no 503
    pid = main_pid(sd)
    # one source (the manager, PID 1), so the journal keeps its order
    manager = [ln for ln in sd.m.journal(SERVICE, output="cat").splitlines()
               if ln.startswith(f"{SERVICE}: ") or ln.startswith("Started ")]
    notes = [(i, m.group(1)) for i, ln in enumerate(manager)
             if (m := re.search(rf"Got notification message from PID {pid} \((.*)\)$", ln))]
    statuses = [n for _, n in notes if n != "WATCHDOG=1"]
    print(f"\nsystemctl start returned after {took:.1f}s; notify messages systemd accepted while starting:")
    for n in statuses:
        print("   ", n)
    assert h[0] == 200 and h[2]["status"] == "ready", h
    assert h[2]["warmup"] and "warmup_s" in h[2]["cold_start"]
    st = sd.m.show(SERVICE, "ActiveState", "SubState", "StatusText", "WatchdogUSec", "NRestarts")
    assert st["ActiveState"] == "active" and st["SubState"] == "running", st
    assert st["StatusText"].startswith("ready: serving qwenbox-demo; cold start "), st
    assert st["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
    status_out = sd.m.systemctl("status", SERVICE, check=False).stdout
    assert 'Status: "ready: serving qwenbox-demo; cold start' in status_out, status_out

    # loading, then warming, then READY=1 with the cold start figures, then systemd's "Started"
    def first(pred) -> int:
        return next((i for i, n in notes if pred(n)), -1)
    loading = first(lambda n: "STATUS=loading: " in n)
    warming = first(lambda n: "STATUS=warming: warming " in n)
    ready = first(lambda n: n.startswith("READY=1") and "STATUS=ready: serving qwenbox-demo; cold start " in n)
    started = next((i for i, ln in enumerate(manager) if i > ready and ln.startswith(f"Started {SERVICE}")), -1)
    assert 0 <= loading < warming < ready < started, (loading, warming, ready, started, statuses)
    assert not [ln for ln in manager if "reception only permitted" in ln], "a child process spoke for the service"
    assert "event=cold_start" in sd.m.journal(None, f"_PID={pid}", output="cat")

    # the watchdog's verdict is on /health, and it pings
    wd = h[2]["watchdog"]
    assert wd["healthy"] and wd["pinging"] and wd["watchdog_sec"] == float(WATCHDOG_SEC), wd

    # environment: caches in the unit's directories, no protocol variables in vLLM's children
    mp = sd.m.host_pid(main_pid(sd))
    env = psutil.Process(mp).environ()
    # no core files (LimitCORE=0): the daemon, and the engine core it started
    assert psutil.Process(mp).rlimit(psutil.RLIMIT_CORE) == (0, 0)
    assert engine_core(sd).rlimit(psutil.RLIMIT_CORE) == (0, 0)
    assert env.get("HOME") == "/var/lib/qwenbox" and env.get("XDG_CACHE_HOME") == "/var/cache/qwenbox", env
    assert (sd.dirs["var-cache"] / "qwenbox" / "vllm").is_dir(), "vLLM's cache is not in CacheDirectory"
    assert (sd.dirs["var-lib"] / "qwenbox").is_dir()
    core = engine_core(sd)
    leaked = set(core.environ()) & {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"}
    assert not leaked, leaked
    cs = h[2]["cold_start"]
    sd.figures["start_to_ready_s"] = round(took, 1)
    sd.figures["cold_start_phases_s"] = {k: cs[k] for k in ("import_s", "engine_s", "warmup_s", "total_s") if k in cs}


@engine_under_manager
def test_reload_applies_limits_without_restart(sd):
    ensure_active(sd)
    pid = main_pid(sd)
    body = chat_body(2, n=2)
    assert request(sd.sock, "POST", CHAT, body)[0] == 200
    good = sd.config.read_text()
    try:
        write_config(sd.config, {**TEST_SECTIONS, "limits": {"max_n": 1}})
        # `systemctl reload` returns when `kill -HUP` has exited, which can be before the daemon
        # has even read the file: wait for its READY=1 status that says the reload is done.
        sd.m.systemctl("reload", SERVICE)
        wait_for(lambda: "reloaded" in sd.m.show(SERVICE, "StatusText")["StatusText"], 60,
                 lambda: f"the reload's status: {sd.m.show(SERVICE, 'SubState', 'StatusText')}")
        st = sd.m.show(SERVICE, "StatusText", "MainPID", "NRestarts")
        assert st["MainPID"] == str(pid) and st["StatusText"].endswith("; reloaded 1 setting(s)"), st
        status, _, data = request(sd.sock, "POST", CHAT, body)
        assert status == 400 and b"cap of 1" in data, data

        sd.config.write_text(sd.config.read_text().replace("max_n = 1", "max_n = 0"))    # out of range
        sd.m.systemctl("reload", SERVICE)
        wait_for(lambda: "reload failed" in sd.m.show(SERVICE, "StatusText")["StatusText"], 60,
                 lambda: f"the bad reload's status: {sd.m.show(SERVICE, 'SubState', 'StatusText')}")
        st = sd.m.show(SERVICE, "StatusText", "MainPID", "ActiveState")
        print(f"\nafter a bad reload: {st}")
        assert st["MainPID"] == str(pid) and st["ActiveState"] == "active"
        assert re.search(r"reload failed, running config kept: .*qwenbox\.toml:\d+: limits\.max_n: must be >= 1",
                         st["StatusText"]), st
        assert "event=reload" in sd.m.journal(SERVICE)
        assert request(sd.sock, "POST", CHAT, body)[0] == 400          # max_n = 1 still holds
    finally:
        sd.config.write_text(good)
        sd.m.systemctl("reload", SERVICE, check=False)
    wait_for(lambda: request(sd.sock, "POST", CHAT, body)[0] == 200, 60, "the good config to come back (n=2 allowed)")


@engine_under_manager
def test_restart_under_load_every_request_answered(sd):
    ensure_active(sd)
    old = main_pid(sd)
    clients = Clients(sd.sock, 4, chat_body(16)).start()
    wait_for(lambda: clients.count_ok() >= 8, 120, lambda: f"8 answers before the restart: {clients.results[-5:]}")
    t0 = time.monotonic()
    service_ctl(sd, "restart")
    took = time.monotonic() - t0
    t_done = time.monotonic()
    # the new process answers: a request sent after the restart returned comes back 200
    wait_for(lambda: any(r["t0"] > t_done and r.get("status") == 200 for r in list(clients.results)), 120,
             lambda: f"an answer to a request sent after the restart: {clients.results[-5:]}")
    results = clients.stop()
    failed = [r for r in results if r.get("status") != 200]
    waits = sorted(r["t1"] - r["t0"] for r in results)
    during = [r for r in results if r["t0"] < t0 + took and r["t1"] > t0]
    print(f"\nrestart under load: systemctl restart took {took:.1f}s; {len(results)} requests "
          f"({len(during)} overlapping the restart), {len(failed)} failed; longest wait {waits[-1]:.1f}s; "
          f"median {waits[len(waits) // 2]:.2f}s")
    assert main_pid(sd) != old
    assert not failed, failed[:5]
    sd.figures["restart_systemctl_s"] = round(took, 1)
    sd.figures["restart_requests"] = (f"{len(results)} requests by 4 clients, {len(during)} during the restart, "
                                      f"{len(failed)} failed")
    sd.figures["restart_longest_client_wait_s"] = round(waits[-1], 1)


@engine_under_manager
def test_engine_sigkill_is_rebuilt_inside_the_running_service(sd):
    """The engine core SIGKILLed under load from 4 clients: the service's main process stays
    (same MainPID, no systemd restart, the watchdog keeps pinging), rebuilds the engine and
    serves again; no request sent after the kill fails."""
    ensure_active(sd)
    st0 = sd.m.show(SERVICE, "MainPID", "NRestarts")
    core = engine_core(sd)
    clients = Clients(sd.sock, 4, chat_body(8)).start()
    wait_for(lambda: clients.count_ok() >= 8, 120, lambda: f"answers before the kill: {clients.results[-5:]}")
    t_kill = time.monotonic()
    core.send_signal(signal.SIGKILL)
    wait_for(lambda: health(sd)["status"] == "recovering", 60, "/health to say recovering")
    wait_for(lambda: health(sd)["status"] == "ready", 300, lambda: f"ready again: {health(sd)}")
    t_ready = time.monotonic()
    wait_for(lambda: sum(1 for r in list(clients.results) if r["t0"] > t_ready and r.get("status") == 200) >= 4,
             120, lambda: f"answers after the rebuild: {clients.results[-5:]}")
    results = clients.stop()
    after = [r for r in results if r["t0"] > t_kill]
    lost = [r for r in after if r.get("status") != 200]
    first_ok = min(r["t1"] for r in after if r.get("status") == 200)
    st = sd.m.show(SERVICE, "MainPID", "NRestarts", "ActiveState")
    journal = sd.m.journal(SERVICE)
    rec = health(sd)["recovery"]
    print(f"\nengine SIGKILL under systemd: same process, rebuilt in {rec['last_recovery_s']}s; first answer "
          f"{first_ok - t_kill:.1f}s after the kill; {len(results)} requests by 4 clients, {len(after)} sent after "
          f"the kill, {len(lost)} of those not 200")
    assert (st["MainPID"], st["NRestarts"], st["ActiveState"]) == (st0["MainPID"], st0["NRestarts"], "active"), st
    assert not lost, lost[:5]
    assert "event=engine_died" in journal and "event=engine_recovered" in journal, journal[-3000:]
    assert "Watchdog timeout" not in journal
    sd.figures["crash_to_first_answer_s"] = round(first_ok - t_kill, 1)
    sd.figures["crash_rebuild_s"] = rec["last_recovery_s"]
    sd.figures["crash_requests"] = f"{len(after)} sent after the kill by 4 clients, {len(lost)} not 200"


@engine_under_manager
def test_frozen_engine_is_killed_by_the_watchdog_and_restarted(sd):
    ensure_active(sd)
    st0 = sd.m.show(SERVICE, "MainPID", "NRestarts")
    core = engine_core(sd)
    load = Clients(sd.sock, 2, chat_body(600, stream=True), timeout=240).start()
    # freeze the engine while it generates for both streams
    wait_for(lambda: health(sd).get("engine", {}).get("running", 0) >= 2, 120,
             lambda: f"two running requests: {health(sd).get('engine')}")
    t_stop = time.monotonic()
    core.send_signal(signal.SIGSTOP)
    sd.frozen.append(core.pid)
    # the daemon's event loop still answers: /health shows the verdict before systemd acts
    # (or the watchdog has already killed it: then there is no verdict to read, and the test says so)
    seen: dict = {}

    def verdict_or_gone():
        try:
            wd = health(sd)["watchdog"]
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            return "gone"
        if not wd["healthy"]:
            seen["verdict"] = wd
        return seen.get("verdict")

    wait_for(verdict_or_gone, 60, "an unhealthy verdict on /health")
    verdict = seen.get("verdict")
    wait_restarted(sd, int(st0["MainPID"]), int(st0["NRestarts"]))
    t_active = time.monotonic()
    assert gone(core), "the frozen engine survived"
    sd.frozen.remove(core.pid)
    status, _, _ = request(sd.sock, "POST", CHAT, chat_body(8), timeout=120)
    t_ok = time.monotonic()
    load.stop()
    journal = sd.m.journal(SERVICE)
    m = re.search(r"^\[\s*([\d.]+)\] .*Watchdog timeout \(limit (\d+)s\)!", journal, re.M)
    print(f"\nfrozen engine: /health verdict {verdict and verdict['reason']!r}; "
          f"restart cycle done {t_active - t_stop:.1f}s after SIGSTOP; answer after {t_ok - t_stop:.1f}s")
    assert verdict is not None and "is stopped" in verdict["reason"], verdict
    assert m and m.group(2) == str(WATCHDOG_SEC), journal[-3000:]
    assert "Failed with result 'watchdog'" in journal
    assert re.search(r"event=watchdog .*healthy=false .*is stopped", journal), journal[-3000:]
    assert status == 200
    sd.figures["frozen_engine_to_watchdog_kill_s"] = round(float(m.group(1)) - t_stop, 1)   # both CLOCK_MONOTONIC
    sd.figures["frozen_engine_to_serving_s"] = round(t_ok - t_stop, 1)
    sd.figures["faulthandler_traceback_in_journal"] = "Fatal Python error: Aborted" in journal


@engine_under_manager
def test_stop_lets_a_long_stream_finish(sd):
    ensure_active(sd)
    pid = main_pid(sd)
    # the daemon logs the id we give (a stream's headers are sent without one)
    rid = f"stop-during-stream-{os.getpid()}"
    max_tokens = 1000
    conn = http.client.HTTPConnection("localhost", timeout=120)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(120)
    s.connect(sd.sock)
    conn.sock = s
    conn.request("POST", CHAT, body=json.dumps(chat_body(max_tokens, stream=True,
                                                         stream_options={"include_usage": True})),
                 headers={"Content-Type": "application/json", "X-Request-Id": rid})
    resp = conn.getresponse()
    assert resp.status == 200
    head = b""
    while head.count(b"data: ") < 2:       # the role chunk and the first tokens: under way
        line = resp.readline()
        assert line, "stream ended early"
        head += line
    stop_done: dict = {}

    def stop() -> None:
        t = time.monotonic()
        r = sd.m.systemctl("stop", SERVICE, check=False, timeout=300)
        stop_done.update(rc=r.returncode, t=time.monotonic(), took=time.monotonic() - t)

    t_stop = time.monotonic()
    stopper = threading.Thread(target=stop)
    stopper.start()
    # The stop is under way once systemd has sent SIGTERM (deactivating) and the daemon has
    # said it drains; we have not read the stream on, so it is still in flight. How long
    # `systemctl stop` takes to get there depends on the machine: wait for it, do not guess.
    st_mid = wait_for(lambda: (lambda st: st["ActiveState"] != "active" and st["StatusText"].startswith("draining")
                               and st)(sd.m.show(SERVICE, "ActiveState", "SubState", "StatusText")), 120,
                      lambda: f"the stop to begin: {sd.m.show(SERVICE, 'ActiveState', 'SubState', 'StatusText')}")
    data = head + resp.read()
    t_end = time.monotonic()
    conn.close()
    stopper.join(300)
    assert not stopper.is_alive(), "systemctl stop hung"
    events = sse_events(data)
    st = sd.m.show(SERVICE, "ActiveState", "Result", "ExecMainStatus")
    print(f"\nstop during a stream: {st_mid}; stream ended {t_end - t_stop:.1f}s after `systemctl stop`, "
          f"which returned after {stop_done.get('took', -1):.1f}s; then {st}")
    assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events), data[-400:]
    assert events[-2]["usage"]["completion_tokens"] == max_tokens
    assert st_mid["ActiveState"] == "deactivating", st_mid
    assert st_mid["StatusText"] == "draining: finishing 1 request(s)", "the stream was not in flight at the stop"
    assert stop_done["rc"] == 0
    assert st == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, st
    # The order, from the daemon's own output (one stream, so in order): the stream's request
    # line, complete and 200, then its `stopped` event. systemd's stop finished only after that
    # process exited (ExecMainStatus above), so the stop waited for the stream.
    own = [e for e in map(parse_line, sd.m.journal(None, f"_PID={pid}", output="cat").splitlines()) if e]
    req = [i for i, e in enumerate(own) if e["event"] == "request" and e.get("id") == rid]
    stopped = [i for i, e in enumerate(own) if e["event"] == "stopped"]
    assert len(req) == 1 and len(stopped) == 1 and req[0] < stopped[0], own[-10:]
    assert own[req[0]].get("status") == "200", own[req[0]]
    assert sd.m.show(SOCKET, "ActiveState")["ActiveState"] == "active"
    sd.figures["stop_during_stream"] = (f"stream finished {t_end - t_stop:.1f}s after stop "
                                        f"(drain_timeout_s 20), stop took {stop_done['took']:.1f}s, exit 0")


@under_manager
def test_ui_service_serves_the_page_in_its_sandbox(sd):
    """qwenbox-ui.service as shipped (hardening included) runs Chainlit from the UI venv;
    no message is sent, so the daemon is not needed (or started) for this."""
    if not UI_PYTHON.exists():
        pytest.skip(f"no UI environment at {UI_PYTHON} (make ui-venv)")
    sd.m.systemctl("start", UI_SERVICE, timeout=120)

    def page():
        st = sd.m.show(UI_SERVICE, "ActiveState", "Result")
        assert st["ActiveState"] in ("active", "activating"), f"{st}\n{sd.m.journal(UI_SERVICE)[-3000:]}"
        try:
            return http_get("GET", "/chat/", sd.ui_port, timeout=5)
        except OSError:
            return None
    status, _, body = wait_for(page, 120, lambda: f"the chat page: {sd.m.journal(UI_SERVICE)[-3000:]}")
    assert status == 200 and b'content="/chat"' in body, body[:500]
    pid = sd.m.host_pid(int(sd.m.show(UI_SERVICE, "MainPID")["MainPID"]))
    assert "chainlit" in " ".join(psutil.Process(pid).cmdline())       # exec'd: systemd watches Chainlit itself
    state = sd.dirs["var-lib"] / "qwenbox-ui"
    assert (state / ".chainlit" / "config.toml").is_file() and oct(state.stat().st_mode & 0o777) == "0o700"
    sd.m.systemctl("stop", UI_SERVICE, timeout=60)
    journal = sd.m.journal(UI_SERVICE)
    assert "Traceback" not in journal, journal[-3000:]
    print(f"\nqwenbox-ui.service under the real manager: page 200; journal tail:\n{journal[-600:]}")


@pytest.mark.ui
@engine_under_manager
def test_ui_service_answers_in_its_sandbox(sd):
    """The sandboxed chat page (MemoryDenyWriteExecute, the syscall filter, IPAddressAllow)
    answers a message from a real browser through the daemon's socket."""
    why = ui_missing()
    if why:
        pytest.skip(why)
    ensure_active(sd)
    sd.m.systemctl("start", UI_SERVICE, timeout=120)
    try:
        wait_for(lambda: _get_ok(sd.ui_port), 120, lambda: f"the chat page: {sd.m.journal(UI_SERVICE)[-3000:]}")
        browser = Browser(sd.work / "chromium-profile")
        try:
            browser.open(f"http://127.0.0.1:{sd.ui_port}/chat/", "sandbox")
            browser.send("Hello from the sandbox")
            answer = wait_answer(browser, 1, 300)
        finally:
            browser.quit()
    finally:
        journal = sd.m.journal(UI_SERVICE)
        (sd.work / "journal-ui.txt").write_text(journal)
    print(f"\nsandboxed page answered ({len(answer)} chars)")
    assert "went wrong" not in answer and "not ready" not in answer and "cannot reach" not in answer, (
        f"{answer}\nUI:\n{journal[-2500:]}")
    assert "Traceback" not in journal, journal[-3000:]
    sd.m.systemctl("stop", UI_SERVICE, timeout=60)


def _get_ok(port: int) -> bool:
    try:
        return http_get("GET", "/chat/", port, timeout=5)[0] == 200
    except OSError:
        return False


@under_manager
def test_manager_shutdown_leaves_nothing(sd):
    (sd.work / "journal-all.txt").write_text(sd.m.journal(None))
    cgroups = list(sd.m._cgroups)
    # Every process of the manager's namespace descends from it; a host-wide search by
    # command line would also find another suite's manager running at the same time.
    tree = [psutil.Process(sd.m.pid), *sd.m.descendants()]
    sd.m.shutdown()
    assert sd.m.leftover_processes() == []
    assert not [c for c in cgroups if c.exists()], cgroups
    assert not [p for p in tree if not gone(p)], tree
