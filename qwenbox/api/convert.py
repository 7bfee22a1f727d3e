"""Pure conversions: parsed request -> GenerationRequest, engine Deltas -> OpenAI JSON.

Contract: no I/O and no vllm types. ``to_generation`` enforces the context-length rule
(400 naming both lengths) and fills ``max_tokens`` from the room left when the client
gave none; the ``*_body`` / ``*_chunk`` builders produce exactly OpenAI's shapes. A
``Shape`` (``CHAT``, ``COMPLETION``) is everything in which the two answers differ, so
a handler picks one and the code that answers has no branch on the kind.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..generation import Delta, GenerationRequest, Sampling, ToolCallDelta
from ..shaping import Defaults
from .errors import bad_request, context_length_exceeded, prompt_too_long

# vLLM reports "abort" for requests it cancelled: that is no OpenAI finish reason, and the
# handler answers an aborted request with an error instead.
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def finish_reason(r: str | None) -> str | None:
    return None if r is None else _FINISH.get(r)


def to_generation(client: Sampling, prompt_ids: list[int], *, request_id: str, max_model_len: int,
                  defaults: Defaults, stream: bool, priority: int = 0) -> GenerationRequest:
    """The client's sampling over the shaped defaults, checked against the context length."""
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise bad_request("the prompt is empty after tokenization", param="messages")
    if n_prompt >= max_model_len:
        raise prompt_too_long(max_model_len, n_prompt)
    room = max_model_len - n_prompt
    if client.max_tokens is not None and client.max_tokens > room:
        raise context_length_exceeded(f"the prompt is {n_prompt} tokens and max_tokens is {client.max_tokens}: "
                                      f"{n_prompt + client.max_tokens} tokens in all", max_model_len,
                                      "lower max_tokens or shorten the prompt", param="max_tokens")
    shaped = dataclasses.replace(defaults.sampling, max_tokens=min(defaults.sampling.max_tokens or room, room))
    return GenerationRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                             sampling=client.merged_over(shaped), priority=priority, stream=stream)


@dataclass
class Accumulator:
    """Collects deltas per choice; counts completion tokens for usage."""
    n: int
    texts: list[str] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    completion_tokens: int = 0

    tool_calls: list[dict[int, dict[str, Any]]] = field(default_factory=list)   # per choice, by call index

    def __post_init__(self) -> None:
        self.texts = [""] * self.n
        self.finish = [None] * self.n
        self.tool_calls = [{} for _ in range(self.n)]

    def add(self, deltas: list[Delta]) -> None:
        for d in deltas:
            self.texts[d.index] += d.text
            self.completion_tokens += d.num_tokens
            if d.finish_reason is not None:
                self.finish[d.index] = finish_reason(d.finish_reason)
            for c in d.tool_calls:
                call = self.tool_calls[d.index].setdefault(
                    c.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                call["id"] = c.id or call["id"]
                call["function"]["name"] = c.name or call["function"]["name"]
                call["function"]["arguments"] += c.arguments

    def message(self, i: int) -> dict[str, Any]:
        """Choice ``i`` as an assistant message: its text, and its tool calls when it made
        any (content is then null where it is empty, as OpenAI gives it)."""
        calls = [self.tool_calls[i][k] for k in sorted(self.tool_calls[i])]
        if not calls:
            return {"role": "assistant", "content": self.texts[i]}
        return {"role": "assistant", "content": self.texts[i] or None, "tool_calls": calls}

    def finish_summary(self) -> str:
        """The choices' distinct finish reasons, sorted and comma-joined (the access log's
        ``finish``); a choice with none finished by stopping."""
        return ",".join(sorted({f or "stop" for f in self.finish}))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())


def chat_body(rid: str, created: int, model: str, acc: Accumulator, prompt_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": acc.message(i),
                         "logprobs": None, "finish_reason": acc.finish[i] or "stop"} for i in range(acc.n)],
            "usage": usage(prompt_tokens, acc.completion_tokens)}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict[str, Any],
               finish: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion_body(rid: str, created: int, model: str, acc: Accumulator, prompt_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": acc.texts[i], "logprobs": None,
                         "finish_reason": acc.finish[i] or "stop"} for i in range(acc.n)],
            "usage": usage(prompt_tokens, acc.completion_tokens)}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, created: int, model: str, obj: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_opening(rid: str, created: int, model: str, n: int) -> list[dict[str, Any]]:
    """A chat stream opens with the assistant's role, once per choice."""
    return [chat_chunk(rid, created, model, i, {"role": "assistant", "content": ""}) for i in range(n)]


def _tool_call_part(c: ToolCallDelta) -> dict[str, Any]:
    """OpenAI's streamed tool-call part: id, type and name on a call's first part only."""
    fn: dict[str, Any] = {"arguments": c.arguments}
    part: dict[str, Any] = {"index": c.index}
    if c.id is not None:
        part.update(id=c.id, type="function")
    if c.name is not None:
        fn["name"] = c.name
    part["function"] = fn
    return part


def chat_delta_chunks(rid: str, created: int, model: str, d: Delta) -> list[dict[str, Any]]:
    """One delta of a chat stream: its text, its tool-call parts, then its finish reason
    as a chunk of its own."""
    out = []
    if d.text:
        out.append(chat_chunk(rid, created, model, d.index, {"content": d.text}))
    if d.tool_calls:
        out.append(chat_chunk(rid, created, model, d.index, {"tool_calls": [_tool_call_part(c) for c in d.tool_calls]}))
    if fin := finish_reason(d.finish_reason):
        out.append(chat_chunk(rid, created, model, d.index, {}, fin))
    return out


def completion_opening(rid: str, created: int, model: str, n: int) -> list[dict[str, Any]]:
    return []


def completion_delta_chunks(rid: str, created: int, model: str, d: Delta) -> list[dict[str, Any]]:
    """One delta of a completion stream: text and finish reason in one chunk (none if both empty)."""
    fin = finish_reason(d.finish_reason)
    return [completion_chunk(rid, created, model, d.index, d.text, fin)] if d.text or fin else []


class Head(NamedTuple):
    """What every body and chunk of one answer starts with."""
    id: str             # the Shape's prefix and the request id
    created: int        # unix seconds
    model: str


@dataclass(frozen=True)
class Shape:
    """How one kind of answer (chat or text completion) is written."""
    id_prefix: str                                               # "chatcmpl" | "cmpl"
    chunk_object: str                                            # a streamed chunk's "object", the usage one's too
    body: Callable[[str, int, str, Accumulator, int], dict[str, Any]]    # the whole answer (head, acc, prompt tokens)
    opening: Callable[[str, int, str, int], list[dict[str, Any]]]        # chunks before any output (head, n)
    delta_chunks: Callable[[str, int, str, Delta], list[dict[str, Any]]]  # the chunks of one delta

    def head(self, request_id: str, model: str) -> Head:
        return Head(f"{self.id_prefix}-{request_id}", now(), model)


CHAT = Shape("chatcmpl", "chat.completion.chunk", chat_body, chat_opening, chat_delta_chunks)
COMPLETION = Shape("cmpl", "text_completion", completion_body, completion_opening, completion_delta_chunks)
