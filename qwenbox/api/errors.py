"""Every HTTP error the API can answer, in OpenAI's shape, mapped in one place.

Contract: handlers and helpers raise ``ApiError`` (or let an engine error / aiohttp HTTP
exception escape); ``to_response(exc, request_id)`` is the only function that turns an
exception into a response: ``{"error": {"message", "type", "param", "code"}}`` with the
right status and headers (``Retry-After`` on 429/503). ``to_sse_event`` is the same body
for a stream that already started (its status line has been sent).
"""
from __future__ import annotations

import json
import logging

from aiohttp import web

from ..engine import EngineDead, EngineFailure, EngineRequestError

log = logging.getLogger("qwenbox.api")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unavailable(message: str, retry_after: int, code: str = "service_unavailable") -> ApiError:
    return ApiError(503, message, type="service_unavailable", code=code,
                    headers={"Retry-After": str(retry_after)})


def rate_limited(message: str, retry_after: int, code: str = "rate_limit_exceeded") -> ApiError:
    return ApiError(429, message, type="rate_limit_error", code=code,
                    headers={"Retry-After": str(retry_after)})


# aiohttp's own HTTP exceptions (routing, body size) -> our shape.
_HTTP_TYPES = {404: ("not_found_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed"),
               413: ("invalid_request_error", "request_too_large")}


def classify(exc: BaseException) -> ApiError:
    """Any exception -> the ApiError a client should see."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return ApiError(413, "request body is larger than the server's limit "
                             f"({exc.text.strip() if exc.text else 'see server.max_body_bytes'})",
                        code="request_too_large")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return ApiError(405, f"method {exc.method} is not allowed here; allowed: "
                             f"{', '.join(sorted(exc.allowed_methods))}", code="method_not_allowed",
                        headers={"Allow": ",".join(sorted(exc.allowed_methods))})
    if isinstance(exc, web.HTTPException):
        t, code = _HTTP_TYPES.get(exc.status, ("invalid_request_error", None))
        msg = "no such route" if exc.status == 404 else (exc.reason or "HTTP error")
        return ApiError(exc.status, msg, type=t, code=code)
    if isinstance(exc, EngineRequestError):
        return bad_request(str(exc), code="invalid_prompt")
    if isinstance(exc, EngineDead):
        return ApiError(503, "the engine stopped; the service is restarting", type="service_unavailable",
                        code="engine_dead", headers={"Retry-After": "10"})
    if isinstance(exc, EngineFailure):
        return ApiError(500, f"generation failed: {exc}", type="server_error", code="generation_failed")
    return ApiError(500, "internal server error", type="server_error", code="internal_error")


def to_response(exc: BaseException, request_id: str) -> web.Response:
    err = classify(exc)
    if err.status >= 500 and not isinstance(exc, (ApiError, EngineDead)):
        log.error("request %s failed: %r", request_id, exc, exc_info=exc)
    headers = {**err.headers, "X-Request-Id": request_id}
    return web.json_response(err.body(), status=err.status, headers=headers)


def to_sse_event(exc: BaseException) -> bytes:
    return f"data: {json.dumps(classify(exc).body())}\n\n".encode()
