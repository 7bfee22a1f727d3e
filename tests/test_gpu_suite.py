"""The GPU suite (tests/gpu/suite.py) end to end in its smoke mode: the demo model on CPU,
every phase, small counts, then the report. It proves the suite runs before it meets the
card; the figures it prints are not benchmarks and nothing here asserts on them."""
import contextlib
import json
import subprocess
import sys

import psutil
import pytest

from helpers import DEMO_CONFIG, ROOT

SUITE = ROOT / "tests" / "gpu" / "suite.py"


def _running_on(out):
    """Processes whose command line names the suite's output directory (its servers, its worker)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(out) in a for a in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            continue
    return found


# Thirteen engine starts (three of them vLLM's server) at ~25 s each on an idle 2-core VM; much
# more on a busy one, hence a time limit above the suite-wide 600 s.
@pytest.mark.timeout(3000)
@pytest.mark.engine
def test_gpu_suite_smoke_mode_runs_every_phase_and_the_report(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.Popen([sys.executable, str(SUITE), "--out", str(out), "--smoke", "--phase", "all"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
    try:
        stdout, _ = proc.communicate(timeout=2900)
    finally:
        if proc.poll() is None:            # interrupted: let the suite stop its servers itself
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for p in _running_on(out):         # and whatever it could not stop (they run in their own groups)
            with contextlib.suppress(psutil.Error):
                p.kill()
    print(stdout[-6000:])
    assert proc.returncode == 0, stdout[-4000:]
    # every server a phase started is gone: nothing runs on this output directory any more
    assert [p.pid for p in _running_on(out)] == []

    res = json.loads((out / "results.json").read_text())
    sys.path.insert(0, str(SUITE.parent))
    import suite
    assert list(res["phases"]) == list(suite.PHASES) and res["smoke"] is True
    for name, ph in res["phases"].items():
        assert not ph.get("errors"), (name, ph.get("errors"), ph.get("log_tails"))

    cold = res["phases"]["cold"]
    for server in ("qwenbox", "vllm"):
        launch = cold[server]
        assert launch["caches_at_launch"]["empty"] and launch["cache_state"] == "cold"
        assert set(launch["caches_at_launch"]["dirs"]) >= {"VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "HOME"}
        assert launch["launch_to_ready_s"] > 0 and launch["ttft_after_ready"]["next_n"] == suite.SMOKE["after_ready"]
    assert cold["qwenbox"]["phases"]["engine_s"] > 0        # qwenbox's /health cold_start

    # the same workloads, every request answered, on all four paths
    p = suite.SMOKE
    expected = {**{f"burst{b}": b for b in p["bursts"]}, **{f"c{c}": n for c, n in p["concurrency"].items()}}
    for name in ("qwenbox", "vllm", "vllm-defaults", "qwenbox-tuned", "inproc"):
        ph = res["phases"][name]
        assert ph["prompt_check"]["distinct"] == ph["prompt_check"]["n"]
        assert set(ph["workloads"]) == set(expected), name
        for key, n in expected.items():
            w = ph["workloads"][key]
            assert w["sent"] == n * p["repeats"] and w["failed"] == 0, (name, key, w["sent"], w["failed"])
            assert all(t > 0 for t in w["output_tokens_per_s"])
    for name in ("qwenbox", "vllm"):
        assert res["phases"][name]["launch"]["cache_state"] in ("cold", "warm")
    # vLLM's defaults: the model and the socket, and only what the CPU backend cannot start without
    from qwenbox.config import load
    model = load(DEMO_CONFIG).model.local_dir
    argv = res["phases"]["vllm-defaults"]["launch"]["argv"]
    assert argv[:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", model, "--uds"]
    assert argv[6:] == p["vllm_defaults_cpu_flags"]
    basis = res["mfu_basis"]
    assert basis["parameters"] == suite.model_parameters(model)[0] and basis["peak_tflops"] is None

    # `qwenbox tune` on the real engine: the config's own setting and the one --try, each built
    # in the one process, measured, disposed of; its drop-in is what qwenbox-tuned served
    t = res["phases"]["tune"]
    assert t["exit_code"] == 0, t.get("log_tails")
    trials = t["result"]["trials"]
    assert [tr["setting"] for tr in trials] == [{}, {"engine.max_num_batched_tokens": 1024}]
    assert all(tr["status"] == "ok" and tr["goodput_rps"] > 0 and tr["engine"]["kv_cache_tokens"] > 0
               for tr in trials)
    assert [lv["concurrency"] for lv in trials[0]["levels"]] == [2, 4]
    assert t["result"]["prompt_check"]["distinct"] == t["result"]["prompt_check"]["n"] == 16
    import tomllib
    profile = tomllib.loads((out / "tune" / "90-tuned.toml").read_text())
    assert res["phases"]["qwenbox-tuned"]["profile"] == profile
    best = next(tr for tr in trials if tr["label"] == t["result"]["best"])
    assert profile["admission"]["max_in_flight"] == best["best_concurrency"]
    assert profile["engine"]["max_num_batched_tokens"] == best["engine"]["max_num_batched_tokens"]
    assert res["phases"]["qwenbox-fp8"]["skipped"].startswith("FP8 needs a GPU")

    rec = res["phases"]["recovery"]
    assert rec["engine_cores"], "no engine core found to kill"
    # whatever the daemon does, the suite measured it: serving again, or an exit and a relaunch
    assert rec["kill_to_first_ok_s"] is not None or rec.get("daemon_exit_code") is not None
    assert rec["failed_after_kill"] == sum(rec["failed_after_kill_by_status"].values())

    assert "skipped" in res["phases"]["sleep"] or res["phases"]["sleep"].get("fell_asleep") is not None

    for which in ("untuned", "tuned"):
        d = res["phases"][f"cost-{which}"]["run"]["load"]["decision"]
        assert {"gpu_memory_idle_mib", "p95_latency_concurrency_1_s", "highest_stable_concurrency",
                "requests_per_day", "cost_per_1k_requests", "burst_failure_rate"} <= set(d)

    rep = subprocess.run([sys.executable, str(SUITE), "--out", str(out), "report"], capture_output=True, text=True,
                         timeout=300, cwd=str(ROOT))
    assert rep.returncode == 0, rep.stderr[-3000:]
    md = (out / "benchmarks.md").read_text()
    print(md)
    assert md.startswith("# Benchmarks") and "Card: **" in md and "NOT a benchmark" in md
    assert "| launch -> ready, empty caches |" in md and "tuned / untuned" in md
    assert "`vllm serve MODEL` (its defaults)" in md
    assert "## `qwenbox tune` on the card" in md
    assert "## Tuned profiles vs `vllm serve MODEL`" in md
    assert f"| {p['bursts'][1]:,} at once: served (all repetitions) |" in md
    assert "MFU: n/a (no dense bf16 peak known for this device (no GPU))" in md
    assert json.loads((out / "benchmarks.json").read_text())["phases"].keys() == res["phases"].keys()


# ------------------------------------------------------------------ the report's arithmetic, no engine
def _suite():
    sys.path.insert(0, str(SUITE.parent))
    import suite
    return suite


def test_mfu_of_issue_16s_h200_figure():
    """Issue 16: 512 -> 128 costs 2 x 4.0 G x 640 = 5.1 TFLOP per request; at ~790 TFLOP/s
    that is ~155 requests/s, ~19.8k output tok/s - so 9.6k output tok/s is ~49%."""
    suite = _suite()
    basis = {"parameters": 4_022_468_096, "peak_tflops": 790.0}
    assert suite.mfu(9600.0, basis, 512, 128) == pytest.approx(9600 / 128 * 2 * 4_022_468_096 * 640 / 790e12)
    assert suite.mfu(19_750.0, basis, 512, 128) == pytest.approx(1.0, abs=0.01)
    assert suite.mfu(9600.0, {"parameters": 4_022_468_096, "peak_tflops": None}, 512, 128) is None
    assert suite.mfu(None, basis, 512, 128) is None


def test_peaks_are_keyed_by_the_gpus_name():
    suite = _suite()
    assert suite.peak_for("NVIDIA H200")[0] == 790.0
    assert suite.peak_for("NVIDIA H100 80GB HBM3")[0] == 989.0 and suite.peak_for("NVIDIA H100 PCIe")[0] == 756.0
    assert suite.peak_for("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert suite.peak_for("NVIDIA L40") is None and suite.peak_for("NVIDIA L4")[0] == 121.0
    assert suite.peak_for(None) is None


def test_parameters_from_safetensors_headers_and_from_config(tmp_path, demo_model):
    suite = _suite()
    n, how = suite.model_parameters(demo_model)
    assert "safetensors" in how
    (tmp_path / "config.json").write_text((demo_model / "config.json").read_text())
    estimate, how = suite.model_parameters(tmp_path)
    assert "estimated" in how and estimate < n < estimate * 1.01       # the norms are all that is left out
