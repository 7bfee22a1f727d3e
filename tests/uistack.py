"""The chat stack for the UI tests: the real `qwenbox ui` process, a real Nginx with the
shipped site, and Debian's Chromium driven through Selenium (chromedriver).

Nothing here starts the engine: the tests start their daemon with ``helpers.Daemon``.
The shipped site (etc/nginx/qwenbox.conf) is used as it is, except for what a test
machine must change (``site_for_test``): the listen address, the daemon's socket, the
chat page's port and the log paths. Each substitution must match exactly once, so the
test notices when the shipped file changes under it.
"""
from __future__ import annotations

import contextlib
import grp
import http.client as httpclient
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from conftest import wait_for
from helpers import ROOT, write_config
from qwenbox.tools.client import package_env

SITE = ROOT / "etc" / "nginx" / "qwenbox.conf"
UI_PYTHON = ROOT / ".venv-ui" / "bin" / "python"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def missing() -> str | None:
    """Why the stack cannot run here (`make test` installs all of it as root), or None."""
    if not UI_PYTHON.exists():
        return f"no UI environment at {UI_PYTHON} (make ui-venv)"
    for exe in ("nginx", CHROMIUM, CHROMEDRIVER):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (apt-get install nginx chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install '.[test]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def www_data_gid() -> int | None:
    """Nginx's workers run as www-data when the test runs as root."""
    if os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam("www-data").gr_gid
    except KeyError:
        return None


def share_socket(path: str) -> None:
    """What qwenbox.socket does in production (SocketGroup=www-data, SocketMode=0660)."""
    gid = www_data_gid()
    if gid is not None:
        os.chown(path, -1, gid)


def http(method: str, url_path: str, port: int, body: Any = None, headers: dict | None = None,
         timeout: float = 30.0, source: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request to 127.0.0.1:port; ``source``: the local address to send from."""
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, url_path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


class Proc:
    """A child process with its output in a log file; ``stop`` always reaps it."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.argv, self.log_path, self.env, self.cwd = argv, log, env, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> Proc:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the child's output until stop() closes it
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd, stdin=subprocess.DEVNULL, process_group=0)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log.close()
        return self.proc.returncode


class ChatPage:
    """`qwenbox ui` on 127.0.0.1:port, talking to the daemon at ``sock``."""

    def __init__(self, work: Path, sock: str, **ui: Any) -> None:
        self.port = free_port()
        self.state = work / "ui-state"
        self.config = write_config(work / "ui.toml", {
            "ui": {"python": str(UI_PYTHON), "state_dir": str(self.state), "listen": f"127.0.0.1:{self.port}", **ui}})
        self.proc = Proc([sys.executable, "-m", "qwenbox", "ui", "--config", str(self.config), "--socket", sock],
                         work / "ui.log", env=package_env())

    def start(self, timeout: float = 120.0) -> ChatPage:
        self.proc.start()

        def up() -> bool:
            assert self.proc.alive(), f"qwenbox ui exited:\n{self.proc.log()[-3000:]}"
            try:
                return http("GET", "/chat/", self.port, timeout=5)[0] == 200
            except OSError:
                return False
        wait_for(up, timeout, lambda: f"the chat page on port {self.port}:\n{self.proc.log()[-2000:]}", interval=0.2)
        return self

    def stop(self) -> None:
        self.proc.stop()


def site_for_test(sock: str, port: int, ui_port: int, logs: Path) -> str:
    text = SITE.read_text()
    for old, new in (("    listen 127.0.0.1:80;\n", f"    listen 127.0.0.1:{port};\n"),
                     ("    listen [::1]:80;\n", ""),
                     ("unix:/run/qwenbox/qwenbox.sock;", f"unix:{sock};"),
                     ("server 127.0.0.1:8300;", f"server 127.0.0.1:{ui_port};"),
                     ("/var/log/nginx/qwenbox.access.log", str(logs / "access.log")),
                     ("/var/log/nginx/qwenbox.error.log", str(logs / "error.log"))):
        assert text.count(old) == 1, f"the shipped site changed: {old!r} appears {text.count(old)} times"
        text = text.replace(old, new)
    return text


class Nginx:
    """A real nginx (master + one worker, unprivileged: www-data under root) serving the
    shipped site, in the foreground, with every path in ``work``."""

    def __init__(self, work: Path, sock: str, ui_port: int) -> None:
        self.work = work
        self.port = free_port()
        work.mkdir(parents=True, exist_ok=True)
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (work / d).mkdir(exist_ok=True)
            if www_data_gid() is not None:
                shutil.chown(work / d, "www-data", "www-data")
        (work / "qwenbox-site.conf").write_text(site_for_test(sock, self.port, ui_port, work))
        user = "user www-data www-data;" if www_data_gid() is not None else ""
        (work / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 512; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    include {work}/qwenbox-site.conf;
}}
""")
        argv = ["nginx", "-p", str(work), "-c", str(work / "nginx.conf"), "-e", str(work / "error.log")]
        self.check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=60)
        self.proc = Proc([*argv, "-g", "daemon off;"], work / "nginx.out")

    def start(self, timeout: float = 60.0) -> Nginx:
        assert self.check.returncode == 0, self.check.stderr
        self.proc.start()

        def up() -> bool:
            assert self.proc.alive(), f"nginx exited:\n{self.proc.log()}\n{self.error_log()}"
            try:
                http("GET", "/", self.port, timeout=5)
                return True
            except OSError:
                return False
        wait_for(up, timeout, lambda: f"nginx on port {self.port}: {self.error_log()[-2000:]}")
        return self

    def error_log(self) -> str:
        p = self.work / "error.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        self.proc.stop(signal.SIGQUIT)


# ---------------------------------------------------------------- the browser
# Records every change of the newest assistant message's text, with a page-side clock: what
# the person saw, in order (read back with ``Browser.seen``).
OBSERVER_JS = """
window.__qb = window.__qb || {marker: arguments[0], log: []};
const last = () => {
  const steps = document.querySelectorAll('[data-step-type="assistant_message"] .message-content');
  return [steps.length, steps.length ? steps[steps.length - 1].innerText : ''];
};
if (!window.__qbObserver) {
  window.__qbObserver = new MutationObserver(() => {
    const [n, text] = last();
    const L = window.__qb.log;
    if (!L.length || L[L.length - 1].text !== text || L[L.length - 1].n !== n)
      L.push({t: performance.now(), n: n, text: text});
  });
  window.__qbObserver.observe(document.body, {subtree: true, childList: true, characterData: true});
}
"""


class Browser:
    def __init__(self, profile: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1100,900"):
            opts.add_argument(a)
        self.d = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(profile.parent / "chromedriver.log")),
                                  options=opts)
        self.d.set_script_timeout(30)

    def quit(self) -> None:
        self.d.quit()

    def open(self, url: str, marker: str) -> None:
        from selenium.webdriver.common.by import By
        self.d.get(url)
        wait_for(lambda: self.d.find_elements(By.CSS_SELECTOR, "#chat-input"), 60, "the chat input")
        self.d.execute_script(OBSERVER_JS, marker)

    def marker(self) -> str | None:
        """Set at ``open``: still there = the page was never reloaded."""
        return self.d.execute_script("return window.__qb ? window.__qb.marker : null")

    def seen(self) -> list[dict]:
        return self.d.execute_script("return window.__qb.log")

    def clear_seen(self) -> None:
        self.d.execute_script("window.__qb.log = []")

    def send(self, text: str) -> None:
        from selenium.webdriver.common.by import By
        box = self.d.find_element(By.CSS_SELECTOR, "#chat-input")
        # React owns the textarea's value: set it the way a paste does, then let React see it.
        self.d.execute_script("""
            const el = arguments[0];
            Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set.call(el, arguments[1]);
            el.dispatchEvent(new Event('input', {bubbles: true}));""", box, text)
        wait_for(lambda: self.d.find_element(By.CSS_SELECTOR, "#chat-submit").is_enabled(), 30, "the send button")
        self.d.find_element(By.CSS_SELECTOR, "#chat-submit").click()

    def running(self) -> bool:
        from selenium.webdriver.common.by import By
        return bool(self.d.find_elements(By.CSS_SELECTOR, "#stop-button"))

    def assistant_texts(self) -> list[str]:
        return self.d.execute_script("""return Array.from(document.querySelectorAll(
            '[data-step-type="assistant_message"] .message-content')).map(e => e.innerText)""")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.d.save_screenshot(str(path))
        return path


INDICATORS = ("Thinking…", "The model is starting", "The model is busy")


def wait_answer(b: Browser, count: int, timeout: float = 240.0) -> str:
    """The ``count``-th assistant message once the turn has finished (a note about dropped
    turns may follow it): the stop button gone and no indicator in its place (Chainlit's
    stop button can be gone for a moment while the turn still runs)."""
    def done():
        texts = b.assistant_texts()
        return (len(texts) >= count and not b.running() and texts[count - 1]
                and not any(i in texts[count - 1] for i in INDICATORS) and texts[count - 1])
    return wait_for(done, timeout, lambda: f"answer {count}: {b.assistant_texts()[-3:]}")


def screenshot_dir() -> Path:
    """Test artifacts; QWENBOX_UI_SCREENSHOTS=docs/screenshots refreshes the README's."""
    return Path(os.environ.get("QWENBOX_UI_SCREENSHOTS") or ROOT / ".run" / "ui-screenshots")


def scratch_dir(prefix: str) -> Path:
    """A directory Nginx's workers (www-data) may traverse: pytest's own are 0700."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    return d
