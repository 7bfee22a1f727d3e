"""qwenbox/api/protocol.py, convert.py and record.py: pure functions, no daemon."""
from __future__ import annotations

import json
import logging

import pytest

from qwenbox import eventlog
from qwenbox.api import convert, errors, protocol
from qwenbox.api.errors import ApiError
from qwenbox.api.record import RequestRecord
from qwenbox.config import LimitsConfig
from qwenbox.generation import Delta, Sampling, TokenLogprob, TopLogprob
from qwenbox.shaping import Defaults

LIMITS = LimitsConfig(max_tokens_cap=1024, max_n=4, max_stop_sequences=2)
MSGS = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


def chat(**kw):
    return {"model": "m", "messages": MSGS, **kw}


def bad(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as ei:
        fn(*args)
    e = ei.value
    assert e.status == 400
    body = e.body()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    return e


# ---------------------------------------------------------------- decode_json
@pytest.mark.parametrize("raw, words", [
    (b'{"model": "m", ', "not valid JSON"),
    (b"", "empty"),
    (b"   \n", "empty"),
    (b'{"model": "\xff"}', "not valid UTF-8"),
])
def test_decode_json_rejects(raw, words):
    e = bad(protocol.decode_json, raw)
    assert words in e.message
    assert e.code in ("invalid_json", "invalid_encoding")


def test_decode_json_names_the_position():
    e = bad(protocol.decode_json, b'{\n  "a": 1,\n  oops\n}')
    assert "line 3" in e.message


def test_decode_json_accepts_utf8():
    assert protocol.decode_json('{"t": "总结"}'.encode()) == {"t": "总结"}


# ---------------------------------------------------------------- parse_chat: each bad input
@pytest.mark.parametrize("body, param", [
    ([], None),
    ("text", None),
    (None, None),
    (42, None),
    ({"messages": MSGS}, "model"),
    ({"model": 3, "messages": MSGS}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": ["hi"]}, "messages[0]"),
    ({"model": "m", "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": {"text": "x"}}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": "m", "messages": [MSGS[0], {"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[1].content[0]"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"model": "m", "messages": [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages[0].tool_calls"),
    ({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "a b"}}]}]},
     "messages[0].tool_calls[0].function.name"),
    ({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=-3), "max_tokens"),
    (chat(max_tokens=1025), "max_tokens"),
    (chat(max_tokens="10"), "max_tokens"),
    (chat(max_tokens=True), "max_tokens"),
    (chat(max_tokens=1.5), "max_tokens"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(temperature=-0.1), "temperature"),
    (chat(temperature=2.01), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(temperature=float("nan")), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(top_p=1.01), "top_p"),
    (chat(top_k=0), "top_k"),
    (chat(presence_penalty=3), "presence_penalty"),
    (chat(frequency_penalty=-3), "frequency_penalty"),
    (chat(n=0), "n"),
    (chat(n=5), "n"),
    (chat(n=1.0), "n"),
    (chat(stream="yes"), "stream"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(stream=True, stream_options=[]), "stream_options"),
    (chat(stop=["a", "b", "c"]), "stop"),
    (chat(stop=[""]), "stop"),
    (chat(stop=5), "stop"),
    (chat(seed="x"), "seed"),
    (chat(tools=[{"type": "function"}]), "tools[0]"),
    (chat(tools={"type": "function"}), "tools"),
    (chat(tools=[{"type": "function", "function": {"name": ""}}]), "tools[0].function.name"),
    (chat(tools=[{"type": "function", "function": {"name": "x" * 65}}]), "tools[0].function.name"),
    (chat(tools=[TOOL, TOOL]), "tools[1].function.name"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]), "tools[0].function.parameters"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"d": "x" * 70_000}}}]),
     "tools[0].function.parameters"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "strict": "yes"}}]), "tools[0].function.strict"),
    (chat(tools=[TOOL] * 129), "tools"),
    (chat(tool_choice="required"), "tool_choice"),
    (chat(tools=[TOOL], tool_choice="always"), "tool_choice"),
    (chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}), "tool_choice"),
    (chat(tools=[TOOL], parallel_tool_calls="no"), "parallel_tool_calls"),
    (chat(functions=[{"name": "f"}]), "functions"),
    (chat(tools=[TOOL], tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    (chat(response_format={"type": "xml"}), "response_format"),
    (chat(response_format="json"), "response_format"),
    (chat(response_format={"type": "json_schema"}), "response_format.json_schema"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
     "response_format.json_schema.name"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": 5}}),
     "response_format.json_schema.schema"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"d": "x" * 70_000}}}),
     "response_format.json_schema.schema"),
    (chat(logprobs="yes"), "logprobs"),
    (chat(logprobs=1), "logprobs"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    (chat(logprobs=True, top_logprobs="3"), "top_logprobs"),
    (chat(logprobs=True, top_logprobs=1.5), "top_logprobs"),
    (chat(logprobs=True, top_logprobs=True), "top_logprobs"),
    (chat(top_logprobs=3), "top_logprobs"),
    (chat(logprobs=False, top_logprobs=3), "top_logprobs"),
    (chat(user=5), "user"),
    (chat(logit_bias=[1, 2]), "logit_bias"),
    (chat(logit_bias={"12": 101}), "logit_bias"),
    (chat(logit_bias={"12": -100.5}), "logit_bias"),
    (chat(logit_bias={"12": "up"}), "logit_bias"),
    (chat(logit_bias={"12": True}), "logit_bias"),
    (chat(logit_bias={"12": float("inf")}), "logit_bias"),
    (chat(logit_bias={"-1": 5}), "logit_bias"),
    (chat(logit_bias={"a": 5}), "logit_bias"),
    (chat(logit_bias={"1.5": 5}), "logit_bias"),
    (chat(logit_bias={"\u0661": 5}), "logit_bias"),                  # a digit, but not an ASCII one
    (chat(logit_bias={"1" * 11: 5}), "logit_bias"),
    (chat(logit_bias={str(i): 1 for i in range(301)}), "logit_bias"),
])
def test_parse_chat_rejects(body, param):
    e = bad(protocol.parse_chat, body, LIMITS)
    assert e.param == param, e.message


