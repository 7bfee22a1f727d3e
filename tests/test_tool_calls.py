"""Tool calls and structured output (issue 19): the real engine on the demo model, the real
`openai` client, over the unix socket; and vLLM's own parser of Qwen3's tool-call format.

The demo model's output is noise: what is asserted is what the grammar forces (a named
call's arguments match its schema, a schema's JSON parses and holds), the shapes OpenAI's
clients read, the counts and the refusals, never the text. The demo model's chat template
is Qwen3's format (``demo_model.CHAT_TEMPLATE``), so a tool history renders as Qwen3's does.
"""
from __future__ import annotations

import json
import warnings

import pytest

from helpers import DEMO_CONFIG, DEMO_MODEL, jrequest, request, sse_events
from qwenbox import config as qconfig
from qwenbox.api import protocol, toolcalls
from qwenbox.api.errors import ApiError
from qwenbox.config import LimitsConfig
from qwenbox.generation import Delta

CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}},
                                       "required": ["utc"], "additionalProperties": False}}}
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "ok": {"type": "boolean"}, "tag": {"type": "string", "enum": ["a", "b"]}},
         "required": ["x", "ok", "tag"], "additionalProperties": False}


def weather_args(arguments: str) -> dict:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and args["city"] in ("Paris", "Rome") and args["unit"] in ("C", "F"), args
    return args


# ---------------------------------------------------------------- without an engine
def parse(**kw):
    return protocol.parse_chat({"model": "m", "messages": MSGS, **kw}, LimitsConfig())


def test_tools_parse_into_definitions_choice_and_parallel():
    req = parse(tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_time"}},
                parallel_tool_calls=False)
    assert req.tools is not None and req.tools.forced == "get_time" and req.tools.parallel is False
    assert [d["function"]["name"] for d in req.tools.definitions] == ["get_weather", "get_time"]
    assert parse(tools=[WEATHER]).tools.choice == "auto"
    assert parse(tools=[WEATHER], tool_choice="none").tools.parsed is False
    assert parse().tools is None and parse(tools=[]).tools is None


def test_a_tool_history_reaches_the_template_with_arguments_as_objects():
    req = parse(messages=[*MSGS, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]}])
    assistant, tool = req.messages[1], req.messages[2]
    assert assistant["content"] == "" and assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert assistant["tool_calls"][1]["function"]["arguments"] == "not json"     # kept as sent
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def test_response_format_becomes_a_guided_constraint():
    assert parse(response_format={"type": "text"}).sampling.guided is None
    assert parse(response_format={"type": "json_object"}).sampling.guided.json_object is True
    g = parse(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": POINT,
                                                                      "strict": True}}).sampling.guided
    assert json.loads(g.json_schema) == POINT


def test_a_forced_call_is_generated_under_its_schema():
    named = toolcalls.guided(parse(tools=[WEATHER, CLOCK], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}).tools)
    assert json.loads(named.json_schema) == WEATHER["function"]["parameters"]
    required = json.loads(toolcalls.guided(parse(tools=[WEATHER, CLOCK], tool_choice="required").tools).json_schema)
    assert required["type"] == "array" and required["minItems"] == 1 and "maxItems" not in required
    names = [alt["properties"]["name"]["enum"] for alt in required["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    one = json.loads(toolcalls.guided(parse(tools=[WEATHER], tool_choice="required",
                                            parallel_tool_calls=False).tools).json_schema)
    assert one["maxItems"] == 1
    assert toolcalls.guided(parse(tools=[WEATHER]).tools) is None          # auto: the model's own format


def test_forced_output_becomes_calls_and_cut_output_stays_content():
    tools = parse(tools=[WEATHER, CLOCK], tool_choice="required").tools
    calls = toolcalls.forced_calls(tools, '[{"name":"get_time","parameters":{"utc":true}},'
                                          '{"name":"get_weather","parameters":{"city":"Rome","unit":"C"}}]')
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "get_time", {"utc": True}), (1, "get_weather", {"city": "Rome", "unit": "C"})]
    assert all(c.id and c.id.startswith("call_") for c in calls)
    assert toolcalls.forced_calls(tools, '[{"name":"get_ti') == ()
    calling = toolcalls.ToolCalling(tools, lambda: None, stream=True)
    first = calling._split(Delta(0, '[{"name":"get_ti', 5))
    assert first.text == "" and first.tool_calls == () and first.num_tokens == 5      # held until the end
    last = calling._split(Delta(0, 'me","param', 3, "length"))
    assert last.text == '[{"name":"get_time","param' and last.tool_calls == () and last.finish_reason == "length"


def test_auto_without_a_parser_is_refused_up_front():
    with pytest.raises(ApiError) as ei:
        toolcalls.ToolCalling(parse(tools=[WEATHER]).tools, lambda: None, stream=False)
    assert ei.value.status == 400 and ei.value.param == "tools"


