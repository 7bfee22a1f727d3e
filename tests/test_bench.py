"""`qwenbox bench`: the load benchmark against the shared daemon with a tiny bounded load
(the JSON has its fields and sane relations; no timing thresholds), option checks, and the
pure parts (prompt mixes, figures, the comparison table) on synthetic data."""
import json
import math
from pathlib import Path

import pytest

from helpers import DEMO_MODEL
from qwenbox import cli
from qwenbox.config import load
from qwenbox.tools.bench import load as L, startup as S
from qwenbox.tools.bench.workload import OptionError
from qwenbox.tools.client import Result


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
                   "--gpu-hour-cost", "2.5", "--tokenizer", str(DEMO_MODEL)])
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
    assert [p["sent"] for p in load_["sweep"]] == [3, 4][:len(load_["sweep"])]    # max(per-level, 2 x level)
    assert load_["prompt_kind"] == "ids"
    check = load_["prompt_check"]
    assert check["synthetic"]["distinct"] == check["synthetic"]["n"] == 3 + 4
    assert check["file"]["distinct"] == 2 and check["file"]["requests"] == 8 and check["file"]["repeats"] == 6
    d = load_["decision"]
    assert d["p95_latency_concurrency_1_s"] == load_["sweep"][0]["e2e_s"]["p95"]
    assert d["highest_stable_concurrency"] == load_["highest_stable_concurrency"]
    assert d["burst_size"] == 4 and d["burst_failure_rate"] == load_["burst"]["failure_rate"]
    assert d["gpu_hour_cost"] == 2.5 and d["gpu_hour_cost_source"] == "--gpu-hour-cost"
    assert (d["gpu_memory_idle_mib"] is None) == (d["gpu_memory_idle_note"] is not None)
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


def test_compare_entries_are_checked_before_anything_starts(tmp_path, capsys):
    from helpers import DEMO_CONFIG
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\nmax_num_seqs = 0\n")
    for entries, says in ((["vllm-defaults"], "2 to 4"), ([str(DEMO_CONFIG)] * 5, "2 to 4"),
                          (["vllm-defaults", "vllm-defaults"], "at most once"),
                          (["vllm-defaults", str(bad)], "bad.toml:2: engine.max_num_seqs"),
                          ([str(DEMO_CONFIG), str(tmp_path / "missing.toml")], "missing.toml")):
        assert cli.main(["bench", "load", "--compare", *entries]) == 2
        out = capsys.readouterr().out.strip()
        assert out.startswith("qwenbox bench load: --compare") and says in out and len(out.splitlines()) == 1, out


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_load_compare_puts_a_profile_beside_vllm_serve_defaults(tmp_path, capsys):
    """Issue 16's cost table: `vllm serve MODEL` with its defaults, then the demo profile
    with a tuned drop-in over it, one after the other, the second over the first."""
    from helpers import write_config
    from qwenbox.tools.bench import servers
    (tmp_path / "tuned" / "conf.d").mkdir(parents=True)
    tuned = write_config(tmp_path / "tuned" / "qwenbox.toml")
    (tmp_path / "tuned" / "conf.d" / "90-tuned.toml").write_text("[engine]\nmax_num_batched_tokens = 1024\n"
                                                                  "[admission]\nmax_in_flight = 4\n")
    out = tmp_path / "load.json"
    rc = cli.main(["bench", "load", "--compare", "vllm-defaults", str(tuned), "--out", str(out),
                   "--levels", "1,2", "--per-level", "2", "--mix-requests", "3", "--burst", "3", "--max-tokens",
                   "3", "--sweep-words", "16", "--mix", "s:16:1", "--phase-time-limit", "120",
                   "--request-timeout", "120"])
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    res = json.loads(out.read_text())
    vllm, tuned_run = res["runs"]
    assert vllm["config"] == "vllm-defaults" and vllm["argv"][:3] == ["-m", "vllm.entrypoints.openai.api_server",
                                                                     "--model"]
    assert vllm["argv"][6:] == list(servers.CPU_BACKEND_FLAGS)        # nothing else of ours reaches it
    assert [r["label"] for r in res["runs"]] == ["A", "B"] and tuned_run["config"].endswith("tuned/qwenbox.toml")
    for r in res["runs"]:
        load_ = r["load"]
        assert load_["mix"]["sent"] == 3 and load_["mix"]["ok"] == 3, r["label"]
        assert load_["decision"]["highest_stable_concurrency"] in (1, 2)
        assert r["server_exit_code"] is not None
    [rows] = res["comparisons"]
    assert rows == res["comparison"] and len(rows) == len(L.COMPARE_ROWS)
    cost = next(row for row in rows if row["metric"] == "cost per 1k requests")
    assert (cost["a"], cost["b"]) == (vllm["load"]["economics"]["cost_per_1k_requests"],
                                      tuned_run["load"]["economics"]["cost_per_1k_requests"])
    assert "A: vllm-defaults" in text and "B: qwenbox.toml" in text and "B / A" in text


