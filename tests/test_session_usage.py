"""Session usage figures (issue 10): turns per visit and the gap between turns, P50/P90,
from the daemon's session table (/metrics, /health) and from its log lines (`qwenbox logs`).

Pure units: the tracker is driven with a stand-in clock; the metrics go to a registry of
their own; the log analyzer reads lines written in the daemon's own format."""
from __future__ import annotations

import json
import math

import pytest
from prometheus_client import CollectorRegistry

from qwenbox import admission
from qwenbox.admission import SessionTracker
from qwenbox.config import SessionsConfig
from qwenbox.metrics import Metrics
from qwenbox.tools import logs


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(admission.time, "monotonic", c)
    return c


def turn(tr: SessionTracker, clock: Clock, sid: str, start: float, length: float = 1.0) -> None:
    clock.t = start
    tr.turn_started(sid)
    clock.t = start + length
    tr.turn_ended(sid)


def test_gaps_and_visits_from_the_session_table(clock):
    tr = SessionTracker(SessionsConfig(keepalive_s=120.0))
    # s1: turns at 0, 11, 41 (gaps 10 and 29), then back after 600 s: a second visit
    for sid, start in (("s1", 0), ("s2", 5), ("s1", 11), (None, 20), ("s1", 41), ("s1", 642)):
        turn(tr, clock, sid, 1000 + start)     # s2: one turn, never back; None: anonymous, no figures
    clock.t = 1000 + 643 + 119                 # s1's second visit is still inside its window
    u = tr.usage()
    assert u["turn_gap_s"]["count"] == 3
    assert sorted(tr.gaps_s) == pytest.approx([10.0, 29.0, 600.0])
    assert u["turn_gap_s"]["p50"] == pytest.approx(29.0)
    assert u["turn_gap_s"]["p90"] == pytest.approx(29.0 + 0.8 * (600.0 - 29.0))
    # ended visits: s1's first (3 turns), s2's (1 turn); s1's second is still open
    assert sorted(tr.visit_turns) == [1, 3]
    clock.t += 2                               # now s1's second visit has ended too
    u = tr.usage()
    assert sorted(tr.visit_turns) == [1, 1, 3] and u["turns_per_visit"]["p50"] == 1.0
    assert tr.usage()["turns_per_visit"]["count"] == 3        # counted once, not per scrape


def test_concurrent_turns_of_one_session_have_no_gap_and_forgotten_sessions_count(clock):
    tr = SessionTracker(SessionsConfig(keepalive_s=120.0, max_tracked=1))
    clock.t = 0.0
    tr.turn_started("a")
    tr.turn_started("a")           # a second tab of the same chat, while the first runs
    clock.t = 1.0
    tr.turn_ended("a")
    tr.turn_ended("a")
    assert list(tr.gaps_s) == []
    turn(tr, clock, "b", 2.0)      # max_tracked=1: "a" is forgotten, its visit counted
    assert list(tr.visit_turns) == [2]


def test_metrics_export_the_quantiles(clock):
    m = Metrics(CollectorRegistry())
    a = admission.Admission(admission.AdmissionConfig(max_in_flight=8, max_queued=8, max_queued_prompt_tokens=8192),
                            SessionsConfig(keepalive_s=60.0), m)      # numbers: admission never sees "auto"
    a.export_metrics()
    text = m.payload()[0].decode()
    assert 'qwenbox_session_turn_gap_seconds{quantile="0.5"} NaN' in text      # no sample yet
    for start in (0, 5, 25):
        turn(a.sessions, clock, "s", 1000 + start)
    clock.t = 2000
    a.export_metrics()
    text = m.payload()[0].decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("qwenbox_session")}
    print("\n" + "\n".join(f"{k} {v}" for k, v in values.items()))
    assert values['qwenbox_session_turn_gap_seconds{quantile="0.5"}'] == pytest.approx(11.5)   # gaps 4 and 19
    assert values['qwenbox_session_turns_per_visit{quantile="0.9"}'] == 3.0
    assert values['qwenbox_session_usage_samples{figure="turn_gap_s"}'] == 2.0
    assert a.health()["session_usage"]["turns_per_visit"]["count"] == 1


def request_line(ts: str, session: str, latency: float) -> str:
    from test_logs import line  # the daemon's own formatter, as test_logs writes lines
    return line("logfmt", "request", ts=ts, id=f"{session}-{ts}", session=session, status=200,
                latency_s=latency, path="/v1/chat/completions")


def test_logs_report_session_usage(capsys):
    lines = [request_line("2026-11-29T10:00:00Z", "s1", 2.0), request_line("2026-11-29T10:00:12Z", "s1", 2.0),
             request_line("2026-11-29T10:00:40Z", "s1", 2.0), request_line("2026-11-29T10:10:00Z", "s1", 2.0),
             request_line("2026-11-29T10:00:05Z", "s2", 1.0), request_line("2026-11-29T10:00:06Z", "", 1.0)]
    su = logs.analyze(lines)["session_usage"]
    assert su["sessions"] == 2
    assert su["turn_gap_s"] == {"count": 3, "p50": pytest.approx(26.0), "p90": pytest.approx(26 + 0.8 * 532)}
    assert su["turns_per_visit"]["count"] == 3 and su["turns_per_visit"]["p50"] == 1
    # a longer keep-alive joins the two visits of s1
    assert logs.analyze(lines, keepalive_s=1000)["session_usage"]["turns_per_visit"]["count"] == 2
    text = logs.render(logs.analyze(lines))
    assert "Sessions: 2" in text and "gap between turns (n=3): p50 26.00 s" in text
    assert math.isclose(json.loads(json.dumps(su))["turn_gap_s"]["p50"], 26.0)


def test_the_daemon_and_the_log_analyzer_give_the_same_figures(clock):
    """One definition (qwenbox/session_usage.py): the live table and the logged turns agree."""
    tr = SessionTracker(SessionsConfig(keepalive_s=120.0))
    turns = (("s1", 0, 1.0), ("s2", 5, 2.0), ("s1", 11, 1.5), ("s1", 41, 1.0), ("s1", 642, 3.0), ("s2", 300, 1.0))
    lines = []
    for sid, start, length in turns:
        turn(tr, clock, sid, 1000 + start, length)
        end = f"2026-11-29T10:{(start + length) // 60:02.0f}:{(start + length) % 60:06.3f}Z"
        lines.append(request_line(end, sid, length))
    clock.t = 1000 + 642 + 3 + 120            # every visit has ended
    live, logged = tr.usage(), logs.analyze(lines, keepalive_s=120.0)["session_usage"]
    assert live["turn_gap_s"]["count"] == 4 and live["turns_per_visit"]["count"] == 4
    for key in ("turn_gap_s", "turns_per_visit"):
        assert logged[key]["count"] == live[key]["count"], key
        assert logged[key]["p50"] == pytest.approx(live[key]["p50"]) and \
            logged[key]["p90"] == pytest.approx(live[key]["p90"]), (key, live, logged)
