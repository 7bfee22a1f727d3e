"""The daemon's life: 503 while loading, ready, graceful drain on SIGTERM, clean exit.

Also ``bind_unix`` on its own: stale socket files are replaced, anything else is refused.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from helpers import Daemon, UnixHTTPConnection, request, sse_events
from qwenbox.eventlog import parse_line
from qwenbox.listeners import ListenerError, bind_unix

CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "Tell me a long story."}]


def try_request(sock: str, method: str, path: str, body=None):
    """(status, headers, body) or None while nothing listens on the socket yet / any more."""
    try:
        return request(sock, method, path, body, timeout=30)
    except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError,
            http.client.RemoteDisconnected):
        return None


def assert_openai_error(status: int, headers: dict, body: bytes, want: int) -> dict:
    assert status == want, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.engine
def test_loading_gate_then_graceful_drain(tmp_path, demo_model):
    max_tokens = 400
    d = Daemon(tmp_path / "d", sections={"server": {"drain_timeout_s": 300.0, "retry_after_s": 7}}).start()
    try:
        # ---- while loading: /health 503 with the phase; the API 503 + Retry-After, OpenAI-shaped
        saw_health_503, saw_chat_503, phases = False, False, set()
        deadline = time.monotonic() + 300
        while True:
            assert time.monotonic() < deadline, f"daemon not ready in time:\n{d.tail()}"
            assert d.proc.poll() is None, f"daemon exited with {d.proc.returncode}:\n{d.tail()}"
            h = try_request(d.sock, "GET", "/health")
            if h is None:
                time.sleep(0.1)
                continue
            status, _, body = h
            health = json.loads(body)
            if status == 200:
                assert health["status"] == "ready"
                break
            assert status == 503, body
            assert health["status"] in ("starting", "loading", "warming") and health["ready"] is False, health
            phases.add(health["status"])
            saw_health_503 = True
            r = try_request(d.sock, "POST", CHAT, {"model": "qwenbox-demo", "messages": MSGS, "max_tokens": 2})
            assert r is not None
            if r[0] == 200:  # became ready between the two requests
                assert try_request(d.sock, "GET", "/health")[0] == 200
                continue
            err = assert_openai_error(*r, 503)
            assert r[1].get("retry-after") == "7", r[1]
            assert err["type"] == "service_unavailable" and err["code"] == "model_loading", err
            saw_chat_503 = True
            time.sleep(0.2)
        assert saw_health_503 and saw_chat_503, "the listener was not up before the engine loaded"
        assert phases & {"loading", "warming"}, phases

        # ---- ready: a long stream, SIGTERM in the middle of it
        conn = UnixHTTPConnection(d.sock, timeout=300)
        conn.request("POST", CHAT, body=json.dumps({
            "model": "qwenbox-demo", "messages": MSGS, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}),
            headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        head = b""
        while head.count(b"data: ") < 4:   # the role chunk, then a few tokens: generation is under way
            line = resp.readline()
            assert line, "stream ended early"
            head += line

        d.proc.send_signal(signal.SIGTERM)

        # the daemon drains: /health says so, new work is refused (503) or finds no socket
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, f"never saw the draining phase:\n{d.tail()}"
            h = try_request(d.sock, "GET", "/health")
            if h is None or json.loads(h[2])["status"] in ("draining", "stopped"):
                break
            time.sleep(0.05)
        r = try_request(d.sock, "POST", CHAT, {"model": "qwenbox-demo", "messages": MSGS, "max_tokens": 2})
        if r is not None:
            assert r[0] != 200
            err = assert_openai_error(*r, 503)
            assert err["code"] == "shutting_down" and "retry-after" in r[1], (err, r[1])

        # the in-flight stream still completes, every token and [DONE]
        data = head + resp.read()
        conn.close()
        events = sse_events(data)
        assert events[-1] == "[DONE]", data[-500:]
        assert not any(isinstance(e, dict) and "error" in e for e in events), [e for e in events if "error" in e]
        assert events[-2]["usage"]["completion_tokens"] == max_tokens

        assert d.proc.wait(120) == 0, d.tail()
        assert not os.path.exists(d.sock), "the socket file outlived the daemon"
        log = [e for e in map(parse_line, d.log_text().splitlines()) if e]
        seen = [e["phase"] for e in log if e.get("event") == "phase"]
        assert seen[-2:] == ["draining", "stopped"], seen
        assert "ready" in seen and seen.index("ready") < seen.index("draining")
        stopped = [e for e in log if e.get("event") == "stopped"]
        assert stopped and stopped[-1]["exit_code"] == "0"
    finally:
        d.stop()


# ---------------------------------------------------------------- bind_unix
def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _connects(path) -> bool:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        c.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        c.close()


def test_bind_unix_fresh_path_with_mode(tmp_path):
    path = tmp_path / "sub" / "dir" / "q.sock"
    s = bind_unix(str(path), 0o660)
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert _mode(path) == 0o660
        assert _connects(path)
    finally:
        s.close()


def test_bind_unix_other_mode(tmp_path):
    path = tmp_path / "q.sock"
    s = bind_unix(str(path), 0o600)
    try:
        assert _mode(path) == 0o600
    finally:
        s.close()


def test_bind_unix_replaces_stale_socket(tmp_path):
    path = tmp_path / "q.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()                    # a crashed server leaves its socket file behind
    assert path.exists() and not _connects(path)
    s = bind_unix(str(path), 0o660)
    try:
        assert _connects(path)
        assert _mode(path) == 0o660
    finally:
        s.close()


def test_bind_unix_refuses_live_socket(tmp_path):
    path = tmp_path / "q.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(ListenerError, match="already listening"):
            bind_unix(str(path), 0o660)
        assert _connects(path), "the live server's socket was disturbed"
    finally:
        live.close()


def test_bind_unix_refuses_regular_file(tmp_path):
    path = tmp_path / "q.sock"
    path.write_text("precious")
    with pytest.raises(ListenerError, match="not a socket"):
        bind_unix(str(path), 0o660)
    assert path.read_text() == "precious"


def test_bind_unix_refuses_directory(tmp_path):
    path = tmp_path / "q.sock"
    path.mkdir()
    with pytest.raises(ListenerError):
        bind_unix(str(path), 0o660)
    assert path.is_dir()


def test_serve_exits_69_when_socket_is_taken(tmp_path, demo_model):
    """A second daemon on the same socket fails fast instead of stealing it."""
    import subprocess
    import sys

    from helpers import ROOT, write_config

    path = tmp_path / "q.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        cfg = write_config(tmp_path / "q.toml")
        r = subprocess.run([sys.executable, "-m", "qwenbox", "serve", "-c", str(cfg), "--socket", str(path)],
                           capture_output=True, text=True, timeout=120, cwd=str(ROOT))
        assert r.returncode == 69, (r.stdout[-2000:], r.stderr[-2000:])
        assert "already listening" in r.stderr
        assert _connects(path)
    finally:
        live.close()


@pytest.mark.engine
def test_compile_cache_builds_the_engine_without_reading_the_weights(tmp_path, demo_model):
    """`qwenbox compile-cache` builds and warms the engine with random weights of the model's
    shapes: it works on a model directory whose weight files are absent."""
    from helpers import write_config

    shapes_only = tmp_path / "model"
    shutil.copytree(demo_model, shapes_only, ignore=shutil.ignore_patterns("*.safetensors"))
    assert not list(shapes_only.glob("*.safetensors"))
    cfg = write_config(tmp_path / "qwenbox.toml")
    out = subprocess.run([sys.executable, "-m", "qwenbox", "compile-cache", "--config", str(cfg),
                          "--model", str(shapes_only)], capture_output=True, text=True, timeout=600)
    print(out.stdout[-500:])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compile caches filled for 'qwenbox-demo'" in out.stdout
    assert "event=compile_cache" in out.stdout and "warmup_s=" in out.stdout