def test_a_three_way_comparison_puts_each_run_over_the_first():
    def run(rps, empty):
        return {"launch_to_ready_s": 30.0, "cache_dir_at_launch": {"empty": empty},
                "load": {"economics": L.economics({"requests_per_s": rps}, 1.0)}}
    a, b, c = run(2.0, True), run(4.0, False), run(3.0, True)
    text = L.compare_table_n([L.comparison(a, b, ("A", "B")), L.comparison(a, c, ("A", "C"))],
                             ["vllm-defaults", "shipped.toml", "tuned.toml"])
    head, _, *rows = text.splitlines()[1:]
    assert head.split() == ["metric", "A:", "vllm-defaults", "B:", "shipped.toml", "C:", "tuned.toml", "B", "/", "A",
                            "C", "/", "A"]
    day = next(r for r in rows if r.startswith("requests/day"))
    assert day.split()[-2:] == ["2.00x", "1.50x"]
    launch = next(r for r in rows if r.startswith("launch to ready"))
    assert "A empty caches, B warm: no ratio" in launch and launch.endswith("1.00x")      # A and C both empty


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
    assert rows["requests/day (mix at that concurrency)"]["b_over_a"] == pytest.approx(2.0)
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
    from qwenbox.engine import engine_args_dict
    from qwenbox.tools.bench import servers
    cfg = load(DEMO_CONFIG)
    argv = S.vllm_argv(cfg, "/tmp/v.sock")
    joined = " ".join(argv)
    assert "vllm.entrypoints.openai.api_server" in joined and "--uds /tmp/v.sock" in joined
    assert f"--max-model-len {cfg.model.max_model_len}" in joined
    assert f"--block-size {cfg.engine.block_size}" in joined and "--enforce-eager" in argv
    assert f"--kv-cache-memory-bytes {int(cfg.engine.kv_cache_memory_gib * (1 << 30))}" in joined
    assert f"--served-model-name {cfg.model.name}" in joined
    assert "--scheduling-policy priority" in joined       # what qwenbox gives AsyncLLM, so vLLM's server too
    # every engine argument qwenbox passes has a decided flag, also the optional ones
    import dataclasses
    full = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, kv_offload_gib=1.0, quantization="fp8",
                                                               performance_mode="interactivity",
                                                               max_cudagraph_capture_size=1024))
    assert set(engine_args_dict(full)) <= set(servers.VLLM_FLAGS)
    flags = " ".join(servers.vllm_argv(full, "/s"))
    assert "--performance-mode interactivity --max-cudagraph-capture-size 1024" in flags
    assert "--kv-offloading-size 1.0" in " ".join(servers.vllm_argv(full, "/s"))
    assert "--quantization fp8" in " ".join(servers.vllm_argv(full, "/s"))
    prod = load(Path(__file__).parent.parent / "etc" / "qwenbox" / "qwenbox.toml")
    assert "--no-enforce-eager" in servers.vllm_argv(prod, "/s")
    assert servers.vllm_env()["VLLM_USE_FLASHINFER_SAMPLER"] == "0"


