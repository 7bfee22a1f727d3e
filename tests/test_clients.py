"""Real clients, unmodified, against the daemon (issue 19, item 6): EleutherAI's lm-eval and
langchain-openai, as their users run them, on the shared ``daemon`` (one cold start).

- lm-eval runs as its CLI (``python -m lm_eval run``) with the API models
  ``local-completions`` and ``local-chat-completions`` on the small local tasks of
  tests/clients/ (``--include_path``, ``dataset_path: json``), ``--limit 3``, with the demo
  model's own directory as its tokenizer and the hub switched off (HF_HUB_OFFLINE and
  kin). Its API models speak TCP only (``requests.post`` / aiohttp's ``TCPConnector`` to
  ``base_url``), so they reach the daemon through ``RecordingProxy``: 127.0.0.1 on an
  ephemeral port, forwarding every request as it is to the daemon's unix socket and keeping
  the exchange (the body the client sent, the status and body it got back).
- langchain-openai reaches the unix socket directly, through the ``http_client`` it takes
  (httpx with a unix-socket transport), whose event hooks keep the exchanges the same way.

The demo model's output is noise: the tests assert on what the clients get back as a
shape (a run that completes, a results file with the tasks, numeric metrics and the sample
counts; a tool call with the tool's name; an object of the schema) and on what the daemon
logged (one access-log line per request, no 5xx), never on metric values or text. Every
test writes its exchanges to ``exchanges.json`` in its tmp_path and prints them, so a
failure shows the request the client sent and the server's answer.
"""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from conftest import wait_for
from helpers import DEMO_MODEL, request
from qwenbox.eventlog import parse_line

pytestmark = pytest.mark.engine

CLIENTS = Path(__file__).resolve().parent / "clients"     # lm-eval's task YAMLs and their data
LIMIT = 3                                                  # docs per task (--limit)
# What keeps lm-eval (datasets, transformers, huggingface_hub) off the network.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}


# ---------------------------------------------------------------- what the clients sent
class Recorder:
    """The exchanges of one test: each request the client sent (its JSON body) with the
    status and body of the answer. Every request gets an X-Request-Id of ours, so its
    access-log line in the daemon's log can be found."""

    def __init__(self) -> None:
        self.exchanges: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    @staticmethod
    def new_id() -> str:
        return f"clients-{uuid.uuid4().hex[:20]}"

    def add(self, rid: str, method: str, path: str, body: bytes, status: int, answer: bytes | str) -> None:
        with self._lock:
            self.exchanges.append({"id": rid, "method": method, "path": path, "request": _decoded(body),
                                   "status": status, "response": _decoded(answer)})

    def posts(self, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.exchanges if e["method"] == "POST" and e["path"] == path]

    def dump(self) -> str:
        with self._lock:
            return json.dumps(self.exchanges, indent=1)


def _decoded(data: bytes | str) -> Any:
    if isinstance(data, str):
        return data
    try:
        return json.loads(data) if data else None
    except ValueError:
        return data[:2000].decode(errors="replace")


@pytest.fixture
def recorder(tmp_path) -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    (tmp_path / "exchanges.json").write_text(rec.dump())
    print(f"exchanges ({len(rec.exchanges)}):\n{rec.dump()[:20000]}")


def assert_logged(daemon, rec: Recorder) -> None:
    """Every recorded request has its access-log line, and none of them is a 5xx."""
    ids = {e["id"] for e in rec.exchanges}
    assert ids, "the client sent no request"

    def lines() -> dict[str, dict[str, Any]]:
        got = {}
        for line in daemon.log_text().splitlines():
            r = parse_line(line)
            if r and r.get("event") == "request" and r.get("id") in ids:
                got[r["id"]] = r
        return got

    def all_logged() -> dict[str, dict[str, Any]] | None:
        got = lines()
        return got if len(got) == len(ids) else None

    logged = wait_for(all_logged, 30, lambda: f"the access-log lines of {len(ids)} requests (have {len(lines())})")
    bad = [r for r in logged.values() if int(r["status"]) >= 500]
    assert not bad, bad


def assert_all_ok(rec: Recorder) -> None:
    failed = [e for e in rec.exchanges if e["status"] != 200]
    assert not failed, "the daemon refused requests:\n" + json.dumps(failed, indent=1)[:8000]


