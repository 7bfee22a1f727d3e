"""The chat page's API client: the public qwenbox API over its unix socket, nothing else.

Contract:
- ``ChatClient(settings)`` wraps one ``AsyncOpenAI`` on an httpx unix-socket transport
  (no retries of its own: this module decides).
- ``await reply(messages, session_id, stream, on_delta, on_wait)`` sends one chat turn with
  ``X-Session-Id`` and only the user's messages (the server shapes max_tokens, temperature,
  top_p, ...) and returns a ``Reply``: the answer and, when the server dropped old turns to
  fit the context, how many (the ``X-Qwenbox-Truncated`` header). With ``stream`` the
  text arrives through ``await on_delta(text)`` as it comes.
- While the daemon is not ready (503: loading, warming, draining; or no socket / refused
  connection while it restarts) and while it is at capacity (429), the request is tried
  again after ``Retry-After`` seconds (else a growing backoff, 1 s doubling to 15 s), and
  ``await on_wait(WaitInfo)`` is told each time, until ``settings.start_wait_s`` has
  passed. A streamed reply that already showed text is never resent.
- Every failure leaves as ``ChatFailure(friendly message)``: no exception text from a
  library and no stack trace reaches the page.
- ``fit_body(messages, max_body_bytes)``: drops the oldest turns (never a system prompt,
  never the last message) until the request body is under the server's limit, so nothing
  is sent that the server would refuse for its size.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import httpx
import openai

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

from .settings import Settings

log = logging.getLogger("qwenbox.ui")

BACKOFF_START_S, BACKOFF_MAX_S = 1.0, 15.0
RETRY_AFTER_MAX_S = 60.0
BODY_OVERHEAD_BYTES = 1024          # model, stream flags, JSON punctuation: generous


class ChatFailure(Exception):
    """A failure said the way the person at the keyboard should read it."""

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.sent = sent                # False: nothing reached the model (keep the history as it was)


@dataclass(frozen=True)
class WaitInfo:
    reason: str                         # "starting" (503 / no socket) or "busy" (429)
    delay_s: float
    attempt: int
    waited_s: float


@dataclass
class Reply:
    text: str
    truncated: int = 0                  # oldest messages the server dropped to fit the context
    finish: str | None = None


# A chat message as the page keeps and sends it: {"role": ..., "content": ...}.
Message = dict[str, str]


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form); None when absent or odd."""
    raw = headers.get("retry-after") if headers is not None else None
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        return None
    return min(max(v, 0.0), RETRY_AFTER_MAX_S) if v == v else None


def truncated_count(headers: Mapping[str, str] | None) -> int:
    m = re.search(r"dropped (\d+)", (headers or {}).get("x-qwenbox-truncated", "") or "")
    return int(m.group(1)) if m else 0


def fit_body(messages: list[Message], max_body_bytes: int) -> tuple[list[Message], int]:
    """-> (messages that fit in one request body, how many old ones were left out)."""
    def size(ms: list[Message]) -> int:
        return len(json.dumps(ms, ensure_ascii=False).encode()) + BODY_OVERHEAD_BYTES

    kept = list(messages)
    dropped = 0
    while size(kept) > max_body_bytes:
        i = next((i for i, m in enumerate(kept[:-1]) if m["role"] != "system"), None)
        if i is None:
            raise ChatFailure("Your message is too large for the server. Please shorten it.", sent=False)
        del kept[i]
        dropped += 1
    return kept, dropped


def _message_of(e: openai.APIStatusError) -> tuple[str | None, str]:
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error") if isinstance(body.get("error"), dict) else body
    code = err.get("code") if isinstance(err, dict) else None
    msg = err.get("message") if isinstance(err, dict) else None
    return code, (msg if isinstance(msg, str) else "")[:300]


def friendly(e: BaseException) -> ChatFailure:
    """Any failure of one request -> what the page says (never the exception's repr)."""
    if isinstance(e, ChatFailure):
        return e
    if isinstance(e, (openai.APITimeoutError, httpx.TimeoutException)):
        return ChatFailure("The model took too long to answer. Please try again.")
    if isinstance(e, (openai.APIConnectionError, httpx.TransportError)):
        return ChatFailure("The chat service cannot reach the model right now. Please try again in a minute.")
    if isinstance(e, openai.APIStatusError):
        code, msg = _message_of(e)
        s = e.status_code
        if s == 400 and code == "context_length_exceeded":
            return ChatFailure("This conversation is now longer than the model can read. Start a new chat "
                               "(the pencil icon at the top) or send a shorter message.", sent=False)
        if s == 400:
            return ChatFailure(f"The server could not accept this message: {msg or 'invalid request'}", sent=False)
        if s == 413:
            return ChatFailure("Your message is too large for the server. Please shorten it.", sent=False)
        if s in (429, 503):
            return ChatFailure("The model is still busy or starting. Please try again in a minute.", sent=False)
        return ChatFailure(f"Something went wrong on the server (HTTP {s}). Please try again.")
    if isinstance(e, openai.APIError):           # an error event inside a started stream
        return ChatFailure("The answer was interrupted by the server. Please try again.")
    return ChatFailure("Something went wrong in the chat page. Please try again.")


