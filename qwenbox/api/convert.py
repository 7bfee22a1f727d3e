"""Pure conversions: parsed request -> GenerationRequest, engine Deltas -> OpenAI JSON.

Contract: no I/O and no vllm types. ``to_generation`` enforces the context-length rule
(400 naming both lengths) and fills ``max_tokens`` from the room left when the client
gave none; the ``*_body`` / ``*_chunk`` builders produce exactly OpenAI's shapes. A
``Shape`` (``CHAT``, ``COMPLETION``) is everything in which the two answers differ, so
a handler picks one and the code that answers has no branch on the kind.

An ``Accumulator`` turns the engine's deltas into the ``Piece``s a client is shown: a
completion's ``Echo`` put first (the prompt's text, and its tokens with logprobs), the
logprobs as ``Token``s, each piece's text offset, its tool-call parts (which it also adds
up per choice: ``Accumulator.message``). Logprobs reach JSON finite (the engine gives -inf
as -9999.0) or null (the first prompt token, which has no context).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..generation import Delta, GenerationRequest, Sampling, TokenLogprob, ToolCallDelta, TopLogprob
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


class Token(NamedTuple):
    """One token of a choice's text as its logprobs describe it: its text, log probability
    and the alternatives asked for (most likely first). ``logprob`` is None for the first
    prompt token (echo): it has no context, so no probability."""
    text: str
    logprob: float | None
    top: tuple[TopLogprob, ...] = ()

    @classmethod
    def of(cls, t: TokenLogprob) -> Token:
        return cls(t.token, t.logprob, t.top)


@dataclass(frozen=True)
class Echo:
    """A completion's ``echo``: ``text`` (the prompt's) goes before the choice's text and,
    with logprobs, the prompt's tokens before its tokens; ``first_token`` is the first
    prompt token's text, which the engine gives no logprob. ``generate`` False
    (``max_tokens: 0``): the one token the engine had to make is not shown or counted."""
    text: str
    first_token: str = ""
    generate: bool = True

    def tokens(self, prompt: Sequence[TokenLogprob | None] | None) -> list[Token]:
        """The prompt's positions as Tokens (none when its logprobs were not asked)."""
        return [Token(self.first_token, None) if p is None else Token.of(p) for p in prompt or ()]


@dataclass(frozen=True)
class Piece:
    """One delta as the client is shown it, echo applied. ``tokens`` are the positions its
    text is made of when logprobs were asked (None otherwise); ``offset`` is where the first
    of them starts in the choice's text (completions' ``text_offset``: the token texts'
    lengths so far, as vLLM counts)."""
    index: int
    text: str
    finish_reason: str | None       # the engine's; ``finish_reason()`` maps it
    tokens: tuple[Token, ...] | None = None
    offset: int = 0
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass
class Accumulator:
    """Collects deltas per choice; counts completion tokens for usage. ``logprobs``: the
    client asked for them; ``echoes``: per choice index, its ``Echo`` (None or absent: no
    echo)."""
    n: int
    logprobs: bool = False
    echoes: Sequence[Echo | None] = ()
    texts: list[str] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    tokens: list[list[Token]] = field(default_factory=list)
    completion_tokens: int = 0
    _started: set[int] = field(default_factory=set)
    _offsets: list[int] = field(default_factory=list)      # per choice: its token texts' length so far
    tool_calls: list[dict[int, dict[str, Any]]] = field(default_factory=list)   # per choice, by call index

    def __post_init__(self) -> None:
        self.texts = [""] * self.n
        self.finish = [None] * self.n
        self.tokens = [[] for _ in range(self.n)]
        self._offsets = [0] * self.n
        self.tool_calls = [{} for _ in range(self.n)]

    def add(self, deltas: list[Delta]) -> list[Piece]:
        """Take the engine's deltas in; -> each as the client is shown it."""
        return [self._add(d) for d in deltas]

    def _add(self, d: Delta) -> Piece:
        echo = self.echoes[d.index] if d.index < len(self.echoes) else None
        text, count, tokens = d.text, d.num_tokens, [Token.of(t) for t in d.logprobs or ()]
        fin = d.finish_reason
        if echo is not None and not echo.generate:
            text, count, tokens = "", 0, []
            fin = "length" if fin in _FINISH else fin      # it stopped at max_tokens: 0
        if echo is not None and d.index not in self._started:
            text = echo.text + text
            tokens = [*echo.tokens(d.prompt_logprobs), *tokens]
        self._started.add(d.index)
        offset = self._offsets[d.index]
        self._offsets[d.index] += sum(len(t.text) for t in tokens)
        self.texts[d.index] += text
        self.tokens[d.index] += tokens
        self.completion_tokens += count
        if fin is not None:
            self.finish[d.index] = finish_reason(fin)
        for c in d.tool_calls:
            call = self.tool_calls[d.index].setdefault(
                c.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            call["id"] = c.id or call["id"]
            call["function"]["name"] = c.name or call["function"]["name"]
            call["function"]["arguments"] += c.arguments
        return Piece(d.index, text, fin, tuple(tokens) if self.logprobs else None, offset, d.tool_calls)

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


def _bytes(text: str) -> list[int]:
    """A token text's UTF-8 bytes (OpenAI's ``bytes``; the text is what the tokenizer
    decoded, so it holds no lone surrogates: "replace" never applies)."""
    return list(text.encode("utf-8", "replace"))


def chat_logprobs(tokens: Sequence[Token]) -> dict[str, Any]:
    """A chat choice's ``logprobs``: per token its text, logprob, bytes and alternatives."""
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": _bytes(t.text),
                         "top_logprobs": [{"token": c.token, "logprob": c.logprob, "bytes": _bytes(c.token)}
                                          for c in t.top]} for t in tokens]}


