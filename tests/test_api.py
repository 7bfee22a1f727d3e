"""The API end to end: the real vLLM CPU engine on the demo model, over the real unix socket.

All tests share the session ``daemon`` (one cold start). Every bad input of issue 2 item 6
gets the OpenAI error shape and the right status, and the daemon answers the next request.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import socket
import time
import uuid

import pytest

from helpers import DEMO_MODEL, UnixHTTPConnection, jrequest, request, sse_events
from qwenbox import config as qconfig
from qwenbox.eventlog import parse_line

pytestmark = pytest.mark.engine

CHAT, COMPL = "/v1/chat/completions", "/v1/completions"
MSGS = [{"role": "user", "content": "Hello there, how are you?"}]


# ---------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def cfg(daemon):
    return qconfig.load(daemon.config)


@pytest.fixture(scope="module")
def model(cfg):
    return cfg.model.name


@pytest.fixture
def openai_client(daemon):
    """The real openai client over the unix socket, closed after the test (its pooled
    connections would otherwise be left to the garbage collector)."""
    with daemon.openai() as client:
        yield client


def assert_error(status, headers, body: bytes, want: int, *, param=..., code=..., type_=...) -> dict:
    assert status == want, body[:500]
    assert headers.get("content-type", "").startswith("application/json"), headers
    obj = json.loads(body)
    assert set(obj) == {"error"}, obj
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    if type_ is not ...:
        assert err["type"] == type_, err
    return err


def assert_serves(daemon, model: str) -> None:
    """The daemon still answers a good request after a bad one."""
    status, _, body = jrequest(daemon.sock, "POST", CHAT, {"model": model, "messages": MSGS, "max_tokens": 2})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1


def post_error(daemon, model, body, want, path=CHAT, **kw) -> dict:
    err = assert_error(*request(daemon.sock, "POST", path, body), want, **kw)
    assert_serves(daemon, model)
    return err


def chat_prompt_tokens(content: str) -> int:
    """Tokens of one user message in the demo model's ChatML template (what the server counts)."""
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(str(DEMO_MODEL / "tokenizer.json"))
    text = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    return len(tok.encode(text, add_special_tokens=False).ids)


def request_log_lines(daemon, rid: str) -> list[dict]:
    out = []
    for line in daemon.log_text().splitlines():
        rec = parse_line(line)
        if rec and rec.get("event") == "request" and rec.get("id") == rid:
            out.append(rec)
    return out


# ---------------------------------------------------------------- bad input (issue 2, item 6)
@pytest.mark.parametrize("raw", [
    b'{"model": "qwenbox-demo", "messages": [',
    b'{"model": "qwenbox-demo", "messages": [}',
    b"{'model': 'qwenbox-demo'}",
    b"not json at all",
    b"",
])
def test_malformed_json(daemon, model, raw):
    err = assert_error(*request(daemon.sock, "POST", CHAT, raw=raw), 400, type_="invalid_request_error")
    assert err["code"] == "invalid_json"
    assert_serves(daemon, model)


@pytest.mark.parametrize("body", [[], [MSGS], "hello", 42, None, True])
def test_non_object_body(daemon, model, body):
    raw = json.dumps(body).encode()
    err = assert_error(*request(daemon.sock, "POST", CHAT, raw=raw), 400)
    assert "JSON object" in err["message"]
    assert_serves(daemon, model)


def test_non_object_body_completions(daemon, model):
    assert_error(*request(daemon.sock, "POST", COMPL, raw=b"[1, 2]"), 400)
    assert_serves(daemon, model)


def test_missing_messages(daemon, model):
    post_error(daemon, model, {"model": model}, 400, param="messages")


def test_empty_messages(daemon, model):
    post_error(daemon, model, {"model": model, "messages": []}, 400, param="messages")


def test_messages_not_a_list(daemon, model):
    post_error(daemon, model, {"model": model, "messages": "hi"}, 400, param="messages")


@pytest.mark.parametrize("role", ["bot", "", None, 7, "System"])
def test_unknown_role(daemon, model, role):
    post_error(daemon, model, {"model": model, "messages": [{"role": role, "content": "x"}]}, 400,
               param="messages[0].role")


@pytest.mark.parametrize("content, param", [
    (5, "messages[0].content"),
    ({"text": "x"}, "messages[0].content"),
    (True, "messages[0].content"),
    ([{"type": "image_url", "image_url": {"url": "http://x"}}], "messages[0].content[0]"),
    (["plain string part"], "messages[0].content[0]"),
])
def test_content_of_wrong_type(daemon, model, content, param):
    post_error(daemon, model, {"model": model, "messages": [{"role": "user", "content": content}]}, 400,
               param=param)


