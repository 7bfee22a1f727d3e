"""A real systemd manager for tests: PID 1 of new pid/mount/uts/cgroup namespaces.

The machine's own PID 1 need not be systemd. As root, ``SystemdManager`` starts
``/lib/systemd/systemd --system`` in fresh namespaces (a new cgroup2 mount on its own
cgroup, a tmpfs on /run, volatile journald), with the units and drop-ins of a host folder
bind-mounted on /run/systemd/system, and drives it with ``nsenter ... systemctl``:

    with SystemdManager(workdir, binds={host_dir: "/run/qwenbox"}) as m:
        m.write_unit("x.service", text); m.write_dropin("x.service", "test", text)
        m.daemon_reload(); m.systemctl("start", "x.service")
        m.show("x.service", "ActiveState", "NRestarts")   # {"ActiveState": "active", ...}
        m.journal("x.service")                              # its journal, as text

With ``overlay=True`` the manager boots in a throwaway root instead: an overlayfs with the
host's / as its read-only lower layer and a tmpfs as its upper layer, a private network
namespace (loopback only) and the host's /dev and /sys. Whatever runs there (dpkg, apt,
maintainer scripts, the units they install) writes only to that tmpfs, which dies with
the namespace; ``m.root`` is that root as the host sees it, ``m.upper`` the upper layer
(everything changed since boot; a deleted file is a 0:0 character device there).

Nothing leaks to the host: the manager's cgroup is our own and is killed and removed on
exit; it is also killed if the test process dies (PR_SET_PDEATHSIG on ``unshare``,
``--kill-child`` on the manager). Only its bind mounts touch host folders, and only the
ones the caller passes. ``unavailable_reason()`` says why a machine cannot run it.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

SYSTEMD = "/lib/systemd/systemd"
TARGET = "qwenbox-test.target"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PR_SET_PDEATHSIG = 1
LAYER = "/run/qwenbox-test-layer"      # with overlay=True: the overlay's tmpfs, inside the namespace


def _cgroup_roots() -> tuple[Path, Path | None]:
    """(the cgroup2 hierarchy, the named v1 'systemd' hierarchy on hybrid hosts or None)."""
    root = Path("/sys/fs/cgroup")
    unified = root if (root / "cgroup.controllers").exists() else root / "unified"
    named = root / "systemd"
    return unified, (named if named.is_dir() and not (named / "cgroup.controllers").exists() else None)


def unavailable_reason() -> str | None:
    """None if this machine can run a systemd manager in namespaces, else why not."""
    if os.geteuid() != 0:
        return "needs root (a systemd manager in new namespaces)"
    if not os.access(SYSTEMD, os.X_OK):
        return f"no systemd binary at {SYSTEMD}"
    for tool in ("unshare", "nsenter", "systemctl", "journalctl"):
        if shutil.which(tool) is None:
            return f"no {tool} command"
    unified, _ = _cgroup_roots()
    if not (unified / "cgroup.procs").exists():
        return f"no cgroup2 hierarchy at {unified}"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--uts", "--cgroup", "--mount-proc", "sh", "-c",
         "mount --make-rprivate / && mount -t tmpfs tmpfs /run && umount /run"],
        capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create pid/mount/cgroup namespaces here: {probe.stderr.strip() or probe.returncode}"
    return None


def _preexec(cgroup_dirs: list[Path]):
    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)   # the test dies -> unshare dies -> all die
        for d in cgroup_dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))
    return run


class SystemdManager:
    def __init__(self, workdir: Path, binds: dict[str | Path, str] | None = None,
                 log_level: str = "info", overlay: bool = False) -> None:
        self.workdir = Path(workdir)
        self.overlay = overlay
        self.units = self.workdir / "units"          # bind-mounted on /run/systemd/system
        self.binds = {str(k): v for k, v in (binds or {}).items()}
        self.log_level = log_level
        self.log_path = self.workdir / "manager.log"
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None                  # the manager, as the host sees it
        self._cgroups: list[Path] = []

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> SystemdManager:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start(self, timeout: float = 60.0) -> SystemdManager:
        self.units.mkdir(parents=True, exist_ok=True)
        (self.units / TARGET).write_text(
            "[Unit]\nDescription=qwenbox test boot target (nothing of sysinit/basic)\nDefaultDependencies=no\n")
        wants = self.units / f"{TARGET}.wants"
        wants.mkdir(exist_ok=True)
        for unit in ("systemd-journald.socket", "systemd-journald.service"):
            link = wants / unit
            if not link.is_symlink():
                link.symlink_to(f"/lib/systemd/system/{unit}")
        unified, named = _cgroup_roots()
        name = f"qwenbox-test-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self._cgroups = [unified / name] + ([named / name] if named else [])
        for d in self._cgroups:
            d.mkdir()
        old = "/.oldroot" if self.overlay else ""      # where host paths are once the root is pivoted
        binds = "\n".join(f"mkdir -p '{ns}'\nmount --bind '{old}{host}' '{ns}'" for host, ns in self.binds.items())
        pivot = finish = ""
        if self.overlay:
            layer, new = self.workdir / "layer", self.workdir / "newroot"
            layer.mkdir(exist_ok=True)
            new.mkdir(exist_ok=True)
            pivot = f"""mount -t tmpfs -o mode=700 tmpfs '{layer}'
