"""The aiohttp application and the context its handlers share with the daemon.

Contract: ``make_app(ctx)`` returns an ``web.Application`` whose handlers reach the daemon
only through ``ctx`` (a ``ServiceContext``): the config, the lifecycle phase, the engine
once it is loaded, admission and shaping, health and metrics. The daemon owns ``ctx``'s
state; handlers only read it.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from ..config import Config
from ..lifecycle import Lifecycle, Phase
from . import middleware, routes
from .convert import Defaults
from .errors import classify, unavailable

_REFUSALS = {
    Phase.STARTING: ("the server is starting; the model is not loaded yet", "model_loading"),
    Phase.LOADING: ("the model is loading", "model_loading"),
    Phase.WARMING: ("the model is warming up", "model_loading"),
    Phase.DRAINING: ("the server is shutting down", "shutting_down"),
    Phase.STOPPED: ("the server is shutting down", "shutting_down"),
    Phase.FAILED: ("the engine failed; the service is restarting", "engine_failed"),
}


@dataclass
class Ticket:
    """What admission hands a request: its engine priority and its sampling defaults."""
    cfg: Config
    priority: int = 0

    def defaults(self, req: Any) -> Defaults:
        return Defaults(max_tokens=min(2048, self.cfg.limits.max_tokens_cap))

    def messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        return messages


class ServiceContext:
    def __init__(self, cfg: Config, lifecycle: Lifecycle) -> None:
        self.cfg = cfg
        self.lifecycle = lifecycle
        self.engine: Any = None
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.cold_start: dict[str, Any] = {}
        self.warmup: dict[str, Any] = {}
        self.in_flight = 0
        self.active: set[str] = set()        # request ids inside admit()
        self.shutdown_aborted: set[str] = set()
        self.model_names = {cfg.model.name, cfg.model.path}
        self.health_checks: dict[str, Any] = {}

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len if self.engine is not None else self.cfg.model.max_model_len

    # ---------------------------------------------------------------- gates
    def refusal(self) -> tuple[str, str] | None:
        """(message, code) when requests must get 503 now, else None."""
        phase = self.lifecycle.phase
        if phase.serves_requests:
            return None
        return _REFUSALS.get(phase, ("the server is not ready", "not_ready"))

    @contextlib.asynccontextmanager
    async def admit(self, request: web.Request, req: Any) -> AsyncIterator[Ticket]:
        rid = request["rid"]
        self.in_flight += 1
        self.active.add(rid)
        try:
            yield Ticket(self.cfg)
        finally:
            self.in_flight -= 1
            self.active.discard(rid)
            self.shutdown_aborted.discard(rid)

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
            raise unavailable(getattr(self, "abort_reason", "aborted"), self.cfg.server.retry_after_s,
                              code="shutting_down")

    async def serving_engine(self) -> Any:
        refusal = self.refusal()
        if refusal is not None or self.engine is None:
            message, code = refusal or ("the model is loading", "model_loading")
            raise unavailable(message, self.cfg.server.retry_after_s, code=code)
        return self.engine

    # ---------------------------------------------------------------- outcomes
    def error_status(self, exc: BaseException) -> int:
        return classify(exc).status

    def on_stream_error(self, exc: BaseException) -> None:
        pass

    def on_request_done(self, request: web.Request, status: int) -> None:
        pass

    # ---------------------------------------------------------------- observability
    def health(self) -> dict[str, Any]:
        phase = self.lifecycle.phase
        body: dict[str, Any] = {
            "status": phase.value, "ready": phase.serves_requests, "detail": self.lifecycle.detail,
            "model": self.cfg.model.name, "uptime_s": round(time.monotonic() - self.started, 3),
            "in_flight": self.in_flight, "cold_start": self.cold_start, "warmup": self.warmup,
        }
        if self.engine is not None:
            p = self.engine.progress
            body["engine"] = {"running": p.running, "waiting": p.waiting,
                              "kv_cache_usage": round(p.kv_cache_usage, 4),
                              "generated_tokens": p.generated_tokens, "core_pids": self.engine.core_pids(),
                              "vllm": self.engine.version, "device": self.engine.device}
        body.update(self.health_checks)
        return body

    def metrics_payload(self) -> tuple[bytes, str]:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def make_app(ctx: ServiceContext) -> web.Application:
    app = web.Application(middlewares=[middleware.request_context, middleware.readiness_gate],
                          client_max_size=ctx.cfg.server.max_body_bytes)
    app["ctx"] = ctx
    routes.add_routes(app)
    return app
