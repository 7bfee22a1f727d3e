"""The GPU suite: qwenbox vs `vllm serve` vs AsyncLLM in-process on one card, in phases.

Not a test (tests/test_gpu_suite.py runs its smoke mode on the demo model). On the lent
GPU machine, after `. /tmp/qb/device.sh env` (see /work/shared/gpu/README.md), with an
output directory that outlives one command (the device's $OUT is new for every command:
copy results.json there at the end of each):

    S="python tests/gpu/suite.py --out /tmp/qb/suite --model $QWEN3_4B_SHAPED"
    $S --phase cold --phase qwenbox; cp /tmp/qb/suite/results.json $OUT/
    ... (the phases in PHASES order, one or more per command; each appends to results.json)
    $S report --doc $OUT/benchmarks.md

``--smoke`` runs the same code on the demo model (etc/qwenbox/demo.toml and
bench-untuned.toml) with small counts; ``--phase all`` runs every phase in order.

Phases (each one command, each meant to end within ~8 minutes on an H200; every server a
phase starts is stopped at its end, each in its own process group; a server that fails
is recorded in the phase's ``errors``, and the suite goes on):
  cold          qwenbox (shipped profile, tests/gpu/make_configs.py) and `vllm serve` with
                the same engine arguments, each on its own fresh, empty cache directories
                (servers.CacheState): launch -> ready with the phases; the first request's
                TTFT after ready vs the median of the next ones.
  qwenbox       qwenbox restarted on the caches it filled (warm launch -> ready), then the
                throughput workloads (below).
  vllm          the same for `vllm serve` on its own caches.
  vllm-defaults `vllm serve MODEL --uds SOCK` and no other flag - the server a user who
                weighs qwenbox against vLLM starts (its defaults: 0.9 of the GPU's memory,
                the model's whole context, max_num_seqs by card; no qwenbox environment
                either, only its own cache directories): launch -> ready, the same
                workloads. (--smoke adds what the CPU backend cannot start without:
                SMOKE["vllm_defaults_cpu_flags"].)
  tune          `qwenbox tune` on the shipped profile (TUNE's SLO, quantization allowed):
                its trials and levels; its drop-ins for the next two phases.
  qwenbox-tuned, qwenbox-fp8
                qwenbox with tune's best unquantized drop-in / its best quantized one
                (FP8 weights on top of the unquantized one where tune chose none): the
                throughput workloads. qwenbox-fp8 is skipped in --smoke (no FP8 on CPU).
  inproc        AsyncLLM in-process (qwenbox.engine.Engine in a worker process, on
                qwenbox's warm caches, no HTTP): the same workloads.
  recovery      qwenbox (warm): a few clients send requests, the engine-core process is
                SIGKILLed; kill -> first successful answer, requests that failed after
                the kill, what the daemon did (a daemon that exits is relaunched at once,
                as systemd's Restart= would, without RestartSec).
  sleep         qwenbox with engine.enable_sleep_mode and standby.idle_sleep_after_s (own
                caches: sleep mode changes the compile key): idle -> asleep, then one
                request wakes it: wake time, that request's TTFT vs awake ones. Needs a GPU.
  cost-untuned, cost-tuned
                `qwenbox bench load` (the stepped sweep, the prompt mix, the 10x burst) on
                the untuned profile and on the shipped one; the report prints tuned/untuned.
Throughput workloads (token-id prompts, /v1/completions, ignore_eos, temperature 0, the
same prompts for every server; checked distinct with no shared KV block before any is
sent): after a few excluded warm-up requests, ``--repeats`` times: 256 and 1,024 requests
at once (512 -> 128 tokens), then concurrency 32, 128 and 512 in a closed loop (issue 16's
workloads). Output tok/s = output tokens / wall time of the run; TTFT client-side.
MFU (model FLOPs utilisation) beside every throughput figure: per request
2 x parameters x (prompt + output tokens) FLOPs - the dense matmuls, parameters counted
from the model's safetensors headers (tied embeddings once: they are the lm_head's
matmul); attention's score and value products (~2-3% more at these lengths) are left out,
and logits are in fact computed only for sampled positions, so it is an upper bound of the
work done - against the card's dense bf16 peak (PEAK_BF16_TFLOPS, keyed by GPU name).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import uuid
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:       # `python tests/gpu/suite.py` runs this checkout's qwenbox
    sys.path.insert(0, str(ROOT))

from qwenbox.listeners import raise_fd_limit  # noqa: E402
from qwenbox.tools.bench import load as L  # noqa: E402
from qwenbox.tools.bench.results import gpu_memory, machine  # noqa: E402
from qwenbox.tools.bench.servers import (  # noqa: E402
    CPU_BACKEND_FLAGS,
    CacheState,
    derived_config,
    engine_cores,
    vllm_argv,
    vllm_defaults_argv as vllm_serve_defaults_argv,
    vllm_env,
)
from qwenbox.tools.bench.tokens import check_prompt_set, load_tokenizer, random_id_prompts, tok_info  # noqa: E402
from qwenbox.tools.client import (  # noqa: E402
    Result,
    Server,
    ServerError,
    get_json,
    serve_argv,
    stream_completion,
    unix_session,
)
from qwenbox.tools.report import dig, fmt, write_json  # noqa: E402
from qwenbox.tools.stats import median, ratio  # noqa: E402

PHASES = ("cold", "qwenbox", "vllm", "vllm-defaults", "qwenbox-24gib", "tune", "qwenbox-tuned", "qwenbox-fp8",
          "inproc", "recovery", "sleep", "cost-untuned", "cost-tuned")

# Counts per mode. GPU: the workloads of issues 11 and 16; smoke: the same code, small, on the demo model.
GPU = dict(prompt_len=512, out_len=128, bursts=(256, 1024), concurrency={32: 256, 128: 512, 512: 1024}, repeats=3,
           warmup_requests=16,
           after_ready=20, ttft_out_len=16, ready_timeout=600.0, request_timeout=300.0,
           recovery_clients=4, recovery_prompt_len=128, recovery_out_len=16, recovery_deadline_s=240.0,
           recovery_before_kill_s=3.0, sleep_after_s=10.0, sleep_deadline_s=180.0,
           # tune's SLO bounds what the suite sends: a 1,024-request burst's p95 TTFT (7.8 s on
           # `vllm serve`'s defaults, issue 16) and a step with a full prefill chunk beside decodes
           tune=["--ttft-p95", "10", "--itl-p95", "0.25", "--levels", "128,512,1024", "--budget-min", "9",
                 "--allow-quantization", "--prompt-tokens", "512", "--output-tokens", "128"],
           load=["--levels", "1,2,4,8,16,32,64,128,256,512", "--per-level", "32", "--sweep-words", "512",
                 "--mix-requests", "512", "--max-tokens", "128", "--p95-bound", "10", "--phase-time-limit", "100",
                 "--request-timeout", "300", "--burst-factor", "10"])
SMOKE = dict(prompt_len=32, out_len=8, bursts=(8, 24), concurrency={2: 4, 4: 8}, repeats=1, warmup_requests=2,
             after_ready=3, ttft_out_len=4, ready_timeout=300.0, request_timeout=120.0,
             recovery_clients=2, recovery_prompt_len=16, recovery_out_len=4, recovery_deadline_s=240.0,
             recovery_before_kill_s=1.0, sleep_after_s=5.0, sleep_deadline_s=60.0,
             tune=["--ttft-p95", "60", "--itl-p95", "10", "--levels", "2,4", "--requests-per-level", "8",
                   "--prompt-tokens", "32", "--output-tokens", "8", "--try", "engine.max_num_batched_tokens=1024"],
             load=["--levels", "1,2", "--per-level", "4", "--sweep-words", "32", "--mix-requests", "6",
                   "--max-tokens", "8", "--p95-bound", "60", "--phase-time-limit", "60", "--request-timeout", "120",
                   "--burst-factor", "2"],
             vllm_defaults_cpu_flags=list(CPU_BACKEND_FLAGS))

# Dense bf16 tensor-core peak, TFLOP/s, by the words of the GPU's name (nvidia-smi's),
# most specific first, with where the figure comes from.
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H200", 790.0, "issue 16's figure for the H200 (NVIDIA's datasheet: 989 SXM, 835 NVL)"),
    ("H100 PCIe", 756.0, "NVIDIA H100 datasheet, PCIe, dense"),
    ("H100 NVL", 835.0, "NVIDIA H100 datasheet, NVL, dense"),
    ("H100", 989.0, "NVIDIA H100 datasheet, SXM, dense"),
    ("A100", 312.0, "NVIDIA A100 datasheet, dense"),
    ("L40S", 362.0, "NVIDIA L40S datasheet, dense"),
    ("L4", 121.0, "NVIDIA L4 datasheet, dense"),
)


# ------------------------------------------------------------------ results file
def results_path(out: Path) -> Path:
    return out / "results.json"


def load_results(out: Path) -> dict[str, Any]:
    p = results_path(out)
    if p.exists():
        return json.loads(p.read_text())
    return {"suite": "tests/gpu/suite.py", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "phases": {}}


def save_results(out: Path, res: dict[str, Any]) -> None:
    tmp = results_path(out).with_suffix(".json.tmp")
    write_json(tmp, res)
    os.replace(tmp, results_path(out))


def say(msg: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ MFU
def model_parameters(model_dir: str | Path) -> tuple[int, str]:
    """(parameters, how they were counted): the element counts in the safetensors headers
    (the 8-byte length, then the JSON header of every ``*.safetensors`` file; no weights
    read), else an estimate from config.json for a dense decoder (Llama/Qwen layout)."""
    d = Path(model_dir)
    shards = sorted(d.glob("*.safetensors"))
    if shards:
        total = 0
        for f in shards:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            total += sum(_numel(t["shape"]) for k, t in header.items() if k != "__metadata__")
        return total, f"the safetensors headers of {len(shards)} file(s) in {d}"
    c = json.loads((d / "config.json").read_text())
    h, layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    attn = h * hd * (2 * c["num_attention_heads"] + 2 * c.get("num_key_value_heads", c["num_attention_heads"]))
    per_layer = attn + 3 * h * inter
    embeddings = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings, f"estimated from {d / 'config.json'} (dense decoder, norms left out)"


def _numel(shape: list[int]) -> int:
    n = 1
    for x in shape:
        n *= int(x)
    return n


def peak_for(gpu: str | None) -> tuple[float, str] | None:
    """(dense bf16 TFLOP/s, source) for a GPU name as nvidia-smi gives it, or None."""
    if not gpu:
        return None
    words = set(re.split(r"[\s\-]+", gpu))
    for key, tflops, source in PEAK_BF16_TFLOPS:
        if set(key.split()) <= words:
            return tflops, source
    return None


def mfu_basis(model_dir: str | Path, gpu: str | None) -> dict[str, Any]:
    """What every MFU figure of a run is computed from (recorded once per results file)."""
    try:
        n, how = model_parameters(model_dir)
    except (OSError, ValueError, KeyError) as e:
        n, how = None, f"not counted: {type(e).__name__}: {e}"
    peak = peak_for(gpu)
    return {"parameters": n, "parameters_from": how, "gpu": gpu, "peak_tflops": peak[0] if peak else None,
            "peak_source": peak[1] if peak else f"no dense bf16 peak known for {gpu or 'this device (no GPU)'}"}


def mfu(output_tokens_per_s: float | None, basis: dict[str, Any] | None, prompt_len: int, out_len: int) -> float | None:
    """Model FLOPs utilisation of a run: requests/s (output tok/s / out_len) x
    2 x parameters x (prompt_len + out_len) FLOPs, over the card's peak."""
    if not output_tokens_per_s or not basis or not basis.get("parameters") or not basis.get("peak_tflops"):
        return None
    flops_per_s = output_tokens_per_s / out_len * 2 * basis["parameters"] * (prompt_len + out_len)
    return flops_per_s / (basis["peak_tflops"] * 1e12)


