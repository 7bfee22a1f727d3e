"""Test helpers: run a real `qwenbox serve` process and talk to it over its unix socket."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qwenbox.tools.client import UnixHTTPConnection

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / ".demo-model"
DEMO_CONFIG = ROOT / "etc" / "qwenbox" / "demo.toml"


def request(sock: str, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 120.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request over the unix socket -> (status, headers, body bytes)."""
    conn = UnixHTTPConnection(sock, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def jrequest(sock: str, method: str, path: str, body: Any = None, **kw) -> tuple[int, dict[str, str], Any]:
    status, headers, data = request(sock, method, path, body, **kw)
    return status, headers, json.loads(data) if data else None


def sse_events(data: bytes) -> list[Any]:
    """Parse an SSE body into its `data:` payloads (JSON decoded, '[DONE]' kept as a string)."""
    out = []
    for block in data.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[6:]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def write_config(path: Path, sections: dict[str, dict[str, Any]] | None = None,
                 base: Path = DEMO_CONFIG) -> Path:
    """The demo profile with absolute paths, plus ``sections`` overrides, written as TOML."""
    import tomllib

    cfg = tomllib.loads(base.read_text())
    cfg["model"]["path"] = str(DEMO_MODEL)
    cfg["engine"]["cache_dir"] = str(ROOT / ".run" / "vllm-cache")
    for sec, kv in (sections or {}).items():
        cfg.setdefault(sec, {}).update(kv)
    lines = []
    for sec, kv in cfg.items():
        lines.append(f"[{sec}]")
        for k, v in kv.items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class Daemon:
    """A real `qwenbox serve` subprocess on the demo model."""

    def __init__(self, workdir: Path, sections: dict[str, dict[str, Any]] | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.sock = str(workdir / "qwenbox.sock")
        self.config = write_config(workdir / "qwenbox.toml", sections)
        self.log_path = workdir / "daemon.log"
        self.extra_args = extra_args or []
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "qwenbox", "serve", "--config", str(self.config),
                                      "--socket", self.sock, *self.extra_args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(self.workdir))
        return self

    def health(self) -> tuple[int, Any] | None:
        try:
            status, _, body = jrequest(self.sock, "GET", "/health", timeout=5)
            return status, body
        except (OSError, http.client.HTTPException, ValueError):
            return None

    def wait_ready(self, timeout: float = 240.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.tail()}")
            h = self.health()
            if h and h[0] == 200:
                return h[1]
            time.sleep(0.25)
        raise TimeoutError(f"daemon not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def openai(self, **kw):
        import httpx
        import openai
        return openai.OpenAI(base_url="http://localhost/v1", api_key="unused", max_retries=0,
                             http_client=httpx.Client(transport=httpx.HTTPTransport(uds=self.sock), timeout=120), **kw)

    def async_openai(self, **kw):
        import httpx
        import openai
        return openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="unused", max_retries=0,
                                  http_client=httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=self.sock),
                                                                timeout=120), **kw)
