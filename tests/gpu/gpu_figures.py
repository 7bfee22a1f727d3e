"""Figures on a real GPU (not a test; run by hand on the lent GPU machine, see docs/cost.md).

    python tests/gpu/gpu_figures.py MODEL_DIR OUTDIR

Runs `qwenbox serve` on MODEL_DIR with the production profile (etc/qwenbox/qwenbox.toml)
plus idle sleep, and measures, one after the other in one run:
  1. first boot (empty caches): launch -> ready, the cold-start phases;
     TTFT of the first request after READY vs the median of the next 20;
  2. idle standby: the engine falls asleep, one request wakes it (wake time, its TTFT);
  3. restart with warm caches: launch -> ready;
  4. restart with --no-warmup: launch -> ready, first TTFT vs median of the next 20.
Prompts are random token ids (512 per request, all different, so the prefix cache gives
no request an advantage), 16 output tokens with ignore_eos. Prints a table, writes JSON.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, model: str, cache: Path, sock: Path) -> None:
    base = (ROOT / "etc" / "qwenbox" / "qwenbox.toml").read_text()
    base = base.replace('path = "Qwen/Qwen3-4B-Instruct-2507"', f'path = "{model}"')
    base = base.replace('served_name = ""', 'served_name = "qwen3-4b"')
    base = base.replace('cache_dir = ""', f'cache_dir = "{cache}"')
    base = base.replace('socket = "/run/qwenbox/qwenbox.sock"', f'socket = "{sock}"')
    base = base.replace("enable_sleep_mode = false", "enable_sleep_mode = true")
    base = base.replace("idle_sleep_after_s = 0.0", "idle_sleep_after_s = 15.0")
    path.write_text(base)


async def health(s: aiohttp.ClientSession) -> dict | None:
    try:
        async with s.get("http://localhost/health") as r:
            return await r.json()
    except (aiohttp.ClientError, OSError, ValueError):
        return None


async def ttft(s: aiohttp.ClientSession, vocab: int, rng: random.Random) -> tuple[float, float]:
    body = {"model": "qwen3-4b", "prompt": [rng.randrange(100, vocab - 1000) for _ in range(512)],
            "max_tokens": 16, "ignore_eos": True, "stream": True, "temperature": 0}
    t0 = time.monotonic()
    first = None
    async with s.post("http://localhost/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: {") and first is None:
                first = time.monotonic() - t0
    return first, time.monotonic() - t0


async def serve_and_measure(cfg: Path, sock: Path, log: Path, *, extra: list[str], sleep_check: bool) -> dict:
    t0 = time.monotonic()
    with open(log, "ab") as log_f:      # the child holds its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "qwenbox", "serve", "--config", str(cfg), *extra],
                                stdout=log_f, stderr=subprocess.STDOUT)
    out: dict = {}
    try:
        conn = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {proc.returncode}; see {log}")
                h = await health(s)
                if h and h.get("ready"):
                    break
                await asyncio.sleep(0.2)
            out["launch_to_ready_s"] = round(time.monotonic() - t0, 2)
            out["cold_start"] = h["cold_start"]
            out["device"] = h["engine"]["device"]
            rng = random.Random(0)
            vocab = 151936
            first = await ttft(s, vocab, rng)
            rest = [await ttft(s, vocab, rng) for _ in range(20)]
            med = statistics.median(r[0] for r in rest)
            out.update(first_ttft_s=round(first[0], 4), median_next20_ttft_s=round(med, 4),
                       first_over_median=round(first[0] / med, 2))
            if sleep_check:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    h = await health(s)
                    if h and h["status"] == "sleeping":
                        break
                    await asyncio.sleep(0.5)
                out["fell_asleep"] = bool(h and h["status"] == "sleeping")
                if out["fell_asleep"]:
                    woke = await ttft(s, vocab, rng)
                    h = await health(s)
                    out.update(wake_s=h["standby"]["last_wake_s"], ttft_after_wake_s=round(woke[0], 4))
    finally:
        proc.terminate()
        proc.wait(120)
    return out


async def main() -> None:
    model, outdir = sys.argv[1], Path(sys.argv[2])
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/qwenbox-gpu")
    work.mkdir(exist_ok=True)
    sock, cache, cfg = work / "q.sock", work / "cache", work / "qwenbox.toml"
    write_config(cfg, model, cache, sock)
    os.environ.setdefault("HF_HOME", str(work / "hf"))
    log = outdir / "daemon.log"
    runs = {"first_boot": await serve_and_measure(cfg, sock, log, extra=[], sleep_check=True),
            "restart_warm_caches": await serve_and_measure(cfg, sock, log, extra=[], sleep_check=False),
            "restart_no_warmup": await serve_and_measure(cfg, sock, log, extra=["--no-warmup"], sleep_check=False)}
    (outdir / "gpu_figures.json").write_text(json.dumps(runs, indent=2))
    print(f"{'run':24} {'ready s':>8} {'1st TTFT':>9} {'median20':>9} {'ratio':>6}")
    for k, r in runs.items():
        print(f"{k:24} {r['launch_to_ready_s']:8.1f} {r['first_ttft_s']:9.4f} {r['median_next20_ttft_s']:9.4f} "
              f"{r['first_over_median']:6.2f}")
    fb = runs["first_boot"]
    print("cold start phases (first boot):", json.dumps(fb["cold_start"]))
    print("idle standby:", {k: fb.get(k) for k in ("fell_asleep", "wake_s", "ttft_after_wake_s")})


if __name__ == "__main__":
    asyncio.run(main())
