"""What a benchmark may send: synthetic prompts, and the caps no option can exceed.

Contract: ``synthetic_text`` is deterministic for a given ``rng`` state and starts with its
``salt``, so no two prompts share a cached prefix beyond the chat template. ``check_range``
raises ``OptionError`` (one line for the user) for an option outside its range; each
benchmark checks all of its options before it starts a server or sends a request.
"""
from __future__ import annotations

import random

# Words the demo model's tokenizer knows (~1.35 tokens per word there); any model's
# tokenizer handles them. Prompt lengths are given in words; real token counts are
# read back from the server's usage figures and reported.
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "you", "are", "a", "helpful", "assistant",
         "answer", "question", "briefly", "and", "precisely", "summarize", "following", "text", "in", "one", "sentence",
         "what", "is", "capital", "of", "france", "paris", "explain", "how", "transformer", "language", "model",
         "generates", "token", "by", "gpu", "memory", "kv", "cache", "prefix", "caching", "batching", "latency",
         "inference", "costs", "write", "short", "poem", "about", "sea", "wind", "morning", "light"]

MAX_CONCURRENCY = 512      # no option can push more requests at once than this (closed loop)
MAX_BURST = 4096           # nor more requests sent at the same instant (the burst)
MAX_REQUESTS = 20000       # nor more requests in one phase

# The price in the cost figures unless --gpu-hour-cost says otherwise, with where it is from.
DEFAULT_GPU_HOUR_COST = 3.50
GPU_HOUR_COST_SOURCE = ("H200 on-demand from $3.50/GPU-hour, GPUaaS.com, 'H200 vs H100: A 2026 Rental Decision "
                        "Guide', 2026-05-26; other quotes seen: $2.00-2.50 (SpendArk via aitechconnect, 2026-05), "
                        "$4.54 (Spheron, 2026-03-17)")


class OptionError(Exception):
    """A bad option or input file: one clear line for the user."""


def check_range(option: str, value: float, lo: float, hi: float | None = None) -> None:
    """``lo <= value <= hi`` (no upper bound when ``hi`` is None), else OptionError."""
    if value < lo or (hi is not None and value > hi):
        raise OptionError(f"{option} must be {lo}..{hi}" if hi is not None else f"{option} must be >= {lo}")


def synthetic_text(words: int, salt: str, rng: random.Random) -> str:
    """``salt`` first, then ``words`` words drawn from WORDS."""
    return f"{salt}: " + " ".join(rng.choice(WORDS) for _ in range(max(1, words)))
