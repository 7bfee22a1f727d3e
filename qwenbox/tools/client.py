"""Talking to a server on a unix socket, and running one: what the benchmarks and the tests share.

Contract:
- ``request`` / ``get_json``: one blocking HTTP request over a unix socket
  (``UnixHTTPConnection``); ``served_model`` reads ``/v1/models``.
- ``unix_session`` + ``stream_chat`` / ``stream_completion``: an aiohttp session on the
  socket and one streamed chat completion / completion timed client-side (``Result``:
  TTFT, inter-token gaps, end to end).
  aiohttp is imported only when these run.
- ``Server``: a server process we start and always stop, on a unix socket, with its
  output in a log file; ``running`` and ``socket_dir`` for the benchmarks.
Nothing here imports vllm.
"""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import qwenbox

from ..jsontypes import Json, JsonObject

if TYPE_CHECKING:                    # imported where it runs only (see the contract above)
    import aiohttp


# ------------------------------------------------------------------ plain HTTP (blocking)
class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix stream socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.unix_path)
        except BaseException:   # nothing listens yet, say: the socket object must not leak
            s.close()
            raise
        self.sock = s


def request(sock: str, method: str, path: str, body: Json = None, *, raw: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 120.0) -> tuple[int, dict[str, str], bytes]:
    """One request -> (status, headers with lower-case names, body bytes). ``body`` is sent
    as JSON, ``raw`` as it is. Connection failures raise OSError / http.client.HTTPException."""
    conn = UnixHTTPConnection(sock, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def get_json(sock: str, path: str, timeout: float = 5.0) -> tuple[int, Json]:
    """GET -> (status, decoded JSON body, or None when the body is empty or not JSON)."""
    status, _, data = request(sock, "GET", path, timeout=timeout)
    try:
        return status, json.loads(data) if data else None
    except ValueError:
        return status, None


def served_model(sock: str) -> tuple[str, int | None]:
    """(model id, max_model_len) as the server at ``sock`` announces them."""
    status, body = get_json(sock, "/v1/models")
    if status != 200 or not body or not body.get("data"):
        raise ServerError(f"GET /v1/models answered {status}")
    m = body["data"][0]
    return m["id"], m.get("max_model_len")


# ------------------------------------------------------------------ one streamed request (aiohttp)
def unix_session(sock: str, limit: int = 0) -> aiohttp.ClientSession:
    """An aiohttp session whose every request goes to the unix socket ``sock``."""
    import aiohttp
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock, limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=None))


@dataclass
class Result:
    """One request as the client saw it. Times are seconds since the request was sent."""
    ok: bool = False
    status: int | None = None        # HTTP status; None when no status line came back
    failure: str | None = None       # None when ok; else "429", "503", "timeout", "stream_error", ...
    error_code: str | None = None    # OpenAI error `code` (the 429 reason, for instance)
    ttft_s: float | None = None      # to the first non-empty content chunk
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)   # gaps between content chunks
    prompt_tokens: int | None = None
    output_tokens: int = 0
    tag: str = ""                    # which prompt class / phase, for breakdowns
    started: float = 0.0             # monotonic send time
    last_output_at: float = 0.0      # monotonic time of the latest output

    def output_at(self, now: float) -> None:
        """Output arrived at monotonic ``now``: the first sets TTFT, each later one adds a gap."""
        if self.ttft_s is None:
            self.ttft_s = now - self.started
        else:
            self.itl_s.append(now - self.last_output_at)
        self.last_output_at = now


async def stream_chat(session: aiohttp.ClientSession, body: JsonObject, timeout_s: float, tag: str = "",
                      request_id: str | None = None) -> Result:
    """POST one streaming chat completion and time it client-side. ``request_id`` goes out
    as X-Request-Id, so the server's own log line for it can be found afterwards. Output
    is a chunk with non-empty ``delta.content``."""
    return await _stream(session, "/v1/chat/completions", body, timeout_s, tag, request_id)


async def stream_completion(session: aiohttp.ClientSession, body: JsonObject, timeout_s: float, tag: str = "",
                            request_id: str | None = None) -> Result:
    """The same for ``/v1/completions`` (``prompt`` a string or a list of token ids). Output
    is any chunk with a choice, even one whose text is empty: a random-weight model's
    token may decode to nothing, and it was generated all the same."""
    return await _stream(session, "/v1/completions", body, timeout_s, tag, request_id)