def test_invalid_utf8(daemon, model):
    raw = b'{"model": "qwenbox-demo", "messages": [{"role": "user", "content": "\xff\xfe bad"}]}'
    err = assert_error(*request(daemon.sock, "POST", CHAT, raw=raw), 400)
    assert err["code"] == "invalid_encoding" and "UTF-8" in err["message"]
    assert_serves(daemon, model)


def test_body_over_size_limit(daemon, model, cfg):
    limit = cfg.server.max_body_bytes
    content = "a" * (limit + 1)
    raw = json.dumps({"model": model, "messages": [{"role": "user", "content": content}]}).encode()
    assert len(raw) > limit
    err = assert_error(*request(daemon.sock, "POST", CHAT, raw=raw), 413, code="request_too_large")
    assert str(limit) in err["message"]
    assert_serves(daemon, model)


def test_chunked_body_over_size_limit(daemon, model, cfg):
    """No Content-Length: the limit must still hold while the body streams in."""
    limit = cfg.server.max_body_bytes
    chunk = b"x" * (256 * 1024)

    def body():
        for _ in range(limit // len(chunk) + 2):
            yield chunk

    conn = UnixHTTPConnection(daemon.sock, timeout=120)
    try:
        # the server may answer and close before the rest of the body is sent
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request("POST", CHAT, body=body(), headers={"Content-Type": "application/json"},
                         encode_chunked=True)
        resp = conn.getresponse()
        assert_error(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read(), 413,
                     code="request_too_large")
    finally:
        conn.close()
    assert_serves(daemon, model)


def test_unknown_model(daemon, model):
    err = post_error(daemon, model, {"model": "gpt-4o", "messages": MSGS}, 404, param="model",
                     code="model_not_found")
    assert "gpt-4o" in err["message"] and model in err["message"]


def test_unknown_model_completions(daemon, model):
    post_error(daemon, model, {"model": "nope", "prompt": "hi"}, 404, path=COMPL, param="model")


def test_missing_model(daemon, model):
    post_error(daemon, model, {"messages": MSGS}, 400, param="model")


@pytest.mark.parametrize("value", [0, -1, "10", 1.5, True])
def test_max_tokens_invalid(daemon, model, value):
    post_error(daemon, model, {"model": model, "messages": MSGS, "max_tokens": value}, 400, param="max_tokens")


def test_max_tokens_above_cap(daemon, model, cfg):
    cap = cfg.limits.max_tokens_cap
    err = post_error(daemon, model, {"model": model, "messages": MSGS, "max_tokens": cap + 1}, 400,
                     param="max_tokens")
    assert str(cap) in err["message"]


def test_max_tokens_above_cap_completions(daemon, model, cfg):
    post_error(daemon, model, {"model": model, "prompt": "hi", "max_tokens": cfg.limits.max_tokens_cap + 1},
               400, path=COMPL, param="max_tokens")


@pytest.mark.parametrize("key, value", [
    ("temperature", -0.5), ("temperature", 2.5), ("temperature", "warm"),
    ("top_p", 0), ("top_p", -0.1), ("top_p", 1.5),
])
def test_sampling_out_of_range(daemon, model, key, value):
    post_error(daemon, model, {"model": model, "messages": MSGS, key: value}, 400, param=key)


def test_n_above_cap(daemon, model, cfg):
    n = cfg.limits.max_n + 1
    err = post_error(daemon, model, {"model": model, "messages": MSGS, "n": n, "max_tokens": 2}, 400, param="n")
    assert str(cfg.limits.max_n) in err["message"]


def test_n_zero(daemon, model):
    post_error(daemon, model, {"model": model, "messages": MSGS, "n": 0}, 400, param="n")


def test_stream_not_boolean(daemon, model):
    post_error(daemon, model, {"model": model, "messages": MSGS, "stream": "yes"}, 400, param="stream")


def test_chat_prompt_longer_than_max_model_len(daemon, model, cfg):
    max_len = cfg.model.max_model_len
    content = "Hello there, how are you? " * (max_len // 4)
    n = chat_prompt_tokens(content)
    assert n > max_len
    err = post_error(daemon, model, {"model": model, "messages": [{"role": "user", "content": content}]}, 400)
    assert str(n) in err["message"] and str(max_len) in err["message"], err


def test_completion_prompt_longer_than_max_model_len(daemon, model, cfg):
    max_len = cfg.model.max_model_len
    ids = [100] * (max_len + 52)
    err = post_error(daemon, model, {"model": model, "prompt": ids, "max_tokens": 4}, 400, path=COMPL)
    assert str(len(ids)) in err["message"] and str(max_len) in err["message"], err


def test_prompt_plus_max_tokens_over_max_model_len(daemon, model, cfg):
    max_len = cfg.model.max_model_len
    max_tokens = min(cfg.limits.max_tokens_cap, max_len - 1)
    ids = [100] * (max_len - max_tokens + 10)
    err = post_error(daemon, model, {"model": model, "prompt": ids, "max_tokens": max_tokens}, 400,
                     path=COMPL, param="max_tokens")
    assert str(max_len) in err["message"]


def test_token_ids_outside_vocab(daemon, model):
    post_error(daemon, model, {"model": model, "prompt": [1, 10 ** 9], "max_tokens": 2}, 400, path=COMPL,
               param="prompt")


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/nothing"), ("POST", "/v1/chat/completion"), ("GET", "/"), ("POST", "/v2/completions"),
])
def test_unknown_route(daemon, model, method, path):
    assert_error(*request(daemon.sock, method, path, {"model": model}), 404, type_="not_found_error")
    assert_serves(daemon, model)


