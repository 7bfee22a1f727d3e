"""``qwenbox logs``: read the daemon's structured lines and tell an operator what happened.

Contract:
- Input: files (``-`` is stdin, ``.gz`` is read compressed), or ``--journal`` which runs
  ``journalctl -o cat -u UNIT``. Lines are read with ``eventlog.parse_line``: logfmt or
  JSON, bare or behind a journald ``short`` prefix; lines that are not ours (vLLM's own
  output) are skipped, except that tracebacks there are still scanned for out-of-memory.
- ``analyze(lines)`` returns one plain dict (what ``--json`` prints): cold starts and their
  phases; in-process engine rebuilds (``engine_rebuilds``: each ``engine_died`` with its
  outcome, recovered / failed / unfinished, and the rebuild's seconds and phases from its
  ``engine_recovered``; ``seconds`` summarises the recovered ones); the latency
  distribution of successful requests (``stats.summary``, a histogram); error classes
  with counts and first/last times; traffic per hour; session usage (``session_usage``:
  the daemon's own figures and definition, ``qwenbox.session_usage``, with a visit
  ending after ``keepalive_s`` idle).
- ``Analyzer`` does the work: one handler per ``eventlog.Event`` that says something here.
- ``request_values(path, ids, key)``: one field of chosen request lines, for the
  benchmarks' server-side figures.
- Tolerant by design: unknown events and fields are ignored, missing fields are fine, so
  newer and older daemons both read.

Error classes. Every request line lands in exactly one of them (or none when it succeeded):
  client_abort      status 499 (the client went away)
  queue_full        status 429 (admission's refusal), by the line's ``reason``
  out_of_memory     a 5xx whose error text says out of memory
  prefill_failure   a 5xx (other than 503) that ended before the first token
  server_error_5xx  every other 5xx, by status (503 while loading/draining, mid-stream 500s)
  client_error_4xx  every other 4xx, by status (bad input; not the server's fault)
Plus two classes of events that are not requests:
  engine_death      ``engine_died`` events (an engine rebuilt in-process: ``rebuilt
                    in-process``), ``engine_failed`` events other than the failure of such
                    a rebuild (that death is counted already), a ``stopped`` with an exit
                    code other than 0 and 130 and no ``engine_failed`` before it, and
                    restarts with neither a ``stopped`` nor an ``engine_failed`` line before
                    them (the process was killed: OOM killer, SIGKILL)
  out_of_memory     also counts OOM messages in log lines and raw tracebacks; mentions in
                    the same second count once
"""
from __future__ import annotations

import datetime as dt
import gzip
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import session_usage as usage_figures
from ..eventlog import Event, parse_line
from ..fileio import write_atomic
from .report import fmt, table
from .stats import percentiles, summary

OOM = re.compile(r"out of memory|OutOfMemoryError|Cannot allocate memory|std::bad_alloc|\bMemoryError\b",
                 re.IGNORECASE)
ERROR_CLASSES = ("out_of_memory", "queue_full", "prefill_failure", "engine_death", "client_abort",
                 "server_error_5xx", "client_error_4xx")
CLASS_TITLES = {"out_of_memory": "out of memory", "queue_full": "queue full / 429",
                "prefill_failure": "prefill failures", "engine_death": "engine deaths",
                "client_abort": "client aborts (499)", "server_error_5xx": "other 5xx",
                "client_error_4xx": "bad requests (4xx)"}
_BOOL = {"true": True, "false": False}
_NUM = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_NUMERIC_KEYS = {"status", "exit_code", "pid", "priority", "n", "queue_depth", "in_flight", "retry_after_s",
                 "truncated", "seconds", "rebuild", "max_restarts"}


# ------------------------------------------------------------------ reading
def read_files(paths: Iterable[str]) -> Iterator[str]:
    for p in paths:
        if p == "-":
            yield from sys.stdin
        elif p.endswith(".gz"):
            with gzip.open(p, "rt", encoding="utf-8", errors="replace") as f:
                yield from f
        else:
            with open(p, encoding="utf-8", errors="replace") as f:
                yield from f


class JournalError(Exception):
    pass


