"""Admission control: bounded in-flight work, a bounded priority queue, reserved capacity
for active sessions. Past the limits a request is refused at once (429), never left to
pile up into an OOM or a hang.

Contract:
- ``async with admission.admit(prompt_tokens, session) as ticket:`` is how a request gets
  to the engine: it yields a ``Ticket`` (engine priority, whether its session is active,
  time queued) and frees the slot on exit, or raises ``Rejected(reason)`` (a 429 for the
  client): ``queue_full``, ``queued_tokens_full`` (at once) or ``queue_timeout`` (waited
  ``queue_timeout_s``). It keeps the session table and the queue metrics up to date.
- Underneath, ``await acquire(prompt_tokens, session_active)`` returns a ``Ticket`` and
  ``release()`` frees one slot and hands it to the best waiter: active sessions first,
  then arrival order. A cancelled waiter (client gone) leaves the queue cleanly.
- Active sessions have priority, never an idle reserve: anonymous traffic may fill all
  ``max_in_flight`` slots (the engine batches as much as it can when no session competes),
  and active sessions may run up to ``reserved_share`` x ``max_in_flight`` slots beyond
  that, so a returning user gets in at once even when anonymous traffic fills the engine;
  vLLM's priority scheduling then runs the session's request first. A share of queue
  places and queued tokens is kept for sessions: anonymous requests are refused earlier
  when the queue is long.
- ``SessionTracker`` says which session ids are active: their last turn ended less than
  ``keepalive_s`` ago. It remembers at most ``max_tracked`` ids (oldest forgotten first).
  It also keeps the figures an operator sizes ``keepalive_s`` with (``usage()``): the gap
  between the end of one turn of a session and the start of its next (every gap, also
  those longer than the keep-alive: they say whether it is long enough), and the turns per
  visit (a visit ends when a session stays idle for ``keepalive_s``; counted when it ends
  or is forgotten). The most recent ``USAGE_WINDOW`` of each; the definition and the
  figures' shape are ``session_usage``'s, which ``qwenbox logs`` uses too.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from . import session_usage
from .config import AdmissionConfig, SessionsConfig


class Rejected(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass(order=True)
class _Waiter:
    rank: int                      # 0 active session, 1 anonymous
    seq: int
    prompt_tokens: int = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


@dataclass(frozen=True)
class Ticket:
    """A granted slot: the engine priority to run with and how long the request queued."""
    session_active: bool
    queued_s: float

    @property
    def priority(self) -> int:
        return 0 if self.session_active else 1     # vLLM runs lower values first


USAGE_WINDOW = 10_000


class SessionTracker:
    def __init__(self, cfg: SessionsConfig) -> None:
        self.cfg = cfg
        self._last_end: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._open: collections.Counter[str] = collections.Counter()
        self._visit_turns: dict[str, int] = {}     # turns of each remembered session's current visit
        self.gaps_s: collections.deque[float] = collections.deque(maxlen=USAGE_WINDOW)
        self.visit_turns: collections.deque[int] = collections.deque(maxlen=USAGE_WINDOW)

    def is_active(self, sid: str | None, now: float | None = None) -> bool:
        if not sid or self.cfg.keepalive_s <= 0:
            return False
        if self._open[sid] > 0:
            return True
        last = self._last_end.get(sid)
        return last is not None and (now or time.monotonic()) - last < self.cfg.keepalive_s

    def turn_started(self, sid: str | None) -> None:
        if not sid:
            return
        last = self._last_end.get(sid)
        if last is not None and not self._open[sid]:
            gap = time.monotonic() - last
            self.gaps_s.append(gap)
            if gap >= self.cfg.keepalive_s:          # the previous visit ended before this turn
                self._end_visit(sid)
        self._visit_turns[sid] = self._visit_turns.get(sid, 0) + 1
        self._open[sid] += 1

    def _end_visit(self, sid: str) -> None:
        n = self._visit_turns.pop(sid, 0)
        if n:
            self.visit_turns.append(n)

    def close_idle_visits(self, now: float | None = None) -> None:
        """Count the visits that ended (idle for keepalive_s) since the last call; oldest
        first, so this stops at the first session still inside its window."""
        now = now or time.monotonic()
        for sid, last in self._last_end.items():
            if now - last < self.cfg.keepalive_s:
                break
            if sid in self._visit_turns and not self._open.get(sid):
                self._end_visit(sid)

    def usage(self) -> session_usage.SessionUsage:
        """P50/P90 of the gap between turns (seconds) and of the turns per visit."""
        self.close_idle_visits()
        return session_usage.figures(list(self.gaps_s), list(self.visit_turns))

    def turn_ended(self, sid: str | None) -> None:
        if not sid:
            return
        self._open[sid] -= 1
        if self._open[sid] <= 0:
            del self._open[sid]
        self._last_end[sid] = time.monotonic()
        self._last_end.move_to_end(sid)
        while len(self._last_end) > self.cfg.max_tracked:
            gone, _ = self._last_end.popitem(last=False)
            if not self._open.get(gone):
                self._end_visit(gone)

    def active_count(self) -> int:
        now = time.monotonic()
        # entries are in last-end order: count from the newest back until one is too old
        n = 0
        for sid in reversed(self._last_end):
            if now - self._last_end[sid] >= self.cfg.keepalive_s:
                break
            if not self._open.get(sid):
                n += 1
        return n + len(self._open)


class Admission:
    def __init__(self, cfg: AdmissionConfig, sessions: SessionsConfig, metrics: Any = None) -> None:
        self.sessions = SessionTracker(sessions)
        self.metrics = metrics
        self.configure(cfg, sessions)
        self.in_flight = 0
        self.queued_tokens = 0
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()

    def configure(self, cfg: AdmissionConfig, sessions: SessionsConfig) -> None:
        """(Re)read the limits; safe while serving (a SIGHUP reload calls this). Every limit
        must be a number: "auto" ones are sized first (``sizing.apply``, ``sizing.unsized``)."""
        self.cfg = cfg
        self.sessions.cfg = sessions
        self.max_in_flight = _number(cfg.max_in_flight, "max_in_flight")
        self.max_queued = _number(cfg.max_queued, "max_queued")
        self.max_queued_tokens = _number(cfg.max_queued_prompt_tokens, "max_queued_prompt_tokens")
        share = sessions.reserved_share if sessions.keepalive_s > 0 else 0.0
        self.session_extra = math.ceil(self.max_in_flight * share)   # slots only active sessions reach
        self.anon_queued = self.max_queued - math.ceil(self.max_queued * share)
        self.anon_queued_tokens = self.max_queued_tokens - math.ceil(self.max_queued_tokens * share)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @contextlib.asynccontextmanager
    async def admit(self, prompt_tokens: int, session: str | None) -> AsyncIterator[Ticket]:
        active = self.sessions.is_active(session)
        try:
            ticket = await self.acquire(prompt_tokens, active)
        except Rejected as r:
            if self.metrics is not None:
                self.metrics.rejections.labels(r.reason).inc()
            raise
        finally:
            self._export_queue()
        self.sessions.turn_started(session)
        try:
            yield ticket
        finally:
            self.sessions.turn_ended(session)
            self.release()
            self._export_queue()

    def _export_queue(self) -> None:
        """The queue gauges, on every change (cheap: three numbers)."""
        m = self.metrics
        if m is not None:
            m.in_flight.set(self.in_flight)
            m.queued.set(self.queued)
            m.queued_tokens.set(self.queued_tokens)

    def export_metrics(self) -> None:
        """Everything, for a /metrics scrape: the active-session count decays with time and
        walks the recent sessions, so it is computed when scraped, not per request."""
        self._export_queue()
        if self.metrics is not None:
            self.metrics.active_sessions.set(self.sessions.active_count())
            self.metrics.set_session_usage(self.sessions.usage())

    def health(self) -> dict[str, Any]:
        return {"admission": {"in_flight": self.in_flight, "queued": self.queued,
                              "queued_prompt_tokens": self.queued_tokens,
                              "max_in_flight": self.max_in_flight, "session_extra_slots": self.session_extra,
                              "max_queued": self.max_queued},
                "active_sessions": self.sessions.active_count(), "session_usage": self.sessions.usage()}

    def _slots(self, session_active: bool) -> int:
        return self.max_in_flight + (self.session_extra if session_active else 0)

    def _may_run(self, session_active: bool) -> bool:
        return self.in_flight < self._slots(session_active)

    async def acquire(self, prompt_tokens: int, session_active: bool) -> Ticket:
        t0 = time.monotonic()
        rank = 0 if session_active else 1
        if self._may_run(session_active) and not any(w.rank <= rank for w in self._queue):
            self.in_flight += 1
            return Ticket(session_active, 0.0)
        max_q = self.max_queued if session_active else self.anon_queued
        max_t = self.max_queued_tokens if session_active else self.anon_queued_tokens
        if len(self._queue) >= max_q:
            raise Rejected("queue_full", f"the server is at capacity: {self.in_flight} requests running and "
                                         f"{len(self._queue)} queued; retry later")
        if self.queued_tokens + prompt_tokens > max_t:
            raise Rejected("queued_tokens_full", f"the server is at capacity: {self.queued_tokens} prompt tokens "
                                                 f"already queued; retry later")
        w = _Waiter(rank, next(self._seq), prompt_tokens,
                    asyncio.get_running_loop().create_future())
        self._queue.append(w)
        self._queue.sort()
        self.queued_tokens += prompt_tokens
        try:
            await asyncio.wait_for(asyncio.shield(w.future), timeout=self.cfg.queue_timeout_s)
        except TimeoutError:
            if not self._withdraw(w):   # granted in the same instant: keep the slot
                return Ticket(session_active, time.monotonic() - t0)
            raise Rejected("queue_timeout", f"waited {self.cfg.queue_timeout_s:g}s in the queue without a free "
                                            f"slot; retry later") from None
        except asyncio.CancelledError:
            if not self._withdraw(w):
                self.release()          # granted, but the client left: hand the slot on
            raise
        return Ticket(session_active, time.monotonic() - t0)

    def _withdraw(self, w: _Waiter) -> bool:
        """Remove a waiter that was not granted; False if it had already been granted."""
        if w.future.done():
            return False
        self._queue.remove(w)
        self.queued_tokens -= w.prompt_tokens
        w.future.cancel()
        return True

    def release(self) -> None:
        self.in_flight -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        i = 0
        while i < len(self._queue):
            w = self._queue[i]
            if self._may_run(w.rank == 0):
                self._queue.pop(i)
                self.queued_tokens -= w.prompt_tokens
                self.in_flight += 1
                w.future.set_result(None)
                continue
            if self.in_flight >= self._slots(True):
                break
            i += 1   # an anonymous waiter can't run yet, but a session further back might


def _number(value: int | str, key: str) -> int:
    if not isinstance(value, int):
        raise ValueError(f"admission.{key} is {value!r}: admission needs a sized config (sizing.apply)")
    return value