def test_cache_state_is_private_and_says_when_it_is_empty(tmp_path):
    from qwenbox.tools.bench.servers import CacheState
    c = CacheState(tmp_path / "c")
    env = c.env()
    for var in ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE",
                "CUDA_CACHE_PATH", "XDG_CACHE_HOME", "HOME"):
        assert env[var].startswith(str(tmp_path / "c")), var
    assert env["VLLM_CACHE_ROOT"] == str(c.vllm_dir) and env["PYTHONUSERBASE"]
    snap = c.snapshot()
    assert snap["empty"] and not snap["dirs"]["HOME"]["exists"]
    c.create()
    (c.vllm_dir / "torch_compile_cache").mkdir()
    assert c.snapshot()["empty"]                 # directories alone are not a filled cache
    (c.vllm_dir / "torch_compile_cache" / "x.bin").write_bytes(b"12345")
    snap = c.snapshot()
    assert not snap["empty"] and snap["dirs"]["VLLM_CACHE_ROOT"] == {"path": str(c.vllm_dir), "exists": True,
                                                                     "files": 1, "bytes": 5}


def test_derived_config_resolves_paths_and_checks_overrides(tmp_path):
    from helpers import DEMO_CONFIG
    from qwenbox.config import ConfigError
    from qwenbox.tools.bench.servers import derived_config
    p = derived_config(DEMO_CONFIG, tmp_path / "d.toml", {"engine": {"cache_dir": str(tmp_path / "cache")}})
    cfg, orig = load(p), load(DEMO_CONFIG)
    assert cfg.engine.cache_dir == str(tmp_path / "cache") and cfg.model.path == orig.model.path
    assert cfg.admission == orig.admission and cfg.engine.max_num_seqs == orig.engine.max_num_seqs
    with pytest.raises(ConfigError):
        derived_config(DEMO_CONFIG, tmp_path / "bad.toml", {"engine": {"max_num_seqs": -1}})
    assert not list(tmp_path.glob("*.tmp"))


def test_stepped_sweep_finds_the_highest_stable_level():
    def lvl(c, fail=0, p95=1.0, not_started=0):
        return {"concurrency": c, "sent": 10, "failed": fail, "failure_rate": fail / 10, "not_started": not_started,
                "e2e_s": {"p95": p95}}
    sweep = [lvl(1), lvl(2, p95=4.0), lvl(4, p95=6.0), lvl(8)]
    for p in sweep:
        p["unstable_because"] = L.stability(p, p95_bound=5.0)
    assert [p["unstable_because"] is None for p in sweep] == [True, True, False, True]
    assert "P95 latency" in sweep[2]["unstable_because"]
    assert L.highest_stable(sweep) == 2            # the level after the first unstable one does not count
    assert "failure rate" in L.stability(lvl(1, fail=1), 5.0)          # 10 % >= 1 %
    assert "not started" in L.stability(lvl(1, not_started=3), 5.0)
    first_bad = [lvl(1, fail=5)]
    first_bad[0]["unstable_because"] = L.stability(first_bad[0], 5.0)
    assert L.highest_stable(first_bad) is None


def test_burst_defaults_to_ten_times_the_stable_level():
    class A:
        burst, burst_factor = None, 10
    assert L.burst_size(A, 16, [1, 2, 4, 8, 16, 32]) == 160
    assert L.burst_size(A, None, [2, 4]) == 20
    assert L.burst_size(A, 512, [512]) == 4096       # workload.MAX_BURST
    A.burst = 0
    assert L.burst_size(A, 16, [16]) == 0


def test_launch_to_ready_has_no_ratio_across_cache_states():
    def run(t, empty):
        return {"launch_to_ready_s": t, "cache_dir_at_launch": {"empty": empty}, "load": {}}
    row = next(r for r in L.comparison(run(100.0, True), run(40.0, False)) if r["metric"] == "launch to ready")
    assert row["b_over_a"] is None and "no ratio" in row["note"]
    row = next(r for r in L.comparison(run(50.0, False), run(40.0, False)) if r["metric"] == "launch to ready")
    assert row["b_over_a"] == pytest.approx(0.8)


def test_startup_ttft_figures():
    f = S.ttft_figures([0.5, 0.1, 0.2, None, 0.3])
    assert f["first_ttft_s"] == 0.5 and f["median_next_ttft_s"] == 0.2 and f["next_n"] == 3
    assert math.isclose(f["first_over_median"], 2.5)