# ------------------------------------------------------------------ set-up shared by the phases
class Setup:
    """Configs, cache states and counts for one output directory."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.out = Path(args.out).resolve()
        self.smoke = args.smoke
        self.p = SMOKE if args.smoke else GPU
        self.work = self.out / "work"
        self.logs = self.out / "logs"
        self.caches = self.out / "caches"
        cfgdir = self.out / "configs"
        if args.smoke:
            self.tuned_src = ROOT / "etc" / "qwenbox" / "demo.toml"
            self.untuned_src = ROOT / "etc" / "qwenbox" / "bench-untuned.toml"
        else:
            if not args.model:
                raise SystemExit("suite: --model DIR is needed (the GPU test model, $QWEN3_4B_SHAPED)")
            if not (cfgdir / "tuned.toml").exists():
                subprocess.run([sys.executable, str(ROOT / "tests" / "gpu" / "make_configs.py"), args.model,
                                str(cfgdir)], check=True, stdout=subprocess.DEVNULL)
            self.tuned_src, self.untuned_src = cfgdir / "tuned.toml", cfgdir / "untuned.toml"
        self.drop_page_cache = args.drop_page_cache
        self.model = args.model

    def model_dir(self) -> str:
        """The model every server of this run serves (the tuned profile's)."""
        from qwenbox.config import load

        return load(self.tuned_src).model.local_dir

    def cache(self, name: str) -> CacheState:
        return CacheState(self.caches / name)

    def config(self, name: str, src: Path, cache: CacheState, extra: dict | None = None) -> Path:
        over = {"engine": {"cache_dir": str(cache.vllm_dir)}}
        for sec, kv in (extra or {}).items():
            over.setdefault(sec, {}).update(kv)
        return derived_config(src, self.work / f"{name}.toml", over)

    def sock(self, name: str) -> str:
        d = sock_dir(self.out)
        d.mkdir(mode=0o700, exist_ok=True)
        return str(d / f"{name}.sock")


def sock_dir(out: Path) -> Path:
    """Where the servers of one --out listen: unix socket paths are limited to ~107 bytes,
    so a short directory in /tmp, stable per --out."""
    return Path("/tmp") / f"qbsuite-{os.getuid()}-{zlib.crc32(str(out).encode()):08x}"


def fresh(cache: CacheState) -> None:
    shutil.rmtree(cache.root, ignore_errors=True)
    cache.create()


def drop_page_cache() -> str:
    """Drop the page cache (root only) so a cold start reads the weights from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "dropped"
    except OSError as e:
        return f"not dropped: {e.strerror}"


# ------------------------------------------------------------------ servers
def qwenbox_server(st: Setup, name: str, config: Path, cache: CacheState, extra: list[str] = ()) -> Server:
    sock = st.sock(name)
    return Server(f"qwenbox ({name})", serve_argv(config, sock, list(extra)), sock, st.logs / f"{name}.log",
                  env=cache.env())


def vllm_server(st: Setup, name: str, config: Path, cache: CacheState) -> Server:
    from qwenbox.config import load

    sock = st.sock(name)
    return Server(f"vllm serve ({name})", vllm_argv(load(config), sock), sock, st.logs / f"{name}.log",
                  env={**cache.env(), **vllm_env()})


def vllm_defaults_argv(st: Setup, model: str, sock: str) -> list[str]:
    """`vllm serve MODEL --uds SOCK` and no other flag; --smoke adds the CPU backend's needs."""
    return vllm_serve_defaults_argv(model, sock, cpu_backend=st.smoke)


def vllm_defaults_server(st: Setup, name: str, model: str, cache: CacheState) -> Server:
    """vLLM's own server with its defaults: only the private cache directories (so that
    its caches are its own, cold or warm like the others'), none of qwenbox's VLLM_*."""
    sock = st.sock(name)
    return Server(f"vllm serve, its defaults ({name})", vllm_defaults_argv(st, model, sock), sock,
                  st.logs / f"{name}.log", env=cache.env())


def vllm_log_phases(log: Path, since: int = 0) -> dict[str, Any]:
    """vLLM's own phase figures from its log (the lines qwenbox's engine reads off its child)."""
    from qwenbox.engine import _ChildLogTap

    out: dict[str, Any] = {}
    try:
        text = log.read_text(errors="replace")[since:]
    except OSError:
        return out
    for line in text.splitlines():
        for key, pat in _ChildLogTap.PATTERNS.items():
            m = pat.search(line)
            if m:
                v = m.group(1).replace(",", "")
                out[key] = int(v) if key == "kv_cache_tokens" else float(v)
    return out


def launch(srv: Server, cache: CacheState, st: Setup, drop: bool = False) -> dict[str, Any]:
    """Start ``srv`` and wait for ready; what the launch looked like (raises ServerError)."""
    entry: dict[str, Any] = {"argv": srv.argv[1:], "caches_at_launch": cache.snapshot()}
    entry["cache_state"] = "cold" if entry["caches_at_launch"]["empty"] else "warm"
    if drop:
        entry["page_cache"] = drop_page_cache()
    log_offset = srv.log_path.stat().st_size if srv.log_path.exists() else 0
    srv.start()
    srv.wait_ready(st.p["ready_timeout"])
    entry.update(launch_to_listen_s=srv.launch_to_listen_s, launch_to_ready_s=srv.launch_to_ready_s,
                 health_at_ready=srv.ready_health, pid=srv.proc.pid if srv.proc else None)
    if isinstance(srv.ready_health, dict) and srv.ready_health.get("cold_start"):
        entry["phases"] = srv.ready_health["cold_start"]
    else:
        entry["phases"] = {"vllm": vllm_log_phases(srv.log_path, log_offset)}
    entry["gpu_memory_idle"] = gpu_memory()
    return entry


def model_id(sock: str) -> str:
    status, body = get_json(sock, "/v1/models", timeout=30)
    if status != 200 or not body or not body.get("data"):
        raise ServerError(f"GET /v1/models answered {status}")
    return body["data"][0]["id"]


# ------------------------------------------------------------------ workloads
def workloads(st: Setup, tok: Any, block_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """{name: [token-id prompts]} in the order they run, and the prompt check's facts.
    The same seeds for every server, so every server gets the very same prompts."""
    info = tok_info(tok)
    p = st.p
    sets: dict[str, Any] = {}
    rng = random.Random("warmup")
    sets["warmup"] = random_id_prompts(p["warmup_requests"], p["prompt_len"], info, rng)
    for rep in range(p["repeats"]):
        for i, b in enumerate(p["bursts"]):      # the first burst's seeds are those of earlier runs
            sets[f"burst{b}-r{rep}"] = random_id_prompts(b, p["prompt_len"], info,
                                                         random.Random(f"burst-{rep}" if i == 0 else f"burst{b}-{rep}"))
        for c, n in p["concurrency"].items():
            sets[f"c{c}-r{rep}"] = random_id_prompts(n, p["prompt_len"], info, random.Random(f"c{c}-{rep}"))
    every = [x for v in sets.values() for x in v]
    check = check_prompt_set(every, "suite throughput prompts", allowed_prefix=0, block_size=block_size)
    return sets, check


def workload_plan(st: Setup, name: str) -> tuple[int, str]:
    """(concurrency, kind) of a workload set by its name."""
    if name == "warmup":
        return 8, "warmup"
    if name.startswith("burst"):
        return int(name[len("burst"):].split("-")[0]), "burst"
    return int(name[1:].split("-")[0]), "concurrency"


def summarize(kind_runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per workload: every repetition's output tok/s and p95 TTFT, and their medians."""
    out = {}
    for key, runs in kind_runs.items():
        tps = [r["output_tokens_per_s"] for r in runs]
        ttft = [r["ttft_s"]["p95"] for r in runs]
        out[key] = {"output_tokens_per_s": tps, "output_tokens_per_s_median": median(tps),
                    "ttft_p95_s": ttft, "ttft_p95_s_median": median(ttft),
                    "failed": sum(r["failed"] for r in runs), "sent": sum(r["sent"] for r in runs),
                    "runs": runs}
    return out


def _key(name: str) -> str:
    return name.rsplit("-r", 1)[0]


async def http_workloads(st: Setup, sock: str, model: str, sets: dict[str, Any]) -> dict[str, Any]:
    runs: dict[str, list] = {}
    async with unix_session(sock) as session:
        for name, prompts in sets.items():
            conc, _ = workload_plan(st, name)
            specs = [L.Spec(None, st.p["out_len"], name, ids) for ids in prompts]
            say(f"  {name}: {len(specs)} requests at concurrency {conc}")
            fig = await L.run_phase(session, model, name, specs, conc, 3600.0, st.p["request_timeout"])
            fig.pop("by_tag", None)
            if name != "warmup":
                runs.setdefault(_key(name), []).append(fig)
                say(f"    {fmt(fig['output_tokens_per_s'])} output tok/s, p95 TTFT {fmt(fig['ttft_s']['p95'], 's')}, "
                    f"{fig['ok']}/{fig['sent']} ok")
    return summarize(runs)


async def ttft_after_ready(st: Setup, sock: str, model: str, tok: Any) -> dict[str, Any]:
    """The first request after ready vs the median of the next ``after_ready`` (one at a time)."""
    prompts = random_id_prompts(1 + st.p["after_ready"], st.p["prompt_len"], tok_info(tok), random.Random("ttft"))
    check_prompt_set(prompts, "first-request TTFT prompts", allowed_prefix=0)
    out = []
    async with unix_session(sock) as session:
        for ids in prompts:
            body = {"model": model, "prompt": ids, "max_tokens": st.p["ttft_out_len"], "temperature": 0.0,
                    "ignore_eos": True}
            r = await stream_completion(session, body, st.p["request_timeout"])
            out.append(r.ttft_s if r.ok else None)
    rest = [t for t in out[1:] if t is not None]
    return {"first_ttft_s": out[0], "median_next_ttft_s": median(rest), "next_n": len(rest),
            "first_over_median": ratio(out[0], median(rest))}


# ------------------------------------------------------------------ phases
def phase_cold(st: Setup, ph: dict[str, Any]) -> None:
    from qwenbox.config import load

    for name, make in (("qwenbox", qwenbox_server), ("vllm", vllm_server)):
        cache = st.cache(name)
        fresh(cache)
        cfg = st.config(name, st.tuned_src, cache)
        srv = make(st, f"{name}-cold", cfg, cache)
        say(f"{name}: launch on empty caches ({cache.root})")
        try:
            entry = launch(srv, cache, st, drop=st.drop_page_cache)
            tok = load_tokenizer(load(cfg).model.path)
            entry["ttft_after_ready"] = asyncio.run(ttft_after_ready(st, srv.sock, model_id(srv.sock), tok))
            ph[name] = entry
            say(f"{name}: ready after {fmt(entry['launch_to_ready_s'], 's')}")
        except Exception as e:
            record_error(ph, name, e, srv)
        finally:
            ph.setdefault(name, {})["exit_code"] = srv.stop()
            ph[name]["caches_after"] = cache.snapshot()


def _served(st: Setup, ph: dict[str, Any], name: str, srv: Server, cache: CacheState, cfg: Path) -> None:
    from qwenbox.config import load

    c = load(cfg)
    try:
        tok = load_tokenizer(c.model.tokenizer or c.model.path)
        sets, ph["prompt_check"] = workloads(st, tok, c.engine.block_size)
        say(f"{name}: launch on its own caches ({cache.root})")
        ph["launch"] = launch(srv, cache, st)
        say(f"{name}: ready after {fmt(ph['launch']['launch_to_ready_s'], 's')} ({ph['launch']['cache_state']})")
        ph["workloads"] = asyncio.run(http_workloads(st, srv.sock, model_id(srv.sock), sets))
    except Exception as e:
        record_error(ph, name, e, srv)
    finally:
        ph["exit_code"] = srv.stop()


def phase_qwenbox(st: Setup, ph: dict[str, Any]) -> None:
    cache = st.cache("qwenbox")
    cache.create()
    cfg = st.config("qwenbox", st.tuned_src, cache)
    _served(st, ph, "qwenbox", qwenbox_server(st, "qwenbox-warm", cfg, cache), cache, cfg)


def phase_vllm(st: Setup, ph: dict[str, Any]) -> None:
    cache = st.cache("vllm")
    cache.create()
    cfg = st.config("vllm", st.tuned_src, cache)
    _served(st, ph, "vllm", vllm_server(st, "vllm-warm", cfg, cache), cache, cfg)


def phase_vllm_defaults(st: Setup, ph: dict[str, Any]) -> None:
    """The same workloads on `vllm serve MODEL` with its own defaults (the tuned config
    only names the model and its tokenizer for the prompts; nothing of it reaches vLLM)."""
    from qwenbox.config import load

    cache = st.cache("vllm-defaults")
    cache.create()
    cfg = st.config("vllm-defaults", st.tuned_src, cache)
    model = load(cfg).model.local_dir
    _served(st, ph, "vllm-defaults", vllm_defaults_server(st, "vllm-defaults", model, cache), cache, cfg)


EMULATED_CARD_GIB = 24.0     # the source article's A10G


def phase_qwenbox_24gib(st: Setup, ph: dict[str, Any]) -> None:
    """The shipped profile ("auto" sizing) held to 24 GiB of this card, as on the source
    article's 24 GB A10G: gpu_memory_utilization = 24 GiB / the card's memory, so weights,
    activations and KV cache share what such a card has. What sizing chose is in
    /health's ``sizing`` (``launch.health_at_ready``). In smoke mode (CPU) the demo profile
    runs unchanged: there is no card memory to cap."""
    from qwenbox.sizing import GiB, probe_device

    cache = st.cache("qwenbox-24gib")
    cache.create()
    total = probe_device().memory_bytes
    extra = {"engine": {"gpu_memory_utilization": round(EMULATED_CARD_GIB * GiB / total, 4)}} if total else None
    ph["emulated_card_gib"], ph["card_bytes"] = EMULATED_CARD_GIB, total
    cfg = st.config("qwenbox-24gib", st.tuned_src, cache, extra)
    _served(st, ph, "qwenbox-24gib", qwenbox_server(st, "qwenbox-24gib", cfg, cache), cache, cfg)


def tune_dir(st: Setup) -> Path:
    return st.out / "tune"


def phase_tune(st: Setup, ph: dict[str, Any]) -> None:
    """`qwenbox tune` on the shipped profile (its own process, qwenbox's warm caches), with
    quantization allowed: its table, and the profiles the next two phases serve."""
    cache = st.cache("qwenbox")
    cache.create()
    cfg = st.config("tune", st.tuned_src, cache)
    out = tune_dir(st)
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "qwenbox", "tune", "-c", str(cfg), *st.p["tune"], "--out", str(out)]
    ph["argv"] = argv[2:]
    st.logs.mkdir(parents=True, exist_ok=True)
    with open(st.logs / "tune.log", "wb") as log:
        proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **cache.env()}, stdout=log,
                              stderr=subprocess.STDOUT, timeout=60 * 25)
    ph["exit_code"] = proc.returncode
    if (out / "tune.json").exists():
        ph["result"] = json.loads((out / "tune.json").read_text())
    else:
        ph.setdefault("errors", {})["tune"] = f"exit {proc.returncode}, no tune.json"
        ph.setdefault("log_tails", {})["tune"] = tail(st.logs / "tune.log", 40)


