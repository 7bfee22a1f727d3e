"""The aiohttp application and the context its handlers share with the daemon.

Contract: ``make_app(ctx)`` returns a ``web.Application`` whose handlers reach the daemon
only through ``ctx`` (a ``ServiceContext``): the config, the lifecycle phase, the engine
once it is loaded, admission, sessions, shaping, standby, health and metrics. The daemon
owns ``ctx``'s state; handlers only go through its methods.
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from aiohttp import web

from ..admission import Admission, Rejected, SessionTracker
from ..config import Config
from ..lifecycle import Lifecycle, Phase
from ..metrics import Metrics
from ..standby import Standby
from . import middleware, routes
from .errors import bad_request, classify, rate_limited, unavailable

_REFUSALS = {
    Phase.STARTING: ("the server is starting; the model is not loaded yet", "model_loading"),
    Phase.LOADING: ("the model is loading", "model_loading"),
    Phase.WARMING: ("the model is warming up", "model_loading"),
    Phase.DRAINING: ("the server is shutting down", "shutting_down"),
    Phase.STOPPED: ("the server is shutting down", "shutting_down"),
    Phase.FAILED: ("the engine failed; the service is restarting", "engine_failed"),
}
_SESSION_ID = re.compile(r"^[A-Za-z0-9._:@\-]{1,128}$")


@dataclass
class Ticket:
    """What admission hands a request: its engine priority and how long it queued."""
    priority: int
    session_active: bool
    queued_s: float


class ServiceContext:
    def __init__(self, cfg: Config, lifecycle: Lifecycle, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.lifecycle = lifecycle
        self.metrics = metrics or Metrics()
        self.engine: Any = None
        self.standby: Standby | None = None
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.cold_start: dict[str, Any] = {}
        self.warmup: dict[str, Any] = {}
        self.in_flight = 0                    # API requests inside track(): drain and standby wait on it
        self.active: set[str] = set()         # request ids admitted to the engine
        self.shutdown_aborted: set[str] = set()
        self.abort_reason = ""
        # Socket activation: a draining instance has stopped accepting (new connections wait
        # in systemd's socket for the next one), so a request that still arrives came on a
        # connection it had accepted: serve it like any in-flight request, no 503.
        self.finish_accepted = False
        self.model_names = {cfg.model.name, cfg.model.path}
        self.sessions = SessionTracker(cfg.sessions)
        self.admission = Admission(cfg.admission, cfg.sessions)
        self.health_checks: dict[str, Any] = {}
        lifecycle.observe(lambda old, new, detail: self.metrics.set_phase(new))
        self.metrics.set_phase(lifecycle.phase)

    def reconfigure(self, cfg: Config) -> None:
        """Apply a reloaded config's non-engine settings (limits, sessions, shaping, server)."""
        self.cfg = cfg
        self.sessions.cfg = cfg.sessions
        self.admission.configure(cfg.admission, cfg.sessions)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len if self.engine is not None else self.cfg.model.max_model_len

    # ---------------------------------------------------------------- gates
    def refusal(self) -> tuple[str, str] | None:
        """(message, code) when requests must get 503 now, else None."""
        phase = self.lifecycle.phase
        if phase.serves_requests or (self.finish_accepted and phase == Phase.DRAINING):
            return None
        return _REFUSALS.get(phase, ("the server is not ready", "not_ready"))

    @contextlib.asynccontextmanager
    async def track(self, request: web.Request) -> AsyncIterator[None]:
        """An API request that will use the engine: drain and idle standby wait for it."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.standby is not None:
                self.standby.touch()

    async def serving_engine(self) -> Any:
        """The engine, awake; 503 when it is not serving."""
        refusal = self.refusal()
        if refusal is not None or self.engine is None:
            message, code = refusal or ("the model is loading", "model_loading")
            raise unavailable(message, self.cfg.server.retry_after_s, code=code)
        if self.standby is not None:
            await self.standby.ensure_awake()
        return self.engine

    def session_id(self, request: web.Request, user: str | None) -> str | None:
        sid = request.headers.get("X-Session-Id")
        if sid is not None:
            if not _SESSION_ID.match(sid):
                raise bad_request("X-Session-Id must be 1-128 characters of letters, digits and ._:@-",
                                  param="X-Session-Id")
            return sid
        return user or None

    @contextlib.asynccontextmanager
    async def admit(self, request: web.Request, prompt_tokens: int, session: str | None) -> AsyncIterator[Ticket]:
        """Admission: a slot for the engine, or 429 now. Active sessions go first."""
        active = self.sessions.is_active(session)
        try:
            slot = await self.admission.acquire(prompt_tokens, active)
        except Rejected as r:
            self.metrics.rejections.labels(r.reason).inc()
            request["qb"]["reason"] = r.reason
            raise rate_limited(r.message, self.cfg.server.retry_after_s, code=r.reason) from None
        finally:
            self._export_queue()
        rid = request["rid"]
        self.active.add(rid)
        self.sessions.turn_started(session)
        try:
            yield Ticket(priority=0 if active else 1, session_active=active, queued_s=slot.queued_s)
        finally:
            self.sessions.turn_ended(session)
            self.active.discard(rid)
            self.shutdown_aborted.discard(rid)
            self.admission.release(slot)
            self._export_queue()

    def _export_queue(self) -> None:
        m, a = self.metrics, self.admission
        m.in_flight.set(a.in_flight)
        m.queued.set(a.queued)
        m.queued_tokens.set(a.queued_tokens)

    async def abort_all(self, why: str) -> int:
        """Drain timed out: abort every admitted request; each answers 503 ``why``."""
        rids = list(self.active)
        self.shutdown_aborted.update(rids)
        self.abort_reason = why
        for rid in rids:
            await self.engine.abort(rid)
        return len(rids)

    def raise_if_aborted(self, rid: str) -> None:
        if rid in self.shutdown_aborted:
            raise unavailable(self.abort_reason or "aborted", self.cfg.server.retry_after_s, code="shutting_down")

    # ---------------------------------------------------------------- outcomes
    def error_status(self, exc: BaseException) -> int:
        return classify(exc).status

    def on_stream_error(self, exc: BaseException) -> None:
        pass

    def on_request_done(self, request: web.Request, status: int) -> None:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        self.metrics.requests.labels(route, str(status)).inc()
        if resource is not None and route.startswith("/v1/"):
            self.metrics.latency.labels(route).observe(time.monotonic() - request["t0"])

    # ---------------------------------------------------------------- observability
    def health(self) -> dict[str, Any]:
        phase = self.lifecycle.phase
        a = self.admission
        body: dict[str, Any] = {
            "status": phase.value, "ready": phase.serves_requests, "detail": self.lifecycle.detail,
            "model": self.cfg.model.name, "uptime_s": round(time.monotonic() - self.started, 3),
            "in_flight": self.in_flight,
            "admission": {"in_flight": a.in_flight, "queued": a.queued, "queued_prompt_tokens": a.queued_tokens,
                          "max_in_flight": a.cfg.max_in_flight, "max_queued": a.cfg.max_queued},
            "active_sessions": self.sessions.active_count(),
            "cold_start": self.cold_start, "warmup": self.warmup,
        }
        if self.standby is not None and self.standby.enabled:
            body["standby"] = {"idle_s": round(self.standby.idle_for(), 1),
                               "sleep_after_s": self.cfg.standby.idle_sleep_after_s,
                               "last_wake_s": self.standby.last_wake_s}
        if self.engine is not None:
            p = self.engine.progress
            body["engine"] = {"running": p.running, "waiting": p.waiting,
                              "kv_cache_usage": round(p.kv_cache_usage, 4),
                              "generated_tokens": p.generated_tokens, "core_pids": self.engine.core_pids(),
                              "vllm": self.engine.version, "device": self.engine.device}
        body.update(self.health_checks)
        return body

    def metrics_payload(self) -> tuple[bytes, str]:
        self.metrics.active_sessions.set(self.sessions.active_count())
        return self.metrics.payload()


def make_app(ctx: ServiceContext) -> web.Application:
    app = web.Application(middlewares=[middleware.request_context, middleware.readiness_gate],
                          client_max_size=ctx.cfg.server.max_body_bytes)
    app["ctx"] = ctx
    routes.add_routes(app)
    return app
