"""Coalesce stream deltas into fewer page updates.

Each Chainlit ``stream_token`` call is one socket.io event; a token per event floods the
browser when many chats are open. ``Batcher`` collects text and flushes it through an
async ``sink`` at most once per ``interval_s`` (0 = every delta), and always at ``close``.

Contract: ``await add(text)`` never loses text; ``await close()`` flushes what is left;
the sink sees the deltas concatenated in order. No task or timer is left behind: a flush
happens on an ``add`` that finds the interval passed, or at ``close``.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable


class Batcher:
    def __init__(self, sink: Callable[[str], Awaitable[None]], interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sink, self.interval_s, self.clock = sink, interval_s, clock
        self._buf: list[str] = []
        self._last = float("-inf")
        self.flushes = 0

    async def add(self, text: str) -> None:
        if text:
            self._buf.append(text)
        if self._buf and self.clock() - self._last >= self.interval_s:
            await self._flush()

    async def close(self) -> None:
        if self._buf:
            await self._flush()

    async def _flush(self) -> None:
        text, self._buf = "".join(self._buf), []
        self._last = self.clock()
        self.flushes += 1
        await self.sink(text)