# ---------------------------------------------------------------- lm-eval through a TCP proxy
class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RecordingProxy

    def do_GET(self) -> None:
        self._forward()

    def do_POST(self) -> None:
        self._forward()

    def _forward(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            self.send_error(501, "the test proxy takes bodies with a Content-Length only")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        rid = Recorder.new_id()
        status, headers, data = request(self.server.sock, self.command, self.path, raw=body, timeout=300,
                                        headers={"Content-Type": self.headers.get("Content-Type", "application/json"),
                                                 "X-Request-Id": rid})
        self.server.recorder.add(rid, self.command, self.path, body, status, data)
        self.send_response(status)
        self.send_header("Content-Type", headers.get("content-type", "application/json"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:   # the recorder keeps what matters
        pass


class RecordingProxy(http.server.ThreadingHTTPServer):
    """127.0.0.1 on an ephemeral port -> the daemon's unix socket, one request at a time as
    the client sent it (plus our X-Request-Id), every exchange kept in ``recorder``."""
    daemon_threads = True

    def __init__(self, sock: str, recorder: Recorder) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.sock, self.recorder = sock, recorder
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(10)


@pytest.fixture
def proxy(daemon, recorder) -> Iterator[RecordingProxy]:
    p = RecordingProxy(daemon.sock, recorder)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def model(daemon) -> str:
    from qwenbox import config as qconfig
    return qconfig.load(daemon.config).model.name


def run_lm_eval(tmp_path: Path, model_type: str, model_args: dict[str, Any], task: str,
                *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    """``python -m lm_eval run`` on one of tests/clients/'s tasks -> (the process, its
    results JSON or None). Its working directory is tests/clients/ (the tasks name their
    data files relative to it); its caches are under ``tmp_path``."""
    out = tmp_path / "lm-eval-out"
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf-ds"),
           "OPENAI_API_KEY": "unused", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "lm_eval", "run", "--model", model_type,
            "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
            "--tasks", task, "--include_path", str(CLIENTS), "--limit", str(LIMIT),
            "--output_path", str(out), *extra]
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=CLIENTS, env=env, capture_output=True, text=True, timeout=400)
    print(f"lm_eval: rc={proc.returncode} in {time.monotonic() - t0:.1f}s: {' '.join(argv[1:])}")
    results = sorted(out.glob("**/results_*.json")) if out.exists() else []
    return proc, json.loads(results[-1].read_text()) if results else None


def assert_lm_eval_ran(proc, results, task: str, metrics: tuple[str, ...], rec: Recorder) -> dict[str, Any]:
    tail = (proc.stdout[-3000:] + "\n--- stderr\n" + proc.stderr[-6000:])
    refused = [e for e in rec.exchanges if e["status"] != 200][:2]
    assert proc.returncode == 0 and results is not None, (
        f"lm_eval exited {proc.returncode}\n{tail}\n--- first refused requests:\n{json.dumps(refused)[:6000]}")
    got = results["results"][task]
    for m in metrics:
        value = got[f"{m},none"]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (m, got)
    assert results["n-samples"][task] == {"original": 5, "effective": LIMIT}, results["n-samples"]
    return got


def test_lm_eval_loglikelihood_multiple_choice(daemon, model, proxy, recorder, tmp_path):
    """A multiple-choice task: lm-eval scores each of a doc's 3 choices as a continuation
    (``echo`` + ``logprobs`` + ``max_tokens: 1`` on /v1/completions), 4 of them per request
    (batch_size=4) as lists of token ids."""
    proc, results = run_lm_eval(tmp_path, "local-completions", {
        "model": model, "base_url": f"{proxy.url}/v1/completions", "tokenizer": DEMO_MODEL,
        "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1, "max_length": 2048},
        "qwenbox_mc", "--batch_size", "4")
    assert_lm_eval_ran(proc, results, "qwenbox_mc", ("acc", "acc_norm"), recorder)
    posts = recorder.posts("/v1/completions")
    assert sum(len(e["request"]["prompt"]) for e in posts) == 3 * LIMIT, "one scored continuation per choice"
    assert_all_ok(recorder)
    assert_logged(daemon, recorder)


def test_lm_eval_generate_until_completions(daemon, model, proxy, recorder, tmp_path):
    """A generate_until task through /v1/completions: the 3 prompts in one request (token
    ids, batch_size=4), greedy, stopping at the end of the line."""
    proc, results = run_lm_eval(tmp_path, "local-completions", {
        "model": model, "base_url": f"{proxy.url}/v1/completions", "tokenizer": DEMO_MODEL,
        "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1, "max_length": 2048},
        "qwenbox_gen", "--batch_size", "4")
    assert_lm_eval_ran(proc, results, "qwenbox_gen", ("exact_match",), recorder)
    posts = recorder.posts("/v1/completions")
    assert sum(len(e["request"]["prompt"]) for e in posts) == LIMIT
    assert all(len(e["response"]["choices"]) == len(e["request"]["prompt"]) for e in posts)
    assert_all_ok(recorder)
    assert_logged(daemon, recorder)


def test_lm_eval_generate_until_chat(daemon, model, proxy, recorder, tmp_path):
    """The same task through /v1/chat/completions (``local-chat-completions``, the chat
    template applied by the server: ``--apply_chat_template``), one doc per request, two
    at a time (num_concurrent=2: lm-eval's aiohttp path)."""
    proc, results = run_lm_eval(tmp_path, "local-chat-completions", {
        "model": model, "base_url": f"{proxy.url}/v1/chat/completions", "num_concurrent": 2, "max_retries": 1},
        "qwenbox_gen", "--apply_chat_template")
    assert_lm_eval_ran(proc, results, "qwenbox_gen", ("exact_match",), recorder)
    assert len(recorder.posts("/v1/chat/completions")) == LIMIT
    assert_all_ok(recorder)
    assert_logged(daemon, recorder)


# ---------------------------------------------------------------- langchain-openai on the unix socket
def _http_client(daemon, rec: Recorder):
    """httpx on the daemon's unix socket, keeping every exchange in ``rec`` (event hooks)."""
    import httpx

    def on_request(req: httpx.Request) -> None:
        req.headers["X-Request-Id"] = rec.new_id()

    def on_response(resp: httpx.Response) -> None:
        streamed = resp.headers.get("content-type", "").startswith("text/event-stream")
        if not streamed:
            resp.read()
        req = resp.request
        rec.add(req.headers["X-Request-Id"], req.method, req.url.path, req.content, resp.status_code,
                "(an event stream)" if streamed else resp.content)

    return httpx.Client(transport=httpx.HTTPTransport(uds=daemon.sock), timeout=120,
                        event_hooks={"request": [on_request], "response": [on_response]})


@pytest.fixture
def chat(daemon, model, recorder):
    """A factory of ``ChatOpenAI`` on the daemon (greedy, no retries), closing its clients."""
    from langchain_openai import ChatOpenAI
    clients = []

    def make(**kw):
        clients.append(_http_client(daemon, recorder))
        return ChatOpenAI(model=model, base_url="http://localhost/v1", api_key="unused", max_retries=0,
                          temperature=0, http_client=clients[-1], **{"max_tokens": 64, **kw})

    yield make
    for c in clients:
        c.close()


@pytest.fixture(scope="module")
def bias() -> dict[str, dict[int, int]]:
    """``logit_bias`` that keeps the demo model's noise short under a grammar (both checked
    on vLLM's structured outputs with this model; the answers are still the model's own):

    - ``no_whitespace``: -100 on the tokens that are whitespace only. Where JSON allows
      whitespace the random model, greedy, picks "\\r" until ``max_tokens`` (a cut object
      that openai's ``parse`` refuses with LengthFinishReasonError); where the grammar asks
      for one, a finite bias does not keep it out.
    - ``shortest_object``: +100 on "{", "}" and the end of text: inside a free JSON object
      (json_object) it writes a run of digits forever; with these it writes "{}" and stops.
    """
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(str(DEMO_MODEL / "tokenizer.json"))
    eos = json.loads((DEMO_MODEL / "generation_config.json").read_text())["eos_token_id"]
    ws = {i: -100 for i in tok.get_vocab().values()
          if (text := tok.decode([i], skip_special_tokens=False)) and not text.strip()}
    braces = {tok.token_to_id("{"): 100, tok.token_to_id("}"): 100, eos: 100}
    assert ws and None not in braces, (ws, braces)
    return {"no_whitespace": ws, "shortest_object": braces}


def _pydantic_schemas():
    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        """Get the current weather in a city."""
        city: Literal["Paris", "London", "Tokyo"] = Field(description="the city")
        unit: Literal["celsius", "fahrenheit"]

    class Verdict(BaseModel):
        """What a review says about the film."""
        sentiment: Literal["positive", "negative", "neutral"]
        recommended: bool

    return GetWeather, Verdict


def test_langchain_plain_chat(daemon, chat, recorder):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    msg = chat().invoke([SystemMessage("You are terse."), HumanMessage("Hello there!")])
    assert isinstance(msg, AIMessage) and isinstance(msg.content, str)
    assert msg.response_metadata["finish_reason"] in ("stop", "length")
    assert msg.usage_metadata and msg.usage_metadata["output_tokens"] >= 1
    chunks = list(chat(max_tokens=8).stream("Tell me a story."))
    assert chunks and all(isinstance(c.content, str) for c in chunks)
    assert_all_ok(recorder)
    assert_logged(daemon, recorder)


@pytest.mark.parametrize("tool_choice, strict", [("GetWeather", None), ("any", None), ("GetWeather", True)])
def test_langchain_bind_tools_forced(daemon, chat, recorder, bias, tool_choice, strict):
    """``bind_tools([...], tool_choice=...)``: a named tool or any tool ("any" is OpenAI's
    "required"), and a named one with ``strict=True``; the server must answer with a call of
    the tool whose arguments fit its schema. Not strict too: the demo model's noise fits a
    schema only where the grammar pins it, so a forced call must pin the arguments' schema
    whatever the tool's ``strict`` says (what `vllm serve --tool-strict-level parameter`
    does; at its default level, "auto", the arguments of a non-strict tool run free)."""
    from langchain_core.messages import AIMessage
    get_weather, _ = _pydantic_schemas()
    llm = chat(max_tokens=128, logit_bias=bias["no_whitespace"]).bind_tools(
        [get_weather], tool_choice=tool_choice, strict=strict)
    msg = llm.invoke("What is the weather in Paris, in celsius?")
    assert isinstance(msg, AIMessage)
    assert not msg.invalid_tool_calls, msg.invalid_tool_calls
    assert len(msg.tool_calls) >= 1, msg
    call = msg.tool_calls[0]
    assert call["name"] == "GetWeather" and call["id"]
    get_weather.model_validate(call["args"])
    assert_all_ok(recorder)
    assert_logged(daemon, recorder)


def test_langchain_tool_result_round_trip(daemon, chat, recorder):
    """What an agent sends after it ran the tool: the assistant's message with its
    ``tool_calls``, then a ``tool`` message with the result; the model answers."""
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    get_weather, _ = _pydantic_schemas()
    history = [HumanMessage("What is the weather in Paris, in celsius?"),
               AIMessage("", tool_calls=[{"name": "GetWeather", "args": {"city": "Paris", "unit": "celsius"},
                                          "id": "call_0", "type": "tool_call"}]),
               ToolMessage("18 degrees and sunny", tool_call_id="call_0")]
    answer = chat().bind_tools([get_weather]).invoke(history)
    assert isinstance(answer, AIMessage)
    assert_all_ok(recorder)
    assert_logged(daemon, recorder)


def test_langchain_bind_tools_auto(daemon, chat, recorder):
    """Tools offered, the choice left to the model (no tool_choice): the demo model's noise
    is rarely a call, so this asserts only that the request is served."""
    from langchain_core.messages import AIMessage
    get_weather, _ = _pydantic_schemas()
    msg = chat().bind_tools([get_weather]).invoke("What is the weather in Tokyo?")
    assert isinstance(msg, AIMessage)
    assert_all_ok(recorder)
    assert_logged(daemon, recorder)


@pytest.mark.parametrize("method, strict", [("json_schema", None), ("function_calling", None),
                                           ("function_calling", True)])
def test_langchain_structured_output(daemon, chat, recorder, bias, method, strict):
    """``with_structured_output(Schema, method=...)``: ``response_format`` with the schema
    (langchain makes it strict), or a forced tool call (strict or not: langchain's default
    leaves ``strict`` out, see test_langchain_bind_tools_forced); either way the answer
    parses as the schema."""
    _, verdict = _pydantic_schemas()
    llm = chat(max_tokens=128, logit_bias=bias["no_whitespace"]).with_structured_output(
        verdict, method=method, strict=strict)
    out = llm.invoke("Review: a wonderful film, I loved every minute of it.")
    assert isinstance(out, verdict), out
    assert_all_ok(recorder)
    assert_logged(daemon, recorder)


def test_langchain_structured_output_json_mode(daemon, chat, recorder, bias):
    """``method="json_mode"``: ``response_format: {"type": "json_object"}``; the answer is a
    JSON object (no schema; the bias makes the demo model's the shortest one)."""
    llm = chat(max_tokens=64, logit_bias=bias["shortest_object"]).with_structured_output(None, method="json_mode")
    out = llm.invoke("Answer in JSON: what is the sentiment of 'a wonderful film'?")
    assert isinstance(out, dict), out
    assert_all_ok(recorder)
    assert_logged(daemon, recorder)


def test_langchain_completions_generate_batch(daemon, model, recorder):
    """``OpenAI().generate([a, b])``: both prompts in one /v1/completions request, one
    generation list per prompt."""
    from langchain_openai import OpenAI
    prompts = ["Once upon a time", "The weather today is"]
    with _http_client(daemon, recorder) as http_client:
        llm = OpenAI(model=model, base_url="http://localhost/v1", api_key="unused", max_retries=0,
                     max_tokens=8, temperature=0, http_client=http_client)
        result = llm.generate(prompts)
    assert len(result.generations) == len(prompts)
    for gens in result.generations:
        assert len(gens) == 1 and isinstance(gens[0].text, str)
        assert gens[0].generation_info["finish_reason"] in ("stop", "length")
    posts = recorder.posts("/v1/completions")
    assert len(posts) == 1 and posts[0]["request"]["prompt"] == prompts, posts
    assert result.llm_output["token_usage"]["completion_tokens"] >= len(prompts)
    assert_all_ok(recorder)
    assert_logged(daemon, recorder)