@pytest.mark.parametrize("method, path, allow", [
    ("GET", CHAT, "POST"), ("PUT", COMPL, "POST"), ("POST", "/v1/models", "GET"), ("DELETE", "/health", "GET"),
])
def test_wrong_method(daemon, model, method, path, allow):
    status, headers, body = request(daemon.sock, method, path)
    assert_error(status, headers, body, 405, code="method_not_allowed")
    assert allow in headers.get("allow", "").split(",")
    assert_serves(daemon, model)


# ---------------------------------------------------------------- good paths
def test_models(daemon, model, cfg):
    status, _, body = jrequest(daemon.sock, "GET", "/v1/models")
    assert status == 200
    assert body["object"] == "list" and len(body["data"]) == 1
    m = body["data"][0]
    assert m["id"] == model == "qwenbox-demo" and m["object"] == "model"
    assert m["max_model_len"] == cfg.model.max_model_len
    assert m["root"] == "qwenbox-demo" and cfg.model.local_dir not in json.dumps(body)     # no local path


def test_model_retrieve_with_the_openai_client(daemon, model, openai_client):
    client = openai_client
    assert client.models.retrieve(model).id == model
    import openai
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no/such-model")


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"])
def test_a_proxied_request_gets_health_status_only_and_no_metrics(daemon, header):
    """What Nginx passes on (it adds X-Forwarded-For) is not local: whether to send traffic,
    nothing about the processes, versions, paths or load behind it."""
    status, _, body = jrequest(daemon.sock, "GET", "/health", headers={header: "203.0.113.9"})
    assert status == 200 and body == {"status": "ready", "ready": True}
    status, _, body = jrequest(daemon.sock, "GET", "/metrics", headers={header: "203.0.113.9"})
    assert status == 403 and body["error"]["code"] == "metrics_local_only"
    assert request(daemon.sock, "GET", "/metrics")[0] == 200           # the socket itself: all of it


def test_health_ready_with_cold_start(daemon):
    status, _, body = jrequest(daemon.sock, "GET", "/health")
    assert status == 200
    assert body["status"] == "ready" and body["ready"] is True
    cs = body["cold_start"]
    for key in ("import_s", "engine_s", "warmup_s", "total_s"):
        assert isinstance(cs.get(key), (int, float)) and cs[key] >= 0, (key, cs)
    assert cs["total_s"] >= cs["import_s"] + cs["engine_s"]
    assert body["warmup"]["steps"], body["warmup"]
    eng = body["engine"]
    assert eng["core_pids"] and isinstance(eng["running"], int)


def test_chat_non_stream(daemon, model):
    status, headers, body = jrequest(daemon.sock, "POST", CHAT, {
        "model": model, "messages": [{"role": "system", "content": "Be brief."}, *MSGS],
        "max_tokens": 5, "ignore_eos": True, "temperature": 0})
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == model and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] == "length"
    u = body["usage"]
    assert u["completion_tokens"] == 5 and u["prompt_tokens"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_chat_usage_counts_the_chat_template(daemon, model):
    status, _, body = jrequest(daemon.sock, "POST", CHAT, {"model": model, "messages": MSGS, "max_tokens": 1})
    assert status == 200
    assert body["usage"]["prompt_tokens"] == chat_prompt_tokens(MSGS[0]["content"])


def test_chat_stream_with_usage(daemon, model):
    status, headers, data = request(daemon.sock, "POST", CHAT, {
        "model": model, "messages": MSGS, "max_tokens": 6, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}})
    assert status == 200, data
    assert headers["content-type"].startswith("text/event-stream")
    raw = data.decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = sse_events(data)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert all(c.get("usage") is None for c in chunks[:-1])
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert isinstance(text, str)