def tuned_profile(st: Setup, quantized: bool) -> dict[str, dict[str, Any]] | None:
    """The tune phase's profile as {section: {key: value}}: the best setting without
    quantization, or the best one with it (None when tune chose none)."""
    import tomllib

    d = tune_dir(st)
    unq, best = d / "90-tuned-unquantized.toml", d / "90-tuned.toml"
    path = best if quantized or not unq.exists() else unq
    if not path.exists():
        return None
    prof: dict[str, dict[str, Any]] = tomllib.loads(path.read_text())
    if not quantized and any(k in prof.get("engine", {}) for k in ("quantization", "kv_cache_dtype")):
        return None
    return prof


def phase_qwenbox_tuned(st: Setup, ph: dict[str, Any], quantized: bool) -> None:
    """The shipped profile with tune's drop-in over it (bf16, or the quantized one: FP8
    weights where tune chose none of its own), on qwenbox's warm caches."""
    name = "qwenbox-fp8" if quantized else "qwenbox-tuned"
    prof = tuned_profile(st, quantized)
    if quantized and st.smoke:
        ph["skipped"] = "FP8 needs a GPU (the CPU backend refuses it)"
        return
    if prof is None and not quantized:
        ph.setdefault("errors", {})[name] = "the tune phase left no profile (run it first)"
        return
    prof = prof or {}
    if quantized and not prof.get("engine", {}).get("quantization"):
        base = tuned_profile(st, False) or {}
        prof = {**base, "engine": {**base.get("engine", {}), "quantization": "fp8"}}
    ph["profile"] = prof
    cache = st.cache(name if quantized else "qwenbox")
    cache.create()
    cfg = st.config(name, st.tuned_src, cache, prof)
    _served(st, ph, name, qwenbox_server(st, name, cfg, cache), cache, cfg)