def test_logit_bias_reaches_the_sampling_by_token_id():
    r = protocol.parse_chat(chat(logit_bias={"15": 100, "3": -100, "7": 0.5}), LIMITS)
    assert r.sampling.logit_bias == ((3, -100.0), (7, 0.5), (15, 100.0))
    assert r.sampling.engine_kwargs()["logit_bias"] == {3: -100.0, 7: 0.5, 15: 100.0}
    assert protocol.parse_chat(chat(), LIMITS).sampling.engine_kwargs()["logit_bias"] is None
    assert protocol.parse_chat(chat(logit_bias={str(i): 1 for i in range(300)}), LIMITS).sampling.logit_bias
    assert "cap of 300" in bad(protocol.parse_chat, chat(logit_bias={str(i): 1 for i in range(301)}), LIMITS).message


def test_cap_messages_name_the_cap():
    assert "1024" in bad(protocol.parse_chat, chat(max_tokens=5000), LIMITS).message
    assert "cap of 4" in bad(protocol.parse_chat, chat(n=5), LIMITS).message


def test_parse_chat_good():
    r = protocol.parse_chat(chat(messages=[{"role": "developer", "content": "be brief"},
                                           {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]},
                                           {"role": "assistant", "content": None}],
                                 max_tokens=1024, temperature=0, top_p=1, n=4, stop="END",
                                 stream=True, stream_options={"include_usage": True},
                                 some_future_field=1), LIMITS)
    assert r.model == "m"
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                          {"role": "assistant", "content": ""}]
    s = r.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.n, s.stop) == (1024, 0, 1, 4, ("END",))
    assert r.stream is True and r.include_usage is True


def test_parse_chat_defaults_leave_room_for_shaping():
    s = protocol.parse_chat(chat(), LIMITS).sampling
    assert s.max_tokens is None and s.temperature is None and s.top_p is None and s.n == 1


