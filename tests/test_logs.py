"""`qwenbox logs`: the analyzer on a log captured from a real daemon run, and on synthetic
lines for every error class in both formats (logfmt, JSON; bare and behind journald's
`short` prefix)."""
import itertools
import json
import logging
import socket
import time

import pytest

from helpers import Daemon, request
from qwenbox import cli, eventlog
from qwenbox.tools import logs, stats

MODEL = "qwenbox-demo"


# ------------------------------------------------------------------ synthetic lines
def line(fmt, event, ts="2026-11-25T10:00:00.000Z", level="info", **fields):
    """A line exactly as eventlog writes it (the real formatters, not a copy of them)."""
    rec = logging.LogRecord("qwenbox.events", getattr(logging, level.upper()), "", 0, event, (), None)
    rec.qb_fields = fields
    text = (eventlog.JsonFormatter() if fmt == "json" else eventlog.LogfmtFormatter()).format(rec)
    # the formatter stamps the record's creation time; pin it so tests can check first/last
    if fmt == "json":
        obj = json.loads(text)
        obj["ts"] = ts
        obj["level"] = level
        return json.dumps(obj)
    _, _, rest = text.partition(" level=")
    return f"ts={ts} level={level} " + rest.split(" ", 1)[1]


_ids = itertools.count()


def req(fmt, status, ts="2026-11-25T10:00:00.000Z", **kw):
    fields = dict(id=kw.pop("id", f"req-{next(_ids)}"), method="POST", path="/v1/chat/completions",
                  status=status, latency_s=kw.pop("latency_s", 0.25), prompt_len=12, max_tokens=16, stream=True)
    fields.update(kw)
    return line(fmt, "request", ts=ts, **fields)


