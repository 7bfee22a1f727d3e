"""OpenAI request shapes, validated at the edge.

Contract: ``decode_json(raw)`` turns the body into a JSON value that is safe to walk (or
400). ``parse_chat(body, limits)`` / ``parse_completion(body, limits)`` take that value and
return a typed request carrying one ``generation.Sampling``, or raise ``ApiError`` (400)
naming the offending ``param``. Every field is checked for type AND range here (ranges
shared with the config through ``generation.RULES``; ``logit_bias`` bounded here, its ids
checked against the vocabulary in ``routes``), and every client string that can
reach a log line or a map is bounded, so nothing malformed reaches the engine. Tool
definitions and JSON schemas are bounded in size (``MAX_SCHEMA_CHARS``) and count
(``MAX_TOOLS``), so what a hostile definition costs the grammar compiler stays small.
Log probabilities are asked of the engine as ``Sampling.logprobs`` (chat: ``logprobs``
and ``top_logprobs``; completions: ``logprobs``, at most ``MAX_LOGPROBS``
alternatives) and, for a completion's ``echo``, ``Sampling.prompt_logprobs``; echo with
``max_tokens: 0`` runs one token and returns the prompt alone (``generate`` False).
Fields we cannot honour (``functions``, ``suffix``, ``best_of``) are rejected with a clear
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
from ..generation import RULES, ChatMessage, Guided, Sampling
from .errors import bad_request

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_DEPTH = 32            # JSON nesting; OpenAI's own request shapes need fewer than 8 levels
MAX_USER_CHARS = 256      # `user` becomes a session id, a map key and a log field
MAX_STOP_CHARS = 256      # per stop sequence
MAX_TOP_K = 1 << 20       # above any vocabulary
MAX_LOGIT_BIAS = 300      # entries of `logit_bias`: a bound on what one request adds to every step
# Alternatives per token (chat's top_logprobs, completions' logprobs). OpenAI documents 5
# for completions and 20 for chat; 20 for both, as vLLM: its default max_logprobs, the
# most its engine returns.
MAX_LOGPROBS = 20
MAX_TOOLS = 128           # OpenAI's own cap on `tools`
MAX_TOOL_CALLS = 128      # tool calls in one assistant turn of the history
MAX_SCHEMA_CHARS = 65_536  # one JSON schema (a tool's parameters, a response_format), as compact JSON
MAX_ID_CHARS = 256        # a tool call's id
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")     # OpenAI's rule for function names


@dataclass(frozen=True)
class Tools:
    """What a chat request offers the model to call: the function definitions (OpenAI's
    ``{"type": "function", "function": {...}}``, checked), how it may call them
    (``choice``: "auto", "required", or "none"; ``forced``: the one function it must call),
    and whether several calls may come in one answer."""
    definitions: tuple[dict[str, Any], ...]
    choice: str = "auto"
    forced: str | None = None
    parallel: bool = True

    @property
    def parsed(self) -> bool:
        """Whether the answer is read for tool calls (not with choice "none")."""
        return bool(self.definitions) and self.choice != "none"


@dataclass
class ChatRequest:
    model: str
    messages: list[ChatMessage]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    tools: Tools | None = None


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


def _content(i: int, msg: dict[str, Any], role: str, optional: bool = False) -> str:
    c = msg.get("content")
    param = f"messages[{i}].content"
    if c is None:
        if optional:      # an assistant turn that only called tools
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
    out = [_message(i, m) for i, m in enumerate(msgs)]
    _reject_if_set(body, "functions", "the legacy 'functions' API is not supported; send 'tools'")
    _reject_if_set(body, "function_call", "the legacy 'function_call' is not supported; send 'tool_choice'",
                   allowed=(None, "none", "auto"))
    tools = _tools(body)
    sampling = dataclasses.replace(_sampling(body, limits), logprobs=_chat_logprobs(body))
    guided = _response_format(body)
    if guided is not None and tools is not None and tools.choice != "none" and (tools.forced or
                                                                              tools.choice == "required"):
        raise bad_request("'response_format' cannot be combined with a forced tool call ('tool_choice' "
                          "\"required\" or a named function): both constrain the same output", param="response_format")
    if guided is not None:
        sampling = dataclasses.replace(sampling, guided=guided)
    stream, include_usage = _stream(body)
    return ChatRequest(model, out, sampling, stream, include_usage, _user(body), tools)


def _message(i: int, m: Any) -> ChatMessage:
    """One message of the history, as the chat template reads it."""
    if not isinstance(m, dict):
        raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
    role = m.get("role")
    if role not in ROLES:
        shown = role if not isinstance(role, str) or len(role) <= 40 else role[:40] + "..."
        raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {shown!r}",
                          param=f"messages[{i}].role")
    calls = m.get("tool_calls")
    # 'developer' is OpenAI's newer name for the system role.
    msg: ChatMessage = {"role": "system" if role == "developer" else role,
                        "content": _content(i, m, role, optional=role == "assistant")}
    if calls is not None and calls != []:
        if role != "assistant":
            raise bad_request(f"messages[{i}].tool_calls: only an assistant message can carry tool calls",
                              param=f"messages[{i}].tool_calls")
        msg["tool_calls"] = _history_calls(i, calls)
    if role == "tool":
        tcid = m.get("tool_call_id")
        if not isinstance(tcid, str) or not tcid or len(tcid) > MAX_ID_CHARS:
            raise bad_request(f"messages[{i}].tool_call_id is required for role 'tool' and must be a string of "
                              f"1-{MAX_ID_CHARS} characters (the id of the call it answers)",
                              param=f"messages[{i}].tool_call_id")
        msg["tool_call_id"] = tcid
    return msg


def _history_calls(i: int, calls: Any) -> list[dict[str, Any]]:
    """An assistant turn's ``tool_calls``: arguments as an object where they parse as one
    (what chat templates expect), else the text as sent."""
    param = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise bad_request(f"{param} must be a list", param=param)
    if len(calls) > MAX_TOOL_CALLS:
        raise bad_request(f"{param} has {len(calls)} calls, above this server's cap of {MAX_TOOL_CALLS}", param=param)
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or c.get("type", "function") != "function":
            raise bad_request(f"{param}[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                              f"\"arguments\": ...}}}}", param=f"{param}[{j}]")
        name, args, cid = fn.get("name"), fn.get("arguments", "{}"), c.get("id", "")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise bad_request(f"{param}[{j}].function.name must be 1-64 letters, digits, '_' or '-'",
                              param=f"{param}[{j}].function.name")
        if not isinstance(args, str):
            raise bad_request(f"{param}[{j}].function.arguments must be a string of JSON",
                              param=f"{param}[{j}].function.arguments")
        if not isinstance(cid, str) or len(cid) > MAX_ID_CHARS:
            raise bad_request(f"{param}[{j}].id must be a string of at most {MAX_ID_CHARS} characters",
                              param=f"{param}[{j}].id")
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = None
        out.append({"id": cid, "type": "function",
                    "function": {"name": name, "arguments": parsed if isinstance(parsed, dict) else args}})
    return out


def _schema(v: Any, param: str) -> str:
    """A JSON schema given as an object -> its compact JSON text, bounded in size."""
    if not isinstance(v, dict):
        raise bad_request(f"'{param}' must be a JSON schema (an object)", param=param)
    text = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    if len(text) > MAX_SCHEMA_CHARS:
        raise bad_request(f"'{param}' is {len(text)} characters of JSON, above this server's cap of "
                          f"{MAX_SCHEMA_CHARS}", param=param)
    return text


def _tools(body: dict[str, Any]) -> Tools | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls``, checked; None without tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = _get(body, "parallel_tool_calls", (bool,), "a boolean", True)
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise bad_request("'tool_choice' needs 'tools' to choose from", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise bad_request("'tools' must be a list of function definitions", param="tools")
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"'tools' has {len(tools)} entries, above this server's cap of {MAX_TOOLS}", param="tools")
    defs, names = [], set()
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type") != "function":
            raise bad_request(f"tools[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                              param=f"tools[{j}]")
        name = fn.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise bad_request(f"tools[{j}].function.name must be 1-64 letters, digits, '_' or '-'",
                              param=f"tools[{j}].function.name")
        if name in names:
            raise bad_request(f"tools[{j}].function.name {name!r} is defined twice", param=f"tools[{j}].function.name")
        names.add(name)
        desc = fn.get("description")
        if desc is not None and (not isinstance(desc, str) or len(desc) > MAX_SCHEMA_CHARS):
            raise bad_request(f"tools[{j}].function.description must be a string of at most {MAX_SCHEMA_CHARS} "
                              "characters", param=f"tools[{j}].function.description")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad_request(f"tools[{j}].function.strict must be a boolean", param=f"tools[{j}].function.strict")
        params = fn.get("parameters")
        d: dict[str, Any] = {"name": name}
        if desc:
            d["description"] = desc
        if params is not None:
            d["parameters"] = json.loads(_schema(params, f"tools[{j}].function.parameters"))
        defs.append({"type": "function", "function": d})
    return _tool_choice(choice, names, tuple(defs), parallel)


def _tool_choice(choice: Any, names: set[str], defs: tuple[dict[str, Any], ...], parallel: bool) -> Tools:
    if choice is None or choice in ("auto", "none", "required"):
        return Tools(defs, choice or "auto", None, parallel)
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad_request("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                          "\"function\": {\"name\": ...}}", param="tool_choice")
    if name not in names:
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise bad_request(f"'tool_choice' names the function {shown!r}, which 'tools' does not define",
                          param="tool_choice")
    return Tools(defs, "required", name, parallel)


def _response_format(body: dict[str, Any]) -> Guided | None:
    """``response_format``: text (None), ``json_object`` or ``json_schema`` (strict or not:
    the grammar holds the output to the schema either way)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Guided(json_object=True)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request("'response_format.json_schema' must be an object with 'name' and 'schema'",
                              param="response_format.json_schema")
        name = js.get("name")
        if name is not None and (not isinstance(name, str) or not _FUNCTION_NAME.match(name)):
            raise bad_request("'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'",
                              param="response_format.json_schema.name")
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad_request("'response_format.json_schema.strict' must be a boolean",
                              param="response_format.json_schema.strict")
        schema = js.get("schema")
        if schema is None:        # OpenAI allows a schema-less json_schema: any JSON object
            return Guided(json_object=True)
        return Guided(json_schema=_schema(schema, "response_format.json_schema.schema"))
    raise bad_request("'response_format.type' must be \"text\", \"json_object\" or \"json_schema\"",
                      param="response_format")


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
