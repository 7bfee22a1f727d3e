"""Request ids, the error mapper, the readiness gate and the access log line.

Order (outermost first): ``request_context`` (id, timing, errors -> JSON, access log),
then ``readiness_gate`` (503 + Retry-After while the engine is not serving).
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid

from aiohttp import web

from .. import eventlog
from .errors import to_response, unavailable

# Routes that answer in every phase: probes must see "loading", not a 503 wall.
ALWAYS_OPEN = {"/health", "/metrics"}
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def new_request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _SANE_ID.match(given) else f"req-{uuid.uuid4().hex[:24]}"


@web.middleware
async def request_context(request: web.Request, handler):
    rid = new_request_id(request)
    request["rid"] = rid
    request["t0"] = time.monotonic()
    request["qb"] = {}            # handlers add prompt_len, output_len, ttft_s, session, finish...
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        if not resp.prepared:
            resp.headers["X-Request-Id"] = rid
        return resp
    except Exception as exc:  # the only place an exception becomes an HTTP answer
        resp = to_response(exc, rid)
        status = resp.status
        return resp
    except asyncio.CancelledError:  # aiohttp cancels the handler when the client goes away
        status = 499
        raise
    finally:
        ctx = request.app["ctx"]
        if ctx.cfg.server.access_log and request.path not in ALWAYS_OPEN:
            info = request["qb"]
            eventlog.event("request", id=rid, method=request.method, path=request.path,
                           status=info.pop("status", status),
                           latency_s=round(time.monotonic() - request["t0"], 4), **info)
        ctx.on_request_done(request, status)


@web.middleware
async def readiness_gate(request: web.Request, handler):
    ctx = request.app["ctx"]
    route = request.match_info.route
    if request.path in ALWAYS_OPEN or route.resource is None:   # unknown routes still 404
        return await handler(request)
    refusal = ctx.refusal()
    if refusal is not None:
        message, code = refusal
        raise unavailable(message, ctx.cfg.server.retry_after_s, code=code)
    return await handler(request)