def test_chat_logprobs_reach_the_sampling_as_alternatives_per_token():
    assert protocol.parse_chat(chat(logprobs=True, top_logprobs=5), LIMITS).sampling.logprobs == 5
    assert protocol.parse_chat(chat(logprobs=True, top_logprobs=20), LIMITS).sampling.logprobs == 20
    assert protocol.parse_chat(chat(logprobs=True), LIMITS).sampling.logprobs == 0      # the chosen token's only
    for off in (chat(), chat(logprobs=False), chat(top_logprobs=0), chat(logprobs=None, top_logprobs=None)):
        assert protocol.parse_chat(off, LIMITS).sampling.logprobs is None
    s = protocol.parse_chat(chat(logprobs=True, top_logprobs=3), LIMITS).sampling
    assert s.prompt_logprobs is None and s.engine_kwargs()["logprobs"] == 3
    assert "between 0 and 20" in bad(protocol.parse_chat, chat(logprobs=True, top_logprobs=21), LIMITS).message


def test_max_completion_tokens_wins():
    assert protocol.parse_chat(chat(max_completion_tokens=7, max_tokens=9), LIMITS).sampling.max_tokens == 7


# ---------------------------------------------------------------- parse_completion
@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": ""}, "prompt"),
    ({"model": "m", "prompt": 5}, "prompt"),
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": ["a", ""]}, "prompt"),
    ({"model": "m", "prompt": [[1], []]}, "prompt"),
    ({"model": "m", "prompt": [[1], [True]]}, "prompt"),
    ({"model": "m", "prompt": ["a"] * 33}, "prompt"),
    ({"model": "m", "prompt": [1, "x"]}, "prompt"),
    ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": "x", "echo": "yes"}, "echo"),
    ({"model": "m", "prompt": "x", "echo": 1}, "echo"),
    ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": "m", "prompt": "x", "logprobs": -1}, "logprobs"),
    ({"model": "m", "prompt": "x", "logprobs": "1"}, "logprobs"),
    ({"model": "m", "prompt": "x", "logprobs": True}, "logprobs"),
    ({"model": "m", "prompt": "x", "logprobs": 1.0}, "logprobs"),
    ({"model": "m", "prompt": "x", "echo": True, "max_tokens": -1}, "max_tokens"),
    ({"model": "m", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "n": 9}, "n"),
])
def test_parse_completion_rejects(body, param):
    assert bad(protocol.parse_completion, body, LIMITS).param == param


def test_parse_completion_good():
    assert protocol.parse_completion({"model": "m", "prompt": "x"}, LIMITS).prompt == "x"
    assert protocol.parse_completion({"model": "m", "prompt": ["x"]}, LIMITS).prompt == "x"
    assert protocol.parse_completion({"model": "m", "prompt": [1, 2, 3]}, LIMITS).prompt == [1, 2, 3]
    batch = protocol.parse_completion({"model": "m", "prompt": ["x", [4, 5], "y"]}, LIMITS)
    assert batch.prompts == ("x", [4, 5], "y") and batch.prompt == "x"
    assert len(protocol.parse_completion({"model": "m", "prompt": ["a"] * 32}, LIMITS).prompts) == 32
    assert "cap of 32" in bad(protocol.parse_completion, {"model": "m", "prompt": ["a"] * 33}, LIMITS).message
    assert "prompt[1]" in bad(protocol.parse_completion, {"model": "m", "prompt": ["a", ""]}, LIMITS).message


def test_completion_logprobs_and_echo_reach_the_sampling():
    base = {"model": "m", "prompt": "x"}
    r = protocol.parse_completion({**base, "logprobs": 5}, LIMITS)
    assert (r.sampling.logprobs, r.sampling.prompt_logprobs, r.echo, r.generate) == (5, None, False, True)
    r = protocol.parse_completion({**base, "logprobs": 20, "echo": True, "max_tokens": 3}, LIMITS)
    assert (r.sampling.logprobs, r.sampling.prompt_logprobs, r.sampling.max_tokens) == (20, 20, 3)
    assert r.echo and r.generate
    assert r.sampling.engine_kwargs()["prompt_logprobs"] == 20
    r = protocol.parse_completion({**base, "echo": True}, LIMITS)              # echo alone: text only
    assert (r.sampling.logprobs, r.sampling.prompt_logprobs, r.sampling.max_tokens) == (None, None, None)
    off = protocol.parse_completion({**base, "echo": False, "logprobs": None}, LIMITS)
    assert not off.echo and off.sampling.logprobs is None


