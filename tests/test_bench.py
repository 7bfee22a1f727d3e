"""`qwenbox bench`: the load benchmark against the shared daemon with a tiny bounded load
(the JSON has its fields and sane relations; no timing thresholds), option checks, and the
pure parts (prompt mixes, figures, the comparison table) on synthetic data."""
import json
import math

import pytest

from qwenbox import cli
from qwenbox.tools.bench import load as L
from qwenbox.tools.bench import startup as S
from qwenbox.tools.bench.workload import OptionError
from qwenbox.tools.client import Result
from qwenbox.config import load


def _check_dist(d):
    assert set(d) >= {"n", "p50", "p95", "p99", "mean"}
    if d["n"]:
        assert d["min"] <= d["p50"] <= d["p95"] <= d["p99"] <= d["max"]


def _check_phase(p):
    assert p["sent"] == p["ok"] + p["failed"]
    assert sum(p["failures_by_status"].values()) == p["failed"]
    assert sum(p["rejected_by_reason"].values()) == p["failures_by_status"].get("429", 0)
    assert p["sent"] + p["not_started"] == p["planned"]
    assert p["failure_rate"] == pytest.approx(p["failed"] / p["sent"])
    for key in ("ttft_s", "itl_s", "e2e_s", "prompt_tokens"):
        _check_dist(p[key])
    assert p["ttft_s"]["n"] == p["ok"] == p["e2e_s"]["n"]
    if p["ok"]:
        assert p["ttft_s"]["p50"] <= p["e2e_s"]["max"]
        assert p["requests_per_s"] == pytest.approx(p["ok"] / p["wall_s"])
        assert p["output_tokens_per_s"] == pytest.approx(p["output_tokens"] / p["wall_s"])
    assert sum(t["sent"] for t in p["by_tag"].values()) == p["sent"]