def _startup_result():
    """A `bench startup` result with round figures, shaped as main() writes it."""
    def tp(rps, p50, p95):
        return {"requests": 8, "ok": 8, "requests_per_s": rps, "output_tokens_per_s": rps * 32,
                "e2e_s": {"p50": p50, "p95": p95}, "requests_per_s_runs": [rps]}
    ttft = {"first_ttft_s": 0.03, "median_next_ttft_s": 0.02, "first_over_median": 1.5}
    res = {"params": {"after_ready": 20, "throughput_requests": 8, "throughput_concurrency": 2, "max_tokens": 32,
                      "throughput_repeats": 1}, "errors": {},
           "qwenbox": {"launch_to_listen_s": 0.5, "launch_to_ready_s": 30.0, "caches_at_launch": {"empty": True},
                       "cold_start": {"import_s": 5.0, "kv_cache_tokens": 1024},
                       "ttft": {**ttft, "server_side": {**ttft, "first_over_median": 1.25}},
                       "throughput": {**tp(8.0, 0.2, 0.4), "server_side_e2e_s": {"n": 8, "p50": 0.15, "p95": 0.3}}},
           "qwenbox_warm": {"launch_to_ready_s": 20.0, "cold_start": {"import_s": 4.0}},
           "qwenbox_no_warmup": {"launch_to_ready_s": 15.0, "ttft": {**ttft, "first_over_median": 3.0}},
           "vllm_server": {"launch_to_ready_s": 60.0, "ttft": ttft},
           "vllm_server_warm": {"launch_to_ready_s": 40.0},
           "in_process": {"ttft": ttft, "throughput": tp(10.0, 0.1, 0.2)}}
    res["ratios"] = S.ratios(res)
    return res


def test_startup_ratios_come_from_their_table():
    r = _startup_result()["ratios"]
    assert list(r) == [x.key for x in S.RATIOS]
    assert r["first_ttft_over_median_warm"] == 1.5 and r["first_ttft_over_median_no_warmup"] == 3.0
    assert r["first_ttft_over_median_warm_server_side"] == 1.25
    assert r["api_over_in_process_requests_per_s"] == pytest.approx(0.8)
    assert r["api_over_in_process_p50"] == pytest.approx(2.0) and r["api_over_in_process_p95"] == pytest.approx(2.0)
    assert r["api_server_side_over_in_process_p50"] == pytest.approx(1.5)
    # launch to ready only against vLLM's launch from the same cache state
    assert r["launch_to_ready_cold_qwenbox_over_vllm"] == pytest.approx(0.5)
    assert r["launch_to_ready_warm_qwenbox_over_vllm"] == pytest.approx(0.5)
    assert r["launch_to_ready_warm_qwenbox_no_warmup_over_vllm"] == pytest.approx(0.375)
    res = _startup_result()
    del res["vllm_server_warm"]
    assert S.ratios(res)["launch_to_ready_warm_qwenbox_over_vllm"] is None


def test_startup_report_prints_each_table_from_the_same_figures():
    lines = S.report(_startup_result()).splitlines()

    def row(label, after=""):
        start = lines.index(after) if after else 0
        return next(line.split("  ") for line in lines[start:] if line.startswith(label))

    def cells(label, after=""):
        return [c.strip() for c in row(label, after) if c.strip()][1:]

    assert cells("import_s") == ["5.00 s", "4.00 s"] and cells("kv_cache_tokens") == ["1,024", "-"]
    assert "median of next 20" in next(line for line in lines if line.startswith("server  "))
    assert cells("qwenbox serve --no-warmup") == ["30.0 ms", "20.0 ms", "3.00x", "-", "-", "-"]
    assert cells("ratio API / in-process") == ["0.80x", "2.00x", "2.00x"]
    assert cells("qwenbox API, its own log") == ["150.0 ms", "300.0 ms", "8"]
    launch = next(line for line in lines if line.startswith("Launch to ready"))
    assert cells("qwenbox serve (pre-warm)", launch) == ["cold (empty at launch)", "500.0 ms", "30.00 s", "0.50x"]
    assert cells("qwenbox serve --no-warmup", launch) == ["warm", "-", "15.00 s", "0.38x"]
    assert cells("vLLM OpenAI server", launch)[-1] == "1.00x"


