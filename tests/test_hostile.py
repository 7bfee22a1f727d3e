"""Hostile clients against the real daemon (real engine on the demo model, real unix socket).

No input may produce a 5xx: every invalid request gets a well-formed OpenAI error with a
4xx status, and the daemon serves the next request. Refusing bad input stays cheap and
bounded: client strings that reach logs and maps are capped, an over-long prompt is
refused after reading a bounded prefix, slow or idle connections are timed out, and
connections past the cap (or past the open-files limit) are refused cleanly.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import uuid

import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import wait_for
from helpers import Daemon, jrequest, request
from qwenbox.eventlog import parse_line

pytestmark = pytest.mark.engine

CHAT, COMPL = "/v1/chat/completions", "/v1/completions"
MODEL = "qwenbox-demo"
MSGS = [{"role": "user", "content": "Hello there"}]


def assert_error_body(status: int, body: bytes) -> dict:
    assert 400 <= status < 500, (status, body[:300])
    obj = json.loads(body)
    assert set(obj) == {"error"}, obj
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and len(err["message"]) < 2000
    return err


def assert_serves(sock: str) -> None:
    status, _, body = jrequest(sock, "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 2})
    assert status == 200, body


def wire_post(sock_path: str, path: str, raw: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST over a plain socket. The server may answer (and close) before the body is sent,
    e.g. for a Content-Encoding it refuses from the headers alone: read the answer anyway."""
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "x", "Content-Type": "application/json",
                                                  "Content-Length": str(len(raw)), "Connection": "close",
                                                  **headers}.items())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(sock_path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + raw)
        answer = read_until_closed(s)
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def post_raw(sock: str, raw: bytes, headers: dict | None = None, path: str = CHAT) -> tuple[int, dict, bytes]:
    return request(sock, "POST", path, raw=raw, headers=headers)


# ---------------------------------------------------------------- the 500s that were found
def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("raw, param", [
    (json.dumps({"model": MODEL, "messages": MSGS, "seed": 1 << 64}).encode(), "seed"),
    (json.dumps({"model": MODEL, "messages": MSGS, "seed": -(1 << 63) - 1}).encode(), "seed"),
    (b'{"model": "qwenbox-demo", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (b'{"model": "qwenbox-demo", "messages": [{"role": "user", "content": "hi"}], "stop": "\\udfff"}', "stop"),
    (b'{"model": "qwenbox-demo", "messages": [{"role": "user", "content": "hi"}], "user": "\\ud800"}', "user"),
    (b'{"model": "qwenbox-demo", "messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}', None),
    (nested(100_000), None),
    (b'{"model": "qwenbox-demo", "messages": [{"role": "user", "content": "hi"}], "x": ' + nested(100_000) + b"}",
     None),
    (b'{"model": "qwenbox-demo", "messages": [{"role": "user", "content": "hi"}], "x": ' + nested(40) + b"}", "x"),
    (b'{"model": "qwenbox-demo", "messages": [], "max_tokens": 1' + b"0" * 5000 + b"}", None),
])
def test_former_500s_are_clear_400s(daemon, raw, param):
    status, _, body = post_raw(daemon.sock, raw)
    err = assert_error_body(status, body)
    assert status == 400
    if param is not None:
        assert err["param"] == param or err["param"].startswith(param + "["), err
    assert_serves(daemon.sock)


def test_lone_surrogate_in_a_completion_prompt(daemon):
    raw = b'{"model": "qwenbox-demo", "prompt": "x\\ud800", "max_tokens": 2}'
    err = assert_error_body(*post_raw(daemon.sock, raw, path=COMPL)[::2])
    assert err["param"] == "prompt" and err["code"] == "invalid_encoding"


def test_gzip_body_that_does_not_decompress(daemon):
    status, _, body = post_raw(daemon.sock, b"\x1f\x8b\x08\x00garbage-not-gzip" * 10,
                               headers={"Content-Encoding": "gzip"})
    assert status == 400 and assert_error_body(status, body)["code"] == "invalid_encoding"
    bomb = gzip.compress(b'{"model": "' + b"a" * (64 << 20) + b'"}')      # 64 MiB inflated, ~64 KiB sent
    status, _, body = post_raw(daemon.sock, bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and assert_error_body(status, body)["code"] == "request_too_large"
    good = gzip.compress(json.dumps({"model": MODEL, "messages": MSGS, "max_tokens": 2}).encode())
    status, _, body = post_raw(daemon.sock, good, headers={"Content-Encoding": "gzip"})
    assert status == 200, body


@pytest.mark.parametrize("wire", [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\nContent-Length: 1\r\n\r\nx",
])
def test_requests_http_cannot_parse_get_a_json_400(daemon, wire):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(daemon.sock)
        s.sendall(wire)
        answer = read_until_closed(s)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and head.split()[1].startswith(b"4"), answer[:200]
    assert_error_body(int(head.split()[1]), body)
    assert_serves(daemon.sock)


# ---------------------------------------------------------------- property-based
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                       lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                       max_leaves=8)


def field(valid, invalid=JSONISH):
    """A field that is valid, invalid (any JSON at all) or absent."""
    return st.one_of(valid, invalid)


# A small JSON schema, valid or not: what `tools` parameters and `response_format` carry
SCHEMA = st.recursive(st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "boolean", "wat"])},
                                            optional={"enum": st.lists(st.text(max_size=4), max_size=3),
                                                      "pattern": st.sampled_from(["^a+$", "(a+)+b", "["]),
                                                      "maximum": st.integers()}),
                      lambda kids: st.fixed_dictionaries({"type": st.just("object"),
                                                          "properties": st.dictionaries(st.text(max_size=5), kids,
                                                                                        max_size=3)},
                                                         optional={"required": st.lists(st.text(max_size=5),
                                                                                        max_size=2)})
                      | st.fixed_dictionaries({"anyOf": st.lists(kids, max_size=3)}), max_leaves=6) | JSONISH