def _top_dict(t: Token) -> dict[str, float] | None:
    """A completion token's ``top_logprobs``: the alternatives and the token itself (up to
    k + 1 entries, as OpenAI and vLLM give them), most likely first; null without context.
    Two ids that decode to one text are one key, the likelier one's."""
    if t.logprob is None:
        return None
    top: dict[str, float] = {}
    for c in t.top:
        top.setdefault(c.token, c.logprob)
    top.setdefault(t.text, t.logprob)
    return top


def completion_logprobs(tokens: Sequence[Token], offset: int = 0) -> dict[str, Any]:
    """A completion choice's ``logprobs`` (OpenAI's legacy shape); ``text_offset`` counts
    from ``offset``, where these tokens start in the choice's text."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [_top_dict(t) for t in tokens], "text_offset": offsets}


def chat_body(rid: str, created: int, model: str, acc: Accumulator, prompt_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": acc.message(i),
                         "logprobs": chat_logprobs(acc.tokens[i]) if acc.logprobs else None,
                         "finish_reason": acc.finish[i] or "stop"} for i in range(acc.n)],
            "usage": usage(prompt_tokens, acc.completion_tokens)}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict[str, Any],
               finish: str | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def completion_body(rid: str, created: int, model: str, acc: Accumulator, prompt_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": acc.texts[i],
                         "logprobs": completion_logprobs(acc.tokens[i]) if acc.logprobs else None,
                         "finish_reason": acc.finish[i] or "stop"} for i in range(acc.n)],
            "usage": usage(prompt_tokens, acc.completion_tokens)}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish: str | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


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


def chat_delta_chunks(rid: str, created: int, model: str, d: Piece) -> list[dict[str, Any]]:
    """One delta of a chat stream: its text (with its tokens' logprobs, when asked: a chunk
    even when they decode to no text), its tool-call parts, then its finish reason as a
    chunk of its own."""
    out = []
    if d.text or d.tokens:
        out.append(chat_chunk(rid, created, model, d.index, {"content": d.text}, None,
                              None if d.tokens is None else chat_logprobs(d.tokens)))
    if d.tool_calls:
        out.append(chat_chunk(rid, created, model, d.index, {"tool_calls": [_tool_call_part(c) for c in d.tool_calls]}))
    if fin := finish_reason(d.finish_reason):
        out.append(chat_chunk(rid, created, model, d.index, {}, fin))
    return out


def completion_opening(rid: str, created: int, model: str, n: int) -> list[dict[str, Any]]:
    return []


def completion_delta_chunks(rid: str, created: int, model: str, d: Piece) -> list[dict[str, Any]]:
    """One delta of a completion stream: text, its tokens' logprobs (when asked; their
    ``text_offset`` continues the choice's) and finish reason in one chunk (none if all empty)."""
    fin = finish_reason(d.finish_reason)
    if not (d.text or d.tokens or fin):
        return []
    lps = None if d.tokens is None else completion_logprobs(d.tokens, d.offset)
    return [completion_chunk(rid, created, model, d.index, d.text, fin, lps)]


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
    delta_chunks: Callable[[str, int, str, Piece], list[dict[str, Any]]]  # the chunks of one delta

    def head(self, request_id: str, model: str) -> Head:
        return Head(f"{self.id_prefix}-{request_id}", now(), model)


CHAT = Shape("chatcmpl", "chat.completion.chunk", chat_body, chat_opening, chat_delta_chunks)
COMPLETION = Shape("cmpl", "text_completion", completion_body, completion_opening, completion_delta_chunks)
