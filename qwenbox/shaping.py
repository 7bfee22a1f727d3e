"""Request shaping: the defaults a request gets when the client leaves them out.

Used by the API only (``api/routes.py``, ``api/convert.py``): the chat UI does not import
it and sends no sampling fields, so the server shapes its requests too. Pure functions,
no I/O.

Contract:
- ``defaults(cfg, text)`` -> ``Defaults``: a ``Sampling`` whose ``max_tokens`` is ``max_tokens_long_prompt`` when
  the prompt text is longer than ``long_prompt_chars`` characters, else
  ``max_tokens_short_prompt``, never above ``limits.max_tokens_cap``; temperature is
  ``temperature_summarize`` when the LAST user turn asks for a summary (any of
  ``summarize_keywords``, case-insensitive), else ``temperature``; plus ``top_p`` and
  ``presence_penalty``; and the ``intent`` it saw. Client values always win (within the
  caps checked at the edge): ``Sampling.merged_over`` fills only what the client left out.
- ``fit_messages(messages, count, budget)`` drops the fewest oldest non-system turns so
  that ``count(messages) <= budget``; the system prompt(s) and the last turn always stay.
  Returns the kept messages and how many were dropped, or raises ``Overlong``.
- ``pad(ids, to, pad_id)`` left-pads a short prompt to ``to`` tokens (an experiment behind
  ``shaping.pad_prompt_to``; off by default, see docs/cost.md for the measurement).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import Config
from .generation import ChatMessage, Sampling


@dataclass(frozen=True)
class Defaults:
    """What the server would choose for the fields a client leaves out, and why."""
    sampling: Sampling
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


def prompt_text(messages: list[ChatMessage]) -> str:
    return "\n".join(str(m.get("content", "")) for m in messages)


def last_user_text(messages: list[ChatMessage]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def defaults(cfg: Config, text: str, intent_text: str | None = None) -> Defaults:
    """Defaults for a prompt of ``text``; ``intent_text`` (the last user turn) decides intent."""
    s = cfg.shaping
    mt = s.max_tokens_long_prompt if len(text) > s.long_prompt_chars else s.max_tokens_short_prompt
    summarize = is_summarize(intent_text if intent_text is not None else text, s.summarize_keywords)
    return Defaults(Sampling(max_tokens=min(mt, cfg.limits.max_tokens_cap),
                             temperature=s.temperature_summarize if summarize else s.temperature,
                             top_p=s.top_p, presence_penalty=s.presence_penalty),
                    intent="summarize" if summarize else "chat")


def fit_messages(messages: list[ChatMessage], count: Callable[[list[ChatMessage]], int],
                 budget: int) -> tuple[list[ChatMessage], int]:
    """Drop the fewest oldest droppable turns so that ``count(kept) <= budget``.

    Binary search over how many to drop (``count`` shrinks as turns go), so a long history
    costs O(log n) counts, not one count per dropped turn.
    """
    droppable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]

    def without(k: int) -> list[ChatMessage]:
        gone = set(droppable[:k])
        return [m for i, m in enumerate(messages) if i not in gone]

    n = count(messages)
    if n <= budget:
        return list(messages), 0
    least = count(without(len(droppable)))
    if least > budget:
        raise Overlong(least, budget)
    lo, hi = 1, len(droppable)           # dropping hi turns fits; find the fewest that do
    while lo < hi:
        mid = (lo + hi) // 2
        if count(without(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return without(lo), lo


def pad(ids: list[int], to: int, pad_id: int) -> list[int]:
    return ids if to <= 0 or len(ids) >= to else [pad_id] * (to - len(ids)) + ids