NAME = st.sampled_from(["get_weather", "f", "a-b_c"]) | st.text(max_size=70)
TOOL = st.fixed_dictionaries({"type": field(st.just("function"), JSONISH),
                              "function": field(st.fixed_dictionaries({"name": NAME}, optional={
                                  "description": st.text(max_size=20), "parameters": SCHEMA,
                                  "strict": st.booleans() | JSONISH}), JSONISH)})
TOOL_CALL = st.fixed_dictionaries({"id": field(st.text(max_size=10), JSONISH), "type": st.just("function"),
                                   "function": field(st.fixed_dictionaries({"name": NAME, "arguments": field(
                                       st.sampled_from(['{"city": "Paris"}', "{}", "not json"]), JSONISH)}),
                                       JSONISH)})

MESSAGE = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
                   st.sampled_from(["bot", "", "USER"]) | JSONISH),
     "content": field(st.text(max_size=60), st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}), max_size=2) | JSONISH)},
    optional={"tool_calls": field(st.lists(TOOL_CALL, max_size=2), JSONISH),
              "tool_call_id": field(st.text(max_size=10), JSONISH)})

CHAT_BODY = st.fixed_dictionaries(
    {"model": field(st.just(MODEL), st.text(max_size=10) | JSONISH),
     "messages": field(st.lists(MESSAGE, min_size=1, max_size=4), JSONISH),
     # always small when valid: a property test must stay quick on a 2-core CPU
     "max_tokens": field(st.integers(1, 8), st.integers() | JSONISH)},
    optional={
        "temperature": field(st.floats(0, 2), JSONISH), "top_p": field(st.floats(0.01, 1), JSONISH),
        "top_k": field(st.integers(-1, 50), st.integers() | JSONISH), "min_p": field(st.floats(0, 1), JSONISH),
        "presence_penalty": field(st.floats(-2, 2), JSONISH), "frequency_penalty": field(st.floats(-2, 2), JSONISH),
        "repetition_penalty": field(st.floats(0.5, 2), JSONISH), "n": field(st.integers(1, 2), JSONISH),
        "seed": field(st.integers(0, 1 << 64), st.integers() | JSONISH), "stop": field(st.text(max_size=5), JSONISH),
        "stream": st.booleans() | JSONISH, "stream_options": field(st.just({"include_usage": True}), JSONISH),
        "user": field(st.text(max_size=300), JSONISH), "logprobs": field(st.booleans(), JSONISH),
        "top_logprobs": field(st.integers(0, 20), st.integers() | JSONISH),
        "tools": field(st.lists(TOOL, max_size=3), JSONISH),
        "tool_choice": field(st.sampled_from(["auto", "none", "required"])
                             | st.fixed_dictionaries({"type": st.just("function"),
                                                      "function": st.fixed_dictionaries({"name": NAME})}), JSONISH),
        "parallel_tool_calls": field(st.booleans(), JSONISH),
        "response_format": field(st.sampled_from([{"type": "json_object"}, {"type": "text"}])
                                 | st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": field(
                                     st.fixed_dictionaries({"name": NAME, "schema": SCHEMA},
                                                           optional={"strict": st.booleans()}), JSONISH)}), JSONISH),
        "ignore_eos": JSONISH,
        "logit_bias": field(st.dictionaries(st.integers(0, 200).map(str), st.floats(-100, 100), max_size=4),
                            JSONISH),
    })