# ---------------------------------------------------------------- the prompt check (real tokenizers)
def _word_level_tokenizer(path):
    """A tokenizer like the GPU test model's old one: a few words known, every other word
    the same unknown id - English prompts collapse to the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "\n": 3, "user": 4, "system": 5, "assistant": 6}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                                                 "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                                                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.save_pretrained(path)
    return path


def test_prompt_sets_pass_with_the_demo_tokenizer():
    from qwenbox.tools.bench import tokens as T
    tok = T.load_tokenizer(str(DEMO_MODEL))
    cfg = load(Path(__file__).parent.parent / "etc" / "qwenbox" / "demo.toml")

    class A:
        seed, prompt_words, after_ready, throughput_requests, throughput_repeats, tokenizer = 0, 24, 20, 16, 2, None
    facts = S.check_prompts(cfg, A)       # what `bench startup` checks before it starts a server
    assert facts["ttft"]["distinct"] == facts["ttft"]["n"] == 21
    assert facts["throughput"]["distinct"] == facts["throughput"]["n"] == 32
    assert facts["ttft"]["max_shared_prefix_tokens"] // 32 <= facts["ttft"]["allowed_prefix_tokens"] // 32
    # random token ids: exactly the length asked for, ordinary ids only, distinct
    info = T.tok_info(tok)
    import random
    ids = T.random_id_prompts(50, 40, info, random.Random(1))
    assert all(len(x) == 40 and all(info.ordinary(i) for i in x) for x in ids)
    assert T.check_prompt_set(ids, "ids")["max_shared_prefix_tokens"] < 16


def test_a_prompt_files_lines_may_repeat_but_must_differ(tmp_path):
    from qwenbox.tools.bench import tokens as T
    tok = T.load_tokenizer(str(DEMO_MODEL))
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hello there"}\n{"prompt": "summarize this"}\n')
    specs = L.load_prompts(str(f), 4) + L.load_prompts(str(f), 4) + L.load_prompts(str(f), 4)[:1]
    facts = L.check_specs(tok, specs, block_size=16)["file"]
    assert (facts["distinct"], facts["requests"], facts["repeats"]) == (2, 5, 3)
    words = T.load_tokenizer(str(_word_level_tokenizer(tmp_path / "tok")))   # both lines: two unknown words
    with pytest.raises(T.PromptSetError, match="only 1 distinct"):
        L.check_specs(words, L.load_prompts(str(f), 4), block_size=16)


def test_prompt_sets_that_collapse_are_refused(tmp_path):
    from qwenbox.tools.bench import tokens as T
    tok = T.load_tokenizer(str(_word_level_tokenizer(tmp_path / "tok")))
    cfg = load(Path(__file__).parent.parent / "etc" / "qwenbox" / "demo.toml")

    class A:
        seed, prompt_words, after_ready = 0, 24, 20
    msgs = S.ttft_messages(cfg, A)
    assert len({m[-1]["content"] for m in msgs}) == 21               # distinct texts ...
    with pytest.raises(T.PromptSetError, match=r"21 prompts are only \d+ distinct token sequences"):
        T.check_chat_set(tok, msgs, "ttft")                           # ... the same ids
    # a shared prefix past the template: refused when it fills a KV block, allowed below one
    base = list(range(100, 140))
    with pytest.raises(T.PromptSetError, match="KV block"):
        T.check_prompt_set([[*base, 1], [*base, 2]], "shared", allowed_prefix=0, block_size=16)
    assert T.check_prompt_set([[*base[:10], 1], [*base[:10], 2]], "short", allowed_prefix=0, block_size=16)
    assert T.check_prompt_set([[*base, 1], [*base, 2]], "system", allowed_prefix=40, block_size=16)
    with pytest.raises(T.PromptSetError, match="cannot load the tokenizer"):
        T.load_tokenizer(str(tmp_path / "missing"))


def test_the_benchmarks_refuse_to_measure_with_such_prompts(tmp_path, capsys):
    bad_tok = str(_word_level_tokenizer(tmp_path / "tok"))
    demo = str(Path(__file__).parent.parent / "etc" / "qwenbox" / "demo.toml")
    # load: refused before any daemon starts (this test may not start one)
    assert cli.main(["bench", "load", "--config", demo,
                     "--tokenizer", bad_tok, "--prompt-kind", "text", "--out", str(tmp_path / "l.json")]) == 2
    out = capsys.readouterr().out
    assert "qwenbox bench load: prompt set" in out and "distinct token sequences" in out
    assert not (tmp_path / "l.json").exists()
    # startup: the same
    assert cli.main(["bench", "startup", "--config", demo,
                     "--tokenizer", bad_tok, "--out", str(tmp_path / "s.json")]) == 2
    assert "qwenbox bench startup: prompt set" in capsys.readouterr().out


def test_a_socket_nobody_listens_on_is_one_line(tmp_path, capsys):
    rc = cli.main(["bench", "load", "--socket", str(tmp_path / "none.sock"), "--tokenizer", str(DEMO_MODEL),
                   "--out", str(tmp_path / "l.json")])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 1 and out[-1].startswith(f"qwenbox bench load: cannot drive the server on {tmp_path / 'none.sock'}")


def test_gpu_suite_set_up_in_gpu_mode(tmp_path):
    """What the smoke run cannot reach: the GPU mode's configs (tests/gpu/make_configs.py),
    the derived per-server configs, and the in-process worker's command line."""
    import argparse
    import sys
    sys.path.insert(0, str(Path(__file__).parent / "gpu"))
    import suite
    model = tmp_path / "qwen3-4b"
    model.mkdir()
    (model / "config.json").write_text("{}")       # enough for the config check; nothing loads it here
    a = argparse.Namespace(out=str(tmp_path / "s"), smoke=False, model=str(model), drop_page_cache=False)
    st = suite.Setup(a)
    assert st.tuned_src.exists() and st.untuned_src.exists()
    cache = st.cache("qwenbox")
    cfg = load(st.config("qwenbox", st.tuned_src, cache))
    assert cfg.model.path == str(model) and cfg.engine.cache_dir == str(cache.vllm_dir)
    assert cfg.engine.max_num_seqs == "auto" and not cfg.engine.enforce_eager    # the shipped profile
    untuned = load(st.config("untuned", st.untuned_src, st.cache("untuned")))
    assert untuned.model.max_model_len == 262144 and not untuned.warmup.enabled
    sleep = load(st.config("s", st.tuned_src, cache, {"engine": {"enable_sleep_mode": True},
                                                      "standby": {"idle_sleep_after_s": 10.0}}))
    assert sleep.engine.enable_sleep_mode and sleep.standby.idle_sleep_after_s == 10.0
    argv = suite.worker_argv(st, tmp_path / "c.toml")
    assert argv[argv.index("--model") + 1] == str(model) and "--smoke" not in argv
    assert len(st.sock("x")) < 100


