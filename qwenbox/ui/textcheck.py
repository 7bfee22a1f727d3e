"""Is this text fit to send? A friendly refusal, or None.

Contract: ``problem(text, max_chars)`` returns a sentence for the person at the keyboard
when the message is empty (or only white space), longer than ``max_chars`` characters, or
not text (NUL and other control characters, lone surrogates, more than a few replacement
characters: what pasted binary data looks like); else None. Cost: one pass over at most
``max_chars + 1`` characters, so a huge paste is refused as cheaply as a small one.
"""
from __future__ import annotations

import re

# C0 controls other than tab, newline and carriage return; DEL and the C1 block; lone
# surrogates (JSON can carry them as \ud800 escapes; the server refuses them).
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_REPLACEMENT = "\ufffd"
MAX_REPLACEMENTS = 3


def problem(text: object, max_chars: int) -> str | None:
    if not isinstance(text, str) or not text.strip():
        return "Your message is empty. Type a question and press Enter."
    if len(text) > max_chars:
        return (f"Your message is {len(text):,} characters long; the limit here is {max_chars:,}. "
                "Please shorten it or send it in parts.")
    if _NOT_TEXT.search(text) or text.count(_REPLACEMENT) > MAX_REPLACEMENTS:
        return ("Your message contains characters that are not text (it looks like pasted binary "
                "data). Please paste plain text.")
    return None
