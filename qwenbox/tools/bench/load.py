"""``qwenbox bench load``: the cost benchmark - bounded load on the unix socket, cost per request.

Phases, in order, each bounded by a request count, a time limit after which no new request
starts (``--phase-time-limit``) and a per-request client timeout:
  1. concurrency sweep: ``--per-level`` requests at each level of ``--levels`` (closed loop,
     fixed prompt length ``--sweep-words``);
  2. prompt-length mix: ``--mix-requests`` requests drawn from ``--mix`` (synthetic
     NAME:WORDS:WEIGHT classes) or from ``--prompts FILE.jsonl``, at ``--mix-concurrency``
     (default: the sweep level with the highest throughput and no failures);
  3. burst: ``--burst`` requests sent at the same instant.
Request counts are at most ``workload.MAX_REQUESTS`` per phase and concurrency at most
``workload.MAX_CONCURRENCY``; ``validate`` refuses anything else before a server starts.
Every request streams (SSE) so TTFT and inter-token gaps are measured client-side; every
request asks for ``--max-tokens`` tokens with ``ignore_eos`` so the work per request is fixed.
Capacity (requests/day) and cost come from the mix phase's sustained throughput:
``cost per 1k requests = gpu_hour_cost / (requests_per_s * 3600) * 1000``.

``--compare A.toml B.toml`` starts a daemon with A, runs all phases, stops it, then the same
with B (never two servers at once), and prints B's figures over A's.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import logs
from ..client import Result, Server, running, served_model, socket_dir, stream_chat, unix_session
from ..report import dig, fmt, table, write_json
from ..stats import ratio, summary
from .results import busy_note, finish, log_dir_for, machine, out_path
from .workload import MAX_CONCURRENCY, MAX_REQUESTS, OptionError, check_range, synthetic_text


@dataclass
class Spec:
    messages: list[dict[str, str]]
    max_tokens: int
    tag: str


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
        specs.append(Spec(msgs, mt, str(obj.get("tag", "file"))))
    if not specs:
        raise OptionError(f"--prompts: {path} holds no prompts")
    return specs


def _words_cap(max_model_len: int | None, max_tokens: int) -> int | None:
    """Words that surely fit the context (~2 tokens per word, room for the template)."""
    if not max_model_len:
        return None
    return max(1, (max_model_len - max_tokens - 64) // 2)


def sweep_specs(args: Any, level: int, n: int, cap: int | None) -> list[Spec]:
    rng = random.Random(f"{args.seed}-sweep-{level}")
    words = min(args.sweep_words, cap) if cap else args.sweep_words
    return [Spec([{"role": "user", "content": synthetic_text(words, f"c{level}-r{i}", rng)}],
                 args.max_tokens, f"sweep-c{level}") for i in range(n)]


def mix_specs(args: Any, n: int, cap: int | None, salt: str = "mix") -> list[Spec]:
    rng = random.Random(f"{args.seed}-{salt}")
    if args.prompts:
        pool = load_prompts(args.prompts, args.max_tokens)
        order = list(range(len(pool)))
        rng.shuffle(order)
        return [pool[order[i % len(pool)]] for i in range(n)]
    classes = parse_mix(args.mix)
    names = [c[0] for c in classes]
    words = {c[0]: (min(c[1], cap) if cap else c[1]) for c in classes}
    picks = rng.choices(names, weights=[c[2] for c in classes], k=n)
    return [Spec([{"role": "user", "content": synthetic_text(words[t], f"{salt}-{i}", rng)}],
                 args.max_tokens, t) for i, t in enumerate(picks)]


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
            body = {"model": model, "messages": s.messages, "max_tokens": s.max_tokens,
                    "temperature": 0.0, "ignore_eos": True}
            results.append(await stream_chat(session, body, request_timeout, tag=s.tag))

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
    return max(clean, key=lambda p: p["requests_per_s"] or 0)["concurrency"]


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
    check_range("--per-level", args.per_level, 1, MAX_REQUESTS)
    check_range("--mix-requests", args.mix_requests, 1, MAX_REQUESTS)
    check_range("--burst", args.burst, 0, MAX_CONCURRENCY)
    check_range("--mix-concurrency", args.mix_concurrency, 0, MAX_CONCURRENCY)
    check_range("--max-tokens", args.max_tokens, 1)
    if args.phase_time_limit <= 0 or args.request_timeout <= 0:
        raise OptionError("--phase-time-limit and --request-timeout must be > 0")
    check_range("--gpu-hour-cost", args.gpu_hour_cost, 0)
    if args.prompts:
        load_prompts(args.prompts, args.max_tokens)
    else:
        parse_mix(args.mix)
    return levels


async def run_load(sock: str, args: Any, levels: list[int], say=lambda s: None) -> dict[str, Any]:
    model, max_len = served_model(sock)
    cap = _words_cap(max_len, args.max_tokens)
    limit = max([*levels, args.burst, args.mix_concurrency, 1])
    out: dict[str, Any] = {"model": model, "max_model_len": max_len}
    async with unix_session(sock, limit=limit) as session:
        sweep = []
        for c in levels:
            say(f"sweep: concurrency {c}, {args.per_level} requests")
            sweep.append(await run_phase(session, model, f"sweep c={c}", sweep_specs(args, c, args.per_level, cap),
                                         c, args.phase_time_limit, args.request_timeout))
        out["sweep"] = sweep
        best = best_level(sweep)
        out["best_concurrency"] = best
        mc = args.mix_concurrency or best or levels[-1]
        say(f"prompt mix: concurrency {mc}, {args.mix_requests} requests")
        out["mix"] = await run_phase(session, model, "mix", mix_specs(args, args.mix_requests, cap), mc,
                                     args.phase_time_limit, args.request_timeout)
        if args.burst:
            say(f"burst: {args.burst} requests at once")
            out["burst"] = await run_phase(session, model, "burst", mix_specs(args, args.burst, cap, salt="burst"),
                                           args.burst, args.phase_time_limit, args.request_timeout)
        else:
            out["burst"] = None
    out["economics"] = economics(out["mix"], args.gpu_hour_cost)
    return out


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


def run_with_daemon(config: str, label: str, sock_dir: Path, log_path: Path, args: Any, levels: list[int],
                    say) -> dict[str, Any]:
    srv = Server.qwenbox(label, config, str(sock_dir / f"{label}.sock"), log_path)
    say(f"[{label}] starting qwenbox serve --config {config}")
    entry: dict[str, Any] = {"label": label, "config": str(Path(config).resolve()), "log": str(log_path)}
    with running(srv, args.ready_timeout):
        entry["launch_to_ready_s"] = srv.launch_to_ready_s
        entry["cold_start"] = (srv.health or {}).get("cold_start")
        entry["load"] = asyncio.run(run_load(srv.sock, args, levels, lambda s: say(f"[{label}] {s}")))
    entry["server_exit_code"] = srv.proc.returncode if srv.proc else None
    entry["server_log"] = server_log_summary(log_path)
    return entry


# ------------------------------------------------------------------ comparison
COMPARE_ROWS = (  # label, path into a run entry, unit, lower is better
    ("requests/day (mix)", ("load", "economics", "requests_per_day"), "", False),
    ("cost per 1k requests", ("load", "economics", "cost_per_1k_requests"), "$", True),
    ("cost per request", ("load", "economics", "cost_per_request"), "$", True),
    ("P95 latency (mix, end to end)", ("load", "mix", "e2e_s", "p95"), "s", True),
    ("P95 TTFT (mix)", ("load", "mix", "ttft_s", "p95"), "s", True),
    ("P95 inter-token (mix)", ("load", "mix", "itl_s", "p95"), "s", True),
    ("P95 TTFT, server-side (whole run)", ("server_log", "ttft_s", "p95"), "s", True),
    ("failure rate under the burst", ("load", "burst", "failure_rate"), "%", True),
    ("P95 latency under the burst", ("load", "burst", "e2e_s", "p95"), "s", True),
    ("launch to ready", ("launch_to_ready_s",), "s", True),
)


def comparison(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label, path, unit, lower in COMPARE_ROWS:
        va, vb = dig(a, *path), dig(b, *path)
        rows.append({"metric": label, "a": va, "b": vb, "b_over_a": ratio(vb, va), "unit": unit,
                     "lower_is_better": lower})
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
    e, f = load["economics"], fmt
    lines = [f"capacity: {f(e['requests_per_s'])} req/s on the prompt mix at concurrency "
             f"{load['mix']['concurrency']} -> {f(e['requests_per_day'])} requests/day",
             f"cost at {f(e['gpu_hour_cost'], '$')}/hour: {f(e['cost_per_1k_requests'], '$')} per 1k requests "
             f"({f(e['cost_per_request'], '$')} per request)"]
    rej = {}
    for p in [*load["sweep"], load["mix"], load.get("burst") or {}]:
        for k, v in (p.get("rejected_by_reason") or {}).items():
            rej[k] = rej.get(k, 0) + v
    if rej:
        lines.append("429 by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(rej.items())))
    return "\n".join(lines)


def compare_table(rows: list[dict[str, Any]], a: str, b: str) -> str:
    f = fmt
    return table(["metric", f"A: {a}", f"B: {b}", "B / A"],
                   [[r["metric"], f(r["a"], r["unit"]), f(r["b"], r["unit"]), f(r["b_over_a"], "x")] for r in rows],
                   "Side by side (A then B, one run; B / A below 1 is better where lower is better)")


def main(args: Any) -> int:
    """The whole ``bench load`` run; ``bench.run`` has validated ``args``."""
    levels = validate(args)
    out = out_path(args, "load")
    logs_dir = log_dir_for(out)
    params = {k: getattr(args, k) for k in ("levels", "per_level", "sweep_words", "mix", "prompts", "mix_requests",
                                           "mix_concurrency", "burst", "max_tokens", "phase_time_limit",
                                           "request_timeout", "gpu_hour_cost", "seed")}
    res: dict[str, Any] = {"kind": "load", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
                           "params": params, "runs": []}
    say = lambda s: print(f"  - {s}", flush=True)  # noqa: E731
    note = busy_note()
    if note:
        print(note, flush=True)
    if args.compare:
        print(f"qwenbox bench load --compare: A={args.compare[0]} B={args.compare[1]}; logs in {logs_dir}/", flush=True)
        with socket_dir() as sd:
            for label, cfg in zip(("A", "B"), args.compare):
                res["runs"].append(run_with_daemon(cfg, label, sd, logs_dir / f"daemon-{label}.log", args, levels, say))
        res["comparison"] = comparison(res["runs"][0], res["runs"][1])
    elif args.socket:
        print(f"qwenbox bench load: driving the daemon on {args.socket}", flush=True)
        entry = {"label": "socket", "socket": args.socket}
        entry["load"] = asyncio.run(run_load(args.socket, args, levels, say))
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
        print(compare_table(res["comparison"], Path(args.compare[0]).name, Path(args.compare[1]).name))
        print()
    print(f"JSON: {out}")
    return 0