def test_echo_with_max_tokens_0_runs_one_token_and_generates_nothing():
    """lm-eval's loglikelihood request, as it sends it."""
    r = protocol.parse_completion({"model": "m", "prompt": [[1, 2, 3], "a b"], "max_tokens": 0, "temperature": 0,
                                   "logprobs": 1, "echo": True}, LIMITS)
    assert r.prompts == ([1, 2, 3], "a b") and r.echo and not r.generate
    assert (r.sampling.max_tokens, r.sampling.logprobs, r.sampling.prompt_logprobs) == (1, 1, 1)
    one = protocol.parse_completion({"model": "m", "prompt": "a", "max_tokens": 1, "logprobs": 1, "echo": True},
                                    LIMITS)
    assert one.generate and one.sampling.max_tokens == 1
    e = bad(protocol.parse_completion, {"model": "m", "prompt": "a", "max_tokens": 0}, LIMITS)   # without echo
    assert e.param == "max_tokens" and "at least 1" in e.message
    assert bad(protocol.parse_chat, chat(max_tokens=0), LIMITS).param == "max_tokens"
    assert "between 0 and 20" in bad(protocol.parse_completion, {"model": "m", "prompt": "a", "logprobs": 21},
                                     LIMITS).message


# ---------------------------------------------------------------- convert.to_generation
DEFAULTS = Defaults(Sampling(max_tokens=100))


def gen(sampling=None, n_prompt=10, max_model_len=64, defaults=DEFAULTS, **kw):
    return convert.to_generation(sampling or Sampling(), list(range(n_prompt)), request_id="r1",
                                 max_model_len=max_model_len, defaults=defaults, stream=False, **kw)


def test_prompt_longer_than_context_names_both_lengths():
    e = bad(gen, None, 80, 64)
    assert "80" in e.message and "64" in e.message
    assert e.code == "context_length_exceeded" and e.param == "messages"


def test_prompt_exactly_the_context_is_rejected():
    e = bad(gen, None, 64, 64)
    assert "64 tokens long" in e.message


def test_prompt_plus_max_tokens_over_context():
    e = bad(gen, Sampling(max_tokens=60), 10, 64)
    assert e.param == "max_tokens" and e.code == "context_length_exceeded"
    assert "70" in e.message and "64" in e.message


def test_prompt_plus_max_tokens_exactly_the_context_is_fine():
    assert gen(Sampling(max_tokens=54), 10, 64).sampling.max_tokens == 54


def test_empty_prompt_is_rejected():
    assert bad(gen, None, 0, 64).param == "messages"


def test_max_tokens_default_is_the_room_left():
    # defaults.max_tokens is 100 but only 64 - 10 = 54 tokens fit
    assert gen(None, 10, 64).sampling.max_tokens == 54


def test_max_tokens_default_from_defaults_when_room():
    assert gen(None, 10, 4096).sampling.max_tokens == 100


def test_sampling_defaults_and_client_values():
    g = gen(None, 5, 64, defaults=Defaults(Sampling(max_tokens=8, temperature=0.3, top_p=0.9,
                                                    presence_penalty=0.1))).sampling
    assert (g.temperature, g.top_p, g.presence_penalty) == (0.3, 0.9, 0.1)
    r = gen(Sampling(temperature=0.0, top_p=0.5, presence_penalty=0.0, n=2, ignore_eos=True,
                     stop=("x",), seed=3), 5, 64, priority=2)
    g = r.sampling
    assert (g.temperature, g.top_p, g.presence_penalty) == (0.0, 0.5, 0.0)
    assert (g.n, g.ignore_eos, g.stop, g.seed, r.priority, r.request_id) == (2, True, ("x",), 3, 2, "r1")
    g = r
    assert g.prompt_token_ids == list(range(5))