def test_chat_stream_without_usage(daemon, model):
    status, _, data = request(daemon.sock, "POST", CHAT, {"model": model, "messages": MSGS, "max_tokens": 3,
                                                          "stream": True})
    assert status == 200
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e or e["usage"] is None for e in events[:-1])
    assert all(e["choices"] for e in events[:-1])


def test_completions_non_stream(daemon, model):
    status, _, body = jrequest(daemon.sock, "POST", COMPL, {"model": model, "prompt": "The quick brown fox",
                                                            "max_tokens": 4, "ignore_eos": True})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert isinstance(choice["text"], str) and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4


def test_completions_token_ids(daemon, model):
    status, _, body = jrequest(daemon.sock, "POST", COMPL, {"model": model, "prompt": [5, 6, 7, 8],
                                                            "max_tokens": 2, "ignore_eos": True})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] == 2


def test_completions_stream(daemon, model):
    status, headers, data = request(daemon.sock, "POST", COMPL, {
        "model": model, "prompt": "The quick brown fox", "max_tokens": 5, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}})
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert chunks and all(c["object"] == "text_completion" for c in chunks)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_n2_non_stream(daemon, model):
    status, _, body = jrequest(daemon.sock, "POST", CHAT, {"model": model, "messages": MSGS, "n": 2,
                                                           "max_tokens": 3, "ignore_eos": True})
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 6


def test_n2_stream(daemon, model):
    status, _, data = request(daemon.sock, "POST", CHAT, {"model": model, "messages": MSGS, "n": 2,
                                                          "max_tokens": 3, "ignore_eos": True, "stream": True,
                                                          "stream_options": {"include_usage": True}})
    assert status == 200
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 6
    finished = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
                for c in events[:-2] if c["choices"][0]["finish_reason"]}
    assert finished == {0: "length", 1: "length"}


def test_request_id_is_echoed(daemon, model):
    rid = f"test-{uuid.uuid4().hex[:12]}"
    status, headers, body = jrequest(daemon.sock, "POST", CHAT, {"model": model, "messages": MSGS, "max_tokens": 1},
                                     headers={"X-Request-Id": rid})
    assert status == 200 and headers["x-request-id"] == rid and body["id"] == f"chatcmpl-{rid}"


# ---------------------------------------------------------------- the real openai client
def test_openai_chat(daemon, model, openai_client):
    client = openai_client
    r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=4)
    assert r.object == "chat.completion" and r.model == model
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 4


def test_openai_chat_stream(daemon, model, openai_client):
    client = openai_client
    stream = client.chat.completions.create(model=model, messages=MSGS, max_tokens=5, stream=True,
                                            extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == ["length"]


def test_openai_completions(daemon, model, openai_client):
    client = openai_client
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=3,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens == 3
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=3, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_models(daemon, model, openai_client):
    assert [m.id for m in openai_client.models.list()] == [model]


def test_openai_async_stream(daemon, model):
    async def main() -> tuple[list[str], int]:
        client = daemon.async_openai()
        try:
            stream = await client.chat.completions.create(model=model, messages=MSGS, max_tokens=4, stream=True,
                                                          stream_options={"include_usage": True},
                                                          extra_body={"ignore_eos": True})
            parts, used = [], 0
            async for c in stream:
                if c.choices and c.choices[0].delta.content:
                    parts.append(c.choices[0].delta.content)
                if c.usage:
                    used = c.usage.completion_tokens
            return parts, used
        finally:
            await client.close()

    parts, used = asyncio.run(main())
    assert used == 4 and parts


def test_openai_errors_map_to_exception_classes(daemon, model, cfg, openai_client):
    import openai
    client = openai_client
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="no-such-model", messages=MSGS, max_tokens=2)
    assert ei.value.status_code == 404 and ei.value.param == "model" and ei.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=model, messages=MSGS, max_tokens=cfg.limits.max_tokens_cap + 1)
    assert ei.value.status_code == 400 and ei.value.param == "max_tokens"
    assert ei.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "x"}])
    assert ei.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", temperature=3)
    # and the client still works afterwards
    assert client.chat.completions.create(model=model, messages=MSGS, max_tokens=1).choices


