"""qwenbox_* Prometheus metrics, next to the vllm:* ones vLLM registers itself.

vLLM's own PrometheusStatLogger registers the engine's figures under their usual names
(vllm:num_requests_running, vllm:kv_cache_usage_perc, vllm:time_to_first_token_seconds,
...) on prometheus_client's default registry, so existing dashboards and autoscalers work
unchanged; ``payload()`` exposes that registry, ours included.

Contract: one ``Metrics`` per process (it registers on the given registry); every method
is cheap and never raises.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TypedDict

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .lifecycle import Phase
from .session_usage import SessionUsage

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class _On(TypedDict):
    registry: CollectorRegistry


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        r: _On = {"registry": registry}
        self.phase = Gauge("qwenbox_phase", "1 for the daemon's current phase, 0 for the others", ["phase"], **r)
        self.cold_start = Gauge("qwenbox_cold_start_phase_seconds",
                                "Seconds each cold-start phase took (import, engine, warmup, total, ...)",
                                ["phase"], **r)
        self.warmup = Gauge("qwenbox_warmup_seconds", "Seconds the pre-warm took before READY", **r)
        self.rejections = Counter("qwenbox_rejections_total", "Requests refused, by reason", ["reason"], **r)
        self.requests = Counter("qwenbox_requests_total", "Finished HTTP requests by route and status",
                                ["route", "status"], **r)
        self.latency = Histogram("qwenbox_request_latency_seconds", "End-to-end latency of API requests",
                                 ["route"], buckets=_LATENCY_BUCKETS, **r)
        self.in_flight = Gauge("qwenbox_requests_in_flight", "Requests admitted to the engine", **r)
        self.queued = Gauge("qwenbox_requests_queued", "Requests waiting for admission", **r)
        self.queued_tokens = Gauge("qwenbox_queued_prompt_tokens", "Prompt tokens of queued requests", **r)
        self.active_sessions = Gauge("qwenbox_active_sessions", "Sessions inside their keep-alive window", **r)
        self.session_turn_gap = Gauge("qwenbox_session_turn_gap_seconds",
                                      "Gap between the end of a session's turn and the start of its next "
                                      "(recent turns; quantile 0.5 and 0.9)", ["quantile"], **r)
        self.session_turns = Gauge("qwenbox_session_turns_per_visit",
                                   "Turns per session visit (a visit ends after sessions.keepalive_s idle; "
                                   "recent visits; quantile 0.5 and 0.9)", ["quantile"], **r)
        self.session_usage_count = Gauge("qwenbox_session_usage_samples",
                                         "How many gaps / visits the session quantiles are computed from",
                                         ["figure"], **r)
        self.sleeping = Gauge("qwenbox_sleeping", "1 while the engine sleeps (idle standby)", **r)
        self.sleeps = Counter("qwenbox_sleeps_total", "Times the idle engine was put to sleep", **r)
        self.wake = Histogram("qwenbox_wake_seconds", "Seconds from a request arriving at a sleeping engine to "
                              "the engine awake with the system prompt re-prefilled",
                              buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), **r)
        self.last_wake = Gauge("qwenbox_last_wake_seconds", "The most recent wake-up time", **r)
        self.truncated = Counter("qwenbox_truncated_requests_total",
                                 "Requests whose oldest turns were dropped to fit the context", **r)
        self.engine_restarts = Counter("qwenbox_engine_restarts_total",
                                       "Engine deaths answered by an in-process rebuild, by outcome "
                                       "(recovered, failed, over_budget: the daemon exited instead)",
                                       ["outcome"], **r)
        self.last_recovery = Gauge("qwenbox_last_recovery_seconds",
                                   "Seconds from the last engine death noticed to serving again", **r)
        for p in Phase:
            self.phase.labels(p.value).set(0)

    def set_phase(self, phase: Phase) -> None:
        for p in Phase:
            self.phase.labels(p.value).set(1 if p == phase else 0)
        self.sleeping.set(1 if phase == Phase.SLEEPING else 0)

    def set_cold_start(self, figures: Mapping[str, object]) -> None:
        """The seconds figures (``*_s``) of a cold start; other figures (counts, names) are not metrics."""
        for k, v in figures.items():
            if k.endswith("_s") and isinstance(v, (int, float)):
                self.cold_start.labels(k[:-2]).set(v)
        if isinstance(w := figures.get("warmup_s"), (int, float)):
            self.warmup.set(w)

    def set_session_usage(self, usage: SessionUsage) -> None:
        """From ``SessionTracker.usage()``; a quantile with no sample yet is NaN."""
        for gauge, key, fig in ((self.session_turn_gap, "turn_gap_s", usage["turn_gap_s"]),
                                (self.session_turns, "turns_per_visit", usage["turns_per_visit"])):
            for q in ("0.5", "0.9"):
                v = fig["p50" if q == "0.5" else "p90"]
                gauge.labels(q).set(float("nan") if v is None else v)
            self.session_usage_count.labels(key).set(fig["count"])

    def observe_request(self, route: str | None, status: int, seconds: float) -> None:
        """One finished HTTP request; ``route`` is the matched pattern (bounded label set)."""
        self.requests.labels(route or "unmatched", str(status)).inc()
        if route is not None and route.startswith("/v1/"):
            self.latency.labels(route).observe(seconds)

    def payload(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