HYPOTHESIS = settings(max_examples=int(os.environ.get("QWENBOX_HYPOTHESIS_EXAMPLES", "120")), deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def check_answer(status: int, body: bytes) -> None:
    assert status < 500, (status, body[:500])
    if status >= 400:
        assert_error_body(status, body)


@HYPOTHESIS
@given(body=CHAT_BODY)
def test_no_request_body_yields_a_5xx(daemon, body):
    status, _, data = request(daemon.sock, "POST", CHAT, raw=json.dumps(body).encode())
    check_answer(status, data)


# echo and logprobs, valid (lm-eval's likelihood requests: max_tokens 0, echo, logprobs) or not
SCORING = st.fixed_dictionaries({}, optional={
    "echo": field(st.booleans(), JSONISH), "logprobs": field(st.integers(0, 20), st.integers() | JSONISH),
    "stream": field(st.booleans(), JSONISH), "n": field(st.integers(1, 2), JSONISH)})


@HYPOTHESIS
@given(prompt=field(st.text(max_size=60), st.lists(st.integers(-5, 2000), max_size=6) | JSONISH
                   | st.lists(st.text(max_size=20) | st.lists(st.integers(-5, 2000), max_size=4), max_size=4)),
       max_tokens=field(st.integers(0, 8), JSONISH), scoring=SCORING, extra=st.dictionaries(st.sampled_from(
           ["echo", "logprobs", "suffix", "best_of", "n", "stop", "seed", "stream"]), JSONISH, max_size=2))
@example(prompt=[[11, 12, 13], "a b"], max_tokens=0, scoring={"echo": True, "logprobs": 1}, extra={})
@example(prompt="a b", max_tokens=1, scoring={"echo": True, "logprobs": 20, "stream": True, "n": 2}, extra={})
def test_no_completion_body_yields_a_5xx(daemon, prompt, max_tokens, scoring, extra):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, **scoring, **extra}
    status, _, data = request(daemon.sock, "POST", COMPL, raw=json.dumps(body).encode())
    check_answer(status, data)


@HYPOTHESIS
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
       path=st.sampled_from([CHAT, COMPL]),
       encoding=st.sampled_from([None, "gzip", "deflate", "br", "identity", "bogus"]))
def test_no_raw_body_yields_a_5xx(daemon, raw, path, encoding):
    headers = {"Content-Encoding": encoding} if encoding else {}
    status, data = wire_post(daemon.sock, path, raw, headers)
    check_answer(status, data)
    assert status >= 400        # random bytes are never a valid request


# ---------------------------------------------------------------- bounded cost
def request_lines(log: str, rid: str) -> list[str]:
    return [line for line in log.splitlines() if f"id={rid}" in line and "event=request" in line]


def test_long_user_is_refused_and_log_lines_stay_small(daemon):
    status, _, body = jrequest(daemon.sock, "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 2,
                                                           "user": "u" * 20_000})
    assert status == 400 and body["error"]["param"] == "user"
    rids = []
    for i in range(20):                      # the longest user that is accepted, each a new session
        rid = f"long-user-{uuid.uuid4().hex[:8]}"
        rids.append(rid)
        status, _, _ = jrequest(daemon.sock, "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 1,
                                                            "user": f"{i:04d}" + "u" * 252},
                                headers={"X-Request-Id": rid})
        assert status == 200
    long_path = "/v1/" + "p" * 7000
    status, _, _ = request(daemon.sock, "GET", long_path, headers={"X-Request-Id": "long-path-1"})
    assert status == 404
    log = wait_for_log(daemon, [*rids, "long-path-1"])
    for rid in [*rids, "long-path-1"]:
        (line,) = request_lines(log, rid)
        assert len(line) < 1500, len(line)


def wait_for_log(daemon, rids: list[str], timeout: float = 30.0) -> str:
    """The daemon's log once it holds the access-log line of every one of ``rids``."""
    def complete() -> str:
        log = daemon.log_text()
        return log if all(request_lines(log, rid) for rid in rids) else ""

    return wait_for(complete, timeout, f"the access-log lines of {rids}")


def test_lone_surrogate_in_a_session_header_keeps_the_access_log_line(daemon):
    rid = f"surrogate-{uuid.uuid4().hex[:8]}"
    raw = b'{"model": "qwenbox-demo", "messages": [{"role": "user", "content": "hi"}], "user": "a\\udc80"}'
    status, _, _ = post_raw(daemon.sock, raw, headers={"X-Request-Id": rid})
    assert status == 400
    (line,) = request_lines(wait_for_log(daemon, [rid]), rid)
    assert parse_line(line)["status"] == "400"


