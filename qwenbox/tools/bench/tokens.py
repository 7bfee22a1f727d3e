"""Prompt sets as the served model's tokenizer sees them: the check every benchmark makes
before it measures, and token-id prompts for when text cannot do better.

Contract:
- ``load_tokenizer(path)``: the model's own tokenizer (transformers; vLLM loads the same
  files), or ``PromptSetError`` naming the path when it cannot be loaded. A benchmark
  that cannot check its prompts does not measure.
- ``chat_ids(tok, messages)`` / ``text_ids(tok, text)``: the token ids the server will
  prefill for a chat request (template rendered, generation prompt opened) / a
  completion prompt.
- ``check_prompt_set(seqs, name, allowed_prefix=..., block_size=...)``: every sequence must
  be distinct, and, unless ``allowed_prefix`` is None, no two may share a KV-cache block
  beyond the blocks that the prefix every prompt legitimately shares (chat template +
  configured system prompt, ``allowed_prefix`` tokens) already fills. vLLM's prefix cache
  reuses whole blocks only, so that is exactly the condition under which no request of
  the set rides on another's cache. Returns the facts for the JSON (``n``, ``distinct``,
  ``max_shared_prefix_tokens``...); raises ``PromptSetError`` (one clear line) otherwise.
- ``random_id_prompts(n, length, tok_info, rng)``: ``n`` prompts of exactly ``length``
  token ids drawn uniformly from the tokenizer's ordinary ids (no special or added
  tokens). The honest default for fixed-length throughput workloads: every prompt is
  exactly ``length`` tokens whatever the tokenizer does with text, and the first ids
  differ with probability 1 - 1/vocab per pair (checked anyway).
"""
from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .workload import OptionError


class PromptSetError(OptionError):
    """A prompt set that would not measure what the benchmark says (or cannot be checked)."""


@dataclass(frozen=True)
class TokInfo:
    """What token-id prompts need to know about a tokenizer."""
    size: int                    # ids 0..size-1 exist (len(tokenizer))
    excluded: frozenset[int]     # special and added tokens: never drawn

    def ordinary(self, i: int) -> bool:
        return 0 <= i < self.size and i not in self.excluded


def load_tokenizer(path: str) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:   # pragma: no cover - vLLM depends on transformers
        raise PromptSetError(f"cannot check prompts: transformers is not importable ({e})") from None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:     # a missing dir, an HF id not in the cache offline, a broken file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PromptSetError(f"cannot load the tokenizer at {path!r} to check the prompts: {first} "
                             "(name it with --tokenizer)") from None


def tok_info(tok: Any) -> TokInfo:
    excluded = set(getattr(tok, "all_special_ids", ()) or ())
    with contextlib.suppress(Exception):
        excluded |= set(tok.get_added_vocab().values())
    return TokInfo(size=len(tok), excluded=frozenset(excluded))


def _ids(out: Any) -> list[int]:
    # transformers 4 returns a list for tokenize=True, 5 a BatchEncoding
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(x) for x in out]


def chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    return _ids(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def text_ids(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=True))


def chat_prefix_len(tok: Any, messages: list[dict[str, str]]) -> int:
    """Tokens of the chat render before the last message's content: the template and the
    earlier turns (the system prompt), which every prompt of a set may share."""
    content = messages[-1]["content"]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    cut = text.rfind(content)
    if cut < 0:
        return 0
    head = _ids(tok(text[:cut], add_special_tokens=False)["input_ids"])
    full = chat_ids(tok, messages)
    return _common_prefix(head, full)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):     # up to the shorter one's end
        if x != y:
            break
        n += 1
    return n


def check_prompt_set(seqs: Sequence[Sequence[int]], name: str, *, allowed_prefix: int | None = 0,
                     block_size: int = 16) -> dict[str, Any]:
    """See the module docstring. ``seqs`` are token-id sequences; ``name`` says which set."""
    tuples = [tuple(s) for s in seqs]
    n = len(tuples)
    distinct = len(set(tuples))
    if any(not s for s in tuples):
        raise PromptSetError(f"prompt set {name!r}: a prompt tokenizes to nothing")
    if distinct < n:
        raise PromptSetError(
            f"prompt set {name!r}: {n} prompts are only {distinct} distinct token sequences with the served "
            "model's tokenizer (its text becomes the same ids), so repeats would be prefix-cache hits; "
            "use token-id prompts (--prompt-kind ids) or a tokenizer that tells the texts apart")
    # The longest prefix any two share is between neighbours in sorted order.
    ordered = sorted(tuples)
    shared = max((_common_prefix(a, b) for a, b in itertools.pairwise(ordered)), default=0)
    facts = {"name": name, "n": n, "distinct": distinct, "max_shared_prefix_tokens": shared,
             "allowed_prefix_tokens": allowed_prefix, "block_size": block_size,
             "tokens_min": min((len(s) for s in tuples), default=0),
             "tokens_max": max((len(s) for s in tuples), default=0)}
    if allowed_prefix is not None and shared // block_size > allowed_prefix // block_size:
        raise PromptSetError(
            f"prompt set {name!r}: two prompts share their first {shared} tokens, "
            f"{shared // block_size - allowed_prefix // block_size} KV block(s) of {block_size} beyond the "
            f"{allowed_prefix} tokens of template and system prompt, so one would ride on the other's prefix "
            "cache; use token-id prompts (--prompt-kind ids)")
    return facts


def check_chat_set(tok: Any, sets: Sequence[list[dict[str, str]]], name: str, *, block_size: int = 16,
                   no_shared_prefix: bool = True) -> dict[str, Any]:
    """``check_prompt_set`` over chat requests as the server will tokenize them."""
    seqs = [chat_ids(tok, m) for m in sets]
    allowed = min((chat_prefix_len(tok, m) for m in sets[:2]), default=0) if no_shared_prefix else None
    return check_prompt_set(seqs, name, allowed_prefix=allowed, block_size=block_size)


def random_id_prompts(n: int, length: int, info: TokInfo, rng: random.Random) -> list[list[int]]:
    if info.size - len([i for i in info.excluded if 0 <= i < info.size]) < 2:
        raise PromptSetError("the tokenizer has fewer than two ordinary token ids")

    def draw() -> int:   # uniform over the ordinary ids; the excluded ones are few
        while True:
            i = rng.randrange(info.size)
            if i not in info.excluded:
                return i
    return [[draw() for _ in range(max(1, length))] for _ in range(n)]
