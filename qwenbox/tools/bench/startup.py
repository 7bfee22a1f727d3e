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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..client import (
    Result,
    Server,
    ServerError,
    package_env,
    running,
    serve_argv,
    served_model,
    socket_dir,
    stream_chat,
    unix_session,
)
from ..logs import request_values
from ..report import dig, fmt, table, write_json
from ..stats import median, ratio, summary
from .results import busy_note, finish, log_dir_for, machine, out_path
from .servers import CacheState, derived_config, vllm_argv, vllm_env
from .tokens import PromptSetError, check_chat_set, load_tokenizer
from .workload import MAX_CONCURRENCY, MAX_REQUESTS, OptionError, check_range, synthetic_text

if TYPE_CHECKING:
    from ...config import Config

Chat = list[dict[str, str]]      # one chat request's messages

# The options that shape the workloads: recorded in the JSON's params and passed to the
# in-process worker, which builds the same workloads from them.
WORKER_PARAMS = ("seed", "prompt_words", "after_ready", "max_tokens", "throughput_requests",
                 "throughput_concurrency", "throughput_repeats")


# ------------------------------------------------------------------ workloads (same for every path)
def _system(cfg: Any) -> list[dict[str, str]]:
    sp = cfg.warmup.system_prompt
    return [{"role": "system", "content": sp}] if sp else []


def ttft_messages(cfg: Any, args: Any) -> list[Chat]:
    """1 + after_ready chat prompts of the same length, no two sharing a prefix past the system prompt."""
    rng = random.Random(args.seed)
    return [[*_system(cfg), {"role": "user", "content": synthetic_text(args.prompt_words, f"first-{i}", rng)}]
            for i in range(1 + args.after_ready)]


def throughput_messages(cfg: Any, args: Any, rep: int = 0) -> list[Chat]:
    """The throughput workload; each repetition has its own prompts (no prefix-cache help)."""
    rng = random.Random(args.seed + 1 + 1000 * rep)
    return [[*_system(cfg), {"role": "user", "content": synthetic_text(args.prompt_words, f"tp{rep}-{i}", rng)}]
            for i in range(args.throughput_requests)]


