"""The record of one API request: what its access-log line (``event=request``) says.

Contract: ``middleware.request_context`` makes one ``RequestRecord`` per request and keeps
it under ``keys.RECORD``; the handlers write each fact into it once, where that fact
becomes known; when the request ends the middleware writes the line from it
(``line_fields``). The line's fields and their order: ``id method path status
latency_s``, then the record's fields from ``truncated`` on, in the order they are
declared here; a field that is None (not known, or not reached) is left out.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

LogValue = str | int | float | bool


@dataclass
class RequestRecord:
    id: str                          # X-Request-Id when it is sane, else a new one; the engine's id too
    started: float                   # time.monotonic() when the middleware saw the request
    # The status the line (and the request metrics) report instead of the response's: a
    # stream whose 200 is sent and that then ended in an error, or by the client leaving (499).
    status: int | None = None
    # ---- the line's own fields, in the line's order
    truncated: int | None = None     # oldest messages dropped to fit (shaping.on_overlong = "truncate")
    session: str | None = None
    intent: str | None = None        # shaping's reading of the prompt ("chat", "summarize")
    queued_s: float | None = None    # waited for an admission slot
    priority: int | None = None      # the engine priority admission gave
    prompt_len: int | None = None    # tokens, padding included
    max_tokens: int | None = None    # as the engine got it (client's, or shaped)
    stream: bool | None = None
    ttft_s: float | None = None      # request seen -> first engine output
    output_len: int | None = None    # completion tokens, all choices
    finish: str | None = None        # the choices' finish reasons, or "client_gone" / "error"
    reason: str | None = None        # admission's refusal (a 429): queue_full, queue_timeout...

    def first_output(self, now: float) -> None:
        """Engine output arrived at ``now`` (monotonic): the first call sets the TTFT."""
        if self.ttft_s is None:
            self.ttft_s = round(now - self.started, 4)

    def ended(self, output_len: int, finish: str, status: int | None = None) -> None:
        """The answer is over: its tokens and how it ended (``status`` where the response's
        own status no longer tells it)."""
        self.output_len, self.finish, self.status = output_len, finish, status

    def line_fields(self, method: str, path: str, status: int, latency_s: float) -> dict[str, LogValue]:
        """The ``event=request`` line's fields, in its order (``status``: the one reported)."""
        head: dict[str, LogValue] = {"id": self.id, "method": method, "path": path, "status": status,
                                     "latency_s": latency_s}
        return head | {name: v for name in _LOGGED if (v := getattr(self, name)) is not None}


# the fields after the head; `started` is not logged (latency_s says it)
_LOGGED = tuple(f.name for f in dataclasses.fields(RequestRecord) if f.name not in ("id", "started", "status"))