def read_journal(unit: str = "qwenbox", since: str | None = None) -> Iterator[str]:
    exe = shutil.which("journalctl")
    if exe is None:
        raise JournalError("journalctl not found (is this a systemd machine?); pass log FILE(s) instead")
    argv = [exe, "-o", "cat", "--no-pager", "-u", unit]
    if since:
        argv += ["--since", since]
    proc = subprocess.run(argv, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[0]
        raise JournalError(f"journalctl failed: {msg}")
    return iter(proc.stdout.splitlines())


def _coerce(key: str, v: Any) -> Any:
    if not isinstance(v, str):
        return v
    if key == "stream" and v in _BOOL:
        return _BOOL[v]
    if (key in _NUMERIC_KEYS or key.endswith(("_s", "_len", "_tokens", "_steps"))) and _NUM.match(v):
        f = float(v)
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    return v


def normalize(rec: dict[str, Any]) -> dict[str, Any]:
    """Types back (logfmt gives strings), and ``_t``: the timestamp as an aware datetime."""
    out = {k: _coerce(k, v) for k, v in rec.items()}
    out["_t"] = parse_ts(out.get("ts"))
    return out


def parse_ts(ts: Any) -> dt.datetime | None:
    if not isinstance(ts, str) or not ts:
        return None
    try:
        t = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def request_values(path: str | os.PathLike[str], ids: Sequence[str], key: str = "ttft_s") -> list[float | None]:
    """``key`` of the daemon's ``request`` lines for these request ids, in the order of
    ``ids``; None where the line or the number is missing or the file cannot be read."""
    found: dict[str, Any] = {}
    want = set(ids)
    try:
        for line in read_files([str(path)]):
            rec = parse_line(line)
            if rec and rec.get("event") == Event.REQUEST and rec.get("id") in want:
                found[rec["id"]] = normalize(rec).get(key)
    except OSError:
        pass
    return [v if isinstance(v := found.get(i), (int, float)) else None for i in ids]


def _iso(t: dt.datetime | None) -> str | None:
    return t.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if t else None


# ------------------------------------------------------------------ histogram
def histogram(xs: list[float], per_decade: int = 4) -> list[dict[str, Any]]:
    """Log-spaced bins (``per_decade`` per factor of 10) covering every value."""
    pos = [x for x in xs if x > 0]
    if not pos:
        return [{"lo": 0.0, "hi": 0.0, "count": len(xs)}] if xs else []
    lo_e = math.floor(math.log10(min(pos)) * per_decade)
    hi_e = math.floor(math.log10(max(pos)) * per_decade) + 1
    edges = [10 ** (e / per_decade) for e in range(lo_e, hi_e + 1)]
    counts = [0] * (len(edges) - 1)
    for x in xs:
        if x <= 0:
            counts[0] += 1
            continue
        i = min(max(math.floor(math.log10(x) * per_decade) - lo_e, 0), len(counts) - 1)
        counts[i] += 1
    return [{"lo": edges[i], "hi": edges[i + 1], "count": c} for i, c in enumerate(counts)]


# ------------------------------------------------------------------ analysis
Record = dict[str, Any]      # one structured line, values typed back (``normalize``), ``_t`` its time
Time = dt.datetime | None     # a line's timestamp; None when it has none


class _Class:
    def __init__(self) -> None:
        self.count = 0
        self.first: dt.datetime | None = None
        self.last: dt.datetime | None = None
        self.by: Counter[str] = Counter()
        self.examples: list[str] = []

    def add(self, t: Time, key: str | None = None, example: str | None = None) -> None:
        self.count += 1
        if t is not None:
            self.first = t if self.first is None or t < self.first else self.first
            self.last = t if self.last is None or t > self.last else self.last
        if key is not None:
            self.by[key] += 1
        if example and len(self.examples) < 3 and example not in self.examples:
            self.examples.append(example[:300])

    def as_dict(self, by_name: str) -> dict[str, Any]:
        d: dict[str, Any] = {"count": self.count, "first": _iso(self.first), "last": _iso(self.last)}
        if self.by:
            d[by_name] = dict(sorted(self.by.items(), key=lambda kv: (-kv[1], kv[0])))
        if self.examples:
            d["examples"] = self.examples
        return d


_BY_NAME = {"queue_full": "by_reason", "server_error_5xx": "by_status", "client_error_4xx": "by_status",
            "engine_death": "by_reason", "out_of_memory": "by_source", "prefill_failure": "by_status",
            "client_abort": "by_path"}
REBUILT = "rebuilt in-process"       # the engine_death key of an engine_died line


def _text(rec: Record) -> str:
    return " ".join(str(rec[k]) for k in ("error", "exc", "msg", "reason", "detail", "code", "error_code")
                    if rec.get(k) not in (None, ""))


def _reject_reason(rec: Record) -> str:
    """A 429 request line's ``reason`` (admission's refusal: queue_full, queue_timeout...)."""
    reason = rec.get("reason")
    return reason if isinstance(reason, str) and reason else "unspecified"


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def session_usage(turns: dict[str, list[tuple[float, float]]], keepalive_s: float) -> dict[str, Any]:
    """``turns``: session -> [(start, end) epoch seconds] -> the daemon's own figures
    (``qwenbox.session_usage``: P50/P90 of the gap between turns and of the turns per
    visit, a visit ending after ``keepalive_s`` idle), with the keep-alive and the number
    of sessions."""
    gaps, visits = usage_figures.from_turns(turns, keepalive_s)
    return {"keepalive_s": keepalive_s, "sessions": len(turns), **usage_figures.figures(gaps, visits)}


class _Errors:
    """The error classes; out-of-memory mentions of one incident (the same second) count once."""

    def __init__(self) -> None:
        self.classes = {c: _Class() for c in ERROR_CLASSES}
        self._oom_seen: dict[str, str] = {}      # second -> the source that counted it

    def __getitem__(self, name: str) -> _Class:
        return self.classes[name]

    def oom(self, t: Time, source: str, example: str, request: bool = False) -> None:
        """Mentions of one incident in the same second count once; every request counts."""
        c = self.classes["out_of_memory"]
        key = t.replace(microsecond=0).isoformat() if t else f"raw-{len(self._oom_seen)}-{c.count}"
        seen = self._oom_seen.get(key)
        if seen is not None and not request:
            return
        if seen is not None and seen != "request":     # a mention already counted it: it was this request
            c.by[seen] -= 1
            c.by = +c.by
            c.by["request"] += 1
            self._oom_seen[key] = "request"
            return
        self._oom_seen[key] = "request" if request else source
        c.add(t, "request" if request else source, example)

    def request(self, rec: Record, status: int | None, t: Time) -> None:
        """A request line in its one class (none when it succeeded)."""
        if status is None or status < 400:
            return
        if status == 499:
            self.classes["client_abort"].add(t, str(rec.get("path", "?")))
        elif status == 429:
            self.classes["queue_full"].add(t, _reject_reason(rec))
        elif status >= 500:
            text = _text(rec)
            if OOM.search(text):
                self.oom(t, "request", text, request=True)
            elif status != 503 and rec.get("ttft_s") in (None, "") and not rec.get("output_len"):
                self.classes["prefill_failure"].add(t, str(status), text or None)
            else:
                self.classes["server_error_5xx"].add(t, str(status), text or None)
        else:
            self.classes["client_error_4xx"].add(t, str(status))

    def as_dict(self) -> dict[str, Any]:
        return {c: self.classes[c].as_dict(_BY_NAME[c]) for c in ERROR_CLASSES}


@dataclass
class _Rebuild:
    """One in-process engine rebuild: its ``engine_died`` line and what became of it."""
    ts: str | None
    reason: str | None
    in_flight: int | None
    outcome: str = "unfinished"      # "recovered", "failed" (engine_failed), or the log/process ended first
    seconds: float | None = None     # engine_recovered's seconds: death seen -> serving again
    phases: dict[str, float] = field(default_factory=dict)


class _Rebuilds:
    """Engine deaths rebuilt in-process (``engine_died``) and their outcomes."""

    def __init__(self) -> None:
        self.each: list[_Rebuild] = []
        self.pending: _Rebuild | None = None

    def died(self, rec: Record, t: Time) -> None:
        in_flight = rec.get("in_flight")
        self.pending = _Rebuild(_iso(t), str(rec["reason"]) if rec.get("reason") not in (None, "") else None,
                                in_flight if isinstance(in_flight, int) else None)
        self.each.append(self.pending)

    def recovered(self, rec: Record) -> None:
        if self.pending is None:         # the log starts mid-rebuild: its engine_died is not in it
            self.pending = _Rebuild(None, None, None)
            self.each.append(self.pending)
        self.pending.outcome = "recovered"
        self.pending.seconds = _number(rec.get("seconds"))
        self.pending.phases = {k: float(v) for k, v in rec.items()
                               if k.endswith("_s") and not k.startswith("_") and _number(v) is not None}
        self.pending = None

    def failed(self) -> bool:
        """An engine_failed line: True when it ended a rebuild (its death is counted already)."""
        ended, self.pending = self.pending, None
        if ended is not None:
            ended.outcome = "failed"
        return ended is not None

    def process_ended(self) -> None:
        """A stop or a restart: a rebuild still pending never finished."""
        self.pending = None

    def as_dict(self) -> dict[str, Any]:
        outcomes = Counter(r.outcome for r in self.each)
        return {"count": len(self.each), "recovered": outcomes["recovered"], "failed": outcomes["failed"],
                "unfinished": outcomes["unfinished"],
                "seconds": summary(r.seconds for r in self.each if r.outcome == "recovered"),
                "each": [asdict(r) for r in self.each]}


SHAPE_KIND = "qwenbox-traffic-shape"     # what `qwenbox tune --workload` reads
SHAPE_SAMPLES = 1000


class Reservoir:
    """A uniform sample of at most ``size`` of the items added (reservoir sampling, seeded:
    the same log gives the same sample), and how many were added."""

    def __init__(self, size: int) -> None:
        self.size, self.seen = size, 0
        self.items: list[tuple[int, int]] = []
        self._rng = random.Random(0)

    def add(self, item: tuple[int, int]) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        elif (j := self._rng.randrange(self.seen)) < self.size:
            self.items[j] = item

    def as_shape(self) -> dict[str, Any]:
        """The traffic shape: the sample and its summaries."""
        return {"kind": SHAPE_KIND, "version": 1, "count": self.seen, "sampled": len(self.items),
                "prompt_tokens": summary([float(p) for p, _ in self.items]),
                "output_tokens": summary([float(o) for _, o in self.items]),
                "requests": [list(x) for x in self.items]}


class _Requests:
    """The access-log lines: counts, latency, traffic per hour and minute, session turns."""

    def __init__(self) -> None:
        self.total = 0
        self.by_status: Counter[str] = Counter()
        self.by_path: Counter[str] = Counter()
        self.sessions: set[str] = set()
        self.session_turns: dict[str, list[tuple[float, float]]] = {}    # session -> [(start, end)]
        self.ok_lat: list[float] = []
        self.all_lat: list[float] = []
        self.ok_ttft: list[float] = []
        self.hours: dict[str, dict[str, Any]] = {}
        self.minutes: Counter[str] = Counter()
        self.shape = Reservoir(SHAPE_SAMPLES)     # (prompt_len, output_len) of successful requests

    def add(self, rec: Record, status: int | None, t: Time) -> None:
        self.total += 1
        self.by_status[str(status) if status is not None else "unknown"] += 1
        self.by_path[str(rec.get("path", "?"))] += 1
        lat = _number(rec.get("latency_s"))
        session = rec.get("session")
        if session not in (None, ""):
            self.sessions.add(str(session))
            if t is not None:                   # the line is written at the end of the turn
                self.session_turns.setdefault(str(session), []).append((t.timestamp() - (lat or 0.0), t.timestamp()))
        if lat is not None:
            self.all_lat.append(lat)
        ok = status is not None and 200 <= status < 400
        if ok and lat is not None:
            self.ok_lat.append(lat)
        if ok and (ttft := _number(rec.get("ttft_s"))) is not None:
            self.ok_ttft.append(ttft)
        p_len, o_len = rec.get("prompt_len"), rec.get("output_len")
        if ok and isinstance(p_len, int) and isinstance(o_len, int) and p_len >= 1 and o_len >= 1:
            self.shape.add((p_len, o_len))
        if t is not None:
            self._traffic(t, status, lat)

    def _traffic(self, t: dt.datetime, status: int | None, lat: float | None) -> None:
        utc = t.astimezone(dt.UTC)
        h = utc.strftime("%Y-%m-%dT%H:00Z")
        bucket = self.hours.setdefault(h, {"hour": h, "requests": 0, "ok": 0, "4xx": 0, "5xx": 0, "_lat": []})
        bucket["requests"] += 1
        if status is not None:
            bucket["ok" if status < 400 else "4xx" if status < 500 else "5xx"] += 1
        if lat is not None and status is not None and status < 400:
            bucket["_lat"].append(lat)
        self.minutes[utc.strftime("%Y-%m-%dT%H:%MZ")] += 1

    def traffic_per_hour(self) -> list[dict[str, Any]]:
        out = []
        for h in sorted(self.hours):
            b = {k: v for k, v in self.hours[h].items() if k != "_lat"}
            p = percentiles(self.hours[h]["_lat"], (50, 95))
            b["p50_s"], b["p95_s"] = p[50], p[95]
            out.append(b)
        return out


class Analyzer:
    """``feed`` it lines one at a time, then ask for the ``report``. Each ``Event`` the
    daemon writes that says something here has one handler (``_HANDLERS``); other events
    are only counted, and lines that are not ours only scanned for out-of-memory."""

    def __init__(self, keepalive_s: float = 120.0) -> None:
        self.keepalive_s = keepalive_s
        self.n_lines = self.n_parsed = 0
        self.events: Counter[str] = Counter()
        self.first_t: Time = None
        self.last_t: Time = None
        self.last_seen_t: Time = None        # the time of the latest line that had one
        self.cold: list[dict[str, Any]] = []
        self.errors = _Errors()
        self.rebuilds = _Rebuilds()
        self.requests = _Requests()
        self.running = False                 # a `listening` seen and no `stopped` after it
        self.failed_this_run = False         # an engine_failed line since the last `listening`

    def feed(self, raw: str) -> None:
        self.n_lines += 1
        parsed = parse_line(raw)
        if parsed is None:
            if OOM.search(raw) and ("Error" in raw or "error" in raw or "Killed" in raw):
                self.errors.oom(self.last_seen_t, "raw output", raw.strip())
            return
        self.n_parsed += 1
        rec = normalize(parsed)
        t = rec["_t"]
        if t is not None:
            self.last_seen_t = t
            self.first_t = t if self.first_t is None or t < self.first_t else self.first_t
            self.last_t = t if self.last_t is None or t > self.last_t else self.last_t
        name = str(rec.get("event", ""))
        self.events[name] += 1
        kind = _event(name)
        handler = _HANDLERS.get(kind) if kind is not None else None
        if handler is not None:
            handler(self, rec, t)

    def _engine_death(self, t: Time, reason: str, example: str | None = None) -> None:
        self.errors["engine_death"].add(t, reason, example)

    def on_listening(self, rec: Record, t: Time) -> None:
        # a start while the previous run never logged its end: that process was killed
        # (OOM killer, SIGKILL), unless it had already said why it gave up (engine_failed)
        if self.running and not self.failed_this_run:
            self._engine_death(t, "restarted without a clean stop (process killed?)")
        self.rebuilds.process_ended()
        self.running, self.failed_this_run = True, False

    def on_stopped(self, rec: Record, t: Time) -> None:
        self.running = False
        self.rebuilds.process_ended()
        code = rec.get("exit_code")
        if isinstance(code, int) and code not in (0, 130) and not self.failed_this_run:
            self._engine_death(t, f"stopped with exit code {code}")

    def on_cold_start(self, rec: Record, t: Time) -> None:
        phases = {k: v for k, v in rec.items() if _number(v) is not None and not k.startswith("_")}
        self.cold.append({"ts": _iso(t), "model": rec.get("model"), "phases": phases})

    def on_engine_died(self, rec: Record, t: Time) -> None:
        self.rebuilds.died(rec, t)
        self._engine_death(t, REBUILT, str(rec.get("reason") or "") or None)

    def on_engine_recovered(self, rec: Record, t: Time) -> None:
        self.rebuilds.recovered(rec)

    def on_engine_failed(self, rec: Record, t: Time) -> None:
        self.failed_this_run = True
        text = _text(rec)
        if not self.rebuilds.failed():       # a failed rebuild is the death its engine_died counted
            self._engine_death(t, str(rec.get("reason") or "engine failed"), text)
        if OOM.search(text):
            self.errors.oom(t, "engine_failed", text)

    def on_log(self, rec: Record, t: Time) -> None:
        text = _text(rec)
        if OOM.search(text) and str(rec.get("level", "")).lower() in ("warning", "error", "critical"):
            self.errors.oom(t, f"log {rec.get('logger', '')}".strip(), text)

    def on_request(self, rec: Record, t: Time) -> None:
        status = rec.get("status")
        status = status if isinstance(status, int) else None
        self.requests.add(rec, status, t)
        self.errors.request(rec, status, t)

    def report(self) -> dict[str, Any]:
        """What ``--json`` prints (see the module's contract)."""
        r = self.requests
        traffic = r.traffic_per_hour()
        return {
            "lines": {"total": self.n_lines, "structured": self.n_parsed, "events": dict(sorted(self.events.items()))},
            "span": {"first": _iso(self.first_t), "last": _iso(self.last_t)},
            "cold_starts": self.cold,
            "engine_rebuilds": self.rebuilds.as_dict(),
            "requests": {"total": r.total, "by_status": dict(sorted(r.by_status.items())),
                         "by_path": dict(sorted(r.by_path.items())), "sessions": len(r.sessions)},
            "latency": {"ok": summary(r.ok_lat), "all": summary(r.all_lat), "ttft_ok": summary(r.ok_ttft),
                        "histogram": histogram(r.ok_lat), "histogram_fine": histogram(r.ok_lat, per_decade=12)},
            "errors": self.errors.as_dict(),
            "traffic_per_hour": traffic,
            "session_usage": session_usage(r.session_turns, self.keepalive_s),
            "traffic_shape": r.shape.as_shape(),
            # per minute only for short logs (under three hours), where per hour says little
            "traffic_per_minute": ([{"minute": m, "requests": n} for m, n in sorted(r.minutes.items())]
                                   if len(traffic) < 3 else []),
        }


_HANDLERS: dict[Event, Callable[[Analyzer, Record, Time], None]] = {
    Event.LISTENING: Analyzer.on_listening,
    Event.STOPPED: Analyzer.on_stopped,
    Event.COLD_START: Analyzer.on_cold_start,
    Event.ENGINE_DIED: Analyzer.on_engine_died,
    Event.ENGINE_RECOVERED: Analyzer.on_engine_recovered,
    Event.ENGINE_FAILED: Analyzer.on_engine_failed,
    Event.LOG: Analyzer.on_log,
    Event.REQUEST: Analyzer.on_request,
}


def _event(name: str) -> Event | None:
    """The ``Event`` a line names; None for a name this version does not know."""
    try:
        return Event(name)
    except ValueError:
        return None


def analyze(lines: Iterable[str], keepalive_s: float = 120.0) -> dict[str, Any]:
    analyzer = Analyzer(keepalive_s)
    for raw in lines:
        analyzer.feed(raw)
    return analyzer.report()


# ------------------------------------------------------------------ text output
def _short(ts: str | None) -> str:
    return ts.replace("T", " ") if ts else "-"


def _render_rebuilds(rb: dict[str, Any]) -> list[str]:
    counts = (f" ({rb['recovered']} recovered, {rb['failed']} failed, {rb['unfinished']} unfinished)"
              if rb["count"] else "")
    out = [f"\nEngine rebuilds in-process: {rb['count']}{counts}"]
    took = rb["seconds"]
    if took["n"]:
        out.append(f"  rebuild took (n={took['n']}): p50 {fmt(took['p50'], 's')}  max {fmt(took['max'], 's')}")
    for r in rb["each"]:
        outcome = f"recovered in {fmt(r['seconds'], 's')}" if r["outcome"] == "recovered" else r["outcome"]
        phases = ", ".join(f"{k[:-2]} {fmt(v, 's')}" for k, v in r["phases"].items())
        in_flight = f", {r['in_flight']} in flight" if r["in_flight"] is not None else ""
        out.append(f"  {_short(r['ts'])}  {r['reason'] or '-'}{in_flight}: {outcome}"
                   + (f" ({phases})" if phases else ""))
    return out


def render(rep: dict[str, Any], source: str = "") -> str:
    out = []
    span = rep["span"]
    out.append(f"qwenbox logs: {rep['lines']['structured']} structured lines of {rep['lines']['total']}"
               f"{' from ' + source if source else ''}; {_short(span['first'])} .. {_short(span['last'])}")

    out.append(f"\nCold starts: {len(rep['cold_starts'])}")
    for c in rep["cold_starts"]:
        ph = c["phases"]
        total = ph.get("total_s")
        parts = [f"{k[:-2]} {fmt(v, 's')}" for k, v in ph.items() if k.endswith("_s") and k != "total_s"]
        parts += [f"{k} {v}" for k, v in ph.items() if not k.endswith("_s")]
        out.append(f"  {_short(c['ts'])}  {c.get('model') or '-'}  total {fmt(total, 's')}: " + ", ".join(parts))
    out += _render_rebuilds(rep["engine_rebuilds"])

    r = rep["requests"]
    statuses = ", ".join(f"{k}: {v}" for k, v in r["by_status"].items())
    out.append(f"\nRequests: {r['total']}" + (f" ({statuses})" if statuses else "")
               + (f"; {r['sessions']} sessions" if r["sessions"] else ""))
    lat, ttft = rep["latency"]["ok"], rep["latency"]["ttft_ok"]
    out.append(f"Latency of successful requests (n={lat['n']}): p50 {fmt(lat['p50'], 's')}  "
               f"p95 {fmt(lat['p95'], 's')}  p99 {fmt(lat['p99'], 's')}  max {fmt(lat['max'], 's')}")
    if ttft["n"]:
        out.append(f"Time to first token (n={ttft['n']}): p50 {fmt(ttft['p50'], 's')}  p95 {fmt(ttft['p95'], 's')}  "
                   f"p99 {fmt(ttft['p99'], 's')}")
    hist = rep["latency"]["histogram"]
    if hist:
        peak = max(b["count"] for b in hist) or 1
        for b in hist:
            bar = "#" * max(1 if b["count"] else 0, round(40 * b["count"] / peak))
            out.append(f"  {fmt(b['lo'], 's'):>9} - {fmt(b['hi'], 's'):<9} {bar:<40} {b['count']}")

    out.append("\nErrors")
    rows = []
    for c in ERROR_CLASSES:
        e = rep["errors"][c]
        by = e.get(_BY_NAME[c]) or {}
        detail = ", ".join(f"{k} x{v}" for k, v in by.items())
        rows.append([CLASS_TITLES[c], e["count"], _short(e["first"]), _short(e["last"]), detail[:70]])
    out.append(table(["class", "count", "first", "last", "detail"], rows, left=(0, 2, 3, 4), indent="  "))

    out.append("\nTraffic per hour (UTC)")
    tr = rep["traffic_per_hour"]
    if not tr:
        out.append("  (no requests)")
    peak = max((b["requests"] for b in tr), default=1) or 1
    for b in tr:
        bar = "#" * max(1, round(30 * b["requests"] / peak))
        out.append(f"  {b['hour'].replace('T', ' ')}  {b['requests']:>7} req  {b['4xx']:>5} 4xx  {b['5xx']:>5} 5xx  "
                   f"p95 {fmt(b['p95_s'], 's'):>9}  {bar}")

    su = rep.get("session_usage")
    if su and su["sessions"]:
        gap, visit = su["turn_gap_s"], su["turns_per_visit"]
        out.append(f"\nSessions: {su['sessions']} (a visit ends after {fmt(su['keepalive_s'], 's')} idle, "
                   "sessions.keepalive_s)")
        out.append(f"  gap between turns (n={gap['count']}): p50 {fmt(gap['p50'], 's')}  p90 {fmt(gap['p90'], 's')}")
        out.append(f"  turns per visit (n={visit['count']}): p50 {fmt(visit['p50'])}  p90 {fmt(visit['p90'])}")
    return "\n".join(out)


# ------------------------------------------------------------------ plot
class PlotUnavailable(Exception):
    pass


def _pyplot() -> Any:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, which is not installed "
                              "(pip install 'qwenbox[plot]' or pip install matplotlib)") from None
    return plt


