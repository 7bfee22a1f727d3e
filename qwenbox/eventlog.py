"""Structured log lines: one per lifecycle event and per finished request.

Contract:
- ``setup(level, fmt, file)`` installs one handler on stdout (journald reads it) and, if
  ``file`` is set, one on that file; lines are ``logfmt`` or ``json`` (``fmt``).
- ``Event`` is the one list of events the daemon writes (and ``qwenbox logs`` reads);
  ``event(kind, **fields)`` writes one line with ``event=kind`` and the fields, in order.
  Every line is written whatever the fields hold: a string field is cut to
  ``MAX_FIELD_CHARS``, and text UTF-8 cannot encode (a lone surrogate) is escaped, so a
  client's bytes can neither lose a line nor make one large.
  Plain ``logging`` calls from any module come out in the same format with ``event=log``.
- ``parse_line(text)`` reads back one line of either format into a dict (or None): the
  log analyzer and the tests use it, so writer and reader cannot drift apart.
"""
from __future__ import annotations

import datetime as _dt
import enum
import json
import logging
import re
import sys
from typing import Any

EVENTS = logging.getLogger("qwenbox.events")


class Event(enum.StrEnum):
    """Every ``event=`` value a qwenbox process writes; nothing else is ever written."""
    LISTENING = "listening"             # sockets bound (or inherited) and served
    PHASE = "phase"                     # a lifecycle transition
    ENGINE_LOADED = "engine_loaded"     # an engine is built (first boot or rebuild), before warm-up
    COLD_START = "cold_start"           # first boot done: the cold-start figures
    SIZING = "sizing"                   # the limits chosen for the engine just built (or on reload)
    ENGINE_DIED = "engine_died"         # the engine died while serving; an in-process rebuild starts
    ENGINE_RECOVERED = "engine_recovered"   # that rebuild is serving
    ENGINE_FAILED = "engine_failed"     # fatal: the process exits non-zero
    RELOAD = "reload"                   # SIGHUP: applied or refused
    SLEEP = "sleep"                     # idle standby put the engine to sleep
    WAKE = "wake"                       # a request woke it
    WATCHDOG = "watchdog"               # the health verdict changed
    REQUEST = "request"                 # one finished API request (the access log)
    STOPPED = "stopped"                 # the process is about to exit
    COMPILE_CACHE = "compile_cache"     # ``qwenbox compile-cache`` finished
    LOG = "log"                         # a plain ``logging`` call, in the same format
MAX_FIELD_CHARS = 1024
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _ts(created: float) -> str:
    return _dt.datetime.fromtimestamp(created, _dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"ts": _ts(record.created), "level": record.levelname.lower()}
    fields = getattr(record, "qb_fields", None)
    if fields is not None:
        out["event"] = record.getMessage()
        out.update((k, _bounded(v)) for k, v in fields.items())
    else:
        out["event"] = Event.LOG.value
        out["logger"] = record.name
        out["msg"] = record.getMessage()
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


def _bounded(v: Any) -> Any:
    if isinstance(v, str) and len(v) > MAX_FIELD_CHARS:
        return f"{v[:MAX_FIELD_CHARS]}...({len(v)} chars)"
    return v


def _encodable(line: str) -> str:
    """The line as UTF-8 can carry it: lone surrogates become backslash escapes."""
    if line.isascii():
        return line
    try:
        line.encode("utf-8")
        return line
    except UnicodeEncodeError:
        return line.encode("utf-8", "backslashreplace").decode("utf-8")


_BARE = re.compile(r"^[A-Za-z0-9_.:/@+\-]+$")


def _logfmt_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        v = json.dumps(v, separators=(",", ":"), ensure_ascii=False)
    s = str(v)
    if s and _BARE.match(s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _encodable(" ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items()))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _encodable(json.dumps(_fields(record), ensure_ascii=False, default=str))


def setup(level: str = "info", fmt: str = "logfmt", file: str = "") -> None:
    formatter = JsonFormatter() if fmt == "json" else LogfmtFormatter()
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_qwenbox", False):
            root.removeHandler(h)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if file:
        handlers.append(logging.FileHandler(file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(formatter)
        h._qwenbox = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level.upper())


def event(kind: Event, level: int = logging.INFO, /, **fields: object) -> None:
    """One line for ``kind`` at logging ``level`` (positional, so that no field can take its name)."""
    EVENTS.log(level, kind.value, extra={"qb_fields": fields})


_LOGFMT_PAIR = re.compile(r'([A-Za-z0-9_.\-]+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_line(line: str) -> dict[str, Any] | None:
    """One log line (logfmt or JSON, optionally behind a journald prefix) -> dict, else None."""
    line = line.strip()
    if not line:
        return None
    brace = line.find("{")
    if brace != -1 and line.endswith("}"):
        try:
            obj = json.loads(line[brace:])
            if isinstance(obj, dict) and "event" in obj:
                return obj
        except ValueError:
            pass
    start = line.find("ts=")
    if start == -1:
        return None
    out: dict[str, Any] = {}
    for key, raw in _LOGFMT_PAIR.findall(line[start:]):
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), raw[1:-1])
        out[key] = raw
    return out if "event" in out else None