def test_over_long_prompt_is_refused_having_read_a_bounded_prefix(demo_model):
    """Refusing costs O(max_model_len), not O(prompt): count what the real tokenizer is given."""
    from transformers import AutoTokenizer

    from qwenbox.engine import PROBE_CHARS_PER_TOKEN, ChatTokenizer

    class Counting:
        def __init__(self, tok):
            self.tok, self.chars = tok, 0

        def __len__(self):
            return len(self.tok)

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def encode(self, text, **kw):
            self.chars += len(text)
            return self.tok.encode(text, **kw)

    counting = Counting(AutoTokenizer.from_pretrained(str(demo_model)))
    tok = ChatTokenizer(counting)
    limit = 2048
    for text in ("😀" * 500_000, "The quick brown fox. " * 100_000, "x" * (limit * tok.max_token_chars + 1)):
        counting.chars = 0
        assert tok.encode_within(text, limit) is None
        assert counting.chars <= limit * PROBE_CHARS_PER_TOKEN, (text[:10], counting.chars)
    ok = "hello world " * 50
    assert tok.encode_within(ok, limit) == tok.encode(ok)


def test_many_huge_prompts_are_refused_while_others_are_served(daemon):
    # 2 MB of emoji (under the demo profile's 4 MiB body limit)
    big = json.dumps({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "😀" * 500_000}]},
                     ensure_ascii=False).encode()
    for _ in range(4):
        status, _, body = post_raw(daemon.sock, big)
        assert status == 400 and json.loads(body)["error"]["code"] == "context_length_exceeded"
        assert_serves(daemon.sock)


# ---------------------------------------------------------------- slow, idle and too many clients
FD_LIMIT, CAP = 512, 256


@pytest.fixture(scope="module")
def tight(tmp_path_factory, demo_model):
    """A daemon with short client timeouts under a low open-files limit (512: the connection
    cap becomes 512 - 256 kept for the engine = 256, below max_connections' 4096)."""
    d = Daemon(tmp_path_factory.mktemp("tight"), sections={"server": {"idle_timeout_s": 2.0, "body_timeout_s": 2.0}})
    d.argv = ["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--", *d.argv]
    d.start()
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def connect(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(sock_path)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a deadline guards hangs)."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def test_dribbled_headers_and_idle_connections_are_closed(tight):
    conns = [connect(tight.sock) for _ in range(30)]
    for s in conns[:15]:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")   # never finishes its headers
    for s in conns:                                   # server closes every one of them by itself
        read_until_closed(s)
        s.close()
    assert jrequest(tight.sock, "GET", "/health")[0] == 200


def test_a_body_that_never_arrives_gets_408(tight):
    s = connect(tight.sock)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000000\r\n\r\n{\"model\": ")
    answer = read_until_closed(s)
    s.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer


def test_connections_past_the_cap_are_refused_cleanly_and_serving_resumes(tight):
    held = [connect(tight.sock) for _ in range(CAP)]
    for s in held:                                # each holds one slot, proven live by an answer
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    for s in held:
        assert s.recv(65536).startswith(b"HTTP/1.1 ")
    extra = [connect(tight.sock) for _ in range(20)]
    answers = [read_until_closed(s) for s in extra]
    for s in extra:
        s.close()
    assert all(a.startswith(b"HTTP/1.1 503") and b"Retry-After" in a and b"too_many_connections" in a
               for a in answers), answers[:2]
    for s in held:
        s.close()
    # the slots free as the server sees the closes
    wait_for(lambda: jrequest(tight.sock, "GET", "/health")[0] == 200, 30, "/health to answer 200 again")
    refusal_logs = [line for line in tight.log_text().splitlines() if "refusing connections" in line]
    assert 1 <= len(refusal_logs) <= 3, refusal_logs         # rate-limited, not one per connection


def test_a_burst_past_the_cap_never_exhausts_the_descriptors(tight):
    """Connections opened all at once, faster than the server registers them: the cap still
    holds (counted from accept, not from registration), the rest get the canned 503, and
    the process never hits its open-files limit."""
    burst = [connect(tight.sock) for _ in range(CAP + 200)]      # nothing sent: they just sit
    answers = [read_until_closed(s) for s in burst]               # idle ones close after 2 s
    for s in burst:
        s.close()
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert len(refused) >= 200, (len(refused), [a[:40] for a in answers if a][:3])
    assert all(a == b"" for a in answers if a not in refused)    # held, then closed as idle
    assert "out of system resource" not in tight.log_text()
    assert jrequest(tight.sock, "GET", "/health")[0] == 200


def test_open_files_limit_caps_connections_below_it(tight):
    """Under `prlimit --nofile=512` the cap drops below max_connections; the daemon says so."""
    events = [e for e in map(parse_line, tight.log_text().splitlines()) if e and e.get("event") == "listening"]
    assert events and events[-1]["open_files_limit"] == str(FD_LIMIT) and events[-1]["max_connections"] == str(CAP)
    assert psutil.Process(tight.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (FD_LIMIT, FD_LIMIT)