def plot(rep: dict[str, Any], path: str) -> None:
    """Latency histogram (log-spaced bins) and the traffic curve (per hour, or per minute
    when the log covers less than three hours)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7))
    hist = rep["latency"].get("histogram_fine") or rep["latency"]["histogram"]
    if hist:
        lefts = [b["lo"] for b in hist]
        widths = [b["hi"] - b["lo"] for b in hist]
        ax1.bar(lefts, [b["count"] for b in hist], width=widths, align="edge", edgecolor="black")
        ax1.set_xscale("log")
        from matplotlib.ticker import FuncFormatter

        def minor(v: float, _pos: Any) -> str:   # label 1x, 2x and 5x powers of ten
            lead = round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
            return fmt(v, 's') if lead in (1, 2, 5) else ""
        ax1.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt(v, 's')))
        ax1.xaxis.set_minor_formatter(FuncFormatter(minor))
    lat = rep["latency"]["ok"]
    for key, style in (("p50", "--"), ("p95", ":"), ("p99", "-.")):
        if lat[key]:
            ax1.axvline(lat[key], linestyle=style, color="red", label=f"{key} {fmt(lat[key], 's')}")
    if lat["n"]:
        ax1.legend()
    ax1.set_xlabel("latency of successful requests (log scale)")
    ax1.set_ylabel("requests")
    ax1.set_title(f"Latency distribution (n={lat['n']})")

    hours = rep["traffic_per_hour"]
    use_minutes = len(hours) < 3
    series = rep["traffic_per_minute"] if use_minutes else hours
    key, stamp, step = (("minute", "%Y-%m-%dT%H:%MZ", dt.timedelta(minutes=1)) if use_minutes
                        else ("hour", "%Y-%m-%dT%H:00Z", dt.timedelta(hours=1)))
    counts = {dt.datetime.strptime(b[key], stamp): b["requests"] for b in series}
    xs: list[dt.datetime] = []
    if counts:                                   # empty buckets are zero traffic, not gaps
        t, end = min(counts), max(counts)
        while t <= end and len(xs) < 100000:
            xs.append(t)
            t += step
    ax2.plot(xs, [counts.get(x, 0) for x in xs], marker="o" if len(xs) < 60 else None, drawstyle="steps-post")
    if xs:
        import matplotlib.dates as mdates
        every = max(1, len(xs) // 10)
        ax2.xaxis.set_major_locator(mdates.MinuteLocator(interval=every) if use_minutes
                                    else mdates.HourLocator(interval=every))
        ax2.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M" if use_minutes else "%m-%d %H:00"))
        if len(xs) == 1:
            ax2.set_xlim(xs[0] - step, xs[0] + step)
    ax2.set_ylim(bottom=0)
    ax2.set_ylabel(f"requests per {key}")
    ax2.set_title(f"Traffic per {key} (UTC)")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ CLI
def _seconds(v: str) -> float:
    import argparse
    try:
        f = float(v)
    except ValueError:
        f = -1.0
    if not (f >= 0 and math.isfinite(f)):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {v!r}")
    return f


def add_arguments(p: Any) -> None:
    p.add_argument("files", nargs="*", metavar="FILE", help="log files ('-' for stdin, .gz is fine)")
    p.add_argument("--journal", action="store_true", help="read the journal: journalctl -o cat -u UNIT")
    p.add_argument("-u", "--unit", default="qwenbox", help="systemd unit for --journal (default: qwenbox)")
    p.add_argument("--since", help="with --journal: passed to journalctl --since (e.g. '-1h', 'today')")
    p.add_argument("--plot", metavar="FILE.png", help="draw the latency histogram and the traffic curve")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    p.add_argument("--shape", metavar="FILE.json", help="write the traffic shape (prompt and output lengths of "
                   f"up to {SHAPE_SAMPLES} successful requests, sampled) for `qwenbox tune --workload`")
    p.add_argument("--keepalive", type=_seconds, default=120.0, metavar="SECONDS",
                   help="session visits end after this long idle, as sessions.keepalive_s (default: 120)")


def main(args: Any) -> int:
    if args.plot:
        try:
            _pyplot()
        except PlotUnavailable as e:
            print(f"qwenbox logs: {e}", file=sys.stderr)
            return 1
    if args.journal and args.files:
        print("qwenbox logs: give FILE(s) or --journal, not both", file=sys.stderr)
        return 2
    try:
        if args.journal:
            lines, source = read_journal(args.unit, args.since), f"journal (unit {args.unit})"
            rep = analyze(lines, args.keepalive)
        elif args.files:
            source = ", ".join(args.files)
            rep = analyze(read_files(args.files), args.keepalive)
        elif not sys.stdin.isatty():
            source, rep = "stdin", analyze(sys.stdin, args.keepalive)
        else:
            print("qwenbox logs: give log FILE(s), '-' for stdin, or --journal [-u UNIT]", file=sys.stderr)
            return 2
    except JournalError as e:
        print(f"qwenbox logs: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"qwenbox logs: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    if args.shape:
        shape = rep["traffic_shape"]
        if not shape["requests"]:
            print("qwenbox logs: no successful request with prompt_len and output_len to take a shape from",
                  file=sys.stderr)
            return 1
        write_atomic(args.shape, json.dumps(shape) + "\n")
    try:
        print(json.dumps(rep, indent=2) if args.json else render(rep, source), flush=True)
    except BrokenPipeError:                      # `qwenbox logs ... | head`
        # the reader is gone: what is still buffered goes nowhere (open for the process's life)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    if args.plot:
        plot(rep, args.plot)
        if not args.json:
            print(f"\nplot: {args.plot}")
    return 0
