"""``qwenbox bench load``: the cost benchmark - bounded load on the unix socket, cost per request.

Phases, in order, each bounded by a request count, a time limit after which no new request
starts (``--phase-time-limit``) and a per-request client timeout:
  1. stepped concurrency sweep: at each level of ``--levels`` (ascending), max(``--per-level``,
     2 x level) requests in a closed loop, fixed prompt length ``--sweep-words``. A level is
     *stable* when under 1 % of its requests fail, every planned request was sent and its P95
     end-to-end latency is at most ``--p95-bound`` seconds; the sweep stops after the first
     unstable level, and the highest stable level is the capacity figure;
  2. prompt-length mix: ``--mix-requests`` requests drawn from ``--mix`` (synthetic
     NAME:LENGTH:WEIGHT classes) or from ``--prompts FILE.jsonl``, at ``--mix-concurrency``
     (default: the highest stable level);
  3. burst: ``--burst`` requests sent at the same instant (default ``--burst-factor`` (10) x
     the highest stable level, at most ``workload.MAX_BURST``).
Prompts: ``--prompt-kind ids`` (default) sends /v1/completions with random token ids
(lengths in tokens: exactly that long whatever the tokenizer does with text); ``text``
sends chat requests of synthetic words. Before anything is sent, every prompt of the run
is checked with the served model's tokenizer (``tokens.check_prompt_set``): distinct, no
KV block shared past the chat template; a file's prompts (``--prompts``) must be distinct
among themselves (they repeat when the phase needs more, and the JSON says how often).
Request counts are at most ``workload.MAX_REQUESTS`` per phase and concurrency at most
``workload.MAX_CONCURRENCY``; ``validate`` refuses anything else before a server starts.
Every request streams (SSE) so TTFT and inter-token gaps are measured client-side; every
request asks for ``--max-tokens`` tokens with ``ignore_eos`` so the work per request is fixed.
What an operator decides with (``decision`` in the JSON): GPU memory in use at idle
(nvidia-smi, else n/a), P95 latency at concurrency 1, the highest stable concurrency,
requests/day at it (the mix phase's sustained rate x 86400), cost per 1k requests at
``--gpu-hour-cost`` (``cost per 1k = gpu_hour_cost / (requests_per_s * 3600) * 1000``) and
the failure rate under the burst.

``--compare A B [C [D]]`` starts a daemon with config A, runs all phases, stops it, then the
same with B and the rest (never two servers at once), and prints every run side by side with
each one's figures over A's. An entry ``vllm-defaults`` is `vllm serve MODEL` with vLLM's own
defaults for the model of the first config (the server a user compares qwenbox with).
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import listeners
from .. import logs
from ..client import (
    Result,
    Server,
    ServerError,
    running,
    served_model,
    socket_dir,
    stream_chat,
    stream_completion,
    unix_session,
)
from ..report import dig, fmt, table, write_json
from ..stats import ratio, summary
from .results import busy_note, finish, gpu_memory, log_dir_for, machine, out_path
from .tokens import TokInfo, chat_ids, chat_prefix_len, check_prompt_set, load_tokenizer, random_id_prompts, tok_info
from .workload import (
    DEFAULT_GPU_HOUR_COST,
    GPU_HOUR_COST_SOURCE,
    MAX_BURST,
    MAX_CONCURRENCY,
    MAX_REQUESTS,
    OptionError,
    check_range,
    synthetic_text,
)

STABLE_FAILURE_RATE = 0.01   # a stable level fails fewer than 1 % of its requests


@dataclass
class Spec:
    """One request: chat ``messages``, or (``prompt_ids``) a completion on token ids."""
    messages: list[dict[str, str]] | None
    max_tokens: int
    tag: str
    prompt_ids: list[int] | None = None
    from_file: bool = False


# ------------------------------------------------------------------ prompts
def parse_mix(text: str) -> list[tuple[str, int, float]]:
    out = []
    for part in text.split(","):
        bits = part.strip().split(":")
        if len(bits) != 3:
            raise OptionError(f"--mix: expected NAME:WORDS:WEIGHT, got {part!r}")
        try:
            name, words, weight = bits[0], int(bits[1]), float(bits[2])
        except ValueError:
            raise OptionError(f"--mix: WORDS must be an integer and WEIGHT a number in {part!r}") from None
        if words < 1 or weight <= 0:
            raise OptionError(f"--mix: WORDS must be >= 1 and WEIGHT > 0 in {part!r}")
        out.append((name, words, weight))
    if not out:
        raise OptionError("--mix is empty")
    return out


def load_prompts(path: str, default_max_tokens: int) -> list[Spec]:
    """JSONL: {"prompt": "..."} or {"messages": [...]}, optional "max_tokens" and "tag"."""
    specs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise OptionError(f"--prompts: cannot read {path}: {e.strerror}") from None
    for no, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise OptionError(f"{path}:{no}: not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise OptionError(f"{path}:{no}: expected an object")
        if isinstance(obj.get("messages"), list) and obj["messages"]:
            msgs = obj["messages"]
        elif isinstance(obj.get("prompt"), str) and obj["prompt"]:
            msgs = [{"role": "user", "content": obj["prompt"]}]
        else:
            raise OptionError(f"{path}:{no}: needs a non-empty \"prompt\" string or \"messages\" list")
        mt = obj.get("max_tokens", default_max_tokens)
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise OptionError(f"{path}:{no}: \"max_tokens\" must be a positive integer")
        specs.append(Spec(msgs, mt, str(obj.get("tag", "file")), from_file=True))
    if not specs:
        raise OptionError(f"--prompts: {path} holds no prompts")
    return specs


def _length_cap(max_model_len: int | None, max_tokens: int, kind: str) -> int | None:
    """Prompt length that surely fits the context: tokens for ids; for text, words at ~2
    tokens per word with room for the template."""
    if not max_model_len:
        return None
    if kind == "ids":
        return max(1, max_model_len - max_tokens - 8)
    return max(1, (max_model_len - max_tokens - 64) // 2)


def level_requests(args: Any, level: int) -> int:
    per_level: int = args.per_level
    return min(MAX_REQUESTS, max(per_level, 2 * level))


def sweep_specs(args: Any, level: int, n: int, cap: int | None, info: TokInfo | None = None) -> list[Spec]:
    rng = random.Random(f"{args.seed}-sweep-{level}")
    length = min(args.sweep_words, cap) if cap else args.sweep_words
    if getattr(args, "prompt_kind", "text") == "ids":
        return [Spec(None, args.max_tokens, f"sweep-c{level}", ids)
                for ids in random_id_prompts(n, length, _need(info), rng)]
    return [Spec([{"role": "user", "content": synthetic_text(length, f"c{level}-r{i}", rng)}],
                 args.max_tokens, f"sweep-c{level}") for i in range(n)]


def _need(info: TokInfo | None) -> TokInfo:
    if info is None:
        raise OptionError("token-id prompts need the served model's tokenizer")
    return info


def mix_specs(args: Any, n: int, cap: int | None, salt: str = "mix", info: TokInfo | None = None) -> list[Spec]:
    rng = random.Random(f"{args.seed}-{salt}")
    if args.prompts:
        pool = load_prompts(args.prompts, args.max_tokens)
        order = list(range(len(pool)))
        rng.shuffle(order)
        return [pool[order[i % len(pool)]] for i in range(n)]
    classes = parse_mix(args.mix)
    names = [c[0] for c in classes]
    lengths = {c[0]: (min(c[1], cap) if cap else c[1]) for c in classes}
    picks = rng.choices(names, weights=[c[2] for c in classes], k=n)
    if getattr(args, "prompt_kind", "text") == "ids":
        return [Spec(None, args.max_tokens, t, random_id_prompts(1, lengths[t], _need(info), rng)[0]) for t in picks]
    return [Spec([{"role": "user", "content": synthetic_text(lengths[t], f"{salt}-{i}", rng)}],
                 args.max_tokens, t) for i, t in enumerate(picks)]


def check_specs(tok: Any, specs: list[Spec], block_size: int) -> dict[str, Any]:
    """The run's prompts as the server will tokenize them: synthetic ones distinct with no
    KV block shared past the chat template; a file's distinct among themselves (repeats of
    the same line are counted, not refused: the file is the user's traffic)."""
    synth = [s for s in specs if not s.from_file]
    out: dict[str, Any] = {}
    if synth:
        seqs = [s.prompt_ids if s.prompt_ids is not None else chat_ids(tok, s.messages or []) for s in synth]
        chat = next((s.messages for s in synth if s.messages), None)
        allowed = chat_prefix_len(tok, chat) if chat else 0
        out["synthetic"] = check_prompt_set(seqs, "sweep, mix and burst prompts", allowed_prefix=allowed,
                                            block_size=block_size)
    files = [s for s in specs if s.from_file]
    if files:
        unique = {json.dumps(s.messages, sort_keys=True): s for s in files}   # a line, however often it is sent
        seqs = [chat_ids(tok, s.messages or []) for s in unique.values()]
        out["file"] = check_prompt_set(seqs, "--prompts file", allowed_prefix=None, block_size=block_size)
        out["file"]["requests"] = len(files)
        out["file"]["repeats"] = len(files) - len(unique)
    return out