def worker_argv(st: Setup, cfg: Path) -> list[str]:
    """The in-process worker's command line: the same mode, model and counts as ours."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--out", str(st.out), "--worker", "inproc",
            "--worker-config", str(cfg), "--repeats", str(st.p["repeats"])]
    return argv + (["--smoke"] if st.smoke else ["--model", st.model])


def phase_inproc(st: Setup, ph: dict[str, Any]) -> None:
    cache = st.cache("qwenbox")
    cache.create()
    cfg = st.config("qwenbox", st.tuned_src, cache)
    out_json = st.work / "inproc.json"
    out_json.unlink(missing_ok=True)
    log = st.logs / "inproc.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = worker_argv(st, cfg)
    from qwenbox.tools.client import package_env

    ph["caches_at_launch"] = cache.snapshot()
    say(f"in-process AsyncLLM: worker on qwenbox's caches; log {log}")
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=package_env(cache.env()), process_group=0)
        try:
            rc = proc.wait(timeout=st.p["ready_timeout"] + 900)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    ph["worker_exit_code"] = rc
    if rc == 0 and out_json.exists():
        ph.update(json.loads(out_json.read_text()))
    else:
        ph.setdefault("errors", {})["inproc"] = f"worker exited with {rc}; log {log}: " + tail(log)


def phase_recovery(st: Setup, ph: dict[str, Any]) -> None:
    from qwenbox.config import load

    cache = st.cache("qwenbox")
    cache.create()
    cfg = st.config("qwenbox", st.tuned_src, cache)
    srv = qwenbox_server(st, "recovery", cfg, cache)
    again: Server | None = None
    try:
        tok = load_tokenizer(load(cfg).model.path)
        ph["launch"] = launch(srv, cache, st)
        model = model_id(srv.sock)
        ph.update(asyncio.run(recovery_run(st, srv, model, tok)))
        again = ph.pop("_relaunched", None)
    except Exception as e:
        record_error(ph, "recovery", e, srv)
    finally:
        ph["exit_code"] = srv.stop()
        if again is not None:
            ph["relaunch_exit_code"] = again.stop()


async def recovery_run(st: Setup, srv: Server, model: str, tok: Any) -> dict[str, Any]:
    """Clients in a loop; SIGKILL the engine core; measure until the first answer after it."""
    p = st.p
    info = tok_info(tok)
    rng = random.Random("recovery")
    log: list[dict[str, Any]] = []
    out: dict[str, Any] = {"clients": p["recovery_clients"], "retry_pause_s": 0.1,
                           "request": f"{p['recovery_prompt_len']} random token ids -> {p['recovery_out_len']} tokens"}
    state = {"kill_at": None, "first_ok_after_kill": None, "stop": False}

    async def client(i: int, session: Any) -> None:
        while not state["stop"]:
            ids = random_id_prompts(1, p["recovery_prompt_len"], info, rng)[0]
            body = {"model": model, "prompt": ids, "max_tokens": p["recovery_out_len"], "temperature": 0.0,
                    "ignore_eos": True}
            t0 = time.monotonic()
            r = await stream_completion(session, body, 60.0)
            t1 = time.monotonic()
            log.append({"client": i, "start": t0, "end": t1, "ok": r.ok, "failure": r.failure})
            k = state["kill_at"]
            if r.ok and k is not None and t0 >= k and state["first_ok_after_kill"] is None:
                state["first_ok_after_kill"] = t1
            if not r.ok:
                await asyncio.sleep(out["retry_pause_s"])   # pacing after a failure, not synchronisation

    async with unix_session(srv.sock) as session:
        tasks = [asyncio.create_task(client(i, session)) for i in range(p["recovery_clients"])]
        await asyncio.sleep(p["recovery_before_kill_s"])    # let the clients get going under load
        cores = engine_cores(srv.proc.pid)
        out["engine_cores"] = [{"pid": c.pid, "name": _safe(c.name)} for c in cores]
        if not cores:
            state["stop"] = True
            await asyncio.gather(*tasks)
            out["error"] = "no EngineCore process among the daemon's children"
            return out
        for c in cores:
            os.kill(c.pid, signal.SIGKILL)
        kill_at = state["kill_at"] = time.monotonic()
        say(f"recovery: SIGKILLed engine core(s) {[c.pid for c in cores]}")
        deadline = kill_at + p["recovery_deadline_s"]
        relaunched: Server | None = None
        while time.monotonic() < deadline and state["first_ok_after_kill"] is None:
            if relaunched is None and srv.proc.poll() is not None:
                out["daemon_exit_code"] = srv.proc.returncode
                out["daemon_exit_after_kill_s"] = time.monotonic() - kill_at
                say(f"recovery: the daemon exited with {srv.proc.returncode} after "
                    f"{fmt(out['daemon_exit_after_kill_s'], 's')}; relaunching it at once (as systemd's Restart=)")
                relaunched = Server(srv.name + " relaunched", srv.argv, srv.sock, srv.log_path)
                relaunched.env = srv.env
                relaunched.start()
                out["relaunched_at_s"] = time.monotonic() - kill_at
            h = relaunched.health() if relaunched is not None else srv.health()
            if relaunched is not None and h is not None and h[0] == 200 and "relaunch_to_ready_s" not in out:
                out["relaunch_to_ready_s"] = time.monotonic() - kill_at - out["relaunched_at_s"]
            if h is not None:
                out.setdefault("health_seen", [])
                status = (h[1] or {}).get("status") if isinstance(h[1], dict) else None
                if not out["health_seen"] or out["health_seen"][-1][1] != status:
                    out["health_seen"].append([round(time.monotonic() - kill_at, 2), status, h[0]])
            await asyncio.sleep(0.1)     # polling the state, bounded by the deadline
        if state["first_ok_after_kill"] is not None:
            settle = time.monotonic() + 2.0
            while time.monotonic() < settle:
                await asyncio.sleep(0.1)
        state["stop"] = True
        await asyncio.gather(*tasks)
    first = state["first_ok_after_kill"]
    after = [r for r in log if r["start"] >= kill_at and (first is None or r["start"] <= first)]
    in_flight = [r for r in log if r["start"] < kill_at <= r["end"]]
    fails: dict[str, int] = {}
    for r in after:
        if not r["ok"]:
            fails[r["failure"]] = fails.get(r["failure"], 0) + 1
    out.update(kill_to_first_ok_s=(first - kill_at) if first else None,
               requests_before_kill=sum(1 for r in log if r["end"] < kill_at),
               in_flight_at_kill=len(in_flight), in_flight_at_kill_ok=sum(1 for r in in_flight if r["ok"]),
               sent_after_kill_until_first_ok=len(after), failed_after_kill=sum(fails.values()),
               failed_after_kill_by_status=fails, deadline_s=p["recovery_deadline_s"])
    if relaunched is not None:
        out["_relaunched"] = relaunched
    return out


def _safe(fn) -> str | None:
    try:
        return fn()
    except Exception:
        return None


def phase_sleep(st: Setup, ph: dict[str, Any]) -> None:
    from qwenbox.config import load

    if not gpu_memory().get("available"):
        ph["skipped"] = "needs a GPU build of vLLM (sleep mode); no nvidia-smi GPU here"
        return
    cache = st.cache("qwenbox-sleep")
    cache.create()
    cfg = st.config("qwenbox-sleep", st.tuned_src, cache,
                    {"engine": {"enable_sleep_mode": True},
                     "standby": {"idle_sleep_after_s": st.p["sleep_after_s"], "sleep_level": 1}})
    srv = qwenbox_server(st, "sleep", cfg, cache)
    try:
        tok = load_tokenizer(load(cfg).model.path)
        ph["launch"] = launch(srv, cache, st)
        ph.update(asyncio.run(sleep_run(st, srv, model_id(srv.sock), tok)))
    except Exception as e:
        record_error(ph, "sleep", e, srv)
    finally:
        ph["exit_code"] = srv.stop()


async def sleep_run(st: Setup, srv: Server, model: str, tok: Any) -> dict[str, Any]:
    prompts = random_id_prompts(8, st.p["prompt_len"], tok_info(tok), random.Random("sleep"))
    check_prompt_set(prompts, "sleep prompts", allowed_prefix=0)
    out: dict[str, Any] = {"idle_sleep_after_s": st.p["sleep_after_s"]}

    async def one(session: Any, ids: list[int]) -> Result:
        body = {"model": model, "prompt": ids, "max_tokens": st.p["ttft_out_len"], "temperature": 0.0,
                "ignore_eos": True}
        return await stream_completion(session, body, st.p["request_timeout"])

    async with unix_session(srv.sock) as session:
        awake = [await one(session, ids) for ids in prompts[:5]]
        out["ttft_awake_median_s"] = median(r.ttft_s for r in awake if r.ok)
        idle_from = time.monotonic()
        deadline = idle_from + st.p["sleep_deadline_s"]
        h = None
        while time.monotonic() < deadline:
            h = srv.health()
            if h and isinstance(h[1], dict) and h[1].get("status") == "sleeping":
                break
            await asyncio.sleep(0.2)     # polling the state, bounded by the deadline
        asleep = bool(h and isinstance(h[1], dict) and h[1].get("status") == "sleeping")
        out["fell_asleep"] = asleep
        out["idle_to_asleep_s"] = time.monotonic() - idle_from if asleep else None
        out["gpu_memory_asleep"] = gpu_memory()
        if asleep:
            r = await one(session, prompts[5])
            out["waking_request"] = {"ok": r.ok, "ttft_s": r.ttft_s, "e2e_s": r.e2e_s, "failure": r.failure}
            h = srv.health()
            out["wake_s"] = dig(h[1] if h else None, "standby", "last_wake_s")
            after = [await one(session, ids) for ids in prompts[6:]]
            out["ttft_after_wake_median_s"] = median(x.ttft_s for x in after if x.ok)
    return out


def phase_cost(st: Setup, ph: dict[str, Any], which: str) -> None:
    from qwenbox import cli

    src = st.untuned_src if which == "untuned" else st.tuned_src
    cache = st.cache("untuned" if which == "untuned" else "qwenbox")
    cache.create()
    cfg = st.config(f"cost-{which}", src, cache)
    args = cli.build_parser().parse_args(["bench", "load", "--config", str(cfg), *st.p["load"],
                                          "--ready-timeout", str(st.p["ready_timeout"])])
    levels = L.validate(args)
    ph["params"] = {k: getattr(args, k) for k in ("levels", "per_level", "sweep_words", "mix", "mix_requests",
                                                 "burst", "burst_factor", "p95_bound", "prompt_kind", "max_tokens",
                                                 "gpu_hour_cost")}
    ph["caches_at_launch"] = cache.snapshot()
    try:
        from qwenbox.tools.client import socket_dir
        with socket_dir() as sd:
            ph["run"] = L.run_with_daemon(str(cfg), which, sd, st.logs / f"cost-{which}.log", args, levels,
                                          lambda s: say(s), env=cache.env())
    except Exception as e:
        record_error(ph, f"cost-{which}", e, None)


def record_error(ph: dict[str, Any], name: str, e: BaseException, srv: Server | None) -> None:
    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    ph.setdefault("errors", {})[name] = msg
    ph.setdefault("tracebacks", {})[name] = traceback.format_exc()[-3000:]
    if srv is not None:
        ph.setdefault("log_tails", {})[name] = srv.tail(40)
    say(f"{name}: FAILED ({msg}); recorded, going on")


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


RUNNERS = {"cold": phase_cold, "qwenbox": phase_qwenbox, "vllm": phase_vllm, "vllm-defaults": phase_vllm_defaults,
           "qwenbox-24gib": phase_qwenbox_24gib, "tune": phase_tune,
           "qwenbox-tuned": lambda st, ph: phase_qwenbox_tuned(st, ph, False),
           "qwenbox-fp8": lambda st, ph: phase_qwenbox_tuned(st, ph, True), "inproc": phase_inproc,
           "recovery": phase_recovery, "sleep": phase_sleep,
           "cost-untuned": lambda st, ph: phase_cost(st, ph, "untuned"),
           "cost-tuned": lambda st, ph: phase_cost(st, ph, "tuned")}


def reap_leftovers(st: Setup) -> list[int]:
    """Kill the process groups of servers an earlier, interrupted command of this suite left
    behind (they run in their own groups, so a killed parent does not take them along):
    anything whose command line names this run's work dir, socket dir or output dir."""
    import psutil

    marks = (str(st.work), str(Path(st.sock("x")).parent), str(st.out))
    me = os.getpid()
    spare = {me} | {p.pid for p in psutil.Process(me).parents()}     # this command and whoever started it
    groups = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] not in spare and any(m in a for a in (p.info["cmdline"] or []) for m in marks):
                groups.add(os.getpgid(p.info["pid"]))
        except (psutil.Error, OSError):
            continue
    groups.discard(os.getpgid(me))
    for g in groups:
        with contextlib.suppress(OSError):
            os.killpg(g, signal.SIGKILL)
    return sorted(groups)


