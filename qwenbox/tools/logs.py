"""``qwenbox logs``: read the daemon's structured lines and tell an operator what happened.

Contract:
- Input: files (``-`` is stdin, ``.gz`` is read compressed), or ``--journal`` which runs
  ``journalctl -o cat -u UNIT``. Lines are read with ``eventlog.parse_line``: logfmt or
  JSON, bare or behind a journald ``short`` prefix; lines that are not ours (vLLM's own
  output) are skipped, except that tracebacks there are still scanned for out-of-memory.
- ``analyze(lines)`` returns one plain dict (what ``--json`` prints): cold starts and their
  phases; the latency distribution of successful requests (``stats.summary``, a
  histogram); error classes with counts and first/last times; traffic per hour; session
  usage (``session_usage``: gap between a session's turns and turns per visit, P50/P90;
  a visit ends when a session is idle ``keepalive_s``, the daemon's own definition).
- ``request_values(path, ids, key)``: one field of chosen request lines, for the
  benchmarks' server-side figures.
- Tolerant by design: unknown events and fields are ignored, missing fields are fine, so
  newer daemons (admission control's 429 lines with a ``reason``/``rejected`` field, a
  ``session`` field) and older ones both read.

Error classes. Every request line lands in exactly one of them (or none when it succeeded):
  client_abort      status 499 (the client went away)
  queue_full        status 429, by reason (``reason=``/``rejected=``/``code=`` on the line,
                    or a separate ``rejected`` event with the request's id)
  out_of_memory     a 5xx whose error text says out of memory
  prefill_failure   a 5xx (other than 503) that ended before the first token
  server_error_5xx  every other 5xx, by status (503 while loading/draining, mid-stream 500s)
  client_error_4xx  every other 4xx, by status (bad input; not the server's fault)
Plus two classes of events that are not requests:
  engine_death      ``engine_failed`` events, a ``stopped`` with an exit code other than 0
                    and 130 and no ``engine_failed`` before it, and restarts with no
                    ``stopped`` line before them (the process was killed: OOM killer, SIGKILL)
  out_of_memory     also counts OOM messages in log lines and raw tracebacks; mentions in
                    the same second count once
"""
from __future__ import annotations

import datetime as dt
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from typing import Any, Iterable, Iterator, Sequence

from .. import session_usage as usage_figures
from ..eventlog import parse_line
from .report import fmt, table
from .stats import percentiles, summary

OOM = re.compile(r"out of memory|OutOfMemoryError|Cannot allocate memory|std::bad_alloc|\bMemoryError\b",
                 re.IGNORECASE)
REJECT_EVENTS = {"rejected", "rejection", "request_rejected", "admission_rejected", "throttled"}
ERROR_CLASSES = ("out_of_memory", "queue_full", "prefill_failure", "engine_death", "client_abort",
                 "server_error_5xx", "client_error_4xx")
CLASS_TITLES = {"out_of_memory": "out of memory", "queue_full": "queue full / 429",
                "prefill_failure": "prefill failures", "engine_death": "engine deaths",
                "client_abort": "client aborts (499)", "server_error_5xx": "other 5xx",
                "client_error_4xx": "bad requests (4xx)"}
_BOOL = {"true": True, "false": False}
_NUM = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_NUMERIC_KEYS = {"status", "exit_code", "pid", "priority", "n", "queue_depth", "in_flight", "retry_after_s"}


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
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def request_values(path: str | os.PathLike, ids: Sequence[str], key: str = "ttft_s") -> list[float | None]:
    """``key`` of the daemon's ``request`` lines for these request ids, in the order of
    ``ids``; None where the line or the number is missing or the file cannot be read."""
    found: dict[str, Any] = {}
    want = set(ids)
    try:
        for line in read_files([str(path)]):
            rec = parse_line(line)
            if rec and rec.get("event") == "request" and rec.get("id") in want:
                found[rec["id"]] = normalize(rec).get(key)
    except OSError:
        pass
    return [v if isinstance(v := found.get(i), (int, float)) else None for i in ids]