# ---------------------------------------------------------------- output shapes
def test_finish_reason_mapping():
    assert convert.finish_reason("stop") == "stop"
    assert convert.finish_reason("length") == "length"
    assert convert.finish_reason(None) is None
    assert convert.finish_reason("abort") is None


def test_accumulator_and_bodies():
    acc = convert.Accumulator(2)
    acc.add([Delta(0, "he", 1), Delta(1, "a", 1)])
    acc.add([Delta(0, "llo", 2, "length"), Delta(1, "b", 1, "stop")])
    assert acc.texts == ["hello", "ab"] and acc.completion_tokens == 5 and acc.finish == ["length", "stop"]
    body = convert.chat_body("chatcmpl-1", 123, "m", acc, 7)
    assert body["object"] == "chat.completion" and body["model"] == "m" and body["created"] == 123
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "hello"},
                                  "logprobs": None, "finish_reason": "length"}
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    cb = convert.completion_body("cmpl-1", 123, "m", acc, 7)
    assert cb["object"] == "text_completion" and cb["choices"][1]["text"] == "ab"
    json.dumps(body), json.dumps(cb)


def test_chunks():
    c = convert.chat_chunk("id", 1, "m", 0, {"content": "x"})
    assert c["object"] == "chat.completion.chunk" and c["choices"][0]["delta"] == {"content": "x"}
    assert c["choices"][0]["finish_reason"] is None
    u = convert.usage_chunk("id", 1, "m", "chat.completion.chunk", 3, 4)
    assert u["choices"] == [] and u["usage"]["total_tokens"] == 7
    t = convert.completion_chunk("id", 1, "m", 1, "y", "stop")
    assert t["choices"][0] == {"index": 1, "text": "y", "logprobs": None, "finish_reason": "stop"}


def test_shapes_chunk_a_delta_as_openai_does():
    head = convert.CHAT.head("req-1", "m")
    assert head.id == "chatcmpl-req-1" and head.model == "m"
    opening = convert.CHAT.opening(*head, 2)
    assert [c["choices"][0]["delta"] for c in opening] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in opening] == [0, 1]
    text_and_end = convert.CHAT.delta_chunks(*head, convert.Piece(1, "hi", "length"))
    assert [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in text_and_end] == \
        [({"content": "hi"}, None), ({}, "length")]
    assert convert.CHAT.delta_chunks(*head, convert.Piece(0, "", "abort")) == []     # vLLM's abort is no finish
    chead = convert.COMPLETION.head("req-1", "m")
    assert chead.id == "cmpl-req-1" and convert.COMPLETION.opening(*chead, 2) == []
    [one] = convert.COMPLETION.delta_chunks(*chead, convert.Piece(0, "hi", "stop"))
    assert one["object"] == "text_completion" and one["choices"][0]["text"] == "hi"
    assert one["choices"][0]["logprobs"] is None
    assert convert.COMPLETION.delta_chunks(*chead, convert.Piece(0, "", None)) == []
    acc = convert.Accumulator(3)
    acc.add([Delta(0, "a", 1, "length"), Delta(1, "b", 1, "stop")])
    assert convert.CHAT.body(*head, acc, 4)["object"] == "chat.completion"
    assert convert.COMPLETION.body(*chead, acc, 4)["object"] == "text_completion"
    assert acc.finish_summary() == "length,stop"         # the unfinished third choice reads as stop


# ---------------------------------------------------------------- logprobs and echo
def lp(token: str, logprob: float, *top: tuple[str, float], token_id: int = 1) -> TokenLogprob:
    return TokenLogprob(token, token_id, logprob, tuple(TopLogprob(t, 100 + i, v) for i, (t, v) in enumerate(top)))


def test_chat_logprobs_shape():
    tokens = [convert.Token.of(lp("hé", -0.5, ("hé", -0.5), ("a", -1.25))), convert.Token.of(lp("!", -9999.0))]
    assert convert.chat_logprobs(tokens) == {"content": [
        {"token": "hé", "logprob": -0.5, "bytes": [104, 195, 169],
         "top_logprobs": [{"token": "hé", "logprob": -0.5, "bytes": [104, 195, 169]},
                          {"token": "a", "logprob": -1.25, "bytes": [97]}]},
        {"token": "!", "logprob": -9999.0, "bytes": [33], "top_logprobs": []}]}
    assert convert.chat_logprobs([]) == {"content": []}