async def _stream(session: aiohttp.ClientSession, path: str, body: JsonObject, timeout_s: float, tag: str,
                  request_id: str | None) -> Result:
    import aiohttp

    chat = path.endswith("/chat/completions")
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    r = Result(tag=tag)
    t0 = r.started = time.monotonic()
    chunks = 0
    done = False
    try:
        async with session.post("http://localhost" + path, json=body,
                                headers={"X-Request-Id": request_id} if request_id else None,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            r.status = resp.status
            if resp.status != 200:
                raw = await resp.read()
                r.failure = str(resp.status)
                r.error_code = _error_code(raw)
                r.e2e_s = time.monotonic() - t0
                return r
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                now = time.monotonic()
                if payload == b"[DONE]":
                    done = True
                    break
                try:
                    obj = json.loads(payload)
                except ValueError:
                    continue
                if "error" in obj:
                    r.failure = "stream_error"
                    r.error_code = _error_code(payload)
                    continue
                if obj.get("usage"):
                    r.prompt_tokens = obj["usage"].get("prompt_tokens")
                    r.output_tokens = obj["usage"].get("completion_tokens") or r.output_tokens
                for ch in obj.get("choices") or ():
                    if (ch.get("delta") or {}).get("content") if chat else ("text" in ch):
                        chunks += 1
                        r.output_at(now)
            r.e2e_s = time.monotonic() - t0
            if not r.output_tokens:
                r.output_tokens = chunks
            if r.failure is None and not done:
                r.failure = "incomplete_stream"
            r.ok = r.failure is None
    except TimeoutError:
        r.failure, r.e2e_s = "timeout", time.monotonic() - t0
    except aiohttp.ClientError as e:
        r.failure, r.e2e_s = "connection_error", time.monotonic() - t0
        r.error_code = type(e).__name__
    return r


def _error_code(raw: bytes) -> str | None:
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(err, dict):
        return err.get("code") or err.get("type")
    return None


# ------------------------------------------------------------------ server processes
class ServerError(RuntimeError):
    """A server we started exited early, was not ready in time, or answered nonsense."""


def package_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment plus ``extra``, such that a child imports this very qwenbox
    (installed or run from a checkout) and its output is not held back in a buffer."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = str(Path(qwenbox.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return {**env, **(extra or {})}


def serve_argv(config: str | os.PathLike[str], sock: str, extra_args: Sequence[str] = ()) -> list[str]:
    """``qwenbox serve`` on ``config``, listening on ``sock``, with this interpreter."""
    return [sys.executable, "-m", "qwenbox", "serve", "--config", str(config), "--socket", sock, *extra_args]


class Server:
    """A server process we start, on a unix socket, and always stop.

    ``start`` launches ``argv`` with stdout and stderr appended to ``log_path``, in a new
    process group so ``stop`` can take the engine-core children too; ``env`` is added to
    ``package_env()``. ``wait_ready`` polls ``/health`` until its first 200, or raises
    ServerError when the process exits or the deadline (counted from launch) passes.
    It records ``launch_to_listen_s`` (first answer of any status on /health),
    ``launch_to_ready_s`` (first 200; qwenbox: after warm-up; vLLM: engine up) and
    ``ready_health`` (that 200's body).
    """

    def __init__(self, name: str, argv: list[str], sock: str, log_path: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name, self.argv, self.sock, self.log_path = name, argv, sock, Path(log_path)
        self.env, self.cwd = package_env(env), cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.t_launch = 0.0
        self.launch_to_listen_s: float | None = None
        self.launch_to_ready_s: float | None = None
        self.ready_health: Json = None
        self._log: io.BufferedWriter | None = None

    @classmethod
    def qwenbox(cls, name: str, config: str | os.PathLike[str], sock: str, log_path: Path,
                extra_args: Sequence[str] = ()) -> Server:
        return cls(name, serve_argv(config, sock, extra_args), sock, log_path)

    def start(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the child's stdout until stop() closes it
        self.t_launch = time.monotonic()
        # Its own process group, so a forced stop takes the engine-core children too. NOT its
        # own session: with the kernel's autogroup scheduling (sched_autogroup_enabled=1) a
        # new session is a new scheduling group, and on the 2-core dev VM that starved this
        # client for whole requests (a streamed answer read in one piece at the end in 60 of
        # 60 requests, vs 0 of 60 in the same session).
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd, stdin=subprocess.DEVNULL, process_group=0)
        return self

    def health(self) -> tuple[int, Json] | None:
        """(status, body) of GET /health, or None while nothing answers on the socket."""
        try:
            return get_json(self.sock, "/health", timeout=5)
        except (OSError, http.client.HTTPException):
            return None

    def wait_ready(self, timeout: float = 600.0, poll: float = 0.1) -> Json:
        """Block until /health answers 200 and return its body (see the class docstring)."""
        deadline = self.t_launch + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode} before it was ready; "
                                  f"log: {self.log_path}\n{self.tail()}")
            h = self.health()
            now = time.monotonic()
            if h is not None:
                if self.launch_to_listen_s is None:
                    self.launch_to_listen_s = now - self.t_launch
                if h[0] == 200:
                    self.launch_to_ready_s = now - self.t_launch
                    self.ready_health = h[1]
                    return h[1]
            if now >= deadline:
                raise ServerError(f"{self.name} not ready after {timeout:.0f} s; log: {self.log_path}\n{self.tail()}")
            time.sleep(poll)   # between probes of the state; the deadline above bounds the wait

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_text().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Send ``sig`` and wait up to ``timeout`` s (then SIGKILL the group); the exit code."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        # Engine-core children left behind by a crash are still in the group we created.
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return p.returncode


@contextlib.contextmanager
def running(server: Server, ready_timeout: float = 600.0) -> Iterator[Server]:
    """The server started and ready for the block; stopped after it, however it ends."""
    try:
        server.start().wait_ready(ready_timeout)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def socket_dir() -> Iterator[Path]:
    """A short private directory for sockets (unix socket paths are limited to ~107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="qwenbox-bench-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