# ------------------------------------------------------------------ one phase
async def run_phase(session: Any, model: str, name: str, specs: list[Spec], concurrency: int,
                    time_limit: float, request_timeout: float) -> dict[str, Any]:
    """Closed loop: ``concurrency`` workers take the next spec until none is left or time is up."""
    results: list[Result] = []
    queue = list(reversed(specs))
    t0 = time.monotonic()
    deadline = t0 + time_limit

    async def worker() -> None:
        while queue and time.monotonic() < deadline:
            s = queue.pop()
            body = {"model": model, "max_tokens": s.max_tokens, "temperature": 0.0, "ignore_eos": True}
            if s.prompt_ids is not None:
                results.append(await stream_completion(session, {**body, "prompt": s.prompt_ids}, request_timeout,
                                                       tag=s.tag))
            else:
                results.append(await stream_chat(session, {**body, "messages": s.messages}, request_timeout,
                                                 tag=s.tag))

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(specs))))))
    fig = phase_figures(results, time.monotonic() - t0)
    fig.update(name=name, concurrency=concurrency, planned=len(specs), not_started=len(queue))
    return fig


def phase_figures(results: list[Result], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    fails = Counter(r.failure for r in results if not r.ok)
    rejected = Counter((r.error_code or "unspecified") for r in results if r.failure == "429")
    out_tokens = sum(r.output_tokens for r in ok)
    by_tag: dict[str, Any] = {}
    for tag in sorted({r.tag for r in results}):
        rs = [r for r in results if r.tag == tag]
        oks = [r for r in rs if r.ok]
        by_tag[tag] = {"sent": len(rs), "ok": len(oks), "prompt_tokens": summary(r.prompt_tokens for r in oks),
                       "ttft_s": summary(r.ttft_s for r in oks), "e2e_s": summary(r.e2e_s for r in oks)}
    return {
        "sent": len(results), "ok": len(ok), "failed": len(results) - len(ok),
        "failure_rate": (len(results) - len(ok)) / len(results) if results else None,
        "failures_by_status": dict(sorted(fails.items())), "rejected_by_reason": dict(sorted(rejected.items())),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else None,
        "output_tokens": out_tokens,
        "ttft_s": summary(r.ttft_s for r in ok),
        "itl_s": summary(g for r in ok for g in r.itl_s),
        "e2e_s": summary(r.e2e_s for r in ok),
        "prompt_tokens": summary(r.prompt_tokens for r in ok),
        "by_tag": by_tag,
    }


def best_level(sweep: list[dict[str, Any]]) -> int | None:
    """The sweep level with the highest throughput among those without failures (else any)."""
    clean = [p for p in sweep if p["sent"] and not p["failed"]] or [p for p in sweep if p["ok"]]
    if not clean:
        return None
    best: int = max(clean, key=lambda p: p["requests_per_s"] or 0)["concurrency"]
    return best


def stability(p: dict[str, Any], p95_bound: float) -> str | None:
    """None when the level is stable, else why not (one phrase)."""
    if not p["sent"]:
        return "nothing sent"
    if p.get("not_started"):
        return f"{p['not_started']} requests not started within the phase time limit"
    if p["failure_rate"] >= STABLE_FAILURE_RATE:
        return f"failure rate {p['failure_rate'] * 100:.1f}% >= {STABLE_FAILURE_RATE * 100:.0f}%"
    p95 = p["e2e_s"]["p95"]
    if p95 is None or p95 > p95_bound:
        return f"P95 latency {fmt(p95, 's')} > {fmt(p95_bound, 's')}"
    return None


def highest_stable(sweep: list[dict[str, Any]]) -> int | None:
    """The highest level before the first unstable one (None when the first is unstable)."""
    best = None
    for p in sweep:
        if p.get("unstable_because"):
            break
        best = p["concurrency"]
    return best


def economics(mix: dict[str, Any], gpu_hour_cost: float) -> dict[str, Any]:
    rps = mix.get("requests_per_s") or 0.0
    if rps <= 0:
        return {"requests_per_s": rps, "requests_per_day": 0, "cost_per_request": None,
                "cost_per_1k_requests": None, "gpu_hour_cost": gpu_hour_cost}
    per_req = gpu_hour_cost / (rps * 3600.0)
    return {"requests_per_s": rps, "requests_per_day": rps * 86400.0, "cost_per_request": per_req,
            "cost_per_1k_requests": per_req * 1000.0, "gpu_hour_cost": gpu_hour_cost,
            "output_tokens_per_s": mix.get("output_tokens_per_s")}


# ------------------------------------------------------------------ a whole run against one socket
def validate(args: Any) -> list[int]:
    """Every option of this mode in range and the prompt source readable, else OptionError;
    the sweep levels."""
    try:
        levels = [int(x) for x in str(args.levels).split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"--levels: expected comma-separated integers, got {args.levels!r}") from None
    if not levels:
        raise OptionError("--levels: give at least one level")
    for c in levels:
        check_range("--levels: each level", c, 1, MAX_CONCURRENCY)
    if levels != sorted(set(levels)):
        raise OptionError("--levels: give each level once, in ascending order (the sweep steps up)")
    check_range("--per-level", args.per_level, 1, MAX_REQUESTS)
    check_range("--mix-requests", args.mix_requests, 1, MAX_REQUESTS)
    if args.burst is not None:
        check_range("--burst", args.burst, 0, MAX_BURST)
    check_range("--burst-factor", args.burst_factor, 1, 100)
    check_range("--mix-concurrency", args.mix_concurrency, 0, MAX_CONCURRENCY)
    check_range("--max-tokens", args.max_tokens, 1)
    check_range("--sweep-words", args.sweep_words, 1)
    if args.phase_time_limit <= 0 or args.request_timeout <= 0:
        raise OptionError("--phase-time-limit and --request-timeout must be > 0")
    if not args.p95_bound > 0:
        raise OptionError("--p95-bound must be > 0")
    check_range("--gpu-hour-cost", args.gpu_hour_cost, 0)
    if args.prompts:
        load_prompts(args.prompts, args.max_tokens)
    else:
        parse_mix(args.mix)
    if args.compare:
        compare_entries(args.compare)
    return levels


def burst_size(args: Any, stable: int | None, levels: list[int]) -> int:
    burst: int | None = args.burst
    factor: int = args.burst_factor
    if burst is not None:
        return burst
    return min(MAX_BURST, factor * (stable or levels[0]))


def plan(args: Any, levels: list[int], max_len: int | None, info: TokInfo | None) -> dict[str, Any]:
    """Every prompt the run may send, made before the first is sent (so they are checked
    together): each sweep level, the mix, and the largest burst the run could choose."""
    cap = _length_cap(max_len, args.max_tokens, getattr(args, "prompt_kind", "text"))
    largest = burst_size(args, levels[-1], levels)
    return {"sweep": {c: sweep_specs(args, c, level_requests(args, c), cap, info) for c in levels},
            "mix": mix_specs(args, args.mix_requests, cap, info=info),
            "burst": mix_specs(args, largest, cap, salt="burst", info=info) if largest else []}


async def run_load(sock: str, args: Any, levels: list[int], say: Callable[[str], None] = lambda s: None,
                   tok: Any = None, block_size: int = 16, gpu_idle: dict[str, Any] | None = None) -> dict[str, Any]:
    """All phases against the server on ``sock``. ``tok`` is the served model's tokenizer
    (loaded from ``args.tokenizer`` when None); the prompts are checked before any is sent
    (PromptSetError otherwise)."""
    model, max_len = served_model(sock)
    if tok is None:
        tok = load_tokenizer(args.tokenizer or model)
    info = tok_info(tok)
    specs = plan(args, levels, max_len, info)
    every = [s for lv in specs["sweep"].values() for s in lv] + specs["mix"] + specs["burst"]
    out: dict[str, Any] = {"model": model, "max_model_len": max_len,
                           "prompt_kind": getattr(args, "prompt_kind", "text"),
                           "prompt_check": check_specs(tok, every, block_size)}
    say(f"prompts checked: {len(every)} requests' prompts, "
        + ", ".join(f"{k}: {v['distinct']} distinct, longest shared prefix {v['max_shared_prefix_tokens']} tokens"
                    for k, v in out["prompt_check"].items()))
    async with unix_session(sock) as session:
        sweep = []
        for c in levels:
            n = len(specs["sweep"][c])
            say(f"sweep: concurrency {c}, {n} requests")
            p = await run_phase(session, model, f"sweep c={c}", specs["sweep"][c], c, args.phase_time_limit,
                                args.request_timeout)
            p["unstable_because"] = stability(p, args.p95_bound)
            sweep.append(p)
            if p["unstable_because"]:
                say(f"sweep: concurrency {c} is not stable ({p['unstable_because']}); the sweep stops here")
                break
        out["sweep"] = sweep
        out["best_concurrency"] = best_level(sweep)
        stable = highest_stable(sweep)
        out["highest_stable_concurrency"] = stable
        out["stable_is_highest_tried"] = bool(stable and stable == levels[-1])
        mc = args.mix_concurrency or stable or levels[0]
        say(f"prompt mix: concurrency {mc}, {args.mix_requests} requests")
        out["mix"] = await run_phase(session, model, "mix", specs["mix"], mc, args.phase_time_limit,
                                     args.request_timeout)
        n_burst = burst_size(args, stable, levels)
        fds = listeners.raise_fd_limit()
        if n_burst > fds - 64:      # one socket per request: past the limit the client, not the server, fails
            out["burst_capped_by_open_files_limit"] = {"wanted": n_burst, "limit": fds}
            n_burst = max(0, fds - 64)
            say(f"burst: capped at {n_burst} requests by this process's open-files limit ({fds})")
        out["burst_size"] = n_burst
        if n_burst:
            say(f"burst: {n_burst} requests at once")
            out["burst"] = await run_phase(session, model, "burst", specs["burst"][:n_burst], n_burst,
                                           args.phase_time_limit, args.request_timeout)
        else:
            out["burst"] = None
    out["economics"] = economics(out["mix"], args.gpu_hour_cost)
    out["decision"] = decision(out, args, gpu_idle)
    return out


def decision(load: dict[str, Any], args: Any, gpu_idle: dict[str, Any] | None = None) -> dict[str, Any]:
    """The figures an operator decides with, in one place (see the module docstring)."""
    c1 = next((p for p in load["sweep"] if p["concurrency"] == 1), None)
    e = load["economics"]
    burst = load.get("burst") or {}
    return {
        "gpu_memory_idle_mib": (gpu_idle or {}).get("used_mib"),
        "gpu_memory_idle_note": None if (gpu_idle or {}).get("available") else
        ((gpu_idle or {}).get("why") or "not measured"),
        "p95_latency_concurrency_1_s": c1["e2e_s"]["p95"] if c1 else None,
        "highest_stable_concurrency": load["highest_stable_concurrency"],
        "stable_is_highest_tried": load["stable_is_highest_tried"],
        "stable_rule": f"failure rate < {STABLE_FAILURE_RATE * 100:.0f}% and P95 end-to-end <= {args.p95_bound} s",
        "mix_concurrency": load["mix"]["concurrency"],
        "requests_per_day": e["requests_per_day"],
        "cost_per_1k_requests": e["cost_per_1k_requests"],
        "gpu_hour_cost": args.gpu_hour_cost,
        "gpu_hour_cost_source": GPU_HOUR_COST_SOURCE if args.gpu_hour_cost == DEFAULT_GPU_HOUR_COST
        else "--gpu-hour-cost",
        "burst_size": load.get("burst_size"),
        "burst_failure_rate": burst.get("failure_rate"),
        "burst_failures_by_status": burst.get("failures_by_status"),
    }


def server_log_summary(path: Path) -> dict[str, Any] | None:
    """What the daemon itself logged during the run (qwenbox logs' analyzer on its stdout)."""
    try:
        rep = logs.analyze(logs.read_files([str(path)]))
    except OSError:
        return None
    return {"requests": rep["requests"]["total"], "by_status": rep["requests"]["by_status"],
            "errors": {k: v["count"] for k, v in rep["errors"].items() if v["count"]},
            "rejected_by_reason": rep["errors"]["queue_full"].get("by_reason", {}),
            "latency_s": rep["latency"]["all"], "ttft_s": rep["latency"]["ttft_ok"],
            "cold_starts": len(rep["cold_starts"])}


VLLM_DEFAULTS = "vllm-defaults"     # a --compare entry: `vllm serve MODEL` with its own defaults
MAX_COMPARED = 4


def _checked_tokenizer(cfg: Any, args: Any, levels: list[int]) -> Any:
    """The served model's tokenizer, once every prompt of the run is checked with it
    (before any server starts)."""
    tok = load_tokenizer(args.tokenizer or cfg.model.local_tokenizer_dir or cfg.model.local_dir)
    check = plan(args, levels, cfg.model.max_model_len, tok_info(tok))      # fails here, before a launch
    check_specs(tok, [s for lv in check["sweep"].values() for s in lv] + check["mix"] + check["burst"],
                cfg.engine.block_size)
    return tok


def _measured(srv: Server, entry: dict[str, Any], args: Any, levels: list[int], say: Callable[[str], None],
              tok: Any, block_size: int) -> dict[str, Any]:
    """Start ``srv``, measure GPU memory at idle once it is ready, run every phase, stop it."""
    label = entry["label"]
    with running(srv, args.ready_timeout):
        entry["launch_to_ready_s"] = srv.launch_to_ready_s
        health = srv.ready_health          # qwenbox's /health body; vLLM's says nothing
        entry["cold_start"] = health.get("cold_start") if isinstance(health, dict) else None
        entry["gpu_memory_idle"] = gpu_memory()
        entry["load"] = asyncio.run(run_load(srv.sock, args, levels, lambda s: say(f"[{label}] {s}"), tok=tok,
                                             block_size=block_size, gpu_idle=entry["gpu_memory_idle"]))
    entry["server_exit_code"] = srv.proc.returncode if srv.proc else None
    return entry


def run_with_daemon(config: str, label: str, sock_dir: Path, log_path: Path, args: Any, levels: list[int],
                    say: Callable[[str], None], env: dict[str, str] | None = None) -> dict[str, Any]:
    """``qwenbox serve`` on ``config``, measured (``_measured``). The prompts are checked
    before the daemon starts."""
    from ...config import load as load_config

    cfg = load_config(config)
    tok = _checked_tokenizer(cfg, args, levels)
    srv = Server.qwenbox(label, config, str(sock_dir / f"{label}.sock"), log_path)
    if env:
        srv.env.update(env)
    say(f"[{label}] starting qwenbox serve --config {config}")
    entry: dict[str, Any] = {"label": label, "config": str(Path(config).resolve()), "log": str(log_path),
                             "cache_dir_at_launch": _dir_state(cfg.engine.cache_dir)}
    _measured(srv, entry, args, levels, say, tok, cfg.engine.block_size)
    entry["server_log"] = server_log_summary(log_path)
    return entry


def run_with_vllm_defaults(model_config: str, label: str, sock_dir: Path, log_path: Path, args: Any,
                           levels: list[int], say: Callable[[str], None]) -> dict[str, Any]:
    """`vllm serve MODEL --uds SOCK` with vLLM's own defaults (``servers.vllm_defaults_argv``),
    for the model ``model_config`` serves, in the environment this command runs in (its
    default caches: as a user starts it), measured like a daemon."""
    from ...config import load as load_config
    from ...sizing import probe_device
    from .servers import vllm_defaults_argv

    cfg = load_config(model_config)
    tok = _checked_tokenizer(cfg, args, levels)
    sock = str(sock_dir / f"{label}.sock")
    argv = vllm_defaults_argv(cfg.model.local_dir, sock, cpu_backend=probe_device().kind == "cpu")
    srv = Server("vllm serve (its defaults)", argv, sock, log_path)
    say(f"[{label}] starting vllm serve {cfg.model.local_dir} with its defaults")
    cache = os.environ.get("VLLM_CACHE_ROOT") or str(Path(os.environ.get("XDG_CACHE_HOME") or
                                                          Path.home() / ".cache") / "vllm")
    entry: dict[str, Any] = {"label": label, "config": VLLM_DEFAULTS, "argv": argv[1:], "log": str(log_path),
                             "cache_dir_at_launch": _dir_state(cache)}
    # vLLM's default block is 16 tokens (32 on the CPU backend's flags): prompts that share
    # no 16-token block share no larger one either
    return _measured(srv, entry, args, levels, say, tok, 16)


def compare_entries(entries: list[str]) -> str:
    """``--compare``'s entries checked: 2..MAX_COMPARED configs or VLLM_DEFAULTS (once, and
    not alone: its model comes from the first config). Returns the first config."""
    if not 2 <= len(entries) <= MAX_COMPARED:
        raise OptionError(f"--compare: give 2 to {MAX_COMPARED} entries (configs, or {VLLM_DEFAULTS})")
    configs = [e for e in entries if e != VLLM_DEFAULTS]
    if len(entries) - len(configs) > 1 or not configs:
        raise OptionError(f"--compare: {VLLM_DEFAULTS} at most once, beside at least one config (it serves the "
                          "first config's model)")
    from ...config import ConfigError, load as load_config
    for c in configs:
        try:
            load_config(c)
        except ConfigError as e:
            raise OptionError(f"--compare {c}: {e}") from None
    return configs[0]


# ------------------------------------------------------------------ comparison
COMPARE_ROWS = (  # label, path into a run entry, unit, lower is better
    ("GPU memory in use at idle (MiB)", ("load", "decision", "gpu_memory_idle_mib"), "", True),
    ("P95 latency at concurrency 1", ("load", "decision", "p95_latency_concurrency_1_s"), "s", True),
    ("highest stable concurrency", ("load", "decision", "highest_stable_concurrency"), "", False),
    ("requests/day (mix at that concurrency)", ("load", "economics", "requests_per_day"), "", False),
    ("cost per 1k requests", ("load", "economics", "cost_per_1k_requests"), "$", True),
    ("cost per request", ("load", "economics", "cost_per_request"), "$", True),
    ("P95 latency (mix, end to end)", ("load", "mix", "e2e_s", "p95"), "s", True),
    ("P95 TTFT (mix)", ("load", "mix", "ttft_s", "p95"), "s", True),
    ("P95 inter-token (mix)", ("load", "mix", "itl_s", "p95"), "s", True),
    ("P95 TTFT, server-side (whole run)", ("server_log", "ttft_s", "p95"), "s", True),
    ("burst size (requests at once)", ("load", "burst_size"), "", False),
    ("failure rate under the burst", ("load", "burst", "failure_rate"), "%", True),
    ("P95 latency under the burst", ("load", "burst", "e2e_s", "p95"), "s", True),
    ("launch to ready", ("launch_to_ready_s",), "s", True),
)


def _dir_state(path: str) -> dict[str, Any]:
    """Whether the compile cache a daemon starts on is empty (a cold start) or not."""
    p = Path(path) if path else None
    if p is None:
        return {"path": None, "empty": None}
    files = sum(len(f) for _, _, f in os.walk(p)) if p.is_dir() else 0
    return {"path": str(p), "empty": files == 0, "files": files}


def comparison(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> list[dict[str, Any]]:
    """B over A per COMPARE_ROWS; launch to ready gets no ratio when one server started on an
    empty compile cache and the other on a filled one (that ratio would measure the cache).
    ``names``: what the rows' notes call the two runs."""
    rows = []
    for label, path, unit, lower in COMPARE_ROWS:
        va, vb = dig(a, *path), dig(b, *path)
        row = {"metric": label, "a": va, "b": vb, "b_over_a": ratio(vb, va), "unit": unit, "lower_is_better": lower}
        if path == ("launch_to_ready_s",):
            ea, eb = dig(a, "cache_dir_at_launch", "empty"), dig(b, "cache_dir_at_launch", "empty")
            if ea is not None and eb is not None and ea != eb:
                row["b_over_a"] = None
                row["note"] = (f"{names[0]} {'empty' if ea else 'warm'} caches, {names[1]} "
                               f"{'empty' if eb else 'warm'}: no ratio")
        rows.append(row)
    return rows


# ------------------------------------------------------------------ printing
def phase_table(load: dict[str, Any], title: str) -> str:
    f = fmt
    rows = []
    for p in [*load["sweep"], load["mix"], *( [load["burst"]] if load.get("burst") else [])]:
        rows.append([p["name"], p["concurrency"], f"{p['ok']}/{p['sent']}", f(p["failure_rate"], "%"),
                     f(p["requests_per_s"]), f(p["output_tokens_per_s"]),
                     f(p["ttft_s"]["p50"], "s"), f(p["ttft_s"]["p95"], "s"),
                     f(p["itl_s"]["p50"], "s"), f(p["itl_s"]["p95"], "s"),
                     f(p["e2e_s"]["p50"], "s"), f(p["e2e_s"]["p95"], "s"),
                     " ".join(f"{k}:{v}" for k, v in p["failures_by_status"].items()) or "-"])
    return table(["phase", "conc", "ok/sent", "fail", "req/s", "tok/s", "TTFT p50", "TTFT p95",
                    "ITL p50", "ITL p95", "E2E p50", "E2E p95", "failures"], rows, title)


def economics_lines(load: dict[str, Any]) -> str:
    e, f, d = load["economics"], fmt, load.get("decision") or {}
    gpu = d.get("gpu_memory_idle_mib")
    lines = ["GPU memory in use at idle: " + (f"{f(gpu)} MiB" if gpu is not None
                                               else f"n/a ({d.get('gpu_memory_idle_note')})"),
             f"P95 latency at concurrency 1: {f(d.get('p95_latency_concurrency_1_s'), 's')}",
             f"highest stable concurrency ({d.get('stable_rule')}): {f(d.get('highest_stable_concurrency'))}"
             + (" (the highest level tried: the limit is above it)" if d.get("stable_is_highest_tried") else ""),
             f"capacity: {f(e['requests_per_s'])} req/s on the prompt mix at concurrency "
             f"{load['mix']['concurrency']} -> {f(e['requests_per_day'])} requests/day",
             f"cost at {f(e['gpu_hour_cost'], '$')}/GPU-hour: {f(e['cost_per_1k_requests'], '$')} per 1k requests "
             f"({f(e['cost_per_request'], '$')} per request); price source: {d.get('gpu_hour_cost_source')}"]
    if load.get("burst"):
        lines.append(f"burst of {load['burst_size']} at once: failure rate {f(load['burst']['failure_rate'], '%')}")
    rej: dict[str, int] = {}
    for p in [*load["sweep"], load["mix"], load.get("burst") or {}]:
        for k, v in (p.get("rejected_by_reason") or {}).items():
            rej[k] = rej.get(k, 0) + v
    if rej:
        lines.append("429 by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(rej.items())))
    return "\n".join(lines)


def compare_table(rows: list[dict[str, Any]], a: str, b: str) -> str:
    return compare_table_n([rows], [a, b])


def compare_table_n(comparisons: list[list[dict[str, Any]]], names: list[str]) -> str:
    """Every run's figures side by side, then each later run over the first:
    ``comparisons[i]`` is ``comparison(first, run i + 1)``."""
    f = fmt
    letters = [chr(ord("A") + i) for i in range(len(names))]
    rows = []
    for k, first in enumerate(comparisons[0]):
        cells = [first["metric"], f(first["a"], first["unit"])]
        cells += [f(c[k]["b"], c[k]["unit"]) for c in comparisons]
        cells += [f(c[k]["b_over_a"], "x") if c[k].get("b_over_a") is not None or not c[k].get("note")
                  else c[k]["note"] for c in comparisons]
        rows.append(cells)
    headers = ["metric", *(f"{x}: {n}" for x, n in zip(letters, names, strict=True)),
               *(f"{x} / A" for x in letters[1:])]
    return table(headers, rows, f"Side by side ({', '.join(letters)}, one run; X / A below 1 is better where lower "
                                "is better)")


def main(args: Any) -> int:
    """The whole ``bench load`` run; ``bench.run`` has validated ``args``."""
    from .tokens import PromptSetError

    levels = validate(args)
    out = out_path(args, "load")
    logs_dir = log_dir_for(out)
    params = {k: getattr(args, k) for k in ("levels", "per_level", "sweep_words", "mix", "prompts", "mix_requests",
                                           "mix_concurrency", "burst", "burst_factor", "p95_bound", "prompt_kind",
                                           "max_tokens", "phase_time_limit", "request_timeout", "gpu_hour_cost",
                                           "seed", "tokenizer")}
    params["gpu_hour_cost_source"] = (GPU_HOUR_COST_SOURCE if args.gpu_hour_cost == DEFAULT_GPU_HOUR_COST
                                      else "--gpu-hour-cost")
    res: dict[str, Any] = {"kind": "load", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
                           "params": params, "runs": [], "open_files_limit": listeners.raise_fd_limit()}
    try:
        return _main(args, levels, out, logs_dir, res)
    except PromptSetError as e:
        print(f"qwenbox bench load: {e}", flush=True)
        return 2
    except (OSError, ServerError, http.client.HTTPException) as e:
        if not args.socket:
            raise
        print(f"qwenbox bench load: cannot drive the server on {args.socket}: {e}", flush=True)
        return 1


def _socket_tokenizer(args: Any) -> Any:
    """--tokenizer, else the model of --config (the daemon's own config, on its machine)."""
    from ...config import ConfigError, load as load_config

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        raise OptionError(f"--socket: name the served model's tokenizer with --tokenizer (the config "
                          f"{args.config} gives none: {e})") from None
    return load_tokenizer(cfg.model.local_tokenizer_dir or cfg.model.local_dir)


def _main(args: Any, levels: list[int], out: Path, logs_dir: Path, res: dict[str, Any]) -> int:
    say = lambda s: print(f"  - {s}", flush=True)  # noqa: E731
    gpu = gpu_memory()
    if gpu.get("available"):
        res["machine"]["gpu"] = gpu.get("name")
    note = busy_note()
    if note:
        print(note, flush=True)
    if args.compare:
        first = compare_entries(args.compare)
        letters = [chr(ord("A") + i) for i in range(len(args.compare))]
        print("qwenbox bench load --compare: " + " ".join(f"{x}={e}" for x, e in zip(letters, args.compare,
                                                                                    strict=True))
              + f"; logs in {logs_dir}/", flush=True)
        with socket_dir() as sd:       # one server at a time, in the order given
            for label, entry in zip(letters, args.compare, strict=True):
                log = logs_dir / f"{'vllm' if entry == VLLM_DEFAULTS else 'daemon'}-{label}.log"
                res["runs"].append(run_with_vllm_defaults(first, label, sd, log, args, levels, say)
                                   if entry == VLLM_DEFAULTS else
                                   run_with_daemon(entry, label, sd, log, args, levels, say))
        res["comparisons"] = [comparison(res["runs"][0], r, ("A", x)) for x, r in zip(letters[1:], res["runs"][1:],
                                                                                      strict=True)]
        res["comparison"] = res["comparisons"][0]
    elif args.socket:
        print(f"qwenbox bench load: driving the daemon on {args.socket}", flush=True)
        entry = {"label": "socket", "socket": args.socket, "gpu_memory_at_start": gpu_memory()}
        entry["load"] = asyncio.run(run_load(args.socket, args, levels, say, tok=_socket_tokenizer(args),
                                             gpu_idle=entry["gpu_memory_at_start"]))
        res["runs"].append(entry)
    else:
        print(f"qwenbox bench load: config {args.config}; logs in {logs_dir}/", flush=True)
        with socket_dir() as sd:
            res["runs"].append(run_with_daemon(args.config, "daemon", sd, logs_dir / "daemon.log", args, levels, say))
    finish(res)
    write_json(out, res)
    print()
    for run in res["runs"]:
        title = f"{run['label']}: {run.get('config') or run.get('socket')}"
        print(phase_table(run["load"], title))
        print(economics_lines(run["load"]))
        if run.get("launch_to_ready_s") is not None:
            print(f"launch to ready: {fmt(run['launch_to_ready_s'], 's')}")
        print()
    if args.compare:
        print(compare_table_n(res["comparisons"], [Path(e).name for e in args.compare]))
        print()
    print(f"JSON: {out}")
    return 0