def _iso(t: dt.datetime | None) -> str | None:
    return t.astimezone(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z") if t else None


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
        i = min(max(int(math.floor(math.log10(x) * per_decade)) - lo_e, 0), len(counts) - 1)
        counts[i] += 1
    return [{"lo": edges[i], "hi": edges[i + 1], "count": c} for i, c in enumerate(counts)]


# ------------------------------------------------------------------ analysis
class _Class:
    def __init__(self) -> None:
        self.count = 0
        self.first: dt.datetime | None = None
        self.last: dt.datetime | None = None
        self.by: Counter = Counter()
        self.examples: list[str] = []

    def add(self, t: dt.datetime | None, key: str | None = None, example: str | None = None) -> None:
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


def _text(rec: dict[str, Any]) -> str:
    return " ".join(str(rec[k]) for k in ("error", "exc", "msg", "reason", "detail", "code", "error_code")
                    if rec.get(k) not in (None, ""))


def _reject_reason(rec: dict[str, Any]) -> str:
    for key in ("reason", "rejected", "rejection", "code", "error_code"):
        v = rec.get(key)
        if isinstance(v, str) and v and v.lower() not in ("true", "false", "1", "0"):
            return v
    return "unspecified"


def session_usage(turns: dict[str, list[tuple[float, float]]], keepalive_s: float) -> dict[str, Any]:
    """``turns``: session -> [(start, end) epoch seconds] -> the daemon's own figures
    (``qwenbox.session_usage``: P50/P90 of the gap between turns and of the turns per
    visit, a visit ending after ``keepalive_s`` idle), with the keep-alive and the number
    of sessions."""
    gaps, visits = usage_figures.from_turns(turns, keepalive_s)
    return {"keepalive_s": keepalive_s, "sessions": len(turns), **usage_figures.figures(gaps, visits)}


def analyze(lines: Iterable[str], keepalive_s: float = 120.0) -> dict[str, Any]:
    n_lines = n_parsed = 0
    events: Counter = Counter()
    first_t = last_t = None
    cold: list[dict[str, Any]] = []
    classes = {c: _Class() for c in ERROR_CLASSES}
    by_status: Counter = Counter()
    by_path: Counter = Counter()
    sessions: set[str] = set()
    session_turns: dict[str, list[tuple[float, float]]] = {}
    ok_lat: list[float] = []
    all_lat: list[float] = []
    ok_ttft: list[float] = []
    hours: dict[str, dict[str, Any]] = {}
    minutes: Counter = Counter()
    rejected_ids: dict[str, str] = {}      # id -> reason, from separate reject events
    queue_full_ids: set[str] = set()
    n_requests = 0
    running = False                        # a `listening` seen and no `stopped` after it
    failed_this_run = False                # an engine_failed line since the last `listening`
    last_seen_t = None

    oom_keys: dict[str, str] = {}          # second -> source that counted it

    def oom(t: dt.datetime | None, source: str, example: str, request: bool = False) -> None:
        """Mentions of one incident in the same second count once; every request counts."""
        c = classes["out_of_memory"]
        key = t.replace(microsecond=0).isoformat() if t else f"raw-{len(oom_keys)}-{c.count}"
        seen = oom_keys.get(key)
        if seen is not None and not request:
            return
        if seen is not None and seen != "request":     # a mention already counted it: it was this request
            c.by[seen] -= 1
            c.by = +c.by
            c.by["request"] += 1
            oom_keys[key] = "request"
            return
        oom_keys[key] = "request" if request else source
        c.add(t, "request" if request else source, example)

    for raw in lines:
        n_lines += 1
        rec0 = parse_line(raw)
        if rec0 is None:
            if OOM.search(raw) and ("Error" in raw or "error" in raw or "Killed" in raw):
                oom(last_seen_t, "raw output", raw.strip())
            continue
        n_parsed += 1
        rec = normalize(rec0)
        t = rec["_t"]
        if t is not None:
            last_seen_t = t
            first_t = t if first_t is None or t < first_t else first_t
            last_t = t if last_t is None or t > last_t else last_t
        ev = str(rec.get("event", ""))
        events[ev] += 1

        if ev == "listening":
            if running:
                classes["engine_death"].add(t, "restarted without a clean stop (process killed?)")
            running, failed_this_run = True, False
        elif ev == "stopped":
            running = False
            code = rec.get("exit_code")
            if isinstance(code, int) and code not in (0, 130) and not failed_this_run:
                classes["engine_death"].add(t, f"stopped with exit code {code}")
        elif ev == "cold_start":
            phases = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                      and not k.startswith("_")}
            cold.append({"ts": _iso(t), "model": rec.get("model"), "phases": phases})
        elif ev == "engine_failed":
            failed_this_run = True
            text = _text(rec)
            classes["engine_death"].add(t, str(rec.get("reason") or "engine failed"), text)
            if OOM.search(text):
                oom(t, "engine_failed", text)
        elif ev in REJECT_EVENTS:
            rid = rec.get("id")
            if isinstance(rid, str) and rid:
                rejected_ids[rid] = _reject_reason(rec)
                if rid in queue_full_ids:
                    continue
                queue_full_ids.add(rid)
            classes["queue_full"].add(t, _reject_reason(rec))
        elif ev == "log":
            text = _text(rec)
            if OOM.search(text) and str(rec.get("level", "")).lower() in ("warning", "error", "critical"):
                oom(t, f"log {rec.get('logger', '')}".strip(), text)
        elif ev == "request":
            n_requests += 1
            status = rec.get("status")
            status = status if isinstance(status, int) else None
            by_status[str(status) if status is not None else "unknown"] += 1
            by_path[str(rec.get("path", "?"))] += 1
            if rec.get("session") not in (None, ""):
                sessions.add(str(rec["session"]))
            lat = rec.get("latency_s")
            lat = float(lat) if isinstance(lat, (int, float)) else None
            if rec.get("session") not in (None, "") and t is not None:     # the line is written at the end
                end = t.timestamp()
                session_turns.setdefault(str(rec["session"]), []).append((end - (lat or 0.0), end))
            if lat is not None:
                all_lat.append(lat)
            if status is not None and 200 <= status < 400:
                if lat is not None:
                    ok_lat.append(lat)
                if isinstance(rec.get("ttft_s"), (int, float)):
                    ok_ttft.append(float(rec["ttft_s"]))
            if t is not None:
                h = t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:00Z")
                bucket = hours.setdefault(h, {"hour": h, "requests": 0, "ok": 0, "4xx": 0, "5xx": 0, "_lat": []})
                bucket["requests"] += 1
                if status is not None:
                    bucket["ok" if status < 400 else "4xx" if status < 500 else "5xx"] += 1
                if lat is not None and status is not None and status < 400:
                    bucket["_lat"].append(lat)
                minutes[t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")] += 1
            _classify_request(rec, status, t, classes, rejected_ids, queue_full_ids, oom)

    traffic = []
    for h in sorted(hours):
        b = hours[h]
        lat = b.pop("_lat")
        p = percentiles(lat, (50, 95))
        b["p50_s"], b["p95_s"] = p[50], p[95]
        traffic.append(b)
    return {
        "lines": {"total": n_lines, "structured": n_parsed, "events": dict(sorted(events.items()))},
        "span": {"first": _iso(first_t), "last": _iso(last_t)},
        "cold_starts": cold,
        "requests": {"total": n_requests, "by_status": dict(sorted(by_status.items())),
                     "by_path": dict(sorted(by_path.items())), "sessions": len(sessions)},
        "latency": {"ok": summary(ok_lat), "all": summary(all_lat), "ttft_ok": summary(ok_ttft),
                    "histogram": histogram(ok_lat), "histogram_fine": histogram(ok_lat, per_decade=12)},
        "errors": {c: classes[c].as_dict(_BY_NAME[c]) for c in ERROR_CLASSES},
        "traffic_per_hour": traffic,
        "session_usage": session_usage(session_turns, keepalive_s),
        # per minute only for short logs (under three hours), where per hour says little
        "traffic_per_minute": ([{"minute": m, "requests": n} for m, n in sorted(minutes.items())]
                               if len(traffic) < 3 else []),
    }


def _classify_request(rec: dict[str, Any], status: int | None, t: dt.datetime | None,
                      classes: dict[str, _Class], rejected_ids: dict[str, str], queue_full_ids: set[str],
                      oom) -> None:
    if status is None or status < 400:
        return
    rid = rec.get("id") if isinstance(rec.get("id"), str) else None
    if status == 499:
        classes["client_abort"].add(t, str(rec.get("path", "?")))
    elif status == 429:
        if rid and rid in queue_full_ids:
            return                                  # its reject event counted it already
        if rid:
            queue_full_ids.add(rid)
        reason = _reject_reason(rec)
        classes["queue_full"].add(t, rejected_ids.get(rid, reason) if reason == "unspecified" and rid else reason)
    elif status >= 500:
        text = _text(rec)
        if OOM.search(text):
            oom(t, "request", text, request=True)
        elif status != 503 and rec.get("ttft_s") in (None, "") and not rec.get("output_len"):
            classes["prefill_failure"].add(t, str(status), text or None)
        else:
            classes["server_error_5xx"].add(t, str(status), text or None)
    else:
        classes["client_error_4xx"].add(t, str(status))


# ------------------------------------------------------------------ text output
def _short(ts: str | None) -> str:
    return ts.replace("T", " ") if ts else "-"


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

    r = rep["requests"]
    statuses = ", ".join(f"{k}: {v}" for k, v in r["by_status"].items())
    out.append(f"\nRequests: {r['total']}" + (f" ({statuses})" if statuses else "")
               + (f"; {r['sessions']} sessions" if r["sessions"] else ""))
    lat, ttft = rep["latency"]["ok"], rep["latency"]["ttft_ok"]
    out.append(f"Latency of successful requests (n={lat['n']}): p50 {fmt(lat['p50'], 's')}  p95 {fmt(lat['p95'], 's')}  "
               f"p99 {fmt(lat['p99'], 's')}  max {fmt(lat['max'], 's')}")
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
    try:
        print(json.dumps(rep, indent=2) if args.json else render(rep, source), flush=True)
    except BrokenPipeError:                      # `qwenbox logs ... | head`
        sys.stdout = open("/dev/null", "w")
    if args.plot:
        plot(rep, args.plot)
        if not args.json:
            print(f"\nplot: {args.plot}")
    return 0
