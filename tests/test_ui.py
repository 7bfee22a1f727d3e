"""The chat page (issue 10): its pure parts, then the whole stack in a real browser.

Units (seconds): the input check, the delta batcher, the request-body fit, the API client
against a scripted unix-socket server (retries honouring Retry-After, friendly failures),
`qwenbox ui`'s set-up, the shipped Nginx site under `nginx -t`.

The stack (``ui`` + ``engine``; one module-wide set-up): a real daemon on the demo model,
the real `qwenbox ui` (Chainlit in .venv-ui), a real nginx with the shipped site on a
loopback port (workers as www-data under root), Debian's Chromium through chromedriver.
The page is opened through Nginx at /chat/. Screenshots go to .run/ui-screenshots/ (or
$QWENBOX_UI_SCREENSHOTS). Nothing waits a fixed time; no timing is asserted (figures are
printed): pieces are shown by states (a partial answer on the page; the daemon still
generating when the client holds the first token).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from types import SimpleNamespace

import pytest

import uistack
from conftest import wait_for
from helpers import ROOT, Daemon, write_config
from qwenbox import config as qconfig
from qwenbox.tools.client import get_json
from qwenbox.ui import client as uiclient, launch, textcheck
from qwenbox.ui.batcher import Batcher
from qwenbox.ui.settings import Settings
from uistack import Browser, ChatPage, Nginx, http, scratch_dir, screenshot_dir, share_socket, wait_answer

CHAT = "/v1/chat/completions"


# ================================================================ units
@pytest.mark.parametrize("text, says", [
    ("", "empty"), ("   \n\t ", "empty"), (None, "empty"),
    ("x" * 101, "101 characters long; the limit here is 100"),
    ("abc\x00def", "not text"), ("bad \x1b[31m escape", "not text"), ("lone \ud800 half", "not text"),
    ("\ufffd" * 4 + "PNG", "not text"),
])
def test_textcheck_refuses(text, says):
    got = textcheck.problem(text, 100)
    assert got is not None and says in got, got


@pytest.mark.parametrize("text", ["Hello!", "多语言 ünïcödé 🙂", "tabs\tand\nnewlines\r\n", "x" * 100,
                                  "one \ufffd is fine"])
def test_textcheck_accepts(text):
    assert textcheck.problem(text, 100) is None


def test_textcheck_cost_is_bounded():
    # a 50 MB paste is refused on its length, before any scan of its characters
    assert "characters long" in textcheck.problem("\x00" * 50_000_000, 16000)


def test_batcher_coalesces_and_never_loses_text():
    now = [0.0]
    out: list[str] = []

    async def sink(t: str) -> None:
        out.append(t)

    async def main():
        b = Batcher(sink, 0.04, clock=lambda: now[0])
        for i in range(10):            # 10 deltas within 10 ms: one flush for the first, then held
            await b.add(f"{i},")
            now[0] += 0.001
        now[0] += 0.05
        await b.add("late,")           # the interval passed: everything held goes out at once
        await b.add("")
        await b.add("tail")
        await b.close()
        return b.flushes

    flushes = asyncio.run(main())
    assert "".join(out) == "0,1,2,3,4,5,6,7,8,9,late,tail"
    assert out == ["0,", "1,2,3,4,5,6,7,8,9,late,", "tail"] and flushes == 3


def test_fit_body_drops_oldest_turns_never_system_or_last():
    big = "y" * 3000
    msgs = [{"role": "system", "content": "sys"}] + [
        {"role": r, "content": f"{i}:{big}"} for i, r in enumerate(["user", "assistant"] * 3)] + [
        {"role": "user", "content": "last"}]
    kept, dropped = uiclient.fit_body(msgs, 8000)
    assert dropped == 4 and kept[0]["role"] == "system" and kept[-1]["content"] == "last"
    assert kept[1]["content"].startswith("4:") and len(kept) == 4
    assert uiclient.fit_body(msgs, 10**6) == (msgs, 0)
    with pytest.raises(uiclient.ChatFailure) as e:
        uiclient.fit_body([{"role": "user", "content": big}], 2000)
    assert "too large" in e.value.message and not e.value.sent


def test_retry_after_and_truncation_headers():
    assert uiclient.retry_after({"retry-after": "5"}) == 5.0
    assert uiclient.retry_after({"retry-after": "99999"}) == uiclient.RETRY_AFTER_MAX_S
    for bad in ({"retry-after": "soon"}, {"retry-after": "nan"}, {}, None):
        assert uiclient.retry_after(bad) is None
    assert uiclient.truncated_count({"x-qwenbox-truncated": "dropped 3 oldest message(s) to fit the context"}) == 3
    assert uiclient.truncated_count({}) == 0


class Scripted:
    """An aiohttp server on a unix socket that answers chat requests from a script: a real
    HTTP peer for the client's retry logic (the real daemon's restart is the browser test's)."""

    def __init__(self, sock: str, script: list) -> None:
        self.sock, self.script, self.seen = sock, list(script), []

    async def handle(self, request):
        from aiohttp import web
        self.seen.append({"headers": {k.lower(): v for k, v in request.headers.items()}, "body": await request.json()})
        step = self.script.pop(0)
        if step[0] == "status":
            _, status, headers, body = step
            return web.json_response(body, status=status, headers=headers)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **step[2]})
        await resp.prepare(request)
        for ev in step[1]:
            await resp.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
        if step[0] == "drop":           # the daemon dies mid-answer: the connection just closes
            request.transport.close()
            return resp
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def start(self):
        from aiohttp import web
        app = web.Application()
        app.router.add_post(CHAT, self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.UnixSite(self.runner, self.sock).start()

    async def stop(self):
        await self.runner.cleanup()


def chunk(text=None, finish=None):
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}


