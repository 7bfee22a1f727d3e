"""OpenAI request shapes, validated at the edge.

Contract: ``decode_json(raw)`` turns the body into a JSON value that is safe to walk (or
400). ``parse_chat(body, limits)`` / ``parse_completion(body, limits)`` take that value and
return a typed request carrying one ``generation.Sampling``, or raise ``ApiError`` (400)
naming the offending ``param``. Every field is checked for type AND range here (ranges
shared with the config through ``generation.RULES``; ``logit_bias`` bounded here, its ids
checked against the vocabulary in ``routes``), and every client string that can
reach a log line or a map is bounded, so nothing malformed reaches the engine.
Log probabilities are asked of the engine as ``Sampling.logprobs`` (chat: ``logprobs``
and ``top_logprobs``; completions: ``logprobs``, at most ``MAX_LOGPROBS``
alternatives) and, for a completion's ``echo``, ``Sampling.prompt_logprobs``; echo with
``max_tokens: 0`` runs one token and returns the prompt alone (``generate`` False).
Fields we cannot honour (tools, JSON mode) are rejected with a clear
message rather than silently ignored; unknown extra fields are ignored, as
OpenAI-compatible servers do, so newer clients keep working.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import LimitsConfig
from ..generation import RULES, Sampling
from .errors import bad_request

ROLES = ("system", "developer", "user", "assistant")
MAX_DEPTH = 32            # JSON nesting; OpenAI's own request shapes need fewer than 8 levels
MAX_USER_CHARS = 256      # `user` becomes a session id, a map key and a log field
MAX_STOP_CHARS = 256      # per stop sequence
MAX_TOP_K = 1 << 20       # above any vocabulary
MAX_LOGIT_BIAS = 300      # entries of `logit_bias`: a bound on what one request adds to every step
# Alternatives per token (chat's top_logprobs, completions' logprobs). OpenAI documents 5
# for completions and 20 for chat; 20 for both, as vLLM: its default max_logprobs, the
# most its engine returns.
MAX_LOGPROBS = 20


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
    prompts: tuple[str | list[int], ...]    # one or more (a batch): text, or token ids
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    echo: bool = False          # each choice's text (and logprobs) start with its prompt's
    generate: bool = True       # False: echo with max_tokens 0, the prompt alone is answered

    @property
    def prompt(self) -> str | list[int]:
        """The first prompt (the only one outside a batch)."""
        return self.prompts[0]


def decode_json(raw: bytes) -> Any:
    """Bytes -> a JSON value that is safe to walk: valid UTF-8, no lone surrogates
    (``"\\ud800"`` escapes) in any key or string, nested at most ``MAX_DEPTH`` deep."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    if not text.strip():
        raise bad_request("request body is empty; expected a JSON object", code="invalid_json")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                          code="invalid_json") from None
    except RecursionError:
        raise bad_request(f"request body is nested too deeply (at most {MAX_DEPTH} levels)",
                          code="invalid_json") from None
    except ValueError as e:   # e.g. an integer with more digits than Python converts
        raise bad_request(f"request body has a value this server cannot read: {e}", code="invalid_json") from None
    _check_tree(value)
    return value