@pytest.fixture(scope="module")
def hermes():
    """vLLM's hermes parser (Qwen3's format) behind the engine border, on the demo tokenizer."""
    from transformers import AutoTokenizer

    from qwenbox import engine
    with warnings.catch_warnings():     # torch's own DeprecationWarnings while vLLM imports it
        warnings.simplefilter("ignore", DeprecationWarning)
        cls = engine._tool_parser_class(_demo_cfg())
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    return lambda: engine.VllmToolParser(cls, tok, [WEATHER, CLOCK])


def _demo_cfg():
    return qconfig.load(DEMO_CONFIG)


# vLLM is imported (its parser), no engine built
QWEN3_CALLS = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>')


@pytest.mark.engine
def test_the_models_own_format_is_read_whole(hermes):
    content, calls = hermes().whole(QWEN3_CALLS)
    assert content.strip() == "Let me check."
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris", "unit": "C"}), (1, "get_time", {"utc": True})]
    assert hermes().whole("no call here") == ("no call here", ())


@pytest.mark.engine
@pytest.mark.parametrize("step", [1, 3, 7, 40])
def test_the_models_own_format_is_read_as_it_streams(hermes, step):
    """Fed in pieces of any size, the parts add up to the whole answer's calls, each call's
    id and name on its first part."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    parser, content, parts = hermes(), "", []
    for i in range(0, len(QWEN3_CALLS), step):
        piece = QWEN3_CALLS[i:i + step]
        text, calls = parser.stream(piece, tok.encode(piece, add_special_tokens=False))
        content += text
        parts += calls
    assert content.strip() == "Let me check."
    merged: dict[int, dict] = {}
    for p in parts:
        m = merged.setdefault(p.index, {"id": p.id, "name": p.name, "args": ""})
        assert p.id is None or m["id"] == p.id
        m["args"] += p.arguments
    assert [(k, m["name"], json.loads(m["args"])) for k, m in sorted(merged.items())] == [
        (0, "get_weather", {"city": "Paris", "unit": "C"}), (1, "get_time", {"utc": True})]
    assert all(m["id"] for m in merged.values())


@pytest.mark.engine
def test_an_unknown_tool_parser_is_a_config_error(hermes):
    import dataclasses

    from qwenbox import engine
    cfg = _demo_cfg()
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tool_parser="no_such_parser"))
    with pytest.raises(qconfig.ConfigError) as ei:
        engine._tool_parser_class(bad)
    assert ei.value.key == "model.tool_parser" and "hermes" in str(ei.value)


# ---------------------------------------------------------------- the real engine
@pytest.fixture
def openai_client(daemon):
    with daemon.openai() as client:
        yield client


@pytest.fixture(scope="module")
def model(daemon):
    return qconfig.load(daemon.config).model.name


@pytest.mark.engine
@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_call_with_the_openai_client(daemon, model, openai_client, stream):
    kw = dict(model=model, messages=MSGS, tools=[WEATHER, CLOCK], max_tokens=64,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if not stream:
        r = openai_client.chat.completions.create(**kw)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        weather_args(call.function.arguments)
        return
    parts, finish = [], None
    for chunk in openai_client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            parts += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert parts[0].id.startswith("call_") and parts[0].function.name == "get_weather"
    assert {p.index for p in parts} == {0}
    weather_args("".join(p.function.arguments or "" for p in parts))


@pytest.mark.engine
@pytest.mark.parametrize("stream", [False, True])
def test_a_required_call_without_parallel_calls_is_exactly_one(daemon, model, openai_client, stream):
    kw = dict(model=model, messages=MSGS, tools=[WEATHER, CLOCK], tool_choice="required",
              parallel_tool_calls=False, max_tokens=64)
    if stream:
        calls: dict[int, dict] = {}
        for chunk in openai_client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                for p in c.delta.tool_calls or []:
                    m = calls.setdefault(p.index, {"name": p.function.name, "args": ""})
                    m["args"] += p.function.arguments or ""
        [(name, arguments)] = [(m["name"], m["args"]) for m in calls.values()]
    else:
        r = openai_client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "tool_calls"
        [call] = r.choices[0].message.tool_calls
        name, arguments = call.function.name, call.function.arguments
    assert name in ("get_weather", "get_time")
    args = json.loads(arguments)
    if name == "get_weather":
        weather_args(arguments)
    else:
        assert set(args) == {"utc"} and isinstance(args["utc"], bool)


@pytest.mark.engine
@pytest.mark.parametrize("stream", [False, True])
def test_auto_and_none_answer_in_openai_shape(daemon, model, openai_client, stream):
    """"auto" lets the model answer or call (the demo model's noise rarely calls: its
    parsing is tested above on Qwen3's format); "none" never yields a tool call."""
    for choice in ("auto", "none"):
        kw = dict(model=model, messages=MSGS, tools=[WEATHER], tool_choice=choice, max_tokens=16)
        if stream:
            chunks = list(openai_client.chat.completions.create(stream=True, **kw))
            finish = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
            calls = [p for ch in chunks for c in ch.choices for p in (c.delta.tool_calls or [])]
        else:
            r = openai_client.chat.completions.create(**kw)
            finish, calls = [r.choices[0].finish_reason], r.choices[0].message.tool_calls or []
            assert isinstance(r.choices[0].message.content, str) or calls
        assert len(finish) == 1 and finish[0] in ("stop", "length", "tool_calls")
        assert (finish[0] == "tool_calls") == bool(calls)
        if choice == "none":
            assert calls == []


@pytest.mark.engine
def test_a_tool_history_renders_through_the_template(daemon, model, openai_client):
    """An assistant turn that called tools and the tools' results: answered, and the prompt
    holds them (more prompt tokens than without the results)."""
    history = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "18 degrees and sunny"}]
    with_results = openai_client.chat.completions.create(model=model, messages=history, tools=[WEATHER],
                                                         max_tokens=4)
    without = openai_client.chat.completions.create(model=model, messages=MSGS, tools=[WEATHER], max_tokens=4)
    assert with_results.usage.prompt_tokens > without.usage.prompt_tokens + 10