FORMATS = ["logfmt", "json"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_request_error_class(fmt):
    lines = [
        req(fmt, 200, ttft_s=0.01, output_len=16, finish="length"),
        req(fmt, 200, ts="2026-11-25T11:30:00.000Z", ttft_s=0.02, output_len=16, finish="length", latency_s=0.5),
        req(fmt, 499, ts="2026-11-25T10:01:00.000Z", finish="client_gone", output_len=3, ttft_s=0.01),
        req(fmt, 499, ts="2026-11-25T10:02:00.000Z"),
        req(fmt, 429, reason="queue_full"),
        req(fmt, 429, ts="2026-11-25T10:05:00.000Z", reason="queue_full"),
        req(fmt, 429, reason="queued_tokens_full"),
        req(fmt, 429),                                            # an older daemon: no reason
        req(fmt, 500),                                            # failed before the first token
        req(fmt, 500, ttft_s=0.01, output_len=4, finish="error"),  # failed mid-stream
        req(fmt, 503),                                            # loading / draining
        req(fmt, 500, error="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.0 GiB"),
        req(fmt, 400),
        req(fmt, 404, path="/v1/nope"),
    ]
    rep = logs.analyze(lines)
    e = rep["errors"]
    assert rep["requests"]["total"] == len(lines)
    assert e["client_abort"]["count"] == 2
    assert e["client_abort"]["first"] == "2026-11-25T10:01:00Z" and e["client_abort"]["last"] == "2026-11-25T10:02:00Z"
    assert e["queue_full"]["count"] == 4
    assert e["queue_full"]["by_reason"] == {"queue_full": 2, "queued_tokens_full": 1, "unspecified": 1}
    assert e["prefill_failure"]["count"] == 1
    assert e["server_error_5xx"]["count"] == 2 and e["server_error_5xx"]["by_status"] == {"500": 1, "503": 1}
    assert e["out_of_memory"]["count"] == 1
    assert e["client_error_4xx"]["count"] == 2
    assert e["engine_death"]["count"] == 0
    # every request line is in exactly one class, or succeeded
    classified = sum(e[c]["count"] for c in logs.ERROR_CLASSES if c != "engine_death")
    assert classified + rep["requests"]["by_status"]["200"] == len(lines)
    assert rep["latency"]["ok"]["n"] == 2
    assert [h["requests"] for h in rep["traffic_per_hour"]] == [13, 1]
    assert [h["hour"] for h in rep["traffic_per_hour"]] == ["2026-11-25T10:00Z", "2026-11-25T11:00Z"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_death_oom_and_cold_starts(fmt):
    lines = [
        line(fmt, "listening", ts="2026-11-25T09:00:00.000Z", pid=10),
        line(fmt, "cold_start", ts="2026-11-25T09:00:30.000Z", model="m", import_s=5.0, engine_s=17.8,
             warmup_s=2.5, total_s=25.3, kv_cache_tokens=262144),
        # the OOM killer: no `stopped` before the next start
        line(fmt, "listening", ts="2026-11-25T09:10:00.000Z", pid=11),
        line(fmt, "cold_start", ts="2026-11-25T09:10:30.000Z", model="m", import_s=4.0, total_s=20.0),
        line(fmt, "engine_failed", ts="2026-11-25T09:20:00.000Z", level="error", reason="engine core died (pids [12])",
             error=None),
        # the daemon's own error log of the same failure, and an OOM in the same second: counted once
        line(fmt, "engine_failed", ts="2026-11-25T09:30:00.000Z", level="error", reason="engine failed to start",
             error="RuntimeError: CUDA out of memory"),
        line(fmt, "log", ts="2026-11-25T09:30:00.200Z", level="error", logger="qwenbox.daemon",
             msg="engine failed to start: CUDA out of memory"),
        line(fmt, "stopped", ts="2026-11-25T09:30:01.000Z", exit_code=1),
        # a warning that merely mentions memory is no OOM
        line(fmt, "log", ts="2026-11-25T09:40:00.000Z", level="info", logger="vllm", msg="out of memory? no"),
    ]
    rep = logs.analyze(lines)
    assert len(rep["cold_starts"]) == 2
    assert rep["cold_starts"][0]["phases"]["engine_s"] == pytest.approx(17.8)
    assert rep["cold_starts"][0]["phases"]["kv_cache_tokens"] == 262144
    d = rep["errors"]["engine_death"]
    assert d["count"] == 3
    assert d["first"] == "2026-11-25T09:10:00Z" and d["last"] == "2026-11-25T09:30:00Z"
    assert rep["errors"]["out_of_memory"]["count"] == 1


def died(fmt, ts, rebuild, in_flight=0, reason="engine core died (pids [12])"):
    return line(fmt, "engine_died", ts=ts, level="error", reason=reason, rebuild=rebuild, max_restarts=3,
                window_s=600.0, in_flight=in_flight)


def recovered(fmt, ts, rebuild, seconds, **phases):
    return line(fmt, "engine_recovered", ts=ts, seconds=seconds, rebuild=rebuild, **phases)


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_rebuilds_in_process_are_engine_deaths_with_outcomes(fmt):
    lines = [
        line(fmt, "listening", ts="2026-11-25T09:00:00.000Z", pid=10),
        died(fmt, "2026-11-25T09:10:00.000Z", 1, in_flight=2),
        recovered(fmt, "2026-11-25T09:10:20.500Z", 1, 20.5, engine_s=15.0, warmup_s=4.0, total_s=19.5),
        died(fmt, "2026-11-25T09:20:00.000Z", 2, reason="engine errored: EngineDeadError"),
        recovered(fmt, "2026-11-25T09:20:12.250Z", 2, 12.25, engine_s=10.0),
        # the third rebuild fails: one death (its engine_died), not two
        died(fmt, "2026-11-25T09:30:00.000Z", 3),
        line(fmt, "engine_failed", ts="2026-11-25T09:30:05.000Z", level="error", reason="engine rebuild failed",
             error="RuntimeError: no"),
        line(fmt, "stopped", ts="2026-11-25T09:30:06.000Z", exit_code=1),
        # the next process: a rebuild the log ends in the middle of
        line(fmt, "listening", ts="2026-11-25T09:40:00.000Z", pid=11),
        died(fmt, "2026-11-25T09:50:00.000Z", 1),
    ]
    rep = logs.analyze(lines)
    rb = rep["engine_rebuilds"]
    assert (rb["count"], rb["recovered"], rb["failed"], rb["unfinished"]) == (4, 2, 1, 1)
    assert [r["outcome"] for r in rb["each"]] == ["recovered", "recovered", "failed", "unfinished"]
    assert rb["seconds"]["n"] == 2 and rb["seconds"]["max"] == 20.5
    assert rb["seconds"]["p50"] == pytest.approx((20.5 + 12.25) / 2)
    first = rb["each"][0]
    assert first == {"ts": "2026-11-25T09:10:00Z", "reason": "engine core died (pids [12])", "in_flight": 2,
                     "outcome": "recovered", "seconds": 20.5,
                     "phases": {"engine_s": 15.0, "warmup_s": 4.0, "total_s": 19.5}}
    d = rep["errors"]["engine_death"]
    assert d["count"] == 4 and d["by_reason"] == {logs.REBUILT: 4}
    assert d["first"] == "2026-11-25T09:10:00Z" and d["last"] == "2026-11-25T09:50:00Z"
    assert json.loads(json.dumps(rep))["engine_rebuilds"] == rb
    text = logs.render(rep)
    assert "Engine rebuilds in-process: 4 (2 recovered, 1 failed, 1 unfinished)" in text
    assert "rebuild took (n=2): p50 16.38 s  max 20.50 s" in text
    assert "engine core died (pids [12]), 2 in flight: recovered in 20.50 s (engine 15.00 s, warmup 4.00 s" in text


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_deaths_past_the_rebuild_budget_and_after_a_fatal_exit_count_once(fmt):
    lines = [
        line(fmt, "listening", ts="2026-11-25T09:00:00.000Z", pid=10),
        died(fmt, "2026-11-25T09:10:00.000Z", 1),
        recovered(fmt, "2026-11-25T09:10:20.000Z", 1, 20.0),
        # past recovery.max_restarts: no rebuild, the process exits 1
        line(fmt, "engine_failed", ts="2026-11-25T09:20:00.000Z", level="error",
             reason="engine died: engine core died; 1 rebuild(s) in the last 600s already"),
        line(fmt, "stopped", ts="2026-11-25T09:20:01.000Z", exit_code=1),
        line(fmt, "listening", ts="2026-11-25T09:30:00.000Z", pid=11),
        # the watchdog's fatal exit writes engine_failed and no `stopped`: the restart is no second death
        line(fmt, "engine_failed", ts="2026-11-25T09:40:00.000Z", level="error", reason="watchdog: stalled"),
        line(fmt, "listening", ts="2026-11-25T09:41:00.000Z", pid=12),
        # killed without a word (SIGKILL): the restart says so
        line(fmt, "listening", ts="2026-11-25T09:50:00.000Z", pid=13),
    ]
    rep = logs.analyze(lines)
    rb = rep["engine_rebuilds"]
    assert (rb["count"], rb["recovered"], rb["failed"], rb["unfinished"]) == (1, 1, 0, 0)
    d = rep["errors"]["engine_death"]
    assert d["count"] == 4, d
    assert d["by_reason"][logs.REBUILT] == 1 and d["by_reason"]["watchdog: stalled"] == 1
    assert d["by_reason"]["restarted without a clean stop (process killed?)"] == 1


def test_no_rebuilds_reads_as_none():
    rep = logs.analyze([req("logfmt", 200, ttft_s=0.01)])
    assert rep["engine_rebuilds"] == {"count": 0, "recovered": 0, "failed": 0, "unfinished": 0,
                                      "seconds": stats.summary([]), "each": []}
    assert "Engine rebuilds in-process: 0\n" in logs.render(rep)


def test_raw_traceback_oom_and_journald_prefixes():
    lines = [
        "Nov 25 10:00:00 box qwenbox[123]: " + req("logfmt", 200, ttft_s=0.01),
        "Nov 25 10:00:01 box qwenbox[123]: " + req("json", 429, ts="2026-11-25T10:00:01.000Z", reason="queue_full"),
        "Nov 25 10:00:02 box qwenbox[123]: (EngineCore pid=130) ERROR 11-25 10:00:02 [core.py:1] "
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB",
        "Nov 25 10:00:02 box qwenbox[123]: (EngineCore pid=130) WARNING reduce max_num_seqs to avoid OOM",
        "plain noise that is not ours",
        "",
    ]
    rep = logs.analyze(lines)
    assert rep["requests"]["by_status"] == {"200": 1, "429": 1}
    assert rep["errors"]["queue_full"]["by_reason"] == {"queue_full": 1}
    assert rep["errors"]["out_of_memory"]["count"] == 1
    assert rep["lines"]["structured"] == 2


def test_a_429_is_its_request_line():
    """Admission's refusals are request lines (status 429, a reason); no other event names
    them, and a line of an event the daemon never writes counts for nothing."""
    lines = [line("logfmt", "rejected", id="r1", reason="queue_timeout"),
             req("logfmt", 429, id="r1", reason="queue_timeout"),
             req("json", 429, id="r2", reason="queue_full"),
             req("json", 429, id="r3", reason="queue_full", session="s-1")]
    rep = logs.analyze(lines)
    assert rep["errors"]["queue_full"]["count"] == 3
    assert rep["errors"]["queue_full"]["by_reason"] == {"queue_full": 2, "queue_timeout": 1}
    assert rep["requests"]["sessions"] == 1
    assert rep["lines"]["events"] == {"rejected": 1, "request": 3}


def test_missing_and_unknown_fields_are_tolerated():
    lines = ['ts=2026-11-25T10:00:00Z event=request status=200',                  # no latency, no id
             'ts=2026-11-25T10:00:01Z event=request status=oops latency_s=abc',    # garbage values
             '{"event": "request", "status": 500, "brand_new_field": {"x": 1}}',   # no ts
             'ts=2026-11-25T10:00:02Z event=something_new weird=1',
             '{"event": "cold_start"}']
    rep = logs.analyze(lines)
    assert rep["requests"]["total"] == 3
    assert rep["requests"]["by_status"] == {"200": 1, "500": 1, "unknown": 1}
    assert rep["cold_starts"][0]["phases"] == {}
    logs.render(rep)   # renders without the usual fields


def test_histogram():
    xs = [0.01 * (i + 1) for i in range(100)]
    h = logs.histogram(xs)
    assert sum(b["count"] for b in h) == 100
    assert all(b["lo"] < b["hi"] for b in h)
    assert h[0]["lo"] <= min(xs) and h[-1]["hi"] > max(xs)


def test_cli_plot_and_missing_matplotlib(tmp_path, monkeypatch, capsys):
    f = tmp_path / "q.log"
    f.write_text("\n".join([req("logfmt", 200, ttft_s=0.01, latency_s=0.1 * (i + 1)) for i in range(5)]) + "\n")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)   # import matplotlib -> ImportError
    assert cli.main(["logs", str(f), "--plot", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "matplotlib" in err
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert cli.main(["logs", str(f), "--plot", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ a real run
def _start_stream(sock, body):
    """Send a streaming request on a raw socket and read until its first SSE event."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(sock)
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"X-Request-Id: test-abort-1\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    got = b""
    while b"data: " not in got:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got[:100]
    return s


@pytest.mark.engine
def test_analyzer_on_a_real_run(tmp_path, demo_model, capsys):
    # One request in flight, no queue: a second concurrent request gets 429 queue_full.
    d = Daemon(tmp_path / "d", sections={"admission": {"max_in_flight": 1, "max_queued": 0}},
               extra_args=["--no-warmup"]).start()
    try:
        d.wait_ready()
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
        sent = {}
        for body in (chat, {**chat, "stream": True}, {**chat, "temperature": 0.0}):
            assert request(d.sock, "POST", "/v1/chat/completions", body)[0] == 200
        assert request(d.sock, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4})[0] == 200
        sent[200] = 4
        assert request(d.sock, "POST", "/v1/chat/completions", raw=b"{not json")[0] == 400
        assert request(d.sock, "POST", "/v1/chat/completions", {**chat, "max_tokens": 0})[0] == 400
        sent[400] = 2
        assert request(d.sock, "POST", "/v1/chat/completions", {**chat, "model": "nope"})[0] == 404
        sent[404] = 1
        # a long stream holds the only slot; meanwhile one more request is refused; then the client leaves
        s = _start_stream(d.sock, {**chat, "stream": True, "max_tokens": 1000, "ignore_eos": True})
        status, _, body = request(d.sock, "POST", "/v1/chat/completions", chat)
        assert status == 429, body
        sent[429] = 1
        s.close()
        sent[499] = 1
        deadline = time.monotonic() + 30   # the abort frees the slot
        while request(d.sock, "POST", "/v1/chat/completions", chat)[0] == 429 and time.monotonic() < deadline:
            time.sleep(0.2)
        sent[200] += 1
    finally:
        assert d.stop() == 0

    rep = logs.analyze(logs.read_files([str(d.log_path)]))
    n = sum(sent.values())
    # retries of the last request that met the not-yet-freed slot are 429s too
    extra_429 = rep["requests"]["by_status"].get("429", 0) - sent[429]
    assert rep["requests"]["total"] == n + extra_429
    assert rep["requests"]["by_status"] == {str(k): v + (extra_429 if k == 429 else 0) for k, v in sorted(sent.items())}
    e = rep["errors"]
    assert e["client_abort"]["count"] == 1
    assert e["queue_full"]["count"] == 1 + extra_429
    assert e["queue_full"]["by_reason"] == {"queue_full": 1 + extra_429}
    assert e["client_error_4xx"]["count"] == 3
    assert e["client_error_4xx"]["by_status"] == {"400": 2, "404": 1}
    for c in ("out_of_memory", "prefill_failure", "engine_death", "server_error_5xx"):
        assert e[c]["count"] == 0, (c, e[c])
    assert len(rep["cold_starts"]) == 1
    assert {"import_s", "engine_s", "total_s"} <= set(rep["cold_starts"][0]["phases"])
    lat = rep["latency"]["ok"]
    assert lat["n"] == sent[200]
    assert lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert rep["latency"]["ttft_ok"]["n"] == sent[200]
    assert sum(h["requests"] for h in rep["traffic_per_hour"]) == rep["requests"]["total"]
    assert sum(b["count"] for b in rep["latency"]["histogram"]) == sent[200]

    # the command line gives the same figures, as JSON and as text
    assert cli.main(["logs", str(d.log_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == rep["requests"]
    assert cli.main(["logs", str(d.log_path)]) == 0
    text = capsys.readouterr().out
    assert "Cold starts: 1" in text and "client aborts (499)" in text