def _check_tree(value: Any) -> None:
    """Walk the decoded JSON once, without recursion: depth and text that UTF-8 can hold."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        v, depth, path = stack.pop()
        if isinstance(v, str):
            _utf8(v, path or "body")
        elif isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise bad_request(f"request body is nested too deeply (at most {MAX_DEPTH} levels)",
                                  param=path or None, code="invalid_json")
            if isinstance(v, dict):
                for k, item in v.items():
                    _utf8(k, path or "body")
                    stack.append((item, depth + 1, f"{path}.{k}" if path else k))
            else:
                stack.extend((item, depth + 1, f"{path}[{i}]") for i, item in enumerate(v))


def _utf8(s: str, path: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(f"'{_short(path)}' contains a lone UTF-16 surrogate (\\u{ord(s[e.start]):04x}); "
                              "text must be valid Unicode", param=_short(path), code="invalid_encoding") from None


def _short(path: str, limit: int = 128) -> str:
    """A client-chosen key path, cut so an error message stays small."""
    return path if len(path) <= limit else path[:limit] + "..."


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        got = type(body).__name__ if body is not None else "null"
        raise bad_request(f"request body must be a JSON object, got {got}", code="invalid_json")
    return body


def _get(body: dict[str, Any], key: str, types: tuple[type, ...], what: str, default: Any = None) -> Any:
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


def _ruled(body: dict[str, Any], key: str, default: Any = None) -> Any:
    """A numeric sampling field, checked against ``generation.RULES`` (shared with config)."""
    rule = RULES[key]
    v = _get(body, key, (int,) if rule.integer else (int, float), "an integer" if rule.integer else "a number",
             default)
    if v is not None:
        problem = rule.check(v)
        if problem:
            raise bad_request(f"'{key}' {problem}", param=key)
    return v


def _reject_if_set(body: dict[str, Any], key: str, why: str,
                   allowed: tuple[object, ...] = (None, False, [], {})) -> None:
    if key in body and body[key] not in allowed:
        raise bad_request(f"'{key}' is not supported by this server: {why}", param=key, code="unsupported_parameter")


def _max_tokens(body: dict[str, Any], limits: LimitsConfig, least: int = 1) -> int | None:
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    mt = body.get(key)
    if mt is None:
        return None
    if isinstance(mt, bool) or not isinstance(mt, int):
        raise bad_request(f"'{key}' must be an integer, got {type(mt).__name__}", param=key)
    if mt < least:
        raise bad_request(f"'{key}' must be at least {least}, got {mt}", param=key)
    if mt > limits.max_tokens_cap:
        raise bad_request(f"'{key}' is {mt}, above this server's cap of {limits.max_tokens_cap}", param=key)
    return mt


def _stop(body: dict[str, Any], limits: LimitsConfig) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise bad_request("'stop' must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stop) > limits.max_stop_sequences:
        raise bad_request(f"'stop' has {len(stop)} sequences, above this server's cap of "
                          f"{limits.max_stop_sequences}", param="stop")
    if any(len(x) > MAX_STOP_CHARS for x in stop):
        raise bad_request(f"each 'stop' sequence must be at most {MAX_STOP_CHARS} characters", param="stop")
    return tuple(stop)


def _sampling(body: dict[str, Any], limits: LimitsConfig, least_tokens: int = 1) -> Sampling:
    top_k = _get(body, "top_k", (int,), "an integer", -1)
    if top_k != -1 and not 1 <= top_k <= MAX_TOP_K:
        raise bad_request(f"'top_k' must be -1 (off) or between 1 and {MAX_TOP_K}, got {top_k}", param="top_k")
    n = _get(body, "n", (int,), "an integer", 1)
    if n < 1:
        raise bad_request(f"'n' must be >= 1, got {n}", param="n")
    if n > limits.max_n:
        raise bad_request(f"'n' is {n}, above this server's cap of {limits.max_n}", param="n")
    return Sampling(
        max_tokens=_max_tokens(body, limits, least_tokens), temperature=_ruled(body, "temperature"),
        top_p=_ruled(body, "top_p"), presence_penalty=_ruled(body, "presence_penalty"),
        top_k=top_k, min_p=_ruled(body, "min_p", 0.0), frequency_penalty=_ruled(body, "frequency_penalty", 0.0),
        repetition_penalty=_ruled(body, "repetition_penalty", 1.0), stop=_stop(body, limits),
        seed=_ruled(body, "seed"), n=n, ignore_eos=_get(body, "ignore_eos", (bool,), "a boolean", False),
        logit_bias=_logit_bias(body))


def _alternatives(body: dict[str, Any], key: str) -> int | None:
    """An integer count of alternatives per token, 0..MAX_LOGPROBS, or None when absent."""
    k: int | None = _get(body, key, (int,), "an integer")
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise bad_request(f"'{key}' must be between 0 and {MAX_LOGPROBS}, got {k}", param=key)
    return k


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat's ``logprobs`` (a boolean) and ``top_logprobs`` -> ``Sampling.logprobs``: the
    alternatives per generated token, or None when logprobs are not asked. A
    ``top_logprobs`` above 0 needs ``logprobs: true`` (0 asks for nothing: accepted, as
    vLLM does)."""
    want = _get(body, "logprobs", (bool,), "a boolean", False)
    top = _alternatives(body, "top_logprobs")
    if top and not want:
        raise bad_request("'top_logprobs' is only allowed with 'logprobs': true", param="top_logprobs")
    return (top or 0) if want else None


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: {"token id": bias in -100..100}, at most MAX_LOGIT_BIAS
    entries (a bound on what one request may make every step pay). Ids are checked against
    the vocabulary where the tokenizer is known (``routes``)."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise bad_request("'logit_bias' must be an object mapping token ids to biases", param="logit_bias")
    if len(bias) > MAX_LOGIT_BIAS:
        raise bad_request(f"'logit_bias' has {len(bias)} entries, above this server's cap of {MAX_LOGIT_BIAS}",
                          param="logit_bias")
    out = []
    for key, v in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
            raise bad_request(f"'logit_bias' keys must be token ids (non-negative integers), got {key[:40]!r}",
                              param="logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not -100 <= v <= 100:
            raise bad_request(f"'logit_bias' values must be numbers from -100 to 100; token {key} has "
                              f"{str(v)[:40]}", param="logit_bias")
        out.append((int(key), float(v)))
    return tuple(sorted(out))


def _user(body: dict[str, Any]) -> str | None:
    user = _get(body, "user", (str,), "a string")
    if user is not None and len(user) > MAX_USER_CHARS:
        raise bad_request(f"'user' must be at most {MAX_USER_CHARS} characters, got {len(user)}", param="user")
    return user or None


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
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


def _model(body: dict[str, Any]) -> str:
    m = body.get("model")
    if not isinstance(m, str) or not m:
        raise bad_request("'model' is required and must be a string (see GET /v1/models)", param="model")
    return m


def _content(i: int, msg: dict[str, Any], role: str) -> str:
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
    sampling = dataclasses.replace(_sampling(body, limits), logprobs=_chat_logprobs(body))
    return ChatRequest(model, out, sampling, stream, include_usage, _user(body))


def _one_prompt(p: Any, param: str) -> str | list[int]:
    if isinstance(p, str):
        if not p:
            raise bad_request(f"'{param}' must not be empty", param="prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    raise bad_request(f"'{param}' must be a non-empty string or a list of token ids", param="prompt")


def _prompts(body: dict[str, Any], limits: LimitsConfig) -> tuple[str | list[int], ...]:
    """``prompt``: a string, a list of token ids, or a batch (a list of either); a batch is
    at most ``limits.max_prompts`` long and each of its prompts is checked as one."""
    p = body.get("prompt")
    if p is None:
        raise bad_request("'prompt' is required", param="prompt")
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        if len(p) > limits.max_prompts:
            raise bad_request(f"'prompt' is a batch of {len(p)} prompts, above this server's cap of "
                              f"{limits.max_prompts}", param="prompt")
        return tuple(_one_prompt(x, f"prompt[{i}]") for i, x in enumerate(p))
    return (_one_prompt(p, "prompt"),)


def parse_completion(body: Any, limits: LimitsConfig) -> CompletionRequest:
    body = _object(body)
    model = _model(body)
    prompts = _prompts(body, limits)
    echo = _get(body, "echo", (bool,), "a boolean", False)
    _reject_if_set(body, "suffix", "suffix (fill-in-the-middle) is not supported", allowed=(None, ""))
    _reject_if_set(body, "best_of", "best_of is not supported", allowed=(None, 1))
    stream, include_usage = _stream(body)
    sampling, generate = _echo_sampling(_sampling(body, limits, least_tokens=0 if echo else 1),
                                        _alternatives(body, "logprobs"), echo)
    return CompletionRequest(model, prompts, sampling, stream, include_usage, _user(body), echo, generate)


def _echo_sampling(s: Sampling, logprobs: int | None, echo: bool) -> tuple[Sampling, bool]:
    """A completion's sampling with its logprobs, and whether it generates at all. With
    echo the prompt's logprobs are asked too (as many alternatives); ``max_tokens: 0``
    (echo only: lm-eval's loglikelihood requests) runs the engine for one token, which is
    not returned: the engine cannot score a prompt without generating."""
    generate = s.max_tokens != 0
    return dataclasses.replace(s, max_tokens=s.max_tokens if generate else 1, logprobs=logprobs,
                               prompt_logprobs=logprobs if echo else None), generate


_SESSION_ID = re.compile(r"^[A-Za-z0-9._:@\-]{1,128}$")


def session_id(headers: Mapping[str, str], user: str | None) -> str | None:
    """The request's session: the ``X-Session-Id`` header, else the (bounded) ``user`` field."""
    sid = headers.get("X-Session-Id")
    if sid is not None:
        if not _SESSION_ID.match(sid):
            raise bad_request("X-Session-Id must be 1-128 characters of letters, digits and ._:@-",
                              param="X-Session-Id")
        return sid
    return user