# ---------------------------------------------------------------- client disconnect aborts the request
def test_client_disconnect_mid_stream_aborts(daemon, model):
    rid = f"disconnect-{uuid.uuid4().hex[:12]}"
    max_tokens = 1000
    _, _, h = jrequest(daemon.sock, "GET", "/health")
    tokens_before = h["engine"]["generated_tokens"]
    conn = UnixHTTPConnection(daemon.sock, timeout=120)
    conn.request("POST", CHAT, body=json.dumps({
        "model": model, "messages": MSGS, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}),
        headers={"Content-Type": "application/json", "X-Request-Id": rid})
    resp = conn.getresponse()
    assert resp.status == 200
    got = 0
    while got < 4:  # a few content chunks: generation is under way
        line = resp.readline()
        assert line, "stream ended before any content"
        if line.startswith(b"data: ") and b'"content"' in line:
            got += 1
    # go away without reading the rest
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()

    deadline = time.monotonic() + 90
    running, lines = None, []
    while time.monotonic() < deadline:
        _, _, h = jrequest(daemon.sock, "GET", "/health", timeout=10)
        running, tokens_after = h["engine"]["running"], h["engine"]["generated_tokens"]
        lines = request_log_lines(daemon, rid)
        if running == 0 and lines:
            break
        time.sleep(0.2)
    assert running == 0, f"the engine still runs {running} request(s) after the client left"
    # The engine stopped early: it did not generate the max_tokens the request asked for
    # (the only request on the shared daemon during this test).
    assert tokens_after - tokens_before < max_tokens, (tokens_before, tokens_after)
    assert lines, f"no request log line for {rid}:\n{daemon.tail()}"
    (rec,) = lines
    assert str(rec["status"]) == "499", rec
    assert rec.get("finish") == "client_gone", rec
    assert_serves(daemon, model)


def test_error_log_lines_carry_status(daemon, model):
    rid = f"badreq-{uuid.uuid4().hex[:12]}"
    status, _, _ = request(daemon.sock, "POST", CHAT, {"model": model, "messages": []},
                           headers={"X-Request-Id": rid})
    assert status == 400
    deadline = time.monotonic() + 30
    while not request_log_lines(daemon, rid) and time.monotonic() < deadline:
        time.sleep(0.1)
    (rec,) = request_log_lines(daemon, rid)
    assert str(rec["status"]) == "400" and rec["path"] == CHAT


