"""`qwenbox tune`'s parts that need no engine: the workload and its traffic shape from
`qwenbox logs --shape`, the search space, the admission arithmetic, the drop-in it writes
(loaded back through conf.d as `serve` loads it), and its refusals of bad input. The
search itself runs on the real engine in the GPU suite's smoke mode (tests/test_gpu_suite.py:
its `tune` phase, then `qwenbox-tuned` serving the drop-in it wrote)."""
import json
import socket
import subprocess
import sys
import tomllib

import pytest

from helpers import ROOT, write_config
from qwenbox import sizing
from qwenbox.config import load
from qwenbox.tools import logs, tune
from qwenbox.tools.bench.workload import OptionError


def _qwenbox(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "qwenbox", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))


def _request_line(i, status=200, prompt_len=512, output_len=128):
    return (f"ts=2026-12-04T10:00:{i % 60:02d}.000Z level=info event=request id=r{i} method=POST "
            f"path=/v1/chat/completions status={status} latency_s=1.5 prompt_len={prompt_len} "
            f"max_tokens=256 ttft_s=0.2 output_len={output_len}")


def test_logs_shape_is_a_bounded_sample_that_tune_reads(tmp_path):
    lines = [_request_line(i, prompt_len=100 + i % 7, output_len=20 + i % 3) for i in range(3000)]
    lines += [_request_line(9000 + i, status=429) for i in range(50)]      # refused: no output, not traffic
    log = tmp_path / "q.log"
    log.write_text("\n".join(lines) + "\n")
    shape = tmp_path / "shape.json"
    r = _qwenbox("logs", str(log), "--shape", str(shape))
    assert r.returncode == 0, r.stderr
    data = json.loads(shape.read_text())
    assert data["kind"] == logs.SHAPE_KIND and data["count"] == 3000
    assert data["sampled"] == len(data["requests"]) == logs.SHAPE_SAMPLES
    assert all(100 <= p <= 106 and 20 <= o <= 22 for p, o in data["requests"])
    wl = tune.Workload.from_shape(str(shape))
    assert len(wl.requests) == logs.SHAPE_SAMPLES and 100 <= wl.typical()[0] <= 106
    # the same log gives the same sample
    again = tmp_path / "again.json"
    assert _qwenbox("logs", str(log), "--shape", str(again)).returncode == 0
    assert json.loads(again.read_text())["requests"] == data["requests"]


def test_logs_shape_refuses_a_log_without_successful_requests(tmp_path):
    log = tmp_path / "q.log"
    log.write_text(_request_line(1, status=429) + "\n")
    r = _qwenbox("logs", str(log), "--shape", str(tmp_path / "s.json"))
    assert r.returncode == 1 and "no successful request" in r.stderr
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("content, why", [
    ("not json", "cannot read it"),
    ('{"kind": "something-else", "requests": [[1, 2]]}', "not a traffic shape"),
    ('{"kind": "qwenbox-traffic-shape", "requests": [[0, 2], [1], "x", [true, 3], [1.5, 2]]}', "no request"),
    ('{"kind": "qwenbox-traffic-shape"}', "no request"),
])
def test_a_bad_traffic_shape_is_one_clear_error(tmp_path, content, why):
    p = tmp_path / "shape.json"
    p.write_text(content)
    with pytest.raises(OptionError, match=why):
        tune.Workload.from_shape(str(p))
    with pytest.raises(OptionError, match="cannot read"):
        tune.Workload.from_shape(str(tmp_path / "missing.json"))


def test_requests_longer_than_the_context_are_left_out_and_said():
    wl = tune.Workload(((100, 10), (5000, 10), (200, 20)), "x").fitted(2048)
    assert wl.requests == ((100, 10), (200, 20)) and "1 longer than max_model_len" in wl.source
    with pytest.raises(OptionError, match=r"fits model\.max_model_len"):
        tune.Workload(((5000, 10),), "x").fitted(2048)


@pytest.mark.parametrize("item", ["max_num_seqs=4", "engine.max_num_seqs", "engine.max_num_seqs=", "model.path=x",
                                  "=1"])
def test_try_needs_an_engine_key_and_values(item):
    with pytest.raises(OptionError, match="--try"):
        tune.parse_try([item])


