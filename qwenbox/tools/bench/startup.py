"""``qwenbox bench startup``: what pre-warm buys, what our API costs, how fast we are up.

In one run, one server at a time, on the config given (the demo model in development).
Cache state is explicit: qwenbox and vLLM's server each start once on their own fresh,
empty cache directories (``servers.CacheState``: cold) and once more on the caches they
filled themselves (warm); launch-to-ready ratios are only taken within one state.
  1. ``qwenbox serve`` (warm-up as configured), cold: launch-to-ready, the cold-start
     phases from /health, the TTFT of the first request after ready vs the median of the
     next ``--after-ready``, then the throughput workload through the API (streaming,
     client-side timing) ``--throughput-repeats`` times, the median repetition reported;
  2. ``qwenbox serve`` again, warm: launch-to-ready and its phases;
  3. ``qwenbox serve --no-warmup``, warm: launch-to-ready and the same first-vs-median TTFT;
  4. vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server --uds``) with
     the same engine arguments (``servers.vllm_argv``), cold then warm: launch-to-ready,
     and after the cold launch the same first-vs-median TTFT;
  5. AsyncLLM in-process, without HTTP (on qwenbox's warm caches): a worker process
     (``python -m qwenbox.tools.bench.startup direct ...``) opens ``qwenbox.engine.Engine``
     (AsyncLLM in that process), runs the same warm-up, the same TTFT sequence and the same
     throughput workload, calling ``engine.generate`` directly. It renders the chat
     template and tokenizes per request, as the API does, so the ratio API / in-process is
     what HTTP, JSON, SSE and our handlers add.
Before any server starts, every prompt set is checked with the served model's tokenizer
(``tokens.check_chat_set``): distinct token sequences, no KV block shared past the
template and system prompt; a set that fails ends the run (exit status 2).
The worker is a separate process only so vLLM's output stays out of the printed table;
inside it, the load generator and AsyncLLM share one process and one event loop.
Requests go one after another (TTFT) or at ``--throughput-concurrency`` (at most
``workload.MAX_CONCURRENCY``); over HTTP each has the client timeout ``--request-timeout``.
``validate`` refuses options out of range before a server starts.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ..client import (Result, Server, ServerError, package_env, running, served_model, serve_argv, socket_dir,
                      stream_chat, unix_session)
from ..logs import request_values
from ..report import dig, fmt, table, write_json
from ..stats import median, ratio, summary
from .results import busy_note, finish, log_dir_for, machine, out_path
from .servers import CacheState, derived_config, vllm_argv, vllm_env  # noqa: F401 (vllm_argv: tests)
from .tokens import PromptSetError, check_chat_set, load_tokenizer
from .workload import MAX_CONCURRENCY, MAX_REQUESTS, OptionError, check_range, synthetic_text


# ------------------------------------------------------------------ workloads (same for every path)
def _system(cfg: Any) -> list[dict[str, str]]:
    sp = cfg.warmup.system_prompt
    return [{"role": "system", "content": sp}] if sp else []


def ttft_messages(cfg: Any, args: Any) -> list[list[dict[str, str]]]:
    """1 + after_ready chat prompts of the same length, no two sharing a prefix past the system prompt."""
    rng = random.Random(args.seed)
    return [_system(cfg) + [{"role": "user", "content": synthetic_text(args.prompt_words, f"first-{i}", rng)}]
            for i in range(1 + args.after_ready)]


def throughput_messages(cfg: Any, args: Any, rep: int = 0) -> list[list[dict[str, str]]]:
    """The throughput workload; each repetition has its own prompts (no prefix-cache help)."""
    rng = random.Random(args.seed + 1 + 1000 * rep)
    return [_system(cfg) + [{"role": "user", "content": synthetic_text(args.prompt_words, f"tp{rep}-{i}", rng)}]
            for i in range(args.throughput_requests)]


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repetition with the median requests/s, plus every repetition's req/s."""
    ordered = sorted(runs, key=lambda r: r["requests_per_s"] or 0)
    pick = dict(ordered[(len(ordered) - 1) // 2])
    pick["requests_per_s_runs"] = [r["requests_per_s"] for r in runs]
    pick["e2e_p50_s_runs"] = [r["e2e_s"]["p50"] for r in runs]
    pick["repetitions"] = len(runs)
    return pick


def ttft_figures(ttfts: list[float | None]) -> dict[str, Any]:
    first, rest = (ttfts[0] if ttfts else None), [t for t in ttfts[1:] if t is not None]
    med = median(rest)
    return {"first_ttft_s": first, "median_next_ttft_s": med, "first_over_median": ratio(first, med),
            "next_n": len(rest), "ttfts_s": ttfts}


async def _pool(items: list[Any], concurrency: int, fn) -> tuple[list[Any], float]:
    """Run ``fn(item)`` over items with at most ``concurrency`` in flight; results in order, wall time."""
    results: list[Any] = [None] * len(items)
    it = iter(enumerate(items))

    async def worker() -> None:
        for i, item in it:
            results[i] = await fn(item)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(items))))))
    return results, time.monotonic() - t0