def test_logit_bias_is_applied_with_the_openai_client(daemon, model, openai_client):
    """+100 on one token with greedy decoding: every generated token is that one, on both
    endpoints (the demo model's own choice would be noise)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    forced = tok.encode(" hello", add_special_tokens=False)[0]
    r = openai_client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, temperature=0,
                                         logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode([forced] * 4) and r.usage.completion_tokens == 4
    chat = openai_client.chat.completions.create(model=model, messages=MSGS, max_tokens=3, temperature=0,
                                                 logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == tok.decode([forced] * 3)
    free = openai_client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert free.choices[0].text != r.choices[0].text        # without it, the model's own (noise) choice


def test_logit_bias_outside_the_vocabulary_is_a_400(daemon, model):
    status, _, body = jrequest(daemon.sock, "POST", COMPL, {"model": model, "prompt": "x", "max_tokens": 1,
                                                           "logit_bias": {"10000000": 5}})
    assert status == 400 and body["error"]["param"] == "logit_bias" and "outside the vocabulary" in \
        body["error"]["message"]


def test_a_batch_of_prompts_is_one_choice_per_prompt_and_n(daemon, model, openai_client):
    """`OpenAI().completions.create(prompt=[a, b, c])`: choices ordered by prompt, then n;
    usage adds up; each prompt is admitted as a request of its own (one access line)."""
    prompts = ["Once upon a time", "The quick brown fox", [11, 12, 13, 14]]
    singles = [openai_client.completions.create(model=model, prompt=p, max_tokens=1) for p in prompts]
    r = openai_client.completions.create(model=model, prompt=prompts, n=2, max_tokens=3, temperature=0.5,
                                         extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert all(c.finish_reason == "length" for c in r.choices)      # the text is noise: maybe special tokens only
    assert r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert r.usage.completion_tokens == 6 * 3
    stream = openai_client.completions.create(model=model, prompt=prompts[:2], max_tokens=4, stream=True,
                                              stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True})
    seen, finished, usage = set(), set(), None
    for chunk in stream:
        for c in chunk.choices:
            seen.add(c.index)
            if c.finish_reason:
                finished.add(c.index)
        usage = chunk.usage or usage
    assert seen == finished == {0, 1}
    assert usage.completion_tokens == 8 and usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles[:2])


def test_a_batch_is_refused_whole_when_one_prompt_is_bad_or_it_is_too_large(daemon, model, cfg):
    status, _, body = jrequest(daemon.sock, "POST", COMPL, {"model": model, "prompt": ["fine", [10 ** 9]],
                                                           "max_tokens": 1})
    assert status == 400 and "'prompt[1]' has token id" in body["error"]["message"], body
    too_many = cfg.admission.max_in_flight + 1
    assert too_many <= cfg.limits.max_prompts
    status, _, body = jrequest(daemon.sock, "POST", COMPL, {"model": model, "prompt": ["x"] * too_many,
                                                           "max_tokens": 1})
    assert status == 400 and "more than this server runs at once" in body["error"]["message"], body
    status, _, body = jrequest(daemon.sock, "POST", COMPL, {"model": model, "max_tokens": 1,
                                                           "prompt": ["x"] * (cfg.limits.max_prompts + 1)})
    assert status == 400 and body["error"]["param"] == "prompt" and "cap of" in body["error"]["message"]


# ---------------------------------------------------------------- logprobs and echo
# The demo model's output is noise: these assert on shapes, counts, order, finiteness and
# consistency, never on what the text says.
def demo_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


def assert_logprob(x) -> None:
    assert isinstance(x, float) and math.isfinite(x) and x <= 0.0, x


def round_trips(tokens: list[str], text: str) -> bool:
    """Whether the token texts should add up to the text: ASCII only (a character of
    several bytes may be split across tokens, each decoded alone as U+FFFD or nothing)."""
    return text.isascii() and all(t.isascii() for t in tokens)


def assert_chat_entries(entries, k: int, greedy: bool = False) -> None:
    """Chat logprobs: each token with its bytes and its k alternatives, most likely first."""
    for e in entries:
        assert_logprob(e.logprob)
        assert e.bytes == list(e.token.encode("utf-8"))
        assert len(e.top_logprobs) == k
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        for t in e.top_logprobs:
            assert_logprob(t.logprob)
            assert t.bytes == list(t.token.encode("utf-8"))
        if k:
            assert e.logprob <= tops[0] + 1e-6          # nothing beats the most likely token
        if greedy and k:
            assert e.logprob == pytest.approx(tops[0], abs=1e-4)   # greedy picks the most likely


def assert_completion_logprobs(lp: dict, k: int, start: int = 0, first_has_none: bool = False) -> None:
    """Completions' logprobs: four parallel lists, offsets that add up the token texts."""
    n = len(lp["tokens"])
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    offset = start
    for i, (tok, x, top, off) in enumerate(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                               lp["text_offset"], strict=True)):
        assert off == offset, (i, lp["text_offset"])
        offset += len(tok)
        if i == 0 and first_has_none:
            assert x is None and top is None
            continue
        assert_logprob(x)
        assert 1 <= len(top) <= k + 1 and tok in top and top[tok] == x
        assert all(math.isfinite(v) and v <= 0 for v in top.values())
        assert list(top.values()) == sorted(top.values(), reverse=True)