def test_completion_logprobs_shape_offsets_and_top_dicts():
    tokens = [convert.Token("The", None),                                          # the first prompt token
              convert.Token.of(lp(" cat", -2.0, (" dog", -1.0), (" cow", -1.5))),  # chosen outside the top 2
              convert.Token.of(lp(" sat", -0.25, (" sat", -0.25), ("�", -3.0), ("�", -3.5)))]
    assert convert.completion_logprobs(tokens, 10) == {
        "tokens": ["The", " cat", " sat"], "token_logprobs": [None, -2.0, -0.25],
        "top_logprobs": [None, {" dog": -1.0, " cow": -1.5, " cat": -2.0}, {" sat": -0.25, "�": -3.0}],
        "text_offset": [10, 13, 17]}
    only_chosen = convert.completion_logprobs([convert.Token.of(lp("x", -0.1))])     # logprobs: 0
    assert only_chosen["top_logprobs"] == [{"x": -0.1}] and only_chosen["text_offset"] == [0]


def test_accumulator_puts_echo_first_and_continues_text_offsets():
    echo = convert.Echo("The cat", first_token="The")
    acc = convert.Accumulator(2, logprobs=True, echoes=(echo, echo))
    prompt = (None, lp(" cat", -3.0, (" dog", -1.0)))
    first = acc.add([Delta(0, " sat", 1, logprobs=(lp(" sat", -0.5),), prompt_logprobs=prompt),
                     Delta(1, " ran", 1, logprobs=(lp(" ran", -0.7),), prompt_logprobs=prompt)])
    assert [p.text for p in first] == ["The cat sat", "The cat ran"]
    assert [t.text for t in first[0].tokens] == ["The", " cat", " sat"] and first[0].offset == 0
    [more] = acc.add([Delta(0, " down", 1, "length", logprobs=(lp(" down", -0.2),))])
    assert more.text == " down" and more.offset == len("The cat sat") and more.finish_reason == "length"
    assert acc.completion_tokens == 3 and acc.texts == ["The cat sat down", "The cat ran"]
    [c] = convert.COMPLETION.delta_chunks("id", 1, "m", more)
    assert c["choices"][0]["logprobs"]["text_offset"] == [11] and c["choices"][0]["finish_reason"] == "length"
    body = convert.completion_body("id", 1, "m", acc, 2)
    whole = body["choices"][0]["logprobs"]
    assert whole["tokens"] == ["The", " cat", " sat", " down"] and whole["text_offset"] == [0, 3, 7, 11]
    assert whole["token_logprobs"][0] is None and whole["top_logprobs"][0] is None
    assert body["choices"][1]["text"] == "The cat ran" and body["usage"]["completion_tokens"] == 3
    json.dumps(body, allow_nan=False)


def test_echo_without_generation_answers_the_prompt_alone():
    """max_tokens 0: the one token the engine made is neither shown nor counted."""
    echo = convert.Echo("a b", first_token="a", generate=False)
    acc = convert.Accumulator(1, logprobs=True, echoes=(echo,))
    [p] = acc.add([Delta(0, " c", 1, "stop", logprobs=(lp(" c", -1.0),),
                         prompt_logprobs=(None, lp(" b", -2.0, (" x", -0.5))))])
    assert p.text == "a b" and [t.text for t in p.tokens] == ["a", " b"] and p.finish_reason == "length"
    assert acc.completion_tokens == 0 and acc.texts == ["a b"] and acc.finish == ["length"]
    body = convert.completion_body("id", 1, "m", acc, 2)
    assert body["choices"][0]["logprobs"] == {"tokens": ["a", " b"], "token_logprobs": [None, -2.0],
                                              "top_logprobs": [None, {" x": -0.5, " b": -2.0}],
                                              "text_offset": [0, 1]}
    text_only = convert.Accumulator(1, echoes=(convert.Echo("a b", generate=False),))
    [p] = text_only.add([Delta(0, " c", 1, "length")])
    assert p.tokens is None and text_only.texts == ["a b"]
    assert convert.completion_body("id", 1, "m", text_only, 2)["choices"][0]["logprobs"] is None


