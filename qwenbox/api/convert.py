"""Pure conversions: parsed request -> GenerationRequest, engine Deltas -> OpenAI JSON.

Contract: no I/O and no vllm types. ``to_generation`` enforces the context-length rule
(400 naming both lengths) and fills ``max_tokens`` from the room left when the client
gave none; the ``*_body`` / ``*_chunk`` builders produce exactly OpenAI's shapes.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from ..generation import Delta, GenerationRequest, Sampling
from ..shaping import Defaults
from .errors import bad_request, context_length_exceeded, prompt_too_long

# vLLM reports "abort" for requests it cancelled: that is no OpenAI finish reason, and the
# handler answers an aborted request with an error instead.
_FINISH = {"stop": "stop", "length": "length"}


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

    def __post_init__(self) -> None:
        self.texts = [""] * self.n
        self.finish = [None] * self.n

    def add(self, deltas: list[Delta]) -> None:
        for d in deltas:
            self.texts[d.index] += d.text
            self.completion_tokens += d.num_tokens
            if d.finish_reason is not None:
                self.finish[d.index] = finish_reason(d.finish_reason)

    def finish_summary(self) -> str:
        """The choices' distinct finish reasons, sorted and comma-joined (the access log's
        ``finish``); a choice with none finished by stopping."""
        return ",".join(sorted({f or "stop" for f in self.finish}))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())


def chat_body(rid: str, created: int, model: str, acc: Accumulator, prompt_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": acc.texts[i]},
                         "logprobs": None, "finish_reason": acc.finish[i] or "stop"} for i in range(acc.n)],
            "usage": usage(prompt_tokens, acc.completion_tokens)}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict,
               finish: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion_body(rid: str, created: int, model: str, acc: Accumulator, prompt_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": acc.texts[i], "logprobs": None,
                         "finish_reason": acc.finish[i] or "stop"} for i in range(acc.n)],
            "usage": usage(prompt_tokens, acc.completion_tokens)}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, created: int, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