def run_phase(st: Setup, name: str) -> None:
    reaped = reap_leftovers(st)
    if reaped:
        say(f"killed process groups left behind by an earlier command: {reaped}")
    gpu = gpu_memory()
    ph: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
                          "gpu": gpu.get("name") if gpu.get("available") else None}
    t0 = time.monotonic()
    say(f"phase {name}: start")
    try:
        RUNNERS[name](st, ph)
    except Exception as e:      # a bug of the suite itself: recorded like a server failure
        record_error(ph, name, e, None)
    ph["wall_s"] = time.monotonic() - t0
    res = load_results(st.out)
    if res.setdefault("smoke", st.smoke) != st.smoke:
        ph.setdefault("errors", {})["suite"] = "this output directory holds results of the other mode (--smoke)"
    res["machine"], res["gpu"] = ph["machine"], ph["gpu"]
    res["mfu_basis"] = mfu_basis(st.model_dir(), ph["gpu"])
    res["phases"][name] = ph
    save_results(st.out, res)
    say(f"phase {name}: done in {fmt(ph['wall_s'], 's')}" + (f"; errors: {ph['errors']}" if ph.get("errors") else ""))


# ------------------------------------------------------------------ the in-process worker
def worker_inproc(st: Setup, config: Path) -> int:
    """Runs in its own process: AsyncLLM (qwenbox.engine.Engine) and the load share one loop."""
    from qwenbox import eventlog
    from qwenbox.config import load

    cfg = load(config)
    eventlog.setup(cfg.logging.level, cfg.logging.format)
    result = asyncio.run(_inproc(st, cfg))
    write_json(st.work / "inproc.json", result)
    return 0


