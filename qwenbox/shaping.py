"""Request shaping: the defaults a request gets when the client leaves them out.

Shared by the server and the chat UI. Pure functions, no I/O.

Contract:
- ``defaults(cfg, text)`` -> ``Defaults``: ``max_tokens`` is ``max_tokens_long_prompt`` when
  the prompt text is longer than ``long_prompt_chars`` characters, else
  ``max_tokens_short_prompt``, never above ``limits.max_tokens_cap``; temperature is
  ``temperature_summarize`` when the LAST user turn asks for a summary (any of
  ``summarize_keywords``, case-insensitive), else ``temperature``; plus ``top_p`` and
  ``presence_penalty``. Client values always win (within the caps checked at the edge).
- ``fit_messages(messages, count, budget)`` drops the oldest non-system turns until
  ``count(messages) <= budget``; the system prompt(s) and the last turn always stay.
  Returns the kept messages and how many were dropped, or raises ``Overlong``.
- ``pad(ids, to, pad_id)`` left-pads a short prompt to ``to`` tokens (an experiment behind
  ``shaping.pad_prompt_to``; off by default, see docs/cost.md for the measurement).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import Config


@dataclass
class Defaults:
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    presence_penalty: float = 0.0
    intent: str = "chat"


class Overlong(Exception):
    """Even with every droppable turn removed, the prompt does not fit."""

    def __init__(self, tokens: int, budget: int) -> None:
        super().__init__(f"the prompt is {tokens} tokens even after dropping older turns; "
                         f"at most {budget} fit")
        self.tokens, self.budget = tokens, budget


def is_summarize(text: str, keywords: list[str]) -> bool:
    low = text.lower()
    return any(k.lower() in low for k in keywords)


def prompt_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m.get("content", "") for m in messages)


def last_user_text(messages: list[dict[str, str]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return m.get("content", "")
    return ""


def defaults(cfg: Config, text: str, intent_text: str | None = None) -> Defaults:
    """Defaults for a prompt of ``text``; ``intent_text`` (the last user turn) decides intent."""
    s = cfg.shaping
    mt = s.max_tokens_long_prompt if len(text) > s.long_prompt_chars else s.max_tokens_short_prompt
    summarize = is_summarize(intent_text if intent_text is not None else text, s.summarize_keywords)
    return Defaults(max_tokens=min(mt, cfg.limits.max_tokens_cap),
                    temperature=s.temperature_summarize if summarize else s.temperature,
                    top_p=s.top_p, presence_penalty=s.presence_penalty,
                    intent="summarize" if summarize else "chat")


def fit_messages(messages: list[dict[str, str]], count: Callable[[list[dict[str, str]]], int],
                 budget: int) -> tuple[list[dict[str, str]], int]:
    kept = list(messages)
    dropped = 0
    n = count(kept)
    while n > budget:
        # oldest turn that is neither a system prompt nor the final turn
        idx = next((i for i, m in enumerate(kept[:-1]) if m["role"] != "system"), None)
        if idx is None:
            raise Overlong(n, budget)
        del kept[idx]
        dropped += 1
        n = count(kept)
    return kept, dropped


def pad(ids: list[int], to: int, pad_id: int) -> list[int]:
    return ids if to <= 0 or len(ids) >= to else [pad_id] * (to - len(ids)) + ids
