"""Every HTTP error the API can answer, in OpenAI's shape, mapped in one place.

Contract: handlers and helpers raise ``ApiError`` (or let an owner's refusal, an engine
error or an aiohttp HTTP exception escape); ``classify(exc, retry_after)`` is the only
function that decides what a client sees for an exception, and ``to_response`` /
``to_sse_event`` render it: ``{"error": {"message", "type", "param", "code"}}`` with the
right status and headers (``Retry-After`` on 429/503), or the same body as one SSE event
for a stream whose status line was already sent. Anything not recognised is a 500.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from ..admission import Rejected
from ..engine import EngineDead, EngineFailure, EngineRequestError
from ..gate import NotServing

log = logging.getLogger("qwenbox.api")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        # The request body was not (or could not be) read to its end: answer and close,
        # rather than let the server linger reading what is left of it.
        self.close = close

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def context_length_exceeded(size: str, max_model_len: int, remedy: str, *, param: str) -> ApiError:
    """The one 400 for a request that does not fit the model's context: ``size`` says how
    long it is, ``remedy`` what the client can change; ``param`` names the field to change."""
    return ApiError(400, f"{size}, but this model's maximum context length is {max_model_len} tokens; {remedy}",
                    param=param, code="context_length_exceeded")


def prompt_too_long(max_model_len: int, tokens: int | None = None, param: str = "messages") -> ApiError:
    """The prompt alone is too long: ``tokens`` long, or (None) known only to be longer
    than the context (it was refused before it was read to its end)."""
    size = f"{tokens} tokens long" if tokens is not None else f"more than {max_model_len} tokens long"
    return context_length_exceeded(f"the prompt is {size}", max_model_len, "shorten the prompt", param=param)


def forbidden(message: str, code: str) -> ApiError:
    return ApiError(403, message, type="permission_error", code=code)


def unavailable(message: str, retry_after: int, code: str = "service_unavailable") -> ApiError:
    return ApiError(503, message, type="service_unavailable", code=code,
                    headers={"Retry-After": str(retry_after)})


def rate_limited(message: str, retry_after: int, code: str = "rate_limit_exceeded") -> ApiError:
    return ApiError(429, message, type="rate_limit_error", code=code,
                    headers={"Retry-After": str(retry_after)})


# aiohttp's own HTTP exceptions (routing, body size) -> our shape.
_HTTP_TYPES = {404: ("not_found_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed"),
               413: ("invalid_request_error", "request_too_large")}


def classify(exc: BaseException, retry_after: int = 5) -> ApiError:
    """Any exception -> the ApiError a client should see."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NotServing):
        return unavailable(exc.message, retry_after, code=exc.code)
    if isinstance(exc, Rejected):
        return rate_limited(exc.message, retry_after, code=exc.reason)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return ApiError(413, "request body is larger than the server's limit "
                             f"({exc.text.strip() if exc.text else 'see server.max_body_bytes'})",
                        code="request_too_large", close=True)
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
        return unavailable("the engine stopped; the service is restarting", retry_after, code="engine_dead")
    if isinstance(exc, EngineFailure):
        return ApiError(500, f"generation failed: {exc}", type="server_error", code="generation_failed")
    return ApiError(500, "internal server error", type="server_error", code="internal_error")


def to_response(exc: BaseException, request_id: str, retry_after: int = 5) -> web.Response:
    err = classify(exc, retry_after)
    if err.status >= 500 and err.status != 503:
        log.error("request %s failed: %r", request_id, exc, exc_info=exc)
    headers = {**err.headers, "X-Request-Id": request_id}
    resp = web.json_response(err.body(), status=err.status, headers=headers)
    if err.close:
        resp.force_close()
    return resp


def to_sse_event(exc: BaseException, retry_after: int = 5) -> bytes:
    return f"data: {json.dumps(classify(exc, retry_after).body())}\n\n".encode()