def unavailable(retry_after: str):
    return ("status", 503, {"Retry-After": retry_after},
            {"error": {"message": "loading", "type": "service_unavailable", "param": None, "code": "loading"}})


def test_client_waits_for_a_starting_server_and_honours_retry_after(tmp_path):
    sock = str(tmp_path / "api.sock")
    server = Scripted(sock, [unavailable("1"), unavailable("0"),
                             ("stream", [chunk("Hel"), chunk("lo"), chunk(finish="stop")],
                              {"X-Qwenbox-Truncated": "dropped 2 oldest message(s) to fit the context"})])
    waits, deltas = [], []

    async def main():
        c = uiclient.ChatClient(Settings(socket=sock, model="m", start_wait_s=60))

        async def on_wait(w):
            waits.append(w)
            if len(waits) == 1:          # nothing listens at first: the daemon is (re)starting
                await server.start()

        async def on_delta(t):
            deltas.append(t)
        try:
            return await c.reply([{"role": "user", "content": "hi"}], "ui-abc", stream=True,
                                 on_delta=on_delta, on_wait=on_wait)
        finally:
            await c.close()
            await server.stop()

    reply = asyncio.run(main())
    assert reply.text == "Hello" and deltas == ["Hel", "lo"] and reply.truncated == 2 and reply.finish == "stop"
    assert [w.reason for w in waits] == ["starting"] * 3
    assert [w.delay_s for w in waits] == [uiclient.BACKOFF_START_S, 1.0, 0.0]   # backoff, then Retry-After
    assert all(s["headers"].get("x-session-id") == "ui-abc" for s in server.seen)
    body = server.seen[-1]["body"]
    # the server shapes the request: the UI sends the model, the messages and stream only
    assert set(body) <= {"model", "messages", "stream"}, body


@pytest.mark.parametrize("script, says, sent", [
    ([("status", 400, {}, {"error": {"message": "too long", "type": "invalid_request_error",
                                     "param": "messages", "code": "context_length_exceeded"}})],
     "longer than the model can read", False),
    ([("status", 500, {}, {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}})],
     "HTTP 500", True),
    ([("stream", [chunk("partial"), {"error": {"message": "engine died", "type": "server_error",
                                                "param": None, "code": "engine_dead"}}], {})],
     "interrupted", True),
    ([("drop", [chunk("partial")], {})], "interrupted", True),
])
def test_client_failures_are_one_friendly_sentence(tmp_path, script, says, sent):
    sock = str(tmp_path / "api.sock")
    server = Scripted(sock, script)

    async def main():
        await server.start()
        c = uiclient.ChatClient(Settings(socket=sock, model="m", start_wait_s=5))

        async def ignore(_):
            pass
        try:
            await c.reply([{"role": "user", "content": "hi"}], "ui-x", stream=True, on_delta=ignore)
        finally:
            await c.close()
            await server.stop()

    with pytest.raises(uiclient.ChatFailure) as e:
        asyncio.run(main())
    assert says in e.value.message and e.value.sent == sent
    assert "Traceback" not in e.value.message and "Error" not in e.value.message
    assert len(server.seen) == 1       # no retry of a refused or half-shown answer


