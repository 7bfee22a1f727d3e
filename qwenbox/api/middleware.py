"""Request ids, the error mapper, the readiness gate and the access log line.

Order (outermost first): ``request_context`` (id, timing, errors -> JSON, access log,
request metrics), then ``readiness_gate`` (503 + Retry-After while the engine is not
serving). Every finished request gets exactly one access-log line, whatever the client
sent: client-chosen text in it (the path) is cut to a bounded length.
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid

from aiohttp import web

from .. import eventlog
from ..eventlog import Event
from ..admission import Rejected
from .errors import to_response
from .keys import CONFIG, GATE, METRICS
from ..gate import NotServing

# Routes that answer in every phase: probes must see "loading", not a 503 wall.
ALWAYS_OPEN = {"/health", "/metrics"}
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_MAX_LOGGED_PATH = 256


def new_request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _SANE_ID.match(given) else f"req-{uuid.uuid4().hex[:24]}"


@web.middleware
async def request_context(request: web.Request, handler):
    rid = new_request_id(request)
    request["rid"] = rid
    request["t0"] = time.monotonic()
    request["qb"] = {}            # handlers add prompt_len, output_len, ttft_s, session, finish...
    cfg = request.app[CONFIG]()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        if not resp.prepared:
            resp.headers["X-Request-Id"] = rid
        return resp
    except Exception as exc:  # the only place an exception becomes an HTTP answer
        if isinstance(exc, Rejected):
            request["qb"]["reason"] = exc.reason
        resp = to_response(exc, rid, cfg.server.retry_after_s)
        status = resp.status
        return resp
    except asyncio.CancelledError:  # aiohttp cancels the handler when the client goes away
        status = 499
        raise
    finally:
        info = request["qb"]
        status = info.pop("status", status)
        if cfg.server.access_log and request.path not in ALWAYS_OPEN:
            path = request.path
            eventlog.event(Event.REQUEST, id=rid, method=request.method,
                           path=path if len(path) <= _MAX_LOGGED_PATH else path[:_MAX_LOGGED_PATH] + "...",
                           status=status, latency_s=round(time.monotonic() - request["t0"], 4), **info)
        resource = request.match_info.route.resource
        request.app[METRICS].observe_request(resource.canonical if resource is not None else None,
                                             status, time.monotonic() - request["t0"])


@web.middleware
async def readiness_gate(request: web.Request, handler):
    route = request.match_info.route
    if request.path in ALWAYS_OPEN or route.resource is None:   # unknown routes still 404
        return await handler(request)
    refusal = request.app[GATE].refusal()
    if refusal is not None:
        raise NotServing(*refusal)
    return await handler(request)