def _median_index(runs: list[dict[str, Any]]) -> int:
    """Which repetition has the median requests/s (the lower middle one of an even count)."""
    order = sorted(range(len(runs)), key=lambda i: runs[i]["requests_per_s"] or 0)
    return order[(len(order) - 1) // 2]


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repetition with the median requests/s, plus every repetition's req/s."""
    pick = dict(runs[_median_index(runs)])
    pick["requests_per_s_runs"] = [r["requests_per_s"] for r in runs]
    pick["e2e_p50_s_runs"] = [r["e2e_s"]["p50"] for r in runs]
    pick["repetitions"] = len(runs)
    return pick


def ttft_figures(ttfts: list[float | None]) -> dict[str, Any]:
    first, rest = (ttfts[0] if ttfts else None), [t for t in ttfts[1:] if t is not None]
    med = median(rest)
    return {"first_ttft_s": first, "median_next_ttft_s": med, "first_over_median": ratio(first, med),
            "next_n": len(rest), "ttfts_s": ttfts}


async def _pool(items: list[Any], concurrency: int, fn: Callable[[Any], Awaitable[Any]]) -> tuple[list[Any], float]:
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


async def http_ttft(sock: str, model: str, prompts: list[Chat], args: Any,
                    ids: list[str] | None = None) -> dict[str, Any]:
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


async def http_throughput(sock: str, model: str, prompts: list[Chat], args: Any, ids: list[str] | None = None
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
    for name in WORKER_PARAMS:
        p.add_argument("--" + name.replace("_", "-"), type=int, required=True)
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
    for name in WORKER_PARAMS:
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
    result: dict[str, Any] = json.loads(json_path.read_text())
    return result


# ------------------------------------------------------------------ the figures, described once
class Ratio(NamedTuple):
    """One figure of the JSON's ``ratios``: ``over`` / ``under``, each a path into the result
    (no ``under``: ``over`` is a ratio already)."""
    key: str
    over: tuple[str, ...]
    under: tuple[str, ...] | None = None


class Launch(NamedTuple):
    """One server launch of the run: its entry in the JSON, its row in the launch-to-ready
    table, and the vLLM launch from the same cache state it is compared with (ratios are
    only taken within one state); ``ratio_key`` names that ratio in ``ratios``."""
    key: str
    label: str
    cache_state: str
    vllm_key: str
    ratio_key: str | None = None


class Column(NamedTuple):
    """One figure column of a printed table: its header, where the figure sits in a row's
    entry, and its unit (``fmt``'s)."""
    header: str
    path: tuple[str, ...]
    unit: str = ""


API, IN_PROCESS = ("qwenbox", "throughput"), ("in_process", "throughput")

LAUNCHES = (
    Launch("qwenbox", "qwenbox serve (pre-warm)", "cold", "vllm_server", "launch_to_ready_cold_qwenbox_over_vllm"),
    Launch("vllm_server", "vLLM OpenAI server", "cold", "vllm_server"),
    Launch("qwenbox_warm", "qwenbox serve (pre-warm)", "warm", "vllm_server_warm",
           "launch_to_ready_warm_qwenbox_over_vllm"),
    Launch("qwenbox_no_warmup", "qwenbox serve --no-warmup", "warm", "vllm_server_warm",
           "launch_to_ready_warm_qwenbox_no_warmup_over_vllm"),
    Launch("vllm_server_warm", "vLLM OpenAI server", "warm", "vllm_server_warm"),
)

RATIOS = (
    Ratio("first_ttft_over_median_warm", ("qwenbox", "ttft", "first_over_median")),
    Ratio("first_ttft_over_median_no_warmup", ("qwenbox_no_warmup", "ttft", "first_over_median")),
    Ratio("first_ttft_over_median_vllm_server", ("vllm_server", "ttft", "first_over_median")),
    Ratio("first_ttft_over_median_warm_server_side", ("qwenbox", "ttft", "server_side", "first_over_median")),
    Ratio("first_ttft_over_median_no_warmup_server_side",
          ("qwenbox_no_warmup", "ttft", "server_side", "first_over_median")),
    Ratio("api_over_in_process_requests_per_s", (*API, "requests_per_s"), (*IN_PROCESS, "requests_per_s")),
    Ratio("api_over_in_process_p50", (*API, "e2e_s", "p50"), (*IN_PROCESS, "e2e_s", "p50")),
    Ratio("api_over_in_process_p95", (*API, "e2e_s", "p95"), (*IN_PROCESS, "e2e_s", "p95")),
    Ratio("api_server_side_over_in_process_p50", (*API, "server_side_e2e_s", "p50"), (*IN_PROCESS, "e2e_s", "p50")),
    Ratio("api_server_side_over_in_process_p95", (*API, "server_side_e2e_s", "p95"), (*IN_PROCESS, "e2e_s", "p95")),
    # only between launches from the same cache state
    *(Ratio(launch.ratio_key, (launch.key, "launch_to_ready_s"), (launch.vllm_key, "launch_to_ready_s"))
      for launch in LAUNCHES if launch.ratio_key),
)

# The TTFT table: one row per server that ran the TTFT sequence, its figures under "ttft".
TTFT_ROWS = (("qwenbox", "qwenbox serve (pre-warm)"), ("qwenbox_no_warmup", "qwenbox serve --no-warmup"),
             ("vllm_server", "vLLM OpenAI server"), ("in_process", "AsyncLLM in-process (after warm-up)"))
TTFT_COLUMNS = (
    Column("first TTFT", ("first_ttft_s",), "s"),
    Column("median of next {after_ready}", ("median_next_ttft_s",), "s"),
    Column("first / median", ("first_over_median",), "x"),
    Column("server: first", ("server_side", "first_ttft_s"), "s"),
    Column("server: median", ("server_side", "median_next_ttft_s"), "s"),
    Column("server: ratio", ("server_side", "first_over_median"), "x"),
)

# The throughput table: the two paths (entry, label, name in the title), their figures under
# "throughput"; then the ratio rows, one RATIOS key (or none) per figure column.
THROUGHPUT_ROWS = (("in_process", "AsyncLLM in-process", "in-process"),
                   ("qwenbox", "qwenbox API (unix socket, SSE)", "API"))
THROUGHPUT_COLUMNS = (
    Column("req/s", ("requests_per_s",)),
    Column("tok/s", ("output_tokens_per_s",)),
    Column("p50 latency", ("e2e_s", "p50"), "s"),
    Column("p95 latency", ("e2e_s", "p95"), "s"),
)
RatioRow = tuple[str, tuple[str | None, ...]]      # a row's label, then a RATIOS key or None per column
API_RATIO_ROW: RatioRow = (
    "ratio API / in-process",
    ("api_over_in_process_requests_per_s", None, "api_over_in_process_p50", "api_over_in_process_p95"))
OWN_LOG_RATIO_ROW: RatioRow = (
    "ratio API (own log) / in-process",
    (None, None, "api_server_side_over_in_process_p50", "api_server_side_over_in_process_p95"))

LAUNCH_COLUMNS = (
    Column("answers /health", ("launch_to_listen_s",), "s"),
    Column("ready (/health 200)", ("launch_to_ready_s",), "s"),
)


def ratios(res: dict[str, Any]) -> dict[str, float | None]:
    """Every figure of ``RATIOS``, from the run's result; None where a side is missing."""
    return {r.key: dig(res, *r.over) if r.under is None else ratio(dig(res, *r.over), dig(res, *r.under))
            for r in RATIOS}


# ------------------------------------------------------------------ the run
@dataclass
class _Run:
    """What every step of one ``bench startup`` run shares: the config and options, where
    sockets and logs go, each server's cache state, and the errors recorded so far."""
    cfg: Config
    args: argparse.Namespace
    sockets: Path
    logs: Path
    qwenbox_config: str          # the config with engine.cache_dir in qwenbox's cache state
    qwenbox_cache: CacheState
    vllm_cache: CacheState
    ttft_prompts: list[Chat]
    errors: dict[str, str]

    def qwenbox(self, name: str, sock: str, log: str, extra: Sequence[str] = ()) -> Server:
        path = str(self.sockets / sock)
        return Server(name, serve_argv(self.qwenbox_config, path, list(extra)), path, self.logs / log,
                      env=self.qwenbox_cache.env())


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


def _at_ready(srv: Server, key: str) -> Any:
    """``key`` of the server's /health answer when it became ready (None without one)."""
    return (srv.ready_health or {}).get(key)


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


def _api_throughput(run: _Run, sock: str, model: str) -> tuple[dict[str, Any], list[str]]:
    """The throughput workload through the API, ``--throughput-repeats`` times: the median
    repetition (``median_run``) and the request ids it sent (to find them in the log)."""
    runs, ids = [], []
    for rep in range(run.args.throughput_repeats):
        ids.append(ttft_ids(f"tp{rep}", run.args.throughput_requests))
        runs.append(asyncio.run(http_throughput(sock, model, throughput_messages(run.cfg, run.args, rep),
                                                run.args, ids[-1])))
    return median_run(runs), ids[_median_index(runs)]


def _qwenbox_cold(run: _Run) -> dict[str, Any]:
    """Step 1: ``qwenbox serve`` (warm-up as configured) on empty caches: launch to ready,
    its phases, the TTFT sequence and the throughput workload, each also from its own log."""
    _say("qwenbox serve (warm-up as configured), empty caches")
    before = run.qwenbox_cache.snapshot()
    srv = run.qwenbox("qwenbox", "qb.sock", "qwenbox-serve-cold.log")
    with running(srv, run.args.ready_timeout):
        entry = {**_launch(srv), "warmup_enabled": run.cfg.warmup.enabled,
                 "cold_start": _at_ready(srv, "cold_start"), "warmup": _at_ready(srv, "warmup")}
        model, _ = served_model(srv.sock)
        ids = ttft_ids("warm", len(run.ttft_prompts))
        entry["ttft"] = asyncio.run(http_ttft(srv.sock, model, run.ttft_prompts, run.args, ids))
        _say("throughput through the API")
        entry["throughput"], throughput_ids = _api_throughput(run, srv.sock, model)
    entry.update(cache_state="cold", caches_at_launch=before, caches_after=run.qwenbox_cache.snapshot())
    add_server_side(entry["ttft"], srv.log_path, ids)
    # the server's own view of the same requests: its latency without the client's share
    entry["throughput"]["server_side_e2e_s"] = summary(request_values(srv.log_path, throughput_ids, "latency_s"))
    return entry


def _qwenbox_warm(run: _Run) -> dict[str, Any]:
    """Step 2: ``qwenbox serve`` restarted on the caches it filled: launch to ready, its phases."""
    _say("qwenbox serve, restarted on its own caches")
    before = run.qwenbox_cache.snapshot()
    srv = run.qwenbox("qwenbox (warm caches)", "qbw.sock", "qwenbox-serve-warm.log")
    with running(srv, run.args.ready_timeout):
        return {**_launch_entry(srv, run.qwenbox_cache, "warm", before), "cold_start": _at_ready(srv, "cold_start")}


def _qwenbox_no_warmup(run: _Run) -> dict[str, Any]:
    """Step 3: ``qwenbox serve --no-warmup`` on the warm caches: launch to ready and the TTFT sequence."""
    _say("qwenbox serve --no-warmup (warm caches)")
    before = run.qwenbox_cache.snapshot()
    srv = run.qwenbox("qwenbox --no-warmup", "qbnw.sock", "qwenbox-serve-no-warmup.log", ["--no-warmup"])
    with running(srv, run.args.ready_timeout):
        entry = {**_launch(srv), "cold_start": _at_ready(srv, "cold_start")}
        model, _ = served_model(srv.sock)
        ids = ttft_ids("nowarm", len(run.ttft_prompts))
        entry["ttft"] = asyncio.run(http_ttft(srv.sock, model, run.ttft_prompts, run.args, ids))
    entry.update(cache_state="warm", caches_at_launch=before)
    add_server_side(entry["ttft"], srv.log_path, ids)
    return entry


def _vllm_servers(run: _Run, res: dict[str, Any]) -> None:
    """Step 4: vLLM's own OpenAI server on empty caches of its own (launch to ready, the TTFT
    sequence), then restarted on them (launch to ready). A launch that fails is recorded in
    ``errors`` and ends the step."""
    run.vllm_cache.create()
    for state, key, caches in (("cold", "vllm_server", "empty caches"),
                               ("warm", "vllm_server_warm", "restarted on its own caches")):
        _say(f"vLLM's OpenAI server (python -m vllm.entrypoints.openai.api_server), {caches}")
        sock = str(run.sockets / f"vllm-{state}.sock")
        before = run.vllm_cache.snapshot()
        srv = Server("vllm", vllm_argv(run.cfg, sock), sock, run.logs / f"vllm-api-server-{state}.log",
                     env={**run.vllm_cache.env(), **vllm_env()})
        entry = res[key] = {"argv": srv.argv[1:]}
        try:
            with running(srv, run.args.ready_timeout):
                entry.update(_launch_entry(srv, run.vllm_cache, state, before))
                if state == "cold":
                    entry["ttft"] = asyncio.run(http_ttft(sock, run.cfg.model.name, run.ttft_prompts, run.args))
        except ServerError as e:
            run.errors[key] = str(e).splitlines()[0]
            print(f"  vLLM's server failed: {run.errors[key]}", flush=True)
            return


def _in_process(run: _Run, res: dict[str, Any]) -> None:
    """Step 5: AsyncLLM in-process, no HTTP, on qwenbox's warm caches (not a start-up figure)."""
    _say("AsyncLLM in-process (qwenbox.engine.Engine, no HTTP)")
    try:
        res["in_process"] = run_direct(run.args, run.logs / "in-process.log", run.logs / "in-process.json",
                                       config=run.qwenbox_config, env=run.qwenbox_cache.env())
    except ServerError as e:
        run.errors["in_process"] = str(e)
        print(f"  in-process run failed: {e}", flush=True)


def _measure(cfg: Config, args: argparse.Namespace, logs: Path, res: dict[str, Any]) -> None:
    """Steps 1-5 into ``res``, one server at a time, each server on cache directories of its
    own under a temporary root that is removed at the end."""
    import shutil
    import tempfile

    caches_root = Path(tempfile.mkdtemp(prefix="qwenbox-bench-caches-"))
    res["caches_root"] = str(caches_root)
    qwenbox_cache, vllm_cache = CacheState(caches_root / "qwenbox"), CacheState(caches_root / "vllm")
    try:
        with socket_dir() as sockets:
            qwenbox_config = derived_config(args.config, sockets / "qwenbox.toml",
                                            {"engine": {"cache_dir": str(qwenbox_cache.vllm_dir)}})
            run = _Run(cfg, args, sockets, logs, str(qwenbox_config), qwenbox_cache, vllm_cache,
                       ttft_messages(cfg, args), res["errors"])
            qwenbox_cache.create()
            res["qwenbox"] = _qwenbox_cold(run)
            res["qwenbox_warm"] = _qwenbox_warm(run)
            res["qwenbox_no_warmup"] = _qwenbox_no_warmup(run)
            if not args.skip_vllm:
                _vllm_servers(run, res)
            _in_process(run, res)
    finally:
        shutil.rmtree(caches_root, ignore_errors=True)


def _header(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    """The result's first part: what ran, where, with which options."""
    return {"kind": "startup", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
            "config": str(Path(args.config).resolve()), "model": cfg.model.name, "model_path": cfg.model.path,
            "params": {k: getattr(args, k) for k in WORKER_PARAMS}, "errors": {}}


def main(args: argparse.Namespace) -> int:
    """The whole ``bench startup`` run; ``bench.run`` has validated ``args``.

    Cache state: qwenbox and vLLM's server each get their own fresh, empty cache
    directories (``servers.CacheState``) for a cold launch, then are relaunched on the
    caches they filled themselves for a warm one. Ratios are only taken between launches
    of the same state."""
    from ...config import load

    cfg = load(args.config)
    out = out_path(args, "startup")
    logs = log_dir_for(out)
    res = _header(cfg, args)
    print(f"qwenbox bench startup: config {args.config}, model {cfg.model.name}; logs in {logs}/", flush=True)
    try:
        res["prompt_check"] = check_prompts(cfg, args)
    except PromptSetError as e:
        print(f"qwenbox bench startup: {e}", flush=True)
        return 2
    note = busy_note()
    if note:
        print(note, flush=True)
    _measure(cfg, args, logs, res)
    res["ratios"] = ratios(res)
    finish(res)
    write_json(out, res)
    print()
    print(report(res))
    print(f"\nJSON: {out}")
    return 0


def _say(what: str) -> None:
    print(f"  - {what} ...", flush=True)


# ------------------------------------------------------------------ the printed tables
def _cells(entry: Any, columns: Sequence[Column]) -> list[str]:
    return [fmt(dig(entry, *c.path), c.unit) for c in columns]


def _phases_table(res: dict[str, Any]) -> str:
    """qwenbox's cold-start phases (/health ``cold_start``), empty caches vs warm."""
    cold, warm = dig(res, "qwenbox", "cold_start") or {}, dig(res, "qwenbox_warm", "cold_start") or {}

    def cell(key: str, v: Any) -> str:
        return fmt(v, "" if key.endswith("tokens") else "s") if isinstance(v, (int, float)) else fmt(v)

    rows = [[k, cell(k, cold.get(k)), cell(k, warm.get(k))] for k in dict.fromkeys([*cold, *warm])]
    return table(["phase", "empty caches", "warm caches"], rows,
                 "Start-up phases of `qwenbox serve` (from /health cold_start)")


def _ttft_table(res: dict[str, Any]) -> str:
    rows = [[label, *_cells(dig(res, key, "ttft"), TTFT_COLUMNS)] for key, label in TTFT_ROWS if dig(res, key, "ttft")]
    headers = [c.header.format(after_ready=res["params"]["after_ready"]) for c in TTFT_COLUMNS]
    return table(["server", *headers], rows, "TTFT of the first request after ready vs the next ones (client-side; "
                                             "server: qwenbox's own request log)")


def _ratio_cells(res: dict[str, Any], keys: Sequence[str | None]) -> list[str]:
    return [fmt(res["ratios"][k], "x") if k else "" for k in keys]


def _throughput_table(res: dict[str, Any]) -> str:
    paths = [(label, short, dig(res, key, "throughput")) for key, label, short in THROUGHPUT_ROWS]
    rows = [[label, *_cells(t, THROUGHPUT_COLUMNS), f"{t['ok']}/{t['requests']}"] for label, _, t in paths if t]
    label, keys = API_RATIO_ROW
    rows.append([label, *_ratio_cells(res, keys), ""])
    own_log = dig(res, *API, "server_side_e2e_s") or {}
    if own_log.get("n"):
        rows.append(["qwenbox API, its own log (no client)", "", "", fmt(own_log["p50"], "s"), fmt(own_log["p95"], "s"),
                     str(own_log["n"])])
        label, keys = OWN_LOG_RATIO_ROW
        rows.append([label, *_ratio_cells(res, keys), ""])
    p = res["params"]
    every = "; ".join(f"{short} " + ", ".join(fmt(x) for x in t.get("requests_per_s_runs", []))
                      for _, short, t in paths if t)
    title = (f"Throughput: {p['throughput_requests']} streamed requests, concurrency {p['throughput_concurrency']}, "
             f"{p['max_tokens']} tokens each; the median of {p.get('throughput_repeats', 1)} repetitions by req/s "
             f"(all: {every})")
    return table(["path", *(c.header for c in THROUGHPUT_COLUMNS), "ok"], rows, title)


def _launch_table(res: dict[str, Any]) -> str:
    rows = []
    for launch in LAUNCHES:
        entry = res.get(launch.key)
        if dig(entry, "launch_to_ready_s") is None:
            continue
        empty = dig(entry, "caches_at_launch", "empty")
        caches = (f"{launch.cache_state} ({'empty' if empty else 'filled'} at launch)" if empty is not None
                  else launch.cache_state)
        same_state_ratio = ratio(dig(entry, "launch_to_ready_s"), dig(res, launch.vllm_key, "launch_to_ready_s"))
        rows.append([launch.label, caches, *_cells(entry, LAUNCH_COLUMNS), fmt(same_state_ratio, "x")])
    return table(["server", "caches", *(c.header for c in LAUNCH_COLUMNS), "ready / vLLM's (same state)"], rows,
                 "Launch to ready: cold = each server on its own empty cache dirs, warm = restarted on "
                 "the caches it filled itself", left=(0, 1))


def report(res: dict[str, Any]) -> str:
    """The printed tables: start-up phases, first TTFT vs the next, throughput API vs
    in-process, launch to ready; then the errors recorded."""
    parts = [_phases_table(res), _ttft_table(res), _throughput_table(res), _launch_table(res)]
    if res.get("errors"):
        parts.append("Errors: " + "; ".join(f"{k}: {v}" for k, v in res["errors"].items()))
    return "\n\n".join(parts)


if __name__ == "__main__":   # vLLM's engine core is spawned: this guard is required
    if len(sys.argv) > 1 and sys.argv[1] == "direct":
        sys.exit(_worker_main(sys.argv[2:]))
    print("usage: python -m qwenbox.tools.bench.startup direct CONFIG OUT.json ... (use `qwenbox bench startup`)",
          file=sys.stderr)
    sys.exit(2)