@pytest.mark.engine
def test_load_bench_against_the_daemon(daemon, tmp_path, capsys):
    out = tmp_path / "load.json"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello there", "tag": "short"}\n'
                       '# a comment\n\n'
                       '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": '
                       '"summarize the following text in one sentence"}], "max_tokens": 3, "tag": "chat"}\n')
    rc = cli.main(["bench", "load", "--socket", daemon.sock, "--out", str(out), "--levels", "1,2",
                   "--per-level", "3", "--mix-requests", "4", "--prompts", str(prompts), "--burst", "4",
                   "--max-tokens", "4", "--phase-time-limit", "60", "--request-timeout", "60",
                   "--gpu-hour-cost", "2.5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "requests/day" in text and "per 1k requests" in text
    res = json.loads(out.read_text())
    assert res["kind"] == "load" and len(res["runs"]) == 1
    load_ = res["runs"][0]["load"]
    assert [p["concurrency"] for p in load_["sweep"]] == [1, 2]
    phases = [*load_["sweep"], load_["mix"], load_["burst"]]
    for p in phases:
        _check_phase(p)
    assert load_["burst"]["concurrency"] == 4 and load_["burst"]["sent"] == 4
    assert load_["mix"]["sent"] == 4 and set(load_["mix"]["by_tag"]) <= {"short", "chat"}
    assert load_["best_concurrency"] in (1, 2)
    ok = [p for p in phases if p["ok"]]
    assert ok, "the demo daemon answered no request at all"
    for p in ok:
        assert p["output_tokens"] > 0
    e = load_["economics"]
    if e["requests_per_s"]:
        assert e["requests_per_s"] == pytest.approx(load_["mix"]["requests_per_s"])
        assert e["requests_per_day"] == pytest.approx(e["requests_per_s"] * 86400)
        assert e["cost_per_1k_requests"] == pytest.approx(2.5 / (e["requests_per_s"] * 3600) * 1000)
        assert e["cost_per_request"] * 1000 == pytest.approx(e["cost_per_1k_requests"])


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nothing": 1}\n')
    for argv in (["--levels", "1,x"], ["--levels", "0"], ["--burst", "100000"], ["--mix", "a:b:c"],
                 ["--prompts", str(bad)], ["--prompts", str(tmp_path / "missing.jsonl")]):
        assert cli.main(["bench", "load", "--socket", "/nonexistent.sock", *argv]) == 2
        out = capsys.readouterr().out.strip()
        assert out.startswith("qwenbox bench load: ") and len(out.splitlines()) == 1
    assert cli.main(["bench", "load", "--socket", "/x", "--prompts", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().out


def test_every_mode_is_checked_before_anything_starts(capsys):
    # a missing config would end a run that got past the checks with 78, not 2
    missing = ["--config", "/nonexistent/qwenbox.toml"]
    for argv, mode in ((["startup", "--throughput-concurrency", "100000"], "startup"),
                       (["startup", "--throughput-repeats", "0"], "startup"),
                       (["all", "--burst", "100000"], "load"),
                       (["--after-ready", "-1"], "startup")):
        assert cli.main(["bench", *argv, *missing]) == 2
        out = capsys.readouterr().out.strip()
        assert out.startswith(f"qwenbox bench {mode}: ") and len(out.splitlines()) == 1, out


def _result(ok=True, failure=None, code=None, e2e=0.5, ttft=0.1, tag="t", tokens=4):
    return Result(ok=ok, status=200 if ok else None, failure=failure, error_code=code, ttft_s=ttft if ok else None,
                    e2e_s=e2e, itl_s=[0.01, 0.02] if ok else [], prompt_tokens=10, output_tokens=tokens if ok else 0,
                    tag=tag)


def test_phase_figures_add_up():
    rs = [_result(e2e=0.1 * i) for i in range(1, 8)]
    rs += [_result(False, "429", "queue_full"), _result(False, "429", "queue_full"),
           _result(False, "429", None), _result(False, "timeout"), _result(False, "stream_error", "generation_failed")]
    f = L.phase_figures(rs, wall_s=2.0)
    assert f["sent"] == 12 and f["ok"] == 7 and f["failed"] == 5
    assert f["failures_by_status"] == {"429": 3, "stream_error": 1, "timeout": 1}
    assert f["rejected_by_reason"] == {"queue_full": 2, "unspecified": 1}
    assert f["requests_per_s"] == 3.5 and f["output_tokens"] == 28
    assert f["e2e_s"]["p50"] == pytest.approx(0.4) and f["e2e_s"]["p95"] >= f["e2e_s"]["p50"]
    assert f["itl_s"]["n"] == 14


def test_best_level_economics_and_comparison():
    sweep = [{"concurrency": 1, "sent": 4, "ok": 4, "failed": 0, "requests_per_s": 2.0},
             {"concurrency": 4, "sent": 4, "ok": 4, "failed": 0, "requests_per_s": 5.0},
             {"concurrency": 8, "sent": 4, "ok": 3, "failed": 1, "requests_per_s": 6.0}]
    assert L.best_level(sweep) == 4
    e = L.economics({"requests_per_s": 2.0, "output_tokens_per_s": 64.0}, gpu_hour_cost=3.6)
    assert e["requests_per_day"] == 172800 and e["cost_per_request"] == pytest.approx(0.0005)
    assert e["cost_per_1k_requests"] == pytest.approx(0.5)
    assert L.economics({"requests_per_s": 0}, 1.0)["cost_per_request"] is None

    def run(rps, p95, burst_fail):
        return {"launch_to_ready_s": 30.0, "load": {"economics": L.economics({"requests_per_s": rps}, 1.0),
                                                    "mix": {"e2e_s": {"p95": p95}, "ttft_s": {"p95": 0.1},
                                                            "itl_s": {"p95": 0.01}},
                                                    "burst": {"failure_rate": burst_fail, "e2e_s": {"p95": 2.0}}}}
    rows = {r["metric"]: r for r in L.comparison(run(2.0, 1.0, 0.0), run(4.0, 0.5, 0.25))}
    assert rows["requests/day (mix)"]["b_over_a"] == pytest.approx(2.0)
    assert rows["cost per request"]["b_over_a"] == pytest.approx(0.5)
    assert rows["P95 latency (mix, end to end)"]["b_over_a"] == pytest.approx(0.5)
    assert rows["failure rate under the burst"]["b_over_a"] is None        # 0.25 / 0: no ratio
    assert "B / A" in L.compare_table(list(rows.values()), "a.toml", "b.toml")


def test_prompt_mix_is_deterministic_and_bounded():
    class A:
        seed, mix, prompts, max_tokens, sweep_words = 7, "s:4:0.5,l:40:0.5", None, 8, 12
    a = L.mix_specs(A, 50, cap=20)
    b = L.mix_specs(A, 50, cap=20)
    assert [x.messages for x in a] == [x.messages for x in b]
    assert {x.tag for x in a} == {"s", "l"}
    assert max(len(x.messages[0]["content"].split()) for x in a) <= 21   # salt + capped words
    assert len({x.messages[0]["content"] for x in a}) == 50              # no shared prefixes
    with pytest.raises(OptionError):
        L.parse_mix("a:0:1")


def test_vllm_server_gets_our_engine_settings():
    from helpers import DEMO_CONFIG
    cfg = load(DEMO_CONFIG)
    argv = S.vllm_argv(cfg, "/tmp/v.sock")
    joined = " ".join(argv)
    assert "vllm.entrypoints.openai.api_server" in joined and "--uds /tmp/v.sock" in joined
    assert f"--max-model-len {cfg.model.max_model_len}" in joined
    assert f"--block-size {cfg.engine.block_size}" in joined and "--enforce-eager" in argv
    assert f"--kv-cache-memory-bytes {int(cfg.engine.kv_cache_memory_gib * (1 << 30))}" in joined
    assert f"--served-model-name {cfg.model.name}" in joined


def test_startup_ttft_figures():
    f = S.ttft_figures([0.5, 0.1, 0.2, None, 0.3])
    assert f["first_ttft_s"] == 0.5 and f["median_next_ttft_s"] == 0.2 and f["next_n"] == 3
    assert math.isclose(f["first_over_median"], 2.5)
