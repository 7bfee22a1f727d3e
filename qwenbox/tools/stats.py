"""Distribution figures for the benchmarks and the log analyzer, from ``statistics``.

Contract: every function takes plain numbers, skips ``None`` and NaN, and answers
``None`` (never raises) where there is nothing to measure. Percentiles interpolate
linearly between order statistics (``statistics.quantiles(method="inclusive")``, the
same as numpy's default), so p50 is the median and p0/p100 would be min/max.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import TypedDict


class Summary(TypedDict):
    """``summary``'s figures; all but ``n`` are None when there is no value."""
    n: int
    p50: float | None
    p95: float | None
    p99: float | None
    mean: float | None
    min: float | None
    max: float | None


def _clean(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def percentiles(values: Iterable[float | None], ps: Sequence[int]) -> dict[int, float | None]:
    """{p: the p-th percentile} for each whole ``p`` in 1..99."""
    xs = _clean(values)
    if len(xs) < 2:   # quantiles() needs two points before Python 3.13; one point is every percentile
        return {p: (xs[0] if xs else None) for p in ps}
    cuts = statistics.quantiles(xs, n=100, method="inclusive")
    return {p: cuts[p - 1] for p in ps}


def summary(values: Iterable[float | None]) -> Summary:
    """n, p50, p95, p99, mean, min and max: the shape every JSON report of ours uses."""
    xs = _clean(values)
    p = percentiles(xs, (50, 95, 99))
    return {"n": len(xs), "p50": p[50], "p95": p[95], "p99": p[99],
            "mean": statistics.fmean(xs) if xs else None, "min": min(xs, default=None), "max": max(xs, default=None)}


def median(values: Iterable[float | None]) -> float | None:
    xs = _clean(values)
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b