def test_client_gives_up_after_start_wait(tmp_path):
    async def main():
        c = uiclient.ChatClient(Settings(socket=str(tmp_path / "absent.sock"), model="m", start_wait_s=0))
        try:
            await c.reply([{"role": "user", "content": "hi"}], "ui-x", stream=False)
        finally:
            await c.close()
    with pytest.raises(uiclient.ChatFailure) as e:
        asyncio.run(main())
    assert "still not ready" in e.value.message


def test_launch_writes_chainlit_config_and_execs_the_ui_python(tmp_path):
    fake_python = tmp_path / "venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text("#!/bin/sh\n")
    fake_python.chmod(0o755)
    cfg = qconfig.load(write_config(tmp_path / "q.toml", {"ui": {
        "python": str(fake_python), "state_dir": str(tmp_path / "state"), "listen": "127.0.0.1:8411",
        "allow_origins": ["https://chat.example.org"], "stream_below_chars": 50, "title": "Box"}}))
    argv, env = launch.prepare(cfg, environ={"PATH": "/usr/bin"})
    assert argv[:4] == [str(fake_python), "-m", "chainlit", "run"] and argv[4].endswith("qwenbox/ui/app.py")
    assert argv[5:] == ["--headless", "--host", "127.0.0.1", "--port", "8411", "--root-path", "/chat"]
    assert env["CHAINLIT_APP_ROOT"] == str(tmp_path / "state")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    s = Settings.from_env(env)
    assert (s.socket, s.model, s.stream_below_chars, s.max_body_bytes) == (
        cfg.server.socket, "qwenbox-demo", 50, cfg.server.max_body_bytes)
    cl = tomllib.loads((tmp_path / "state" / ".chainlit" / "config.toml").read_text())
    assert cl["project"]["allow_origins"] == ["https://chat.example.org"]
    assert cl["features"]["spontaneous_file_upload"]["enabled"] is False
    assert cl["UI"]["name"] == "Box" and cl["meta"]["generated_by"] == launch.CHAINLIT_VERSION
    assert (tmp_path / "state" / "chainlit.md").read_text() == ""
    assert not [p for p in (tmp_path / "state").rglob(".*.*") if p.name.startswith((".config", ".chainlit.md"))]