# Logprobs are the model's own (vLLM's raw logprobs, before penalties): greedy picks the most
# likely of them only without shaping's default presence_penalty, hence the 0 where it is checked.
def test_chat_logprobs_with_the_openai_client(daemon, model, openai_client):
    r = openai_client.chat.completions.create(model=model, messages=MSGS, max_tokens=6, temperature=0,
                                              presence_penalty=0, logprobs=True, top_logprobs=3,
                                              extra_body={"ignore_eos": True})
    (choice,) = r.choices
    entries = choice.logprobs.content
    assert len(entries) == r.usage.completion_tokens == 6
    assert_chat_entries(entries, 3, greedy=True)
    if round_trips([e.token for e in entries], choice.message.content):
        assert "".join(e.token for e in entries) == choice.message.content
    chosen = openai_client.chat.completions.create(model=model, messages=MSGS, max_tokens=2, logprobs=True,
                                                   extra_body={"ignore_eos": True})
    assert [len(e.top_logprobs) for e in chosen.choices[0].logprobs.content] == [0, 0]
    plain = openai_client.chat.completions.create(model=model, messages=MSGS, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_streamed_ride_on_their_own_chunks(daemon, model, openai_client):
    stream = openai_client.chat.completions.create(model=model, messages=MSGS, max_tokens=7, n=2, stream=True,
                                                   logprobs=True, top_logprobs=2,
                                                   stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True})
    entries: dict[int, list] = {0: [], 1: []}
    texts = {0: "", 1: ""}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            if c.logprobs is not None:
                assert c.delta.content is not None
                entries[c.index] += c.logprobs.content
                texts[c.index] += c.delta.content
            else:
                assert not c.delta.content      # text never comes without its tokens' logprobs
    assert usage.completion_tokens == 14 and [len(e) for e in entries.values()] == [7, 7]
    for i, es in entries.items():
        assert_chat_entries(es, 2)
        if round_trips([e.token for e in es], texts[i]):
            assert "".join(e.token for e in es) == texts[i]


def test_completions_logprobs_whole_and_streamed(daemon, model, openai_client):
    prompt = "The quick brown fox"
    r = openai_client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                         presence_penalty=0, extra_body={"ignore_eos": True})
    (choice,) = r.choices
    lp = choice.logprobs.model_dump()
    assert len(lp["tokens"]) == r.usage.completion_tokens == 5
    assert_completion_logprobs(lp, 2)
    for tok, x, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert x == pytest.approx(max(top.values()), abs=1e-4), (tok, top)     # greedy
    if round_trips(lp["tokens"], choice.text):
        assert "".join(lp["tokens"]) == choice.text
    stream = openai_client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                              presence_penalty=0, stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True})
    tokens, offsets, logprobs, text, usage = [], [], [], "", None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                part = c.logprobs.model_dump()
                assert_completion_logprobs(part, 2, start=sum(len(t) for t in tokens))   # offsets continue
                tokens += part["tokens"]
                offsets += part["text_offset"]
                logprobs += part["token_logprobs"]
    assert usage.completion_tokens == 5 and len(tokens) == 5
    assert tokens == lp["tokens"] and offsets == lp["text_offset"] and text == choice.text
    assert logprobs == pytest.approx(lp["token_logprobs"], abs=1e-4)
    plain = openai_client.completions.create(model=model, prompt=prompt, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_echo_as_lm_eval_sends_it(daemon, model, openai_client):
    """lm-eval's loglikelihood requests: a batch of token-id or text prompts, max_tokens 0
    or 1, greedy, logprobs 1, echo. The prompt's tokens come first, the first one without
    a logprob; max_tokens 0 answers the prompt alone and counts no completion token."""
    tok = demo_tokenizer()
    texts = ["Once upon a time there was", "The quick brown fox jumps"]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    by_max = {}
    for prompts, decoded in ((ids, [tok.decode(i) for i in ids]), (texts, texts)):
        for max_tokens in (0, 1):
            r = openai_client.completions.create(model=model, prompt=prompts, max_tokens=max_tokens, temperature=0,
                                                 logprobs=1, echo=True)
            assert sorted(c.index for c in r.choices) == [0, 1]
            assert r.usage.prompt_tokens == sum(map(len, ids))
            assert r.usage.completion_tokens == 2 * max_tokens
            for c in sorted(r.choices, key=lambda c: c.index):
                n_prompt = len(ids[c.index])
                lp = c.logprobs.model_dump()
                assert c.text.startswith(decoded[c.index]) and (max_tokens or c.text == decoded[c.index])
                assert len(lp["tokens"]) == n_prompt + max_tokens
                assert_completion_logprobs(lp, 1, first_has_none=True)
                if round_trips(lp["tokens"], c.text):
                    assert "".join(lp["tokens"]) == c.text
                assert math.isfinite(sum(lp["token_logprobs"][1:n_prompt]))    # what lm-eval sums
                by_max.setdefault((c.index, max_tokens), []).append(lp["token_logprobs"][:n_prompt])
    for i in (0, 1):        # the prompt's logprobs do not depend on generating, nor on ids vs text
        first, *rest = by_max[(i, 0)] + by_max[(i, 1)]
        for other in rest:
            assert other[0] is None and other[1:] == pytest.approx(first[1:], abs=1e-3)


def test_echo_streamed_with_n_and_without_logprobs(daemon, model, openai_client):
    prompt = "Once upon a time"
    n_prompt = len(demo_tokenizer().encode(prompt, add_special_tokens=False))
    stream = openai_client.completions.create(model=model, prompt=prompt, max_tokens=3, n=2, echo=True, logprobs=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True})
    texts, tokens, usage = {0: "", 1: ""}, {0: [], 1: []}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            if not texts[c.index]:
                assert c.text.startswith(prompt)          # the first chunk of each choice echoes the prompt
            texts[c.index] += c.text
            if c.logprobs is not None:
                part = c.logprobs.model_dump()
                assert_completion_logprobs(part, 0, start=sum(len(t) for t in tokens[c.index]),
                                           first_has_none=not tokens[c.index])
                tokens[c.index] += part["tokens"]
    assert usage.completion_tokens == 6 and usage.prompt_tokens == n_prompt
    assert [len(t) for t in tokens.values()] == [n_prompt + 3] * 2
    only = list(openai_client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in only if c.choices) == prompt
    assert all(c.choices[0].logprobs is None for c in only if c.choices)
    assert only[-1].usage.completion_tokens == 0
    whole = openai_client.completions.create(model=model, prompt=[prompt, [5, 6, 7]], max_tokens=2, echo=True)
    by_index = {c.index: c for c in whole.choices}
    assert by_index[0].text.startswith(prompt) and by_index[0].logprobs is None
    assert by_index[1].text.startswith(demo_tokenizer().decode([5, 6, 7]))