def test_gpu_suite_report_publishes_no_path_of_the_machine_it_ran_on(tmp_path):
    """The report (benchmarks.md and the JSON beside it, what docs/ gets) names the run by
    its phases and writes the output, socket and model directories as $OUT, $SOCKETS and
    $MODEL; results.json keeps them."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent / "gpu"))
    import suite
    out, model = tmp_path / "suite-out", tmp_path / "the-model"
    sock = str(suite.sock_dir(out) / "vllm-cold.sock")
    launch = {"argv": ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--uds", sock],
              "caches_at_launch": {"root": str(out / "caches" / "vllm")}, "launch_to_ready_s": 60.0,
              "cache_state": "cold"}
    suite.save_results(out, {"suite": "tests/gpu/suite.py", "created": "2026-12-04T00:00:00+0000", "gpu": "X",
                             "machine": {"host": "h", "cpus": 2, "python": "3.11"},
                             "phases": {"cold": {"vllm": launch, "wall_s": 1.0}}})
    doc = tmp_path / "docs" / "benchmarks.md"
    text = suite.report(out, doc)
    published = doc.with_suffix(".json").read_text()
    for where in (text, published):
        assert str(tmp_path) not in where and "/tmp/" not in where
    assert "Run: the GPU suite (tests/gpu/suite.py; phases cold)" in text
    vllm = json.loads(published)["phases"]["cold"]["vllm"]
    assert vllm["argv"][3:] == ["$MODEL", "--uds", "$SOCKETS/vllm-cold.sock"]
    assert vllm["caches_at_launch"]["root"] == "$OUT/caches/vllm"
    assert str(model) in (out / "results.json").read_text()