def test_ui_command_refuses_a_bad_setup_with_exit_78(tmp_path):
    cfg = write_config(tmp_path / "q.toml", {"ui": {"python": str(tmp_path / "nope" / "python"),
                                                    "state_dir": str(tmp_path / "s")}})
    r = subprocess.run([sys.executable, "-m", "qwenbox", "ui", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 78 and "ui.python" in r.stderr and "Traceback" not in r.stderr, r.stderr
    bad = write_config(tmp_path / "b.toml", {"ui": {"listen": "everywhere", "allow_origins": ["*"]}})
    r = subprocess.run([sys.executable, "-m", "qwenbox", "ui", "-c", str(bad)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 78 and "ui.listen" in r.stderr, r.stderr


def test_daemon_reload_ignores_the_ui_section(tmp_path):
    """[ui] is read by `qwenbox ui` only: a SIGHUP reload neither applies nor reports it."""
    old = qconfig.load(write_config(tmp_path / "a.toml"))
    new = qconfig.load(write_config(tmp_path / "b.toml", {"ui": {"listen": "127.0.0.1:9999"},
                                                           "limits": {"max_n": 2}}))
    cfg, applied, ignored = qconfig.reloaded(old, new)
    assert applied == ["limits.max_n"] and ignored == [] and cfg.ui.listen == "127.0.0.1:9999"


def test_ui_needs_the_daemons_unix_socket(tmp_path):
    cfg = qconfig.load(write_config(tmp_path / "q.toml", {"server": {"socket": "", "tcp": "127.0.0.1:8000"}}))
    with pytest.raises(launch.UiSetupError, match=r"server\.socket is empty"):
        launch.prepare(cfg)


def test_shipped_site_says_what_the_issue_asks():
    site = uistack.SITE.read_text()

    def block(name: str) -> str:
        m = re.search(r"location " + re.escape(name) + r" \{(.*?)\n    \}", site, re.S)
        assert m, name
        return m.group(1)
    v1, chat, metrics = block("/v1/"), block("/chat/"), block("= /metrics")
    for line in ("proxy_http_version 1.1;", "proxy_buffering off;", "proxy_set_header Connection \"\";"):
        assert line in v1, line
    assert int(re.search(r"proxy_read_timeout (\d+)s;", v1).group(1)) >= 300       # restart + load
    assert "proxy_pass http://qwenbox_chat;" in chat                               # no URI: /chat kept
    assert "proxy_set_header Upgrade $http_upgrade;" in chat
    assert "if ($qwenbox_foreign_origin)" in chat
    assert int(re.search(r"proxy_read_timeout (\d+)s;", chat).group(1)) > 45       # socket.io ping
    assert re.search(r"allow 127\.0\.0\.1;\s+allow ::1;\s+deny all;", metrics)
    assert "limit_req_status 429;" in site and "limit_conn_status 429;" in site
    assert "limit_req zone=" in v1 and "limit_conn " in v1
    m = re.search(r"client_max_body_size (\d+)m;", site)
    assert int(m.group(1)) * 1024 * 1024 == qconfig.ServerConfig().max_body_bytes
    assert re.search(r"location = / \{\s+return 302 /chat/;", site)
    assert "# auth_basic " in site


@pytest.mark.ui
def test_shipped_site_passes_nginx_t():
    if uistack.shutil.which("nginx") is None:
        pytest.skip("nginx is not installed")
    work = scratch_dir("qb-nginx-t-")
    try:
        n = Nginx(work, "/run/qwenbox/qwenbox.sock", 8300)
        assert n.check.returncode == 0, n.check.stderr
    finally:
        uistack.shutil.rmtree(work, ignore_errors=True)


# ================================================================ the stack
# The demo model's context is 2048 tokens: a long first answer leaves no room for a second
# turn, and the server then drops the oldest turns ("truncate") instead of refusing (400).
DAEMON_SECTIONS = {"shaping": {"on_overlong": "truncate"}}


def stack_test(fn):
    return pytest.mark.ui(pytest.mark.engine(fn))


def share_when_bound(d: Daemon) -> None:
    wait_for(lambda: os.path.exists(d.sock) or not d.proc or d.proc.poll() is not None, 120,
             "the daemon's socket")
    assert d.proc.poll() is None, d.log_text()[-3000:]
    share_socket(d.sock)


@pytest.fixture(scope="module")
def stack(demo_model):
    why = uistack.missing()
    if why:
        pytest.skip(why)
    work = scratch_dir("qb-ui-")
    env = SimpleNamespace(work=work, daemon=None, page=None, nginx=None, browser=None, figures={})
    try:
        env.daemon = Daemon(work / "daemon", DAEMON_SECTIONS)
        env.daemon.start()
        share_when_bound(env.daemon)
        env.page = ChatPage(work, env.daemon.sock)
        env.page.start()
        env.nginx = Nginx(work / "nginx", env.daemon.sock, env.page.port)
        env.nginx.start()
        env.daemon.wait_ready()
        env.browser = Browser(work / "chromium-profile")
        env.url = f"http://127.0.0.1:{env.nginx.port}"
        env.marker = f"page-{os.getpid()}"
        env.browser.open(env.url + "/", env.marker)        # / redirects to /chat/
        yield env
    finally:
        for part in (env.browser and env.browser.quit, env.nginx and env.nginx.stop,
                     env.page and env.page.stop, env.daemon and env.daemon.stop):
            if part:
                try:
                    part()
                except Exception as e:              # one failing stop must not leave the others running
                    print(f"stopping {part}: {e}")
        if env.figures:
            print("\nUI figures: " + json.dumps(env.figures))
        uistack.shutil.rmtree(work, ignore_errors=True)


def request_lines(d: Daemon) -> list[dict]:
    from qwenbox.eventlog import parse_line
    return [r for r in map(parse_line, d.log_text().splitlines()) if r and r.get("event") == "request"
            and r.get("path") == CHAT]


@stack_test
def test_page_streams_short_messages_and_shows_thinking_for_long_ones(stack):
    b, shots = stack.browser, screenshot_dir()
    assert b.d.current_url.rstrip("/").endswith("/chat")
    before = len(request_lines(stack.daemon))
    b.clear_seen()
    b.send("Hello there! What can you do?")
    final = wait_answer(b, 1)
    seen = [e for e in b.seen() if e["n"] == 1]
    partial = [e for e in seen if e["text"] and len(e["text"]) < len(final)]
    b.screenshot(shots / "chat-short-reply.png")
    print(f"\nshort message: the answer ({len(final)} chars) took {len(seen)} page states")
    assert partial, f"the answer appeared in one piece: {[len(e['text']) for e in seen]}"
    assert all(final.startswith(e["text"].rstrip()) for e in partial[:3])

    long_text = ("Please read this carefully and answer in detail. " * 8).strip()
    assert len(long_text) >= 200
    b.clear_seen()
    b.send(long_text)
    # the page's own record, not a poll: a quick answer may replace the indicator between two polls
    wait_for(lambda: any("Thinking" in e["text"] for e in b.seen()), 120,
             lambda: f"the thinking indicator: page states {[e['text'][:60] for e in b.seen()][-5:]}; "
                     f"UI log: {stack.page.proc.log()[-1500:]}")
    b.screenshot(shots / "chat-thinking.png")
    final2 = wait_answer(b, 2)
    seen2 = [e["text"] for e in b.seen() if e["n"] == 2]
    b.screenshot(shots / "chat-long-reply.png")
    assert "Thinking" not in final2 and final2 != final
    # the indicator, then the whole answer: no partial answer in between
    after = seen2[next(i for i, t in enumerate(seen2) if "Thinking" in t) + 1:]
    assert after and all(t == final2 for t in after if t), [len(t) for t in after]

    lines = request_lines(stack.daemon)[before:]
    assert [r.get("stream") == "true" for r in lines] == [True, False], lines
    assert lines[0]["session"] == lines[1]["session"] and lines[0]["session"].startswith("ui-")
    assert all(r["status"] == "200" for r in lines), lines
    # The history went along. The first answer is random: when it was long, the server dropped
    # the oldest turns to fit the context and the page must say so; else the prompt grew.
    dropped = int(lines[1].get("truncated") or 0)
    notes = [t for t in b.assistant_texts() if "were left out" in t]
    print(f"second turn: prompt {lines[1]['prompt_len']} tokens, server dropped {dropped} message(s)")
    if dropped:
        assert len(notes) == 1 and f"the {dropped} oldest message(s)" in notes[0], notes
    else:
        assert not notes and int(lines[1]["prompt_len"]) > int(lines[0]["prompt_len"])


@stack_test
def test_bad_input_is_answered_in_the_page_and_never_sent(stack):
    b = stack.browser
    before = len(request_lines(stack.daemon))
    n = len(b.assistant_texts())
    for text, says in (("x" * 16001, "the limit here is 16,000"), ("PNG\x00\x01\x02binary", "not text")):
        b.send(text)
        got = wait_answer(b, n + 1, 60)
        n = len(b.assistant_texts())
        assert says in got, got
    assert len(request_lines(stack.daemon)) == before
    assert "Traceback" not in " ".join(b.assistant_texts())


@stack_test
def test_daemon_restart_page_recovers_without_reload(stack):
    b, d = stack.browser, stack.daemon
    n = len(b.assistant_texts())
    assert d.stop() == 0
    status, headers, _ = http("GET", "/health", stack.nginx.port)
    assert status == 503 and headers.get("retry-after"), (status, headers)     # Nginx: not running, retry
    t0 = time.monotonic()
    b.send("Are you back?")
    wait_for(lambda: any("model is starting" in t for t in b.assistant_texts()), 120, "the 'model is starting' notice")
    b.screenshot(screenshot_dir() / "chat-model-starting.png")
    stack.daemon = d = Daemon(stack.work / "daemon", DAEMON_SECTIONS)
    d.start()
    share_when_bound(d)
    final = wait_answer(b, n + 1, 400)
    took = time.monotonic() - t0
    assert not any("model is starting" in t for t in b.assistant_texts()), "the notice stayed"
    assert final and "went wrong" not in final and "not ready" not in final, final
    assert b.marker() == stack.marker, "the page was reloaded"
    assert "Traceback" not in " ".join(b.assistant_texts())
    stack.figures["restart_message_answered_after_s"] = round(took, 1)
    print(f"\ndaemon restart: the message sent while it was down was answered {took:.1f}s later")


def read_sse(resp, on_first=None) -> tuple[list[float], list[str]]:
    """Arrival times of content chunks, and the raw events."""
    times, events = [], []
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].decode()
        events.append(payload)
        if payload == "[DONE]":
            break
        obj = json.loads(payload)
        if any((c.get("delta") or {}).get("content") for c in obj.get("choices") or ()):
            times.append(time.monotonic())
            if len(times) == 1 and on_first:
                on_first()
    return times, events


@stack_test
def test_stream_through_nginx_arrives_in_pieces(stack):
    import http.client as httpclient
    conn = httpclient.HTTPConnection("127.0.0.1", stack.nginx.port, timeout=120)
    body = {"model": "qwenbox-demo", "messages": [{"role": "user", "content": "Count."}], "stream": True,
            "max_tokens": 256, "ignore_eos": True}
    conn.request("POST", CHAT, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/event-stream")
    at_first = {}

    def first():      # the client holds the first token: is the daemon still generating?
        at_first["health"] = get_json(stack.daemon.sock, "/health")[1]
    times, events = read_sse(resp, first)
    conn.close()
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    print(f"\nthrough nginx: {len(times)} content chunks over {times[-1] - times[0]:.3f}s; inter-arrival "
          f"p50 {gaps[len(gaps) // 2] * 1000:.1f} ms, p90 {gaps[int(len(gaps) * 0.9)] * 1000:.1f} ms")
    stack.figures["nginx_stream_itl_p50_ms"] = round(gaps[len(gaps) // 2] * 1000, 1)
    assert events[-1] == "[DONE]" and len(times) >= 32     # deltas that end mid-character carry no text
    assert at_first["health"]["in_flight"] >= 1, "the first token reached the client only after generation ended"


@stack_test
def test_nginx_access_rules(stack):
    """/metrics from loopback only; /health's status only; the body limit; no cross-site use
    of the chat socket."""
    port = stack.nginx.port
    status, _, data = http("GET", "/health", port)
    assert status == 200 and json.loads(data) == {"status": "ready", "ready": True}, data[:500]
    poll = "/chat/ws/socket.io/?EIO=4&transport=polling"
    assert http("GET", poll, port, headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200
    assert http("GET", poll, port)[0] == 200                                         # no Origin: not a browser
    assert http("GET", poll, port, headers={"Origin": "https://evil.example"})[0] == 403
    def gap_samples() -> float:
        status, _, data = http("GET", "/metrics", stack.nginx.port)
        assert status == 200 and b"qwenbox_session_turn_gap_seconds" in data
        return float(re.search(rb'qwenbox_session_usage_samples\{figure="turn_gap_s"\} ([\d.]+)', data).group(1))
    before = gap_samples()
    sid = f"metrics-test-{os.getpid()}"
    for _ in range(2):           # two turns of one session through Nginx: one more gap
        status, _, _ = http("POST", CHAT, stack.nginx.port, headers={"X-Session-Id": sid}, timeout=120,
                            body={"model": "qwenbox-demo", "messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 4})
        assert status == 200
    assert gap_samples() == before + 1
    status, _, _ = http("GET", "/metrics", stack.nginx.port, source="127.0.0.2")     # another address
    assert status == 403
    status, _, _ = http("POST", CHAT, stack.nginx.port,
                        body={"messages": [{"role": "user", "content": "x" * (5 << 20)}]})
    assert status == 413


@stack_test
def test_nginx_limits_answer_429(stack):
    import http.client as httpclient
    port = stack.nginx.port
    held = []
    body = json.dumps({"model": "qwenbox-demo", "messages": [{"role": "user", "content": "Go on."}], "stream": True,
                       "max_tokens": 1000, "ignore_eos": True})
    try:
        for _ in range(8):           # limit_conn: 8 streams per client address
            c = httpclient.HTTPConnection("127.0.0.1", port, timeout=120)
            c.request("POST", CHAT, body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            assert r.status == 200
            held.append(c)
        status, _, _ = http("POST", CHAT, port, body=json.loads(body))
        assert status == 429, status
    finally:
        for c in held:
            c.close()
    # limit_req: a burst past rate + burst is refused with 429, not 503
    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(32) as ex:
        statuses = list(ex.map(lambda _: http("GET", "/v1/models", port)[0], range(80)))
    print(f"\nburst of 80 GET /v1/models: {statuses.count(200)} x 200, {statuses.count(429)} x 429")
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0