class ChatClient:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        transport = httpx.AsyncHTTPTransport(uds=settings.socket)
        timeout = httpx.Timeout(connect=10.0, read=settings.read_timeout_s, write=30.0, pool=30.0)
        # openai takes httpx's client at run time (is_legacy_httpx_async_client) but types httpx2's only.
        self.api = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="unused", max_retries=0,
                                      http_client=httpx.AsyncClient(  # type: ignore[arg-type]
                                          transport=transport, timeout=timeout))

    async def close(self) -> None:
        await self.api.close()

    async def reply(self, messages: list[Message], session_id: str, *, stream: bool,
                    on_delta: Callable[[str], Awaitable[None]] | None = None,
                    on_wait: Callable[[WaitInfo], Awaitable[None]] | None = None) -> Reply:
        t0 = time.monotonic()
        backoff = BACKOFF_START_S
        attempt = 0
        shown = {"any": False}

        async def delta(text: str) -> None:
            shown["any"] = True
            if on_delta is not None:
                await on_delta(text)

        while True:
            attempt += 1
            try:
                return await (self._stream(messages, session_id, delta) if stream
                              else self._complete(messages, session_id))
            except (openai.APIConnectionError, openai.APIStatusError, httpx.TransportError) as e:
                # httpx's own errors arrive raw from inside a stream (the daemon gone mid-answer)
                status = getattr(e, "status_code", None)
                timed_out = isinstance(e, (openai.APITimeoutError, httpx.TimeoutException))
                retryable = (not timed_out and not isinstance(e, openai.APIStatusError)) or status in (429, 503)
                if not retryable or shown["any"]:
                    if shown["any"]:
                        raise ChatFailure("The answer was interrupted (the model restarted). "
                                          "Please send your message again.") from None
                    raise friendly(e) from None
                waited = time.monotonic() - t0
                hinted = retry_after(getattr(getattr(e, "response", None), "headers", None))
                delay = hinted if hinted is not None else backoff
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                if waited + delay > self.s.start_wait_s:
                    minutes = max(1, round(self.s.start_wait_s / 60))
                    raise ChatFailure(f"The model is still not ready after {minutes} minute(s). "
                                      "Please try again later.", sent=False) from None
                log.info("api not ready (%s); retry %d in %.1fs", status or type(e).__name__, attempt, delay)
                if on_wait is not None:
                    await on_wait(WaitInfo("busy" if status == 429 else "starting", delay, attempt, waited))
                await asyncio.sleep(delay)
            except openai.APIError as e:             # an error event in a stream that had begun
                raise friendly(e) from None

    @staticmethod
    def _params(messages: list[Message]) -> list[ChatCompletionMessageParam]:
        # openai's message types are one TypedDict per role; ours are plain {role, content} dicts
        # of those roles (the server validates them as any client's).
        return cast("list[ChatCompletionMessageParam]", messages)

    async def _complete(self, messages: list[Message], session_id: str) -> Reply:
        raw = await self.api.chat.completions.with_raw_response.create(
            model=self.s.model, messages=self._params(messages), extra_headers={"X-Session-Id": session_id})
        done = raw.parse()
        choice = done.choices[0]
        return Reply(choice.message.content or "", truncated_count(raw.headers), choice.finish_reason)

    async def _stream(self, messages: list[Message], session_id: str,
                      on_delta: Callable[[str], Awaitable[None]]) -> Reply:
        parts: list[str] = []
        finish = None
        async with self.api.chat.completions.with_streaming_response.create(
                stream=True, model=self.s.model, messages=self._params(messages),
                extra_headers={"X-Session-Id": session_id}) as resp:
            truncated = truncated_count(resp.headers)
            async for chunk in await resp.parse():
                for ch in chunk.choices:
                    text = ch.delta.content if ch.delta is not None else None
                    if text:
                        parts.append(text)
                        await on_delta(text)
                    if ch.finish_reason:
                        finish = ch.finish_reason
        return Reply("".join(parts), truncated, finish)
