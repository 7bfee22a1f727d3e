"""Test helpers: run a real `qwenbox serve` process and talk to it over its unix socket.

The process runner and the HTTP client are the benchmarks' (``qwenbox.tools.client``);
what is here is only what tests add: the demo-model config and the OpenAI clients."""
from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

from qwenbox.tools.client import Server, UnixHTTPConnection, request, serve_argv  # noqa: F401 (tests import them here)

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / ".demo-model"
DEMO_CONFIG = ROOT / "etc" / "qwenbox" / "demo.toml"
CHAT = "/v1/chat/completions"


def jrequest(sock: str, method: str, path: str, body: Any = None, **kw) -> tuple[int, dict[str, str], Any]:
    """``request`` with the answer's body decoded as JSON (None when empty)."""
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


class Daemon(Server):
    """A real `qwenbox serve` subprocess on the demo model, with its config, socket and log
    in ``workdir`` (also its working directory); ``env`` is added to the environment.
    ``start``, ``health``, ``tail``, ``log_text`` and ``stop(sig, timeout)`` are Server's."""

    def __init__(self, workdir: Path, sections: dict[str, dict[str, Any]] | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.config = write_config(workdir / "qwenbox.toml", sections)
        sock = str(workdir / "qwenbox.sock")
        super().__init__("qwenbox serve", serve_argv(self.config, sock, extra_args or ()), sock,
                         workdir / "daemon.log", env=env, cwd=workdir)

    def wait_ready(self, timeout: float = 240.0, poll: float = 0.1) -> Any:
        """The /health body once it answers 200 (a demo-model cold start takes ~30 s)."""
        return super().wait_ready(timeout, poll)

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


class Clients:
    """``n`` threads that each send requests back to back, one new connection per request."""

    def __init__(self, sock: str, n: int, body: dict, path: str = CHAT, pause: float = 0.0,
                 timeout: float = 240.0) -> None:
        self.sock, self.body, self.path, self.pause, self.timeout = sock, body, path, pause, timeout
        self.results: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            r = {"t0": t0}
            try:
                status, _headers, data = request(self.sock, "POST", self.path, self.body, timeout=self.timeout)
                r["status"] = status
                if status != 200:
                    r["body"] = data[:300].decode(errors="replace")
            except (OSError, http.client.HTTPException) as e:
                r["error"] = f"{type(e).__name__}: {e}"
            r["t1"] = time.monotonic()
            with self._lock:
                self.results.append(r)
            if self.pause:
                self._stop.wait(self.pause)

    def start(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 300.0) -> list[dict]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "a client hung"
        return self.results

    def count_ok(self) -> int:
        with self._lock:
            return sum(1 for r in self.results if r.get("status") == 200)


def chat_body(max_tokens: int = 16, **kw) -> dict:
    return {"model": "qwenbox-demo", "messages": [{"role": "user", "content": "Hello there!"}],
            "max_tokens": max_tokens, "ignore_eos": True, **kw}