def test_try_parses_numbers_and_words():
    assert tune.parse_try(["engine.max_num_seqs=256,512", "engine.performance_mode=interactivity"]) == [
        tune.Dimension("engine.max_num_seqs", (256, 512)),
        tune.Dimension("engine.performance_mode", ("interactivity",))]


def _limits(kind, name, gib, seqs, tokens):
    dev = sizing.Device(kind, name, int(gib * sizing.GiB))
    return sizing.EngineLimits(dev, sizing.Choice(seqs, "t", True), sizing.Choice(tokens, "t", True))


def test_search_space_follows_the_device(tmp_path):
    cfg = load(write_config(tmp_path / "q.toml", {"engine": {"enforce_eager": False}}))
    h200 = _limits("cuda", "NVIDIA H200", 140, 1024, 8192)
    keys = [d.key for d in tune.search_space(cfg, h200, allow_quantization=False)]
    assert keys == ["engine.max_num_batched_tokens", "engine.max_cudagraph_capture_size", "engine.max_num_seqs",
                    "engine.performance_mode", "engine.max_num_batched_tokens"]
    with_q = [d.key for d in tune.search_space(cfg, h200, allow_quantization=True)]
    assert with_q[2:4] == ["engine.quantization", "engine.kv_cache_dtype"]
    # quantization only when allowed, never on the CPU backend; no CUDA graphs there either
    cpu = [d.key for d in tune.search_space(cfg, _limits("cpu", "cpu", 0, 16, 2048), allow_quantization=True)]
    assert not set(cpu) & {"engine.quantization", "engine.kv_cache_dtype", "engine.max_cudagraph_capture_size",
                           "engine.performance_mode"}


