"""Request ids, the error mapper, the readiness gate and the access log line.

Order (outermost first): ``request_context`` (the request's ``RequestRecord``: id,
timing; errors -> JSON; the access log line, written from the record; request metrics),
then ``readiness_gate`` (503 + Retry-After while the engine is not serving). Every
finished request gets exactly one access-log line, whatever the client sent:
client-chosen text in it (the path) is cut to a bounded length.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from .. import eventlog
from ..admission import Rejected
from ..eventlog import Event
from ..gate import NotServing
from .errors import to_response
from .keys import CONFIG, GATE, METRICS, RECORD
from .record import RequestRecord

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Routes that answer in every phase: probes must see "loading", not a 503 wall.
ALWAYS_OPEN = {"/health", "/metrics"}
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_MAX_LOGGED_PATH = 256


def new_request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _SANE_ID.match(given) else f"req-{uuid.uuid4().hex[:24]}"


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    record = RequestRecord(new_request_id(request), time.monotonic())
    request[RECORD] = record      # the handlers fill in prompt_len, output_len, ttft_s, session, finish...
    cfg = request.app[CONFIG]()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        if not resp.prepared:
            resp.headers["X-Request-Id"] = record.id
        return resp
    except Exception as exc:  # the only place an exception becomes an HTTP answer
        if isinstance(exc, Rejected):
            record.reason = exc.reason
        resp = to_response(exc, record.id, cfg.server.retry_after_s)
        status = resp.status
        return resp
    except asyncio.CancelledError:  # aiohttp cancels the handler when the client goes away
        status = 499
        raise
    finally:
        seconds = time.monotonic() - record.started
        if record.status is not None:       # a stream that ended badly after its 200 was sent
            status = record.status
        if cfg.server.access_log and request.path not in ALWAYS_OPEN:
            eventlog.event(Event.REQUEST, logging.INFO,
                           **record.line_fields(request.method, _logged_path(request.path), status, round(seconds, 4)))
        resource = request.match_info.route.resource
        request.app[METRICS].observe_request(resource.canonical if resource is not None else None, status, seconds)


def _logged_path(path: str) -> str:
    """The client chose it: bounded."""
    return path if len(path) <= _MAX_LOGGED_PATH else path[:_MAX_LOGGED_PATH] + "..."


@web.middleware
async def readiness_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route
    if request.path in ALWAYS_OPEN or route.resource is None:   # unknown routes still 404
        return await handler(request)
    refusal = request.app[GATE].refusal()
    if refusal is not None:
        raise NotServing(*refusal)
    return await handler(request)