async def _inproc(st: Setup, cfg: Any) -> dict[str, Any]:
    from qwenbox.engine import Engine
    from qwenbox.generation import GenerationRequest, Sampling

    t0 = time.monotonic()
    engine = await Engine.open(cfg)
    out: dict[str, Any] = {"open_s": time.monotonic() - t0, "cold_start": engine.cold_start.as_dict()}
    try:
        tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        sets, out["prompt_check"] = workloads(st, tok, cfg.engine.block_size)

        async def one(ids: list[int], tag: str) -> Result:
            r = Result(tag=tag)
            r.started = time.monotonic()
            req = GenerationRequest(request_id=f"suite-{uuid.uuid4().hex[:16]}", prompt_token_ids=ids,
                                    sampling=Sampling(max_tokens=st.p["out_len"], temperature=0.0, ignore_eos=True),
                                    stream=True)
            r.prompt_tokens = len(ids)
            try:
                async for deltas in engine.generate(req):
                    n = sum(d.num_tokens for d in deltas)
                    if n:
                        r.output_at(time.monotonic())
                        r.output_tokens += n
                r.ok, r.status = True, 200
            except Exception as e:
                r.failure, r.error_code = "engine_error", f"{type(e).__name__}: {e}"
            r.e2e_s = time.monotonic() - r.started
            return r

        async def worker(queue: list[list[int]], results: list[Result], tag: str) -> None:
            while queue:
                results.append(await one(queue.pop(), tag))

        runs: dict[str, list] = {}
        for name, prompts in sets.items():
            conc, _ = workload_plan(st, name)
            queue = list(reversed(prompts))
            results: list[Result] = []
            t1 = time.monotonic()
            await asyncio.gather(*(worker(queue, results, name) for _ in range(min(conc, len(prompts)))))
            fig = L.phase_figures(results, time.monotonic() - t1)
            fig.pop("by_tag", None)
            fig.update(name=name, concurrency=conc)
            if name != "warmup":
                runs.setdefault(_key(name), []).append(fig)
        out["workloads"] = summarize(runs)
    finally:
        await engine.close()
    return out


# ------------------------------------------------------------------ report
def _med_range(w: dict[str, Any] | None, key: str, unit: str = "") -> str:
    if not w:
        return "-"
    xs = [x for x in w.get(key) or [] if x is not None]
    if not xs:
        return "-"
    m = statistics.median(xs)
    if len(xs) == 1:
        return fmt(m, unit)
    return f"{fmt(m, unit)} ({fmt(min(xs), unit)}-{fmt(max(xs), unit)})"


