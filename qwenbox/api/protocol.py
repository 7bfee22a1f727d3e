"""OpenAI request shapes, validated at the edge.

Contract: ``parse_chat(body, limits)`` / ``parse_completion(body, limits)`` take the decoded
JSON value and return a typed request, or raise ``ApiError`` (400) naming the offending
``param``. Values are checked for type AND range here, so nothing malformed reaches the
engine. Fields we cannot honour (tools, logprobs, JSON mode, batched prompts) are rejected
with a clear message rather than silently ignored; unknown extra fields are ignored, as
OpenAI-compatible servers do, so newer clients keep working.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import LimitsConfig
from .errors import bad_request

ROLES = ("system", "developer", "user", "assistant")


@dataclass
class Sampling:
    max_tokens: int | None = None       # None: decided by shaping / room left in the context
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float | None = None
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    user: str | None = None


@dataclass
class CompletionRequest:
    model: str
    prompt: str | list[int]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    user: str | None = None


def decode_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    if not text.strip():
        raise bad_request("request body is empty; expected a JSON object", code="invalid_json")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                          code="invalid_json") from None


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__ if body is not None else 'null'}",
                          code="invalid_json")
    return body


def _get(body: dict, key: str, types: tuple, what: str, default: Any = None) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in types:
        raise bad_request(f"'{key}' must be {what}, got a boolean", param=key)
    if not isinstance(v, types):
        raise bad_request(f"'{key}' must be {what}, got {type(v).__name__}", param=key)
    if isinstance(v, float) and not math.isfinite(v):
        raise bad_request(f"'{key}' must be a finite number", param=key)
    return v


def _range(key: str, v: Any, lo: float | None, hi: float | None, *, lo_open: bool = False) -> None:
    if v is None:
        return
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise bad_request(f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {v}", param=key)
    if hi is not None and v > hi:
        raise bad_request(f"'{key}' must be <= {hi}, got {v}", param=key)


def _reject_if_set(body: dict, key: str, why: str, allowed: tuple = (None, False, [], {})) -> None:
    if key in body and body[key] not in allowed:
        raise bad_request(f"'{key}' is not supported by this server: {why}", param=key, code="unsupported_parameter")


NUM = (int, float)


def _sampling(body: dict, limits: LimitsConfig) -> Sampling:
    s = Sampling()
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if mt is not None:
        if isinstance(mt, bool) or not isinstance(mt, int):
            raise bad_request(f"'{key}' must be an integer, got {type(mt).__name__}", param=key)
        if mt <= 0:
            raise bad_request(f"'{key}' must be at least 1, got {mt}", param=key)
        if mt > limits.max_tokens_cap:
            raise bad_request(f"'{key}' is {mt}, above this server's cap of {limits.max_tokens_cap}", param=key)
        s.max_tokens = mt
    s.temperature = _get(body, "temperature", NUM, "a number")
    _range("temperature", s.temperature, 0.0, 2.0)
    s.top_p = _get(body, "top_p", NUM, "a number")
    _range("top_p", s.top_p, 0.0, 1.0, lo_open=True)
    s.top_k = _get(body, "top_k", (int,), "an integer", -1)
    if s.top_k != -1:
        _range("top_k", s.top_k, 1, None)
    s.min_p = _get(body, "min_p", NUM, "a number", 0.0)
    _range("min_p", s.min_p, 0.0, 1.0)
    s.presence_penalty = _get(body, "presence_penalty", NUM, "a number")
    _range("presence_penalty", s.presence_penalty, -2.0, 2.0)
    s.frequency_penalty = _get(body, "frequency_penalty", NUM, "a number", 0.0)
    _range("frequency_penalty", s.frequency_penalty, -2.0, 2.0)
    s.repetition_penalty = _get(body, "repetition_penalty", NUM, "a number", 1.0)
    _range("repetition_penalty", s.repetition_penalty, 0.0, 2.0, lo_open=True)
    s.n = _get(body, "n", (int,), "an integer", 1)
    _range("n", s.n, 1, None)
    if s.n > limits.max_n:
        raise bad_request(f"'n' is {s.n}, above this server's cap of {limits.max_n}", param="n")
    s.seed = _get(body, "seed", (int,), "an integer")
    s.ignore_eos = _get(body, "ignore_eos", (bool,), "a boolean", False)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
            raise bad_request("'stop' must be a non-empty string or a list of non-empty strings", param="stop")
        if len(stop) > limits.max_stop_sequences:
            raise bad_request(f"'stop' has {len(stop)} sequences, above this server's cap of "
                              f"{limits.max_stop_sequences}", param="stop")
        s.stop = stop
    _reject_if_set(body, "logprobs", "log probabilities are not returned")
    _reject_if_set(body, "top_logprobs", "log probabilities are not returned", allowed=(None, 0))
    _reject_if_set(body, "logit_bias", "logit bias is not applied")
    return s


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", (bool,), "a boolean", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad_request("'stream_options' must be an object", param="stream_options")
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        include_usage = _get(opts, "include_usage", (bool,), "a boolean", False)
    return stream, include_usage


def _model(body: dict) -> str:
    m = body.get("model")
    if not isinstance(m, str) or not m:
        raise bad_request("'model' is required and must be a string (see GET /v1/models)", param="model")
    return m


def _content(i: int, msg: dict, role: str) -> str:
    c = msg.get("content")
    param = f"messages[{i}].content"
    if c is None:
        if role == "assistant":
            return ""
        raise bad_request(f"{param} is required for role '{role}'", param=param)
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"{param}[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                                  f"got {kind!r} (this model takes text only)", param=f"{param}[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"{param} must be a string or a list of text parts, got {type(c).__name__}", param=param)


def parse_chat(body: Any, limits: LimitsConfig) -> ChatRequest:
    body = _object(body)
    model = _model(body)
    msgs = body.get("messages")
    if msgs is None:
        raise bad_request("'messages' is required", param="messages")
    if not isinstance(msgs, list):
        raise bad_request(f"'messages' must be a list, got {type(msgs).__name__}", param="messages")
    if not msgs:
        raise bad_request("'messages' must contain at least one message", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
        role = m.get("role")
        if role == "tool" or m.get("tool_calls"):
            raise bad_request(f"messages[{i}]: tool messages and tool calls are not supported by this server",
                              param=f"messages[{i}].role", code="unsupported_parameter")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}",
                              param=f"messages[{i}].role")
        # 'developer' is OpenAI's newer name for the system role.
        out.append({"role": "system" if role == "developer" else role, "content": _content(i, m, role)})
    _reject_if_set(body, "tools", "tool calling is not enabled")
    _reject_if_set(body, "functions", "function calling is not enabled")
    _reject_if_set(body, "tool_choice", "tool calling is not enabled", allowed=(None, "none"))
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad_request("'response_format' other than {\"type\": \"text\"} is not supported by this server",
                          param="response_format", code="unsupported_parameter")
    stream, include_usage = _stream(body)
    user = _get(body, "user", (str,), "a string")
    return ChatRequest(model, out, _sampling(body, limits), stream, include_usage, user)


def parse_completion(body: Any, limits: LimitsConfig) -> CompletionRequest:
    body = _object(body)
    model = _model(body)
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one is the common client default
    if isinstance(p, str):
        if not p:
            raise bad_request("'prompt' must not be empty", param="prompt")
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        pass
    elif isinstance(p, list) and p and all(isinstance(t, (str, list)) for t in p):
        raise bad_request("batched prompts are not supported; send one prompt per request", param="prompt",
                          code="unsupported_parameter")
    elif p is None:
        raise bad_request("'prompt' is required", param="prompt")
    else:
        raise bad_request("'prompt' must be a non-empty string or a list of token ids", param="prompt")
    _reject_if_set(body, "echo", "echoing the prompt is not supported")
    _reject_if_set(body, "suffix", "suffix (fill-in-the-middle) is not supported", allowed=(None, ""))
    _reject_if_set(body, "best_of", "best_of is not supported", allowed=(None, 1))
    stream, include_usage = _stream(body)
    user = _get(body, "user", (str,), "a string")
    return CompletionRequest(model, p, _sampling(body, limits), stream, include_usage, user)