def test_quantizing_tries_need_allow_quantization(tmp_path, demo_model):
    cfg = write_config(tmp_path / "q.toml", {"server": {"socket": str(tmp_path / "none.sock")}})
    r = _qwenbox("tune", "-c", str(cfg), "--try", "engine.quantization=fp8", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "needs --allow-quantization" in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_bad_try_value_is_refused_before_any_engine_is_built(tmp_path, demo_model):
    cfg = write_config(tmp_path / "q.toml", {"server": {"socket": str(tmp_path / "none.sock")}})
    for bad, says in (("engine.max_num_seqs=0", "engine.max_num_seqs"),
                      ("engine.performance_mode=fastest", "engine.performance_mode"),
                      ("engine.no_such_key=1", "no_such_key")):
        r = _qwenbox("tune", "-c", str(cfg), "--try", bad, "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and f"--try {bad}" in r.stderr and says in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    for opt in (["--ttft-p95", "0"], ["--itl-p95", "nan"], ["--levels", "4,x"], ["--levels", "0"],
                ["--budget-min", "-1"], ["--workload", str(tmp_path / "missing.json")]):
        r = _qwenbox("tune", "-c", str(cfg), *opt, "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and r.stderr.startswith("qwenbox tune: "), (opt, r.stderr)


def test_tune_refuses_while_a_daemon_answers_on_the_socket(tmp_path, demo_model):
    """Anything that accepts on the config's socket is taken for the daemon: the tuner needs
    the card to itself and says how to free it."""
    sock_path = str(tmp_path / "q.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(4)
    try:
        cfg = write_config(tmp_path / "q.toml", {"server": {"socket": sock_path}})
        r = _qwenbox("tune", "-c", str(cfg), "--out", str(tmp_path / "o"))
    finally:
        listener.close()
    assert r.returncode == 2 and "answers on" in r.stderr and "systemctl stop" in r.stderr


def _trial(levels, setting=None, engine=None):
    t = tune.Trial(setting or {}, tune.label(setting or {}))
    t.engine = engine or {"max_num_seqs": 1024, "max_num_batched_tokens": 8192, "kv_cache_tokens": 649488}
    t.levels = levels
    return t


def _level(c, rps, ttft95, meets=True, good=None):
    return tune.Level(c, 2 * c, 2 * c / rps, rps, rps * 128, ttft95 / 3, ttft95, 0.1, good or 2 * c,
                      rps if good is None else good / (2 * c / rps), meets)


def test_the_best_level_is_the_highest_goodput_that_met_the_slo():
    t = _trial([_level(128, 69.3, 0.95), _level(512, 77.2, 3.7), _level(1024, 90.0, 12.0, meets=False)])
    assert t.best.concurrency == 512 and t.goodput == 77.2
    assert _trial([_level(128, 50, 20, meets=False)]).best is None


def test_admission_waits_only_as_long_as_the_slo_allows():
    slo = tune.Slo(10.0, 0.25)
    t = _trial([_level(1024, 81.5, 7.43)])
    a = tune.admission_for(t, slo, 512, 8192)
    # 81.5 requests finish per second; the q-th waiting gets a slot after q / 81.5 s: (10 - 7.43) s of room
    assert a == {"max_in_flight": 1024, "max_queued": 209, "max_queued_prompt_tokens": 209 * 512}
    tight = tune.admission_for(_trial([_level(64, 40.0, 2.5)]), tune.Slo(2.0, 0.25), 512, 8192)
    assert tight["max_queued"] == 0 and tight["max_queued_prompt_tokens"] == 8192   # one max_model_len prompt


def test_the_profile_is_a_drop_in_that_serve_loads(tmp_path):
    main = write_config(tmp_path / "qwenbox.toml")
    t = _trial([_level(16, 100.0, 0.5)], {"engine.max_num_batched_tokens": 1024},
               {"max_num_seqs": 16, "max_num_batched_tokens": 1024, "kv_cache_tokens": 1})
    settings = tune.profile_settings(t, tune.Slo(2.0, 0.25), 64, 2048)
    text = tune.profile_text(settings, ["written by a test", "apply: install ..."])
    assert text.startswith("# written by a test\n# apply: install ...\n")
    assert tomllib.loads(text)["engine"] == {"max_num_seqs": 16, "max_num_batched_tokens": 1024}
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / tune.PROFILE).write_text(text)
    cfg = load(main)
    assert cfg.files[-1].endswith(tune.PROFILE)
    assert (cfg.engine.max_num_seqs, cfg.engine.max_num_batched_tokens) == (16, 1024)
    assert (cfg.admission.max_in_flight, cfg.admission.max_queued) == (16, 150)


def test_the_tables_name_every_trial_and_level():
    ok = _trial([_level(128, 69.3, 0.95), _level(512, 77.2, 3.7)])
    failed = tune.Trial({"engine.quantization": "fp8"}, "quantization=fp8", status="failed",
                        error="ConfigError: engine.quantization: not supported")
    res = tune.SearchResult([ok, failed], ok, ok, ["performance_mode=interactivity"])
    meta = {"slo": {"ttft_p95_s": 10.0, "itl_p95_s": 0.25}, "workload": "512 -> 128 tokens", "device": "X",
            "wall_s": 100.0, "gpu_hour_cost": 3.5}
    text = tune.render(res, meta)
    assert "the config's own" in text and "quantization=fp8" in text and "ConfigError" in text
    md = tune.render(res, meta, markdown=True)
    assert md.count("| the config's own | ") == 3        # the trials' table, then one row per level
    assert "Not tried (budget): performance_mode=interactivity" in md
    assert tune.cost_per_1k(77.2, 3.5) == pytest.approx(3.5 / (77.2 * 3.6)) and tune.cost_per_1k(0.0, 3.5) is None


def test_ladder():
    assert tune.ladder(1024) == [64, 256, 1024]
    assert tune.ladder(16) == [1, 4, 16]
    assert tune.ladder(1) == [1]
    assert tune.ladder(512, (128, 512, 1024)) == [128, 512]


def test_the_progress_line_says_where_the_run_is_and_when_it_ends():
    import io
    out = io.StringIO()
    now = [1000.0]
    p = tune.ProgressLine(planned=5, budget_s=600.0, stream=out, clock=lambda: now[0])
    p.show("the config's own: building the engine")
    assert out.getvalue().startswith("[                    ] trial 1/5: the config's own: building the engine")
    assert "ETA 10:00" in out.getvalue()            # no trial has ended: the budget
    p.trial_done(100.0)
    p.show("x: closed loop at 64")
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("[####                ] trial 2/5: x: closed loop at 64") and "ETA 6:40" in line
    p.trial_done(100.0)
    now[0] += 590                                   # 590 s of the 600 s budget spent
    p.show("y")
    # three trials left at 100 s each, but none starts past the budget: its end plus one trial
    assert "ETA 1:50" in out.getvalue().splitlines()[-1]