def report(out: Path, doc: Path | None) -> str:
    res = published(load_results(out), out)     # the markdown names no path of the machine it ran on
    ph = res.get("phases", {})
    g = lambda *p: dig(ph, *p)  # noqa: E731
    gpu = res.get("gpu") or "no GPU (nvidia-smi absent)"
    smoke = res.get("smoke")
    vllm_version = next((v for n in ("qwenbox", "qwenbox-tuned", "qwenbox-fp8", "qwenbox-24gib")
                         if (v := dig(ph, n, "launch", "health_at_ready", "engine", "vllm"))),
                        dig(ph, "cold", "qwenbox", "health_at_ready", "engine", "vllm") or "?")
    lines = ["# Benchmarks: qwenbox vs `vllm serve` vs AsyncLLM in-process", "",
             f"Card: **{gpu}**. Run: the GPU suite (tests/gpu/suite.py"
             f"{' --smoke, demo model on CPU: NOT a benchmark' if smoke else ''}; phases {', '.join(ph) or 'none'}), "
             f"results created {res.get('created')}; machine {dig(res, 'machine', 'host')}, "
             f"{dig(res, 'machine', 'cpus')} CPUs, Python {dig(res, 'machine', 'python')}. vLLM "
             f"{vllm_version}.",
             ""]
    p = SMOKE if smoke else GPU
    basis = res.get("mfu_basis")
    q, v, i = g("qwenbox", "workloads") or {}, g("vllm", "workloads") or {}, g("inproc", "workloads") or {}
    d = g("vllm-defaults", "workloads") or {}
    servers = (q, v, d, i)              # the table's columns, in order
    rows = []

    def ratios(k: str, key: str) -> list[str]:
        """qwenbox / vllm (same arguments), qwenbox / vllm (its defaults)."""
        return [fmt(ratio(dig(q, k, key), dig(other, k, key)), "x") for other in (v, d)]

    def launch_of(server: str, state: str) -> dict[str, Any] | None:
        """A server's launch on empty ("cold") or its own filled ("warm") caches. The
        defaults server has no cold phase of its own: its one launch goes where its state says."""
        if server == "vllm-defaults":
            a = g(server, "launch")
            return a if dig(a, "cache_state") == state else None
        return g("cold", server) if state == "cold" else g(server, "launch")

    def start_row(label: str, state: str) -> None:
        qa, va, da = (launch_of(n, state) for n in ("qwenbox", "vllm", "vllm-defaults"))
        cells = [fmt(dig(a, "launch_to_ready_s"), "s") + (f" ({dig(a, 'cache_state')})" if a else "")
                 for a in (qa, va, da)]
        same = [fmt(ratio(dig(qa, "launch_to_ready_s"), dig(oa, "launch_to_ready_s")), "x")
                if qa and oa and dig(qa, "cache_state") == dig(oa, "cache_state")
                else "- (cache states differ)" if qa and oa else "-" for oa in (va, da)]
        rows.append([label, *cells, "-", *same])

    def tput(w: dict[str, Any] | None) -> str:
        cell = _med_range(w, "output_tokens_per_s")
        m = mfu(dig(w, "output_tokens_per_s_median"), basis, p["prompt_len"], p["out_len"])
        return cell if cell == "-" else f"{cell}; MFU {fmt(m, '%') if m is not None else '-'}"

    def served(w: dict[str, Any] | None) -> str:
        if not w:
            return "-"
        refused = w.get("failed") or 0
        return f"{w['sent'] - refused}/{w['sent']} served" + (f", {refused} not" if refused else "")

    start_row("launch -> ready, empty caches", "cold")
    start_row("launch -> ready, warm caches (restart on its own caches)", "warm")
    mem = [dig(g(n, "launch"), "gpu_memory_idle", "used_mib") for n in ("qwenbox", "vllm", "vllm-defaults")]
    rows.append(["GPU memory in use when ready", *(fmt(m, " MiB") for m in mem), "-",
                 *(fmt(ratio(mem[0], o), "x") for o in mem[1:])])
    shape = f"{p['prompt_len']} -> {p['out_len']} tokens"
    for b in p["bursts"]:
        k = f"burst{b}"
        rows.append([f"{b:,} requests at once, {shape}: output tok/s", *map(tput, (w.get(k) for w in servers)),
                     *ratios(k, "output_tokens_per_s_median")])
        rows.append([f"{b:,} at once: p95 TTFT", *(_med_range(w.get(k), "ttft_p95_s", "s") for w in servers),
                     *ratios(k, "ttft_p95_s_median")])
        rows.append([f"{b:,} at once: served (all repetitions)", *(served(w.get(k)) for w in servers), "-", "-"])
    for c, n in p["concurrency"].items():
        k = f"c{c}"
        rows.append([f"closed loop at {c} ({n:,} requests): output tok/s", *map(tput, (w.get(k) for w in servers)),
                     *ratios(k, "output_tokens_per_s_median")])
        rows.append([f"closed loop at {c}: p95 TTFT", *(_med_range(w.get(k), "ttft_p95_s", "s") for w in servers),
                     *ratios(k, "ttft_p95_s_median")])
    fails = [f"{n}: {dig(w, k, 'failed')}/{dig(w, k, 'sent')}"
             for n, w in (("qwenbox", q), ("vllm", v), ("vllm defaults", d), ("in-process", i))
             for k in (w or {}) if dig(w, k, "failed")]
    rec = ph.get("recovery") or {}
    if rec:
        what = (f"{fmt(rec.get('kill_to_first_ok_s'), 's')}; {rec.get('failed_after_kill', '-')} of "
                f"{rec.get('sent_after_kill_until_first_ok', '-')} requests sent after the kill failed "
                f"({', '.join(f'{k} {n}' for k, n in (rec.get('failed_after_kill_by_status') or {}).items()) or 'none'}"
                f"; {rec.get('clients')} clients, each retrying {fmt(rec.get('retry_pause_s'), 's')} after a failure)")
        if rec.get("daemon_exit_code") is not None:
            what += (f"; the daemon exited {rec['daemon_exit_code']} after "
                     f"{fmt(rec.get('daemon_exit_after_kill_s'), 's')}"
                     f" and was relaunched at once, ready {fmt(rec.get('relaunch_to_ready_s'), 's')} later"
                     f" (+ systemd's RestartSec in production)")
        seen = rec.get("health_seen") or []
        if seen:
            what += "; /health after the kill: " + ", ".join(f"{t} s {st} ({code})" for t, st, code in seen)
        if rec.get("error"):
            what = f"not measured: {rec['error']}"
        rows.append(["engine core SIGKILLed under load -> first answer", what, "-", "-", "-", "-", "-"])
    sl = ph.get("sleep") or {}
    if sl:
        if sl.get("skipped"):
            rows.append(["idle sleep -> wake; the waking request's TTFT", f"n/a ({sl['skipped']})",
                         "-", "-", "-", "-", "-"])
        else:
            rows.append(["idle sleep -> wake; the waking request's TTFT",
                         f"{fmt(sl.get('wake_s'), 's')}; {fmt(dig(sl, 'waking_request', 'ttft_s'), 's')} "
                         f"(awake: {fmt(sl.get('ttft_awake_median_s'), 's')})", "-", "-", "-", "-", "-"])
    lines.append(_md(["figure", "qwenbox", "`vllm serve` (same engine arguments)",
                      "`vllm serve MODEL` (its defaults)", "AsyncLLM in-process", "qwenbox / vllm (same)",
                      "qwenbox / vllm (defaults)"], rows))
    # the repetitions as run (--repeats), not the mode's default
    repeats = sorted({len(r.get("runs") or []) for w in servers for r in w.values() if isinstance(r, dict)} - {0})
    lines += ["", f"Throughput cells: median of {'/'.join(map(str, repeats)) or '-'} repetitions (min-max); "
              "prompts are random token ids, "
              "the same for every server, checked distinct with no shared KV block; client-side timing over the unix "
              "socket (in-process: no HTTP). Failed requests in the throughput runs: "
              + (", ".join(fails) or "none") + ".",
              "", _mfu_note(basis, p)]
    if g("vllm-defaults", "launch", "argv"):
        lines += ["", "`vllm serve` with its defaults ran as: `"
                  + " ".join(g("vllm-defaults", "launch", "argv")) + "`."]
    lines += _sizing_section(g, p, tput, served)
    lines += _tuned_section(g, p, tput, served)

    # start-up phases
    prow = []
    for label, path in (("qwenbox, empty caches", ("cold", "qwenbox")), ("qwenbox, warm caches", ("qwenbox", "launch")),
                        ("vllm serve, empty caches", ("cold", "vllm")), ("vllm serve, warm caches", ("vllm", "launch")),
                        ("vllm serve with its defaults", ("vllm-defaults", "launch"))):
        e = g(*path)
        if not e:
            continue
        phs = e.get("phases") or {}
        flat = {k: v for k, v in phs.items() if isinstance(v, (int, float))}   # qwenbox: /health cold_start
        flat.update(phs.get("vllm") or {})                                      # vllm: read off its log
        prow.append([label, fmt(e.get("launch_to_ready_s"), "s"),
                     ", ".join(f"{k} {fmt(v, '' if k.endswith('tokens') else 's')}" for k, v in flat.items()) or "-",
                     "empty" if dig(e, "caches_at_launch", "empty") else
                     f"{dig(e, 'caches_at_launch', 'dirs', 'VLLM_CACHE_ROOT', 'files')} files in VLLM_CACHE_ROOT"])
    if prow:
        lines += ["", "## Launch -> ready and its phases", "",
                  _md(["launch", "launch -> ready", "phases (qwenbox: /health cold_start; vllm: its log)",
                       "caches at launch"], prow)]
    ta = [(n, g("cold", n, "ttft_after_ready")) for n in ("qwenbox", "vllm")]
    if any(t for _, t in ta):
        lines += ["", "First request after ready (empty-cache launch) vs the median of the next ones: " + "; ".join(
            f"{n} {fmt(dig(t, 'first_ttft_s'), 's')} vs {fmt(dig(t, 'median_next_ttft_s'), 's')} "
            f"({fmt(dig(t, 'first_over_median'), 'x')})" for n, t in ta if t) + "."]

    # cost table
    a, b = g("cost-untuned", "run"), g("cost-tuned", "run")
    if a or b:
        lines += ["", "## Cost: `qwenbox bench load`, untuned defaults vs the shipped profile", ""]
        if a and b:
            rows = L.comparison(a, b)
            lines.append(_md(["metric", "untuned", "tuned (shipped)", "tuned / untuned"],
                             [[r["metric"], fmt(r["a"], r["unit"]), fmt(r["b"], r["unit"]), fmt(r["b_over_a"], "x")
                               if r["b_over_a"] is not None else "-" + (f" ({r['note']})" if r.get("note") else "")]
                              for r in rows]))
        for lbl, run in (("untuned", a), ("tuned", b)):
            if run:
                lines += ["", f"{lbl}: " + L.economics_lines(run["load"]).replace("\n", "; ")]
    errs = {k: v.get("errors") for k, v in ph.items() if v.get("errors")}
    if errs:
        lines += ["", "## Failures recorded", ""] + [f"- {k}: {v}" for k, v in errs.items()]
    lines += ["", "Phases run: " + ", ".join(f"{k} ({fmt(v.get('wall_s'), 's')})" for k, v in ph.items()) + ".",
              "Every figure comes from the JSON beside this file (benchmarks.json)."]
    text = "\n".join(lines) + "\n"
    for target in [out / "benchmarks.md"] + ([doc] if doc else []):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        write_json(target.with_suffix(".json"), published(res, out))
    return text


def published(res: dict[str, Any], out: Path) -> dict[str, Any]:
    """``res`` as the report publishes it beside the markdown: the paths of the machine it
    ran on (the output directory, the sockets' directory, the model directory given to
    vLLM) written as $OUT, $SOCKETS and $MODEL. results.json keeps them."""
    names = {str(out): "$OUT", str(sock_dir(out)): "$SOCKETS"}
    names.update({m: "$MODEL" for m in _argv_values(res, "--model")})
    # the sockets' directory of the machine that ran it (a report may be written elsewhere)
    names.update({str(Path(s).parent): "$SOCKETS" for s in _argv_values(res, "--uds")})
    ordered = sorted(names.items(), key=lambda kv: -len(kv[0]))     # a longer path before a prefix of it

    def swap(x: Any) -> Any:
        if isinstance(x, str):
            for path, name in ordered:
                x = x.replace(path, name)
            return x
        if isinstance(x, dict):
            return {k: swap(v) for k, v in x.items()}
        if isinstance(x, list):
            return [swap(v) for v in x]
        return x

    published_res: dict[str, Any] = swap(res)
    return published_res