@contextlib.contextmanager
def reloaded_limits(daemon, **limits):
    """The shared daemon with these ``[limits]`` applied by a SIGHUP reload; its own config
    is back (reloaded again) afterwards."""
    from conftest import wait_for
    from helpers import write_config

    def reloads() -> list[dict]:
        return [r for r in map(parse_line, daemon.log_text().splitlines()) if r and r.get("event") == "reload"]

    def apply(write) -> None:
        before = len(reloads())
        write()
        daemon.proc.send_signal(signal.SIGHUP)
        last = wait_for(lambda: reloads()[before:], 30, "the reload's log line")[-1]
        assert str(last["ok"]).lower() == "true", last

    original = daemon.config.read_text()
    apply(lambda: write_config(daemon.config, {"limits": limits}))
    try:
        yield
    finally:
        apply(lambda: daemon.config.write_text(original))


def test_prompt_logprobs_are_bounded_by_a_limit(daemon, model):
    ids = list(range(100, 109))                 # 9 tokens
    body = {"model": model, "prompt": ids, "max_tokens": 0, "logprobs": 1, "echo": True}
    with reloaded_limits(daemon, max_prompt_logprobs_tokens=8):
        err = post_error(daemon, model, body, 400, path=COMPL, param="prompt")
        assert "limits.max_prompt_logprobs_tokens" in err["message"] and "8" in err["message"], err
        err = post_error(daemon, model, {**body, "prompt": [ids[:8], ids]}, 400, path=COMPL, param="prompt")
        assert "'prompt[1]' is 9 tokens" in err["message"], err
        for fine in ({**body, "prompt": ids[:8]}, {**body, "logprobs": None}, {**body, "echo": False, "max_tokens": 1}):
            status, _, answer = jrequest(daemon.sock, "POST", COMPL, fine)
            assert status == 200, (fine, answer)
    status, _, answer = jrequest(daemon.sock, "POST", COMPL, body)           # the shipped default: 4096
    assert status == 200 and len(answer["choices"][0]["logprobs"]["tokens"]) == 9, answer


@pytest.mark.parametrize("path, extra, param", [
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": "3"}, "top_logprobs"),
    (CHAT, {"top_logprobs": 3}, "top_logprobs"),
    (CHAT, {"logprobs": "true"}, "logprobs"),
    (COMPL, {"logprobs": 21}, "logprobs"),
    (COMPL, {"logprobs": -1}, "logprobs"),
    (COMPL, {"logprobs": True}, "logprobs"),
    (COMPL, {"echo": "yes"}, "echo"),
    (COMPL, {"echo": 1}, "echo"),
    (COMPL, {"max_tokens": 0}, "max_tokens"),
    (COMPL, {"max_tokens": 0, "echo": False, "logprobs": 1}, "max_tokens"),
])
def test_bad_logprobs_and_echo_values_name_the_param(daemon, model, path, extra, param):
    body = {"model": model, "max_tokens": 2, **({"messages": MSGS} if path == CHAT else {"prompt": "hi"}), **extra}
    post_error(daemon, model, body, 400, path=path, param=param)