def test_chat_stream_chunks_carry_their_own_tokens_logprobs():
    acc = convert.Accumulator(1, logprobs=True)
    [p] = acc.add([Delta(0, "", 1, logprobs=(lp("", -0.1),))])       # a token that decodes to no text
    [c] = convert.CHAT.delta_chunks("id", 1, "m", p)
    assert c["choices"][0]["delta"] == {"content": ""}
    assert c["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.1
    [p] = acc.add([Delta(0, "hi", 1, "length", logprobs=(lp("hi", -0.3, ("hi", -0.3)),))])
    text, end = convert.CHAT.delta_chunks("id", 1, "m", p)
    assert [e["token"] for e in text["choices"][0]["logprobs"]["content"]] == ["hi"]
    assert end["choices"][0]["logprobs"] is None and end["choices"][0]["finish_reason"] == "length"
    body = convert.chat_body("id", 1, "m", acc, 3)
    assert [e["logprob"] for e in body["choices"][0]["logprobs"]["content"]] == [-0.1, -0.3]
    plain = convert.Accumulator(1)
    [p] = plain.add([Delta(0, "", 1)])
    assert convert.CHAT.delta_chunks("id", 1, "m", p) == []           # no logprobs asked: no empty chunk
    assert convert.chat_body("id", 1, "m", plain, 3)["choices"][0]["logprobs"] is None


def test_context_length_errors_are_one_shape():
    for e in (errors.prompt_too_long(64), errors.prompt_too_long(64, 80, param="prompt"),
              errors.context_length_exceeded("the prompt is 10 tokens and max_tokens is 60", 64, "lower max_tokens",
                                             param="max_tokens")):
        assert e.status == 400 and e.code == "context_length_exceeded" and "64 tokens" in e.message
    unread = errors.prompt_too_long(64)
    assert unread.param == "messages" and "more than 64 tokens long" in unread.message
    assert "80 tokens long" in errors.prompt_too_long(64, 80).message


# ---------------------------------------------------------------- the access-log line (api/record.py)
def logged(fields: dict) -> str:
    """The line the daemon's formatter writes for these fields, from `event=` on."""
    rec = logging.LogRecord("qwenbox.events", logging.INFO, "", 0, eventlog.Event.REQUEST.value, (), None)
    rec.qb_fields = fields
    return eventlog.LogfmtFormatter().format(rec).split(" ", 2)[2]


def test_request_record_writes_the_line_in_its_order_without_unknown_facts():
    r = RequestRecord("req-1", started=10.0)
    r.session, r.intent = "s-1", "chat"
    r.queued_s, r.priority = 0.0, 0
    r.prompt_len, r.max_tokens, r.stream = 5, 16, True
    r.first_output(10.25)
    r.first_output(11.0)                      # TTFT is the first output's
    r.ended(4, "length")
    assert logged(r.line_fields("POST", "/v1/chat/completions", 200, 1.5)) == (
        "event=request id=req-1 method=POST path=/v1/chat/completions status=200 latency_s=1.5 session=s-1 "
        "intent=chat queued_s=0 priority=0 prompt_len=5 max_tokens=16 stream=true ttft_s=0.25 output_len=4 "
        "finish=length")
    refused = RequestRecord("req-2", started=0.0, truncated=2, session=None, intent="summarize", reason="queue_full")
    assert logged(refused.line_fields("POST", "/v1/chat/completions", 429, 0.01)) == (
        "event=request id=req-2 method=POST path=/v1/chat/completions status=429 latency_s=0.01 truncated=2 "
        "intent=summarize reason=queue_full")
    assert list(RequestRecord("req-3", 0.0).line_fields("GET", "/x", 404, 0.0)) == \
        ["id", "method", "path", "status", "latency_s"]