def _argv_values(res: Any, flag: str) -> set[str]:
    """Every value of ``flag`` (``--model DIR``, ``--uds SOCK``) in the argv the results recorded."""
    if isinstance(res, dict):
        found = set().union(*(_argv_values(v, flag) for v in res.values())) if res else set()
        argv = res.get("argv")
        if isinstance(argv, list) and flag in argv[:-1]:
            found.add(str(argv[argv.index(flag) + 1]))
        return found
    if isinstance(res, list):
        return set().union(*(_argv_values(v, flag) for v in res)) if res else set()
    return set()


def _sizing_section(g: Any, p: dict[str, Any], tput: Any, served: Any) -> list[str]:
    """What "auto" sizing chose on the card and on the card held to 24 GiB, and how the
    24 GiB run served the same workloads."""
    out: list[str] = []
    for name, label in (("qwenbox", "the whole card"), ("qwenbox-24gib", "held to 24 GiB (an A10G's memory)")):
        s = g(name, "launch", "health_at_ready", "sizing")
        if not s:
            continue
        chosen = ", ".join(f"{k.split('.')[1]} {c['value']}" for k, c in (s.get("chosen") or {}).items())
        out += ["", f"Sizing on {label}: KV cache {s.get('kv_cache_tokens'):,} tokens; {chosen}."]
    w = g("qwenbox-24gib", "workloads")
    if w:
        rows = []
        for b in p["bursts"]:
            k = f"burst{b}"
            rows.append([f"{b:,} at once: output tok/s; p95 TTFT; served", tput(w.get(k)),
                         _med_range(w.get(k), "ttft_p95_s", "s"), served(w.get(k))])
        for c, n in p["concurrency"].items():
            k = f"c{c}"
            rows.append([f"closed loop at {c} ({n:,} requests)", tput(w.get(k)),
                         _med_range(w.get(k), "ttft_p95_s", "s"), served(w.get(k))])
        out += ["", "qwenbox held to 24 GiB of the card, the same workloads:", "",
                _md(["workload", "output tok/s", "p95 TTFT", "served"], rows)]
        if g("qwenbox-24gib", "errors"):
            out += ["", f"Errors: {g('qwenbox-24gib', 'errors')}"]
    return out


def _tuned_section(g: Any, p: dict[str, Any], tput: Any, served: Any) -> list[str]:
    """`qwenbox tune`'s trials, and its profiles (bf16; FP8) beside `vllm serve MODEL` with
    its defaults and the shipped profile, on the same workloads."""
    out: list[str] = []
    t = g("tune", "result")
    if t:
        rows = [[tr["label"], tr["status"] + (f": {tr['error'][:60]}" if tr.get("error") else ""),
                 fmt(tr.get("goodput_rps")), tr.get("best_concurrency") or "-",
                 dig(tr, "engine", "kv_cache_tokens") or "-", fmt(tr.get("build_s"), "s")] for tr in t["trials"]]
        out += ["", f"## `qwenbox tune` on the card: SLO p95 TTFT <= {dig(t, 'slo', 'ttft_p95_s')} s, p95 ITL <= "
                f"{dig(t, 'slo', 'itl_p95_s')} s, {t.get('workload')}; {len(t['trials'])} trials in "
                f"{fmt(t.get('wall_s'), 's')} (budget {t.get('budget_min')} min)", "",
                _md(["setting", "status", "goodput req/s", "best concurrency", "KV cache tokens", "build"], rows),
                "", f"Best: {t.get('best')}; best without quantization: {t.get('best_unquantized')}"
                + (f"; not tried (budget): {', '.join(t['not_tried'])}" if t.get("not_tried") else "") + "."]
    d = g("vllm-defaults", "workloads") or {}
    cols = [(n, g(n, "workloads") or {}) for n in ("qwenbox-tuned", "qwenbox-fp8", "qwenbox")]
    if not any(w for _, w in cols[:2]):
        return out
    rows = []

    def cell(w: dict[str, Any], k: str) -> str:
        r = ratio(dig(w, k, "output_tokens_per_s_median"), dig(d, k, "output_tokens_per_s_median"))
        tr = ratio(dig(w, k, "ttft_p95_s_median"), dig(d, k, "ttft_p95_s_median"))
        if not w.get(k):
            return "-"
        return (f"{tput(w.get(k))}; p95 TTFT {_med_range(w.get(k), 'ttft_p95_s', 's')}; {served(w.get(k))}; "
                f"**{fmt(r, 'x')}** tok/s, {fmt(tr, 'x')} p95 TTFT")
    keys = [(f"burst{b}", f"{b:,} at once") for b in p["bursts"]] + [
        (f"c{c}", f"closed loop at {c} ({n:,} requests)") for c, n in p["concurrency"].items()]
    for k, label in keys:
        rows.append([label, *(cell(w, k) for _, w in cols),
                     f"{tput(d.get(k))}; p95 TTFT {_med_range(d.get(k), 'ttft_p95_s', 's')}; {served(d.get(k))}"
                     if d.get(k) else "-"])
    mem = [dig(g(n, "launch"), "gpu_memory_idle", "used_mib") for n in ("qwenbox-tuned", "qwenbox-fp8", "qwenbox",
                                                                         "vllm-defaults")]
    rows.append(["GPU memory in use when ready", *(fmt(m, " MiB") for m in mem)])
    out += ["", "## Tuned profiles vs `vllm serve MODEL` (its defaults), the same workloads", "",
            "Each cell: output tok/s (median, min-max; MFU against the dense bf16 peak); p95 TTFT; served; "
            "then the ratios to `vllm serve` with its defaults.", "",
            _md(["workload", "qwenbox, tune's bf16 drop-in", "qwenbox, tune's FP8 drop-in",
                 "qwenbox, shipped profile", "`vllm serve MODEL` (its defaults, bf16)"], rows)]
    for n, _ in cols[:2]:
        if g(n, "profile"):
            out += ["", f"{n} served with: `{json.dumps(g(n, 'profile'), sort_keys=True)}`"]
        if g(n, "errors"):
            out += ["", f"{n} errors: {g(n, 'errors')}"]
    return out


def _mfu_note(basis: dict[str, Any] | None, p: dict[str, Any]) -> str:
    """How the MFU figures were computed, with their inputs."""
    if not basis:
        return "MFU: not computed (no basis recorded)."
    n = basis.get("parameters")
    per_request = f"2 x {n:,} parameters x ({p['prompt_len']} + {p['out_len']}) tokens" if n else "-"
    if basis.get("peak_tflops"):
        return (f"MFU: requests/s x {per_request} of dense-matmul FLOPs per request (parameters from "
                f"{basis.get('parameters_from')}; attention's score/value products left out), over "
                f"{fmt(basis['peak_tflops'])} TFLOP/s dense bf16 for {basis.get('gpu')} ({basis.get('peak_source')}).")
    return f"MFU: n/a ({basis.get('peak_source')}); per request {per_request}."


def _md(headers: list[str], rows: list[list[Any]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tests/gpu/suite.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", nargs="?", choices=("run", "report"), default="run")
    ap.add_argument("--out", required=True, help="output directory (results.json, logs/, caches/)")
    ap.add_argument("--model", help="model directory (GPU mode; the smoke mode uses the demo model)")
    ap.add_argument("--phase", action="append", choices=(*PHASES, "all"),
                    help="phase(s) to run (repeatable; all = every phase in order)")
    ap.add_argument("--smoke", action="store_true", help="the demo model on CPU, small counts")
    ap.add_argument("--drop-page-cache", action="store_true",
                    help="drop the page cache before each empty-cache launch (root only)")
    ap.add_argument("--doc", help="report: also write this markdown file (and .json beside it)")
    ap.add_argument("--repeats", type=int, help="repetitions of the throughput workloads (default: 3 GPU, 1 smoke)")
    ap.add_argument("--worker", choices=("inproc",), help=argparse.SUPPRESS)
    ap.add_argument("--worker-config", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.command == "report":
        print(report(out, Path(a.doc).resolve() if a.doc else None))
        return 0
    st = Setup(a)
    if a.repeats:
        st.p = {**st.p, "repeats": a.repeats}
    if a.worker == "inproc":
        return worker_inproc(st, Path(a.worker_config))
    if not a.phase:
        ap.error("--phase NAME (or report)")
    raise_fd_limit()
    # A SIGTERM (a time limit, Ctrl-C's cousin) unwinds like an exception: every phase's
    # `finally` stops its servers, which run in process groups of their own.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = list(PHASES) if "all" in a.phase else a.phase
    for name in names:
        run_phase(st, name)
    return 0


if __name__ == "__main__":   # vLLM's engine core is spawned: this guard is required
    sys.exit(main())