mkdir '{layer}/upper' '{layer}/work'
mount -t overlay overlay -o 'lowerdir=/,upperdir={layer}/upper,workdir={layer}/work' '{new}'
mkdir -p '{new}{old}'
cd '{new}'
pivot_root . '.{old}'
cd /
mount -t proc proc /proc
mount --rbind {old}/dev /dev
mount --rbind {old}/sys /sys
ip link set lo up
"""
            binds += f"\nmkdir -p {LAYER}\nmount --bind '{old}{layer}' {LAYER}"
            finish = f"umount -l {old}\nrmdir {old}\n"
        inner = self.workdir / "inner.sh"
        inner.write_text(f"""#!/bin/sh
set -e
mount --make-rprivate /
{pivot}umount -R /sys/fs/cgroup 2>/dev/null || umount -l /sys/fs/cgroup 2>/dev/null || true
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/systemd/system /run/lock /run/systemd/journald.conf.d
mount --bind '{old}{self.units}' /run/systemd/system
printf '[Journal]\\nStorage=volatile\\nRateLimitBurst=0\\n' > /run/systemd/journald.conf.d/test.conf
{binds}
{finish}hostname qwenbox-test
exec env -i container=qwenbox-test PATH={PATH} LANG=C.UTF-8 \\
  {SYSTEMD} --system --unit={TARGET} --log-level={self.log_level} --show-status=0
""")
        inner.chmod(0o755)
        with open(self.log_path, "ab") as log:      # the child keeps its own copy
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--uts", "--cgroup",
                 "--mount-proc", *(["--net"] if self.overlay else []), str(inner)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_preexec(self._cgroups), env={"PATH": PATH, "LANG": "C.UTF-8"})
        deadline = time.monotonic() + timeout
        try:
            while self.pid is None:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"systemd manager did not start:\n{self.manager_log()}")
                kids = psutil.Process(self.proc.pid).children()
                if kids and _cmdline(kids[0]).startswith(SYSTEMD):
                    self.pid = kids[0].pid
                time.sleep(0.05)
            while True:
                state = self.systemctl("is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"systemd manager is {state!r} after {timeout}s:\n{self.manager_log()}")
                time.sleep(0.1)
        except BaseException:
            self.shutdown()
            raise
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        """Power the manager off (stops every unit), then make sure nothing is left."""
        if self.proc is not None and self.proc.poll() is None:
            self.systemctl("poweroff", check=False, timeout=10)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_cgroup()
                self.proc.kill()
                self.proc.wait(10)
        self._kill_cgroup()
        for top in self._cgroups:
            # innermost first: a cgroup can be removed once it has no children and no processes
            for d in [*sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), top]:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    pass        # still busy after the kill: leftover_processes() and the caller's checks say so
        self.pid = None

    def _kill_cgroup(self, timeout: float = 30.0) -> None:
        """SIGKILL whatever still runs in the manager's cgroups (nothing, after a clean poweroff),
        and wait until the kernel has reaped it all: only empty cgroups can be removed."""
        for top in self._cgroups:
            if not top.exists():
                continue
            if (top / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    (top / "cgroup.kill").write_text("1")
            for procs in top.rglob("cgroup.procs"):
                try:
                    pids = [int(p) for p in procs.read_text().split()]
                except OSError:
                    continue
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.leftover_processes() and time.monotonic() < deadline:
            time.sleep(0.05)

    def leftover_processes(self) -> list[int]:
        pids = []
        for top in self._cgroups:
            for procs in top.rglob("cgroup.procs") if top.exists() else ():
                with contextlib.suppress(OSError):
                    pids += [int(p) for p in procs.read_text().split()]
        return pids

    @property
    def root(self) -> Path:
        """The manager's root directory as the host sees it (the throwaway root with ``overlay``)."""
        assert self.pid is not None, "manager not running"
        return Path(f"/proc/{self.pid}/root")

    @property
    def upper(self) -> Path:
        """With ``overlay``: the upper layer, i.e. every file created, changed or deleted in the root."""
        assert self.overlay, "no overlay root"
        return self.root / LAYER.lstrip("/") / "upper"

    # ------------------------------------------------------------ units
    def write_unit(self, name: str, text: str) -> Path:
        path = self.units / name
        path.write_text(text)
        return path

    def write_dropin(self, unit: str, name: str, text: str) -> Path:
        d = self.units / f"{unit}.d"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{name}.conf"
        path.write_text(text)
        return path

    def mask(self, unit: str) -> None:
        link = self.units / unit
        if not link.is_symlink():
            link.symlink_to("/dev/null")

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    # ------------------------------------------------------------ driving it
    def nsenter(self, *cmd: str, check: bool = True, timeout: float = 60.0,
                input: str | None = None) -> subprocess.CompletedProcess:
        assert self.pid is not None, "manager not running"
        r = subprocess.run(["nsenter", "-t", str(self.pid), "-a", *cmd], capture_output=True, text=True,
                           timeout=timeout, input=input, env={"PATH": PATH, "LANG": "C.UTF-8",
                                                              "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"})
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
        return r

    def systemctl(self, *args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess:
        return self.nsenter("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str | None = None, *args: str, output: str = "short-monotonic") -> str:
        cmd = ["journalctl", "--no-pager", "-o", output, *args]
        if unit:
            cmd += ["-u", unit]
        return self.nsenter(*cmd, check=False).stdout

    def host_pid(self, ns_pid: int) -> int | None:
        """The host's pid of a process the manager's namespace calls ``ns_pid``."""
        for p in self.descendants():
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("NSpid:"):
                            if int(line.split()[-1]) == ns_pid:
                                return p.pid
                            break
            except OSError:
                continue
        return None

    def descendants(self) -> list[psutil.Process]:
        if self.pid is None:
            return []
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def manager_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def scratch_dir(prefix: str = "qwenbox-sd-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
