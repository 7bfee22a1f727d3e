"""Session usage figures: the gap between a session's turns and the turns per visit.

Contract: one definition and one shape for the daemon (``admission.SessionTracker``,
live, behind /health and /metrics) and for the log analyzer (``qwenbox logs``, from the
request lines), so the two cannot drift apart:
- a gap runs from the end of one turn of a session to the start of its next, when no
  other turn of that session is running (turns that overlap have no gap);
- a visit ends when the session stays idle for ``keepalive_s`` or more;
- ``figures(gaps, visit_turns)`` -> ``{"turn_gap_s": {"count", "p50", "p90"},
  "turns_per_visit": {...}}``; a quantile with no sample is None.
``from_turns`` applies the definition to whole logged turns. Pure: no clock, no I/O;
``qwenbox serve`` imports this module, so it imports nothing from ``qwenbox.tools``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TypedDict


class Figure(TypedDict):
    count: int
    p50: float | None
    p90: float | None


class SessionUsage(TypedDict):
    turn_gap_s: Figure          # seconds
    turns_per_visit: Figure


def quantile(xs: Sequence[float], q: float) -> float | None:
    """The q-quantile by linear interpolation between order statistics (numpy's default,
    ``statistics.quantiles(method="inclusive")``); None when there is no sample."""
    if not xs:
        return None
    ordered = sorted(xs)
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def figure(xs: Sequence[float]) -> Figure:
    return {"count": len(xs), "p50": quantile(xs, 0.5), "p90": quantile(xs, 0.9)}


def figures(gaps_s: Sequence[float], visit_turns: Sequence[int]) -> SessionUsage:
    return {"turn_gap_s": figure(gaps_s), "turns_per_visit": figure(visit_turns)}


def from_turns(turns: Mapping[str, Iterable[tuple[float, float]]],
               keepalive_s: float) -> tuple[list[float], list[int]]:
    """``turns``: session -> its turns as (start, end) seconds -> (every gap, the turns of
    every visit). A session's last visit counts as ended: the log is all there is."""
    gaps: list[float] = []
    visits: list[int] = []
    for spans in turns.values():
        n, end = 0, None
        for start, stop in sorted(spans):
            if end is not None and start >= end:
                gaps.append(start - end)
                if start - end >= keepalive_s:
                    visits.append(n)
                    n = 0
            n += 1
            end = stop if end is None else max(end, stop)
        visits.append(n)
    return gaps, visits