def throughput_figures(results: list[Result], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    toks = sum(r.output_tokens for r in ok)
    return {"requests": len(results), "ok": len(ok), "failures": len(results) - len(ok),
            "wall_s": wall_s, "requests_per_s": len(ok) / wall_s if wall_s else None,
            "output_tokens_per_s": toks / wall_s if wall_s else None,
            "e2e_s": summary(r.e2e_s for r in ok), "ttft_s": summary(r.ttft_s for r in ok)}


# ------------------------------------------------------------------ through an HTTP server
def _body(model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True}


def ttft_ids(tag: str, n: int) -> list[str]:
    return [f"bench-{tag}-{i}" for i in range(n)]


async def http_ttft(sock: str, model: str, prompts: list, args: Any, ids: list[str] | None = None) -> dict[str, Any]:
    async with unix_session(sock) as session:
        results = []
        for i, msgs in enumerate(prompts):   # one after another: the first one is THE first request
            results.append(await stream_chat(session, _body(model, msgs, args.max_tokens), args.request_timeout,
                                               request_id=ids[i] if ids else None))
    fig = ttft_figures([r.ttft_s if r.ok else None for r in results])
    fig["failures"] = [r.failure for r in results if not r.ok]
    return fig


def add_server_side(fig: dict[str, Any], log_path: Path, ids: list[str]) -> None:
    """qwenbox logs its own TTFT per request: the same ratio without the client's share."""
    s = ttft_figures(request_values(log_path, ids))
    fig["server_side"] = {k: s[k] for k in ("first_ttft_s", "median_next_ttft_s", "first_over_median", "ttfts_s")}


async def http_throughput(sock: str, model: str, prompts: list, args: Any, ids: list[str] | None = None
                          ) -> dict[str, Any]:
    rid = iter(ids or [])
    async with unix_session(sock) as session:
        results, wall = await _pool(prompts, args.throughput_concurrency,
                                    lambda m: stream_chat(session, _body(model, m, args.max_tokens),
                                                            args.request_timeout, request_id=next(rid, None)))
    return throughput_figures(results, wall)


# ------------------------------------------------------------------ in-process (the worker)
async def _direct_one(engine: Any, messages: list[dict[str, str]], max_tokens: int) -> Result:
    from ...generation import GenerationRequest, Sampling

    r = Result()
    t0 = r.started = time.monotonic()
    try:
        ids = engine.tokenizer.encode(engine.tokenizer.render_chat(messages))
        req = GenerationRequest(request_id=f"bench-{uuid.uuid4().hex[:16]}", prompt_token_ids=ids,
                                sampling=Sampling(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                                stream=True)
        r.prompt_tokens = len(ids)
        async for deltas in engine.generate(req):
            now = time.monotonic()
            n = sum(d.num_tokens for d in deltas)
            if n:
                r.output_at(now)
                r.output_tokens += n
        r.e2e_s = time.monotonic() - t0
        r.ok, r.status = True, 200
    except Exception as e:   # the worker reports, the parent decides
        r.failure, r.error_code, r.e2e_s = "engine_error", f"{type(e).__name__}: {e}", time.monotonic() - t0
    return r


async def _direct(cfg: Any, args: Any) -> dict[str, Any]:
    from ... import warmup
    from ...engine import Engine

    t0 = time.monotonic()
    engine = await Engine.open(cfg)
    try:
        out: dict[str, Any] = {"open_s": time.monotonic() - t0, "cold_start": engine.cold_start.as_dict()}
        report = await warmup.run(engine, cfg)
        out["warmup_s"] = report.total_s
        ttfts = []
        for msgs in ttft_messages(cfg, args):
            r = await _direct_one(engine, msgs, args.max_tokens)
            ttfts.append(r.ttft_s if r.ok else None)
        out["ttft"] = ttft_figures(ttfts)
        runs, errors = [], set()
        for rep in range(args.throughput_repeats):
            results, wall = await _pool(throughput_messages(cfg, args, rep), args.throughput_concurrency,
                                        lambda m: _direct_one(engine, m, args.max_tokens))
            runs.append(throughput_figures(results, wall))
            errors |= {r.error_code for r in results if r.error_code}
        out["throughput"] = median_run(runs)
        out["throughput"]["errors"] = sorted(errors)[:5]
        return out
    finally:
        await engine.close()


def _worker_main(argv: list[str]) -> int:
    from ... import eventlog
    from ...config import load

    p = argparse.ArgumentParser(prog="python -m qwenbox.tools.bench.startup direct")
    p.add_argument("config")
    p.add_argument("out")
    for name, typ in (("seed", int), ("prompt_words", int), ("after_ready", int), ("max_tokens", int),
                      ("throughput_requests", int), ("throughput_concurrency", int), ("throughput_repeats", int)):
        p.add_argument("--" + name.replace("_", "-"), type=typ, required=True)
    a = p.parse_args(argv)
    cfg = load(a.config)
    eventlog.setup(cfg.logging.level, cfg.logging.format)
    result = asyncio.run(_direct(cfg, a))
    Path(a.out).write_text(json.dumps(result))
    return 0


def run_direct(args: Any, log_path: Path, json_path: Path, config: str | None = None,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    argv = [sys.executable, "-m", "qwenbox.tools.bench.startup", "direct", str(Path(config or args.config).resolve()),
            str(json_path)]
    for name in ("seed", "prompt_words", "after_ready", "max_tokens", "throughput_requests", "throughput_concurrency",
                 "throughput_repeats"):
        argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=package_env(env), process_group=0)
        try:
            rc = proc.wait(timeout=args.ready_timeout + 600)
        except BaseException:
            proc.kill()
            proc.wait(10)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
    if rc != 0 or not json_path.exists():
        raise ServerError(f"in-process worker exited with {rc}; log: {log_path}")
    return json.loads(json_path.read_text())


# ------------------------------------------------------------------ the run
def validate(args: Any) -> None:
    """Every option of this mode in range, else OptionError (before any server starts)."""
    check_range("--after-ready", args.after_ready, 0, MAX_REQUESTS)
    check_range("--throughput-requests", args.throughput_requests, 1, MAX_REQUESTS)
    check_range("--throughput-concurrency", args.throughput_concurrency, 1, MAX_CONCURRENCY)
    check_range("--throughput-repeats", args.throughput_repeats, 1)
    check_range("--prompt-words", args.prompt_words, 1)
    check_range("--max-tokens", args.max_tokens, 1)
    if args.request_timeout <= 0 or args.ready_timeout <= 0:
        raise OptionError("--request-timeout and --ready-timeout must be > 0")


def _launch(srv: Server) -> dict[str, Any]:
    return {"launch_to_listen_s": srv.launch_to_listen_s, "launch_to_ready_s": srv.launch_to_ready_s}


def check_prompts(cfg: Any, args: Any) -> dict[str, Any]:
    """Every prompt set this run sends, checked with the served model's tokenizer: the TTFT
    set and every throughput repetition are distinct token sequences sharing no KV block
    past the template and system prompt, and no two repetitions share a prompt."""
    tok = load_tokenizer(args.tokenizer or cfg.model.local_tokenizer_dir or cfg.model.local_dir)
    bs = cfg.engine.block_size
    out = {"ttft": check_chat_set(tok, ttft_messages(cfg, args), "ttft", block_size=bs)}
    every = [m for rep in range(args.throughput_repeats) for m in throughput_messages(cfg, args, rep)]
    out["throughput"] = check_chat_set(tok, every, "throughput (all repetitions)", block_size=bs)
    return out


def _launch_entry(srv: Server, cache: CacheState, state: str, before: dict[str, Any]) -> dict[str, Any]:
    return {**_launch(srv), "cache_state": state, "caches_at_launch": before, "caches_after": cache.snapshot()}


def main(args: Any) -> int:
    """The whole ``bench startup`` run; ``bench.run`` has validated ``args``.

    Cache state: qwenbox and vLLM's server each get their own fresh, empty cache
    directories (``servers.CacheState``) for a cold launch, then are relaunched on the
    caches they filled themselves for a warm one. Ratios are only taken between launches
    of the same state."""
    import shutil
    import tempfile

    from ...config import load

    cfg = load(args.config)
    out = out_path(args, "startup")
    logs = log_dir_for(out)
    res: dict[str, Any] = {
        "kind": "startup", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
        "config": str(Path(args.config).resolve()), "model": cfg.model.name, "model_path": cfg.model.path,
        "params": {k: getattr(args, k) for k in ("seed", "prompt_words", "after_ready", "max_tokens",
                                                 "throughput_requests", "throughput_concurrency",
                                                 "throughput_repeats")},
        "errors": {}}
    print(f"qwenbox bench startup: config {args.config}, model {cfg.model.name}; logs in {logs}/", flush=True)
    try:
        res["prompt_check"] = check_prompts(cfg, args)
    except PromptSetError as e:
        print(f"qwenbox bench startup: {e}", flush=True)
        return 2
    note = busy_note()
    if note:
        print(note, flush=True)
    ttft_prompts = ttft_messages(cfg, args)
    caches_root = Path(tempfile.mkdtemp(prefix="qwenbox-bench-caches-"))
    qb_cache, vl_cache = CacheState(caches_root / "qwenbox"), CacheState(caches_root / "vllm")
    res["caches_root"] = str(caches_root)
    try:
        with socket_dir() as sd:
            qcfg = str(derived_config(args.config, sd / "qwenbox.toml",
                                      {"engine": {"cache_dir": str(qb_cache.vllm_dir)}}))
            qb_cache.create()
            # 1. qwenbox serve, warm-up as configured, empty caches
            _say("qwenbox serve (warm-up as configured), empty caches")
            before = qb_cache.snapshot()
            srv = Server("qwenbox", serve_argv(qcfg, str(sd / "qb.sock")), str(sd / "qb.sock"),
                         logs / "qwenbox-serve-cold.log", env=qb_cache.env())
            with running(srv, args.ready_timeout):
                res["qwenbox"] = {**_launch(srv), "warmup_enabled": cfg.warmup.enabled,
                                  "cold_start": (srv.ready_health or {}).get("cold_start"),
                                  "warmup": (srv.ready_health or {}).get("warmup")}
                model, _ = served_model(srv.sock)
                ids = ttft_ids("warm", len(ttft_prompts))
                res["qwenbox"]["ttft"] = asyncio.run(http_ttft(srv.sock, model, ttft_prompts, args, ids))
                _say("throughput through the API")
                runs, tp_ids = [], []
                for rep in range(args.throughput_repeats):
                    ids_rep = ttft_ids(f"tp{rep}", args.throughput_requests)
                    runs.append(asyncio.run(http_throughput(srv.sock, model, throughput_messages(cfg, args, rep),
                                                            args, ids_rep)))
                    runs[-1]["_ids"] = ids_rep
                res["qwenbox"]["throughput"] = median_run(runs)
                tp_ids = res["qwenbox"]["throughput"].pop("_ids")
                for r in runs:
                    r.pop("_ids", None)
            res["qwenbox"].update(cache_state="cold", caches_at_launch=before, caches_after=qb_cache.snapshot())
            add_server_side(res["qwenbox"]["ttft"], srv.log_path, ids)
            # the server's own view of the same requests: its latency without the client's share
            res["qwenbox"]["throughput"]["server_side_e2e_s"] = summary(
                request_values(srv.log_path, tp_ids, "latency_s"))

            # 2. restarted on the caches it filled
            _say("qwenbox serve, restarted on its own caches")
            before = qb_cache.snapshot()
            srv = Server("qwenbox (warm caches)", serve_argv(qcfg, str(sd / "qbw.sock")), str(sd / "qbw.sock"),
                         logs / "qwenbox-serve-warm.log", env=qb_cache.env())
            with running(srv, args.ready_timeout):
                res["qwenbox_warm"] = {**_launch_entry(srv, qb_cache, "warm", before),
                                       "cold_start": (srv.ready_health or {}).get("cold_start")}

            # 3. the same without warm-up (warm caches)
            _say("qwenbox serve --no-warmup (warm caches)")
            before = qb_cache.snapshot()
            srv = Server("qwenbox --no-warmup", serve_argv(qcfg, str(sd / "qbnw.sock"), ["--no-warmup"]),
                         str(sd / "qbnw.sock"), logs / "qwenbox-serve-no-warmup.log", env=qb_cache.env())
            with running(srv, args.ready_timeout):
                res["qwenbox_no_warmup"] = {**_launch(srv), "cold_start": (srv.ready_health or {}).get("cold_start")}
                model, _ = served_model(srv.sock)
                ids = ttft_ids("nowarm", len(ttft_prompts))
                res["qwenbox_no_warmup"]["ttft"] = asyncio.run(http_ttft(srv.sock, model, ttft_prompts, args, ids))
            res["qwenbox_no_warmup"].update(cache_state="warm", caches_at_launch=before)
            add_server_side(res["qwenbox_no_warmup"]["ttft"], srv.log_path, ids)

            # 4. vLLM's own OpenAI server: empty caches of its own, then restarted on them
            if not args.skip_vllm:
                vl_cache.create()
                for state in ("cold", "warm"):
                    key = "vllm_server" if state == "cold" else "vllm_server_warm"
                    _say(f"vLLM's OpenAI server (python -m vllm.entrypoints.openai.api_server), "
                         f"{'empty caches' if state == 'cold' else 'restarted on its own caches'}")
                    sock = str(sd / f"vllm-{state}.sock")
                    before = vl_cache.snapshot()
                    srv = Server("vllm", vllm_argv(cfg, sock), sock, logs / f"vllm-api-server-{state}.log",
                                 env={**vl_cache.env(), **vllm_env()})
                    res[key] = {"argv": srv.argv[1:]}
                    try:
                        with running(srv, args.ready_timeout):
                            res[key].update(_launch_entry(srv, vl_cache, state, before))
                            if state == "cold":
                                res[key]["ttft"] = asyncio.run(http_ttft(sock, cfg.model.name, ttft_prompts, args))
                    except ServerError as e:
                        res["errors"][key] = str(e).splitlines()[0]
                        print(f"  vLLM's server failed: {res['errors'][key]}", flush=True)
                        break

            # 5. AsyncLLM in-process, no HTTP (on qwenbox's warm caches: not a start-up figure)
            _say("AsyncLLM in-process (qwenbox.engine.Engine, no HTTP)")
            try:
                res["in_process"] = run_direct(args, logs / "in-process.log", logs / "in-process.json",
                                               config=qcfg, env=qb_cache.env())
            except ServerError as e:
                res["errors"]["in_process"] = str(e)
                print(f"  in-process run failed: {e}", flush=True)
    finally:
        shutil.rmtree(caches_root, ignore_errors=True)

    res["ratios"] = ratios(res)
    finish(res)
    write_json(out, res)
    print()
    print(report(res))
    print(f"\nJSON: {out}")
    return 0


def _say(what: str) -> None:
    print(f"  - {what} ...", flush=True)


def ratios(res: dict[str, Any]) -> dict[str, Any]:
    g = lambda *path: dig(res, *path)  # noqa: E731
    return {
        "first_ttft_over_median_warm": g("qwenbox", "ttft", "first_over_median"),
        "first_ttft_over_median_no_warmup": g("qwenbox_no_warmup", "ttft", "first_over_median"),
        "first_ttft_over_median_vllm_server": g("vllm_server", "ttft", "first_over_median"),
        "first_ttft_over_median_warm_server_side": g("qwenbox", "ttft", "server_side", "first_over_median"),
        "first_ttft_over_median_no_warmup_server_side": g("qwenbox_no_warmup", "ttft", "server_side",
                                                          "first_over_median"),
        "api_over_in_process_requests_per_s": ratio(g("qwenbox", "throughput", "requests_per_s"),
                                                      g("in_process", "throughput", "requests_per_s")),
        "api_over_in_process_p50": ratio(g("qwenbox", "throughput", "e2e_s", "p50"),
                                           g("in_process", "throughput", "e2e_s", "p50")),
        "api_over_in_process_p95": ratio(g("qwenbox", "throughput", "e2e_s", "p95"),
                                           g("in_process", "throughput", "e2e_s", "p95")),
        "api_server_side_over_in_process_p50": ratio(g("qwenbox", "throughput", "server_side_e2e_s", "p50"),
                                                       g("in_process", "throughput", "e2e_s", "p50")),
        "api_server_side_over_in_process_p95": ratio(g("qwenbox", "throughput", "server_side_e2e_s", "p95"),
                                                       g("in_process", "throughput", "e2e_s", "p95")),
        # only between launches from the same cache state
        "launch_to_ready_cold_qwenbox_over_vllm": ratio(g("qwenbox", "launch_to_ready_s"),
                                                          g("vllm_server", "launch_to_ready_s")),
        "launch_to_ready_warm_qwenbox_over_vllm": ratio(g("qwenbox_warm", "launch_to_ready_s"),
                                                          g("vllm_server_warm", "launch_to_ready_s")),
        "launch_to_ready_warm_qwenbox_no_warmup_over_vllm": ratio(g("qwenbox_no_warmup", "launch_to_ready_s"),
                                                                    g("vllm_server_warm", "launch_to_ready_s")),
    }


def report(res: dict[str, Any]) -> str:
    f, g = fmt, lambda *p: dig(res, *p)
    parts = []
    cold, warm = g("qwenbox", "cold_start") or {}, g("qwenbox_warm", "cold_start") or {}
    unit = lambda k, v: f(v, "" if k.endswith("tokens") else "s") if isinstance(v, (int, float)) else f(v)  # noqa: E731
    rows = [[k, unit(k, cold.get(k)), unit(k, warm.get(k))] for k in dict.fromkeys([*cold, *warm])]
    parts.append(table(["phase", "empty caches", "warm caches"], rows,
                       "Start-up phases of `qwenbox serve` (from /health cold_start)"))

    rows = []
    for key, label in (("qwenbox", "qwenbox serve (pre-warm)"), ("qwenbox_no_warmup", "qwenbox serve --no-warmup"),
                       ("vllm_server", "vLLM OpenAI server"), ("in_process", "AsyncLLM in-process (after warm-up)")):
        t = g(key, "ttft")
        if t:
            ss = t.get("server_side") or {}
            rows.append([label, f(t["first_ttft_s"], "s"), f(t["median_next_ttft_s"], "s"),
                         f(t["first_over_median"], "x"), f(ss.get("first_ttft_s"), "s"),
                         f(ss.get("median_next_ttft_s"), "s"), f(ss.get("first_over_median"), "x")])
    n = res["params"]["after_ready"]
    parts.append(table(["server", "first TTFT", f"median of next {n}", "first / median",
                          "server: first", "server: median", "server: ratio"], rows,
                         "TTFT of the first request after ready vs the next ones (client-side; "
                         "server: qwenbox's own request log)"))

    rows = []
    api, direct = g("qwenbox", "throughput"), g("in_process", "throughput")
    for label, t in (("AsyncLLM in-process", direct), ("qwenbox API (unix socket, SSE)", api)):
        if t:
            rows.append([label, f(t["requests_per_s"]), f(t["output_tokens_per_s"]), f(t["e2e_s"]["p50"], "s"),
                         f(t["e2e_s"]["p95"], "s"), f"{t['ok']}/{t['requests']}"])
    r = res["ratios"]
    rows.append(["ratio API / in-process", f(r["api_over_in_process_requests_per_s"], "x"), "",
                 f(r["api_over_in_process_p50"], "x"), f(r["api_over_in_process_p95"], "x"), ""])
    ss = (api or {}).get("server_side_e2e_s") or {}
    if ss.get("n"):
        rows.append(["qwenbox API, its own log (no client)", "", "", f(ss["p50"], "s"), f(ss["p95"], "s"),
                     str(ss["n"])])
        rows.append(["ratio API (own log) / in-process", "", "", f(r["api_server_side_over_in_process_p50"], "x"),
                     f(r["api_server_side_over_in_process_p95"], "x"), ""])
    p = res["params"]
    parts.append(table(["path", "req/s", "tok/s", "p50 latency", "p95 latency", "ok"], rows,
                         f"Throughput: {p['throughput_requests']} streamed requests, concurrency "
                         f"{p['throughput_concurrency']}, {p['max_tokens']} tokens each; the median of "
                         f"{p.get('throughput_repeats', 1)} repetitions by req/s (all: "
                         + "; ".join(f"{lbl} " + ", ".join(fmt(x) for x in (t or {}).get("requests_per_s_runs", []))
                                     for lbl, t in (("in-process", direct), ("API", api)) if t) + ")"))

    rows = []
    for key, label, state, vkey in (
            ("qwenbox", "qwenbox serve (pre-warm)", "cold", "vllm_server"),
            ("vllm_server", "vLLM OpenAI server", "cold", "vllm_server"),
            ("qwenbox_warm", "qwenbox serve (pre-warm)", "warm", "vllm_server_warm"),
            ("qwenbox_no_warmup", "qwenbox serve --no-warmup", "warm", "vllm_server_warm"),
            ("vllm_server_warm", "vLLM OpenAI server", "warm", "vllm_server_warm")):
        if g(key, "launch_to_ready_s") is not None:
            empty = g(key, "caches_at_launch", "empty")
            rows.append([label, f"{state} ({'empty' if empty else 'filled'} at launch)" if empty is not None else state,
                         f(g(key, "launch_to_listen_s"), "s"), f(g(key, "launch_to_ready_s"), "s"),
                         f(ratio(g(key, "launch_to_ready_s"), g(vkey, "launch_to_ready_s")), "x")])
    parts.append(table(["server", "caches", "answers /health", "ready (/health 200)", "ready / vLLM's (same state)"],
                       rows, "Launch to ready: cold = each server on its own empty cache dirs, warm = restarted on "
                             "the caches it filled itself", left=(0, 1)))
    if res.get("errors"):
        parts.append("Errors: " + "; ".join(f"{k}: {v}" for k, v in res["errors"].items()))
    return "\n\n".join(parts)


if __name__ == "__main__":   # vLLM's engine core is spawned: this guard is required
    if len(sys.argv) > 1 and sys.argv[1] == "direct":
        sys.exit(_worker_main(sys.argv[2:]))
    print("usage: python -m qwenbox.tools.bench.startup direct CONFIG OUT.json ... (use `qwenbox bench startup`)",
          file=sys.stderr)
    sys.exit(2)