@pytest.mark.engine
@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_holds_to_its_schema(daemon, model, openai_client, stream):
    kw = dict(model=model, messages=[{"role": "user", "content": "a point"}], max_tokens=64,
              response_format={"type": "json_schema", "json_schema": {"name": "point", "schema": POINT,
                                                                      "strict": True}})
    if stream:
        text = "".join(c.delta.content or "" for ch in openai_client.chat.completions.create(stream=True, **kw)
                       for c in ch.choices)
    else:
        r = openai_client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "stop"
        text = r.choices[0].message.content
    value = json.loads(text)
    assert set(value) == {"x", "ok", "tag"} and 0 <= value["x"] <= 99 and isinstance(value["ok"], bool)
    assert value["tag"] in ("a", "b")
    assert " " not in text          # compact JSON: no whitespace for the model to spend tokens on


@pytest.mark.engine
def test_json_object_output_is_a_json_object_as_far_as_it_goes(daemon, model, openai_client):
    r = openai_client.chat.completions.create(model=model, messages=MSGS, max_tokens=48, temperature=0,
                                              response_format={"type": "json_object"})
    text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert text.startswith("{")
    if finish == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.engine
@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_the_grammar_cannot_compile_is_a_400_streamed_or_not(daemon, model, stream):
    body = {"model": model, "messages": MSGS, "max_tokens": 8, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "wat"}}}}
    status, _, data = jrequest(daemon.sock, "POST", CHAT, body)
    assert status == 400, data
    assert "wat" in data["error"]["message"]
    status, _, data = jrequest(daemon.sock, "POST", CHAT, {"model": model, "messages": MSGS, "max_tokens": 2})
    assert status == 200


@pytest.mark.engine
def test_a_hostile_schema_costs_a_bounded_answer(daemon, model):
    """A schema built to be expensive (deep nesting of alternatives, a backtracking-prone
    pattern) is answered (an answer or a 400) and the daemon serves the next request."""
    deep: dict = {"type": "string", "pattern": "^(x+x+)+y$"}
    for _ in range(5):      # 2^5 copies of the leaf, nested as deep as the body's depth bound lets it
        deep = {"anyOf": [{"type": "array", "items": deep}, {"type": "object", "additionalProperties": deep}]}
    nasty = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+(b|c|d|e)*(a|aa)*$"},
                                              "d": deep}, "required": ["s"]}
    for schema in (nasty, deep):
        body = {"model": model, "messages": MSGS, "max_tokens": 8,
                "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
        status, _, data = jrequest(daemon.sock, "POST", CHAT, body)
        assert status in (200, 400), data
    status, _, _ = jrequest(daemon.sock, "POST", CHAT, {"model": model, "messages": MSGS, "max_tokens": 2})
    assert status == 200


@pytest.mark.engine
def test_streamed_tool_parts_arrive_as_sse(daemon, model):
    """The wire shape under the client: one part with id, type and name, then arguments."""
    body = {"model": model, "messages": MSGS, "tools": [WEATHER], "max_tokens": 64, "stream": True,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    status, _, data = request(daemon.sock, "POST", CHAT, body)
    assert status == 200
    events = [e for e in sse_events(data) if e != "[DONE]"]
    parts = [p for e in events for c in e["choices"] for p in c["delta"].get("tool_calls", [])]
    assert parts[0]["type"] == "function" and parts[0]["function"]["name"] == "get_weather"
    assert all(isinstance(p["function"]["arguments"], str) for p in parts)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
