"""``qwenbox tune``: search engine and admission settings together for the highest goodput
under a latency SLO, in one process, and write the winner as a conf.d drop-in.

Contract:
- Input: the operator's config (main file and drop-ins, as ``serve`` reads it), an SLO
  (``--ttft-p95``, ``--itl-p95``, seconds) and a workload: fixed prompt/output lengths
  (``--prompt-tokens``/``--output-tokens``, default ``[sizing]``'s typical request) or a
  traffic shape written by ``qwenbox logs --shape`` (``--workload FILE``). Prompts are
  random ordinary token ids, checked distinct (no request rides on another's prefix cache);
  every trial gets the very same prompts; outputs are ``ignore_eos``, greedy, streamed.
- A trial is one engine setting: the engine is built in this process (vLLM imported once
  for all trials: no process restart), warmed as ``serve`` warms it, then driven in closed
  loops at rising concurrency (a ladder up to its ``max_num_seqs``, one midpoint tried
  where the SLO is crossed); a level meets the SLO when its p95 TTFT and its p95
  inter-token latency are within it; the trial's goodput is the best level's requests/s
  that met the SLO one by one, and that level is its ``max_in_flight``. Then the engine
  is disposed of (core processes killed and reaped) before the next is built.
- The search is coordinate descent from the config's own setting (after sizing's step
  (a)): one key at a time over its candidate values (``search_space``; ``--try KEY=V,V``
  replaces the defaults), a value kept when it raises goodput by more than ``MIN_GAIN``.
  Quantization (``engine.quantization``, ``engine.kv_cache_dtype``: they change the
  answers) is tried only with ``--allow-quantization``, after the chunk budget and the
  CUDA graphs (``search_space`` gives the order). A trial
  that fails to build or to serve is recorded with its error, and the search goes on.
- ``--budget-min`` bounds the whole run: a trial is started only while the mean trial so
  far still fits; the keys not tried are listed. A progress line with the ETA goes to stderr.
- Output (``--out DIR``, written atomically): ``tune.json`` (every trial, every level),
  ``tune.md`` (the same as tables) and ``90-tuned.toml``, the best setting as a drop-in:
  its engine keys, ``admission.max_in_flight``, ``admission.max_queued`` (as many as can
  wait and still see their first token within the SLO at the measured rate) and
  ``max_queued_prompt_tokens``; validated by loading the config with it before it is
  written. With quantization allowed and chosen, ``90-tuned-unquantized.toml`` holds the
  best setting without it. Exit 0 when a setting met the SLO, 1 when none did, 2 on bad input.
- The tuner needs the card to itself: it refuses to start while a daemon answers on the
  config's socket.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import sizing, warmup
from ..config import AUTO, Config, ConfigError, load
from ..engine_protocol import EngineOpener, ServingEngine
from ..fileio import write_atomic
from ..generation import GenerationRequest, Sampling
from ..supervisor import close, dispose, open_vllm_engine
from .bench.load import economics
from .bench.tokens import PromptSetError, check_prompt_set, load_tokenizer, random_id_prompts, tok_info
from .bench.workload import DEFAULT_GPU_HOUR_COST, OptionError
from .logs import SHAPE_KIND
from .report import fmt, table
from .stats import percentiles

MIN_GAIN = 0.02             # a value must beat the best so far by more than this to be kept
PROFILE = "90-tuned.toml"
PROFILE_UNQUANTIZED = "90-tuned-unquantized.toml"
QUANTIZING_KEYS = ("engine.kv_cache_dtype", "engine.quantization")
Value = int | str
Setting = dict[str, Value]          # dotted engine key -> value; {} is the config's own


# ------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Slo:
    ttft_p95_s: float
    itl_p95_s: float

    def met_by(self, ttft_s: float, itl_s: float | None) -> bool:
        return ttft_s <= self.ttft_p95_s and (itl_s is None or itl_s <= self.itl_p95_s)


@dataclass(frozen=True)
class Workload:
    """Requests as (prompt tokens, output tokens), drawn in turn; where they come from."""
    requests: tuple[tuple[int, int], ...]
    source: str

    @classmethod
    def fixed(cls, prompt_tokens: int, output_tokens: int) -> Workload:
        return cls(((prompt_tokens, output_tokens),), f"{prompt_tokens} -> {output_tokens} tokens")

    @classmethod
    def from_shape(cls, path: str) -> Workload:
        """A ``qwenbox logs --shape`` file: {"kind": SHAPE_KIND, "requests": [[p, o], ...]}."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise OptionError(f"--workload {path}: cannot read it: {e}") from None
        if not isinstance(data, dict) or data.get("kind") != SHAPE_KIND:
            raise OptionError(f"--workload {path}: not a traffic shape (write one with `qwenbox logs --shape`)")
        reqs = data.get("requests")
        pairs = []
        for r in reqs if isinstance(reqs, list) else []:
            if (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                             for x in r) and r[0] >= 1 and r[1] >= 1):
                pairs.append((r[0], r[1]))
        if not pairs:
            raise OptionError(f"--workload {path}: it holds no request with a prompt and an output length")
        return cls(tuple(pairs), f"traffic shape {Path(path).name} ({len(pairs)} requests)")

    def fitted(self, max_model_len: int) -> Workload:
        """Only the requests that fit the model's context; OptionError when none does."""
        kept = tuple(r for r in self.requests if r[0] + r[1] <= max_model_len)
        if not kept:
            raise OptionError(f"no request of the workload fits model.max_model_len ({max_model_len})")
        dropped = len(self.requests) - len(kept)
        return Workload(kept, self.source + (f", {dropped} longer than max_model_len left out" if dropped else ""))

    def typical(self) -> tuple[int, int]:
        return (int(statistics.median(r[0] for r in self.requests)),
                int(statistics.median(r[1] for r in self.requests)))


@dataclass(frozen=True)
class Dimension:
    key: str                 # dotted, engine.*
    values: tuple[Value, ...]


def parse_try(items: Sequence[str]) -> list[Dimension]:
    """``--try engine.max_num_seqs=256,512`` -> Dimensions (numbers where they parse)."""
    out = []
    for item in items:
        key, sep, vals = item.partition("=")
        key = key.strip()
        if not sep or not key.startswith("engine.") or not vals.strip():
            raise OptionError(f"--try {item!r}: expected engine.KEY=VALUE[,VALUE...]")
        values = tuple(int(v) if v.strip().lstrip("-").isdigit() else v.strip() for v in vals.split(","))
        out.append(Dimension(key, values))
    return out


def search_space(cfg: Config, limits: sizing.EngineLimits, allow_quantization: bool) -> list[Dimension]:
    """The keys tried by default, most promising first for a prefill-heavy load, for the
    engine ``cfg`` builds: a larger prefill chunk budget, CUDA graphs for the largest decode
    batches, then (with quantization allowed) FP8 weights and an FP8 KV cache, then fewer
    sequences, vLLM's interactivity mode and a smaller chunk budget. The CPU backend has
    no CUDA graphs and no FP8: only the scheduler limits there."""
    seqs, tokens = limits.max_num_seqs.value, limits.max_num_batched_tokens.value
    gpu = limits.device.kind == "cuda" and not cfg.engine.enforce_eager
    dims = [Dimension("engine.max_num_batched_tokens", (2 * tokens,))]
    graphs = limits.max_cudagraph_capture_size.value if limits.max_cudagraph_capture_size else min(2 * seqs, 512)
    if gpu and min(seqs, tokens) > graphs and cfg.engine.max_cudagraph_capture_size == AUTO:
        dims.append(Dimension("engine.max_cudagraph_capture_size", (min(seqs, tokens),)))
    if allow_quantization and limits.device.kind == "cuda":
        if not cfg.engine.quantization:
            dims.append(Dimension("engine.quantization", ("fp8",)))
        if cfg.engine.kv_cache_dtype == "auto":
            dims.append(Dimension("engine.kv_cache_dtype", ("fp8",)))
    if seqs >= 2:
        dims.append(Dimension("engine.max_num_seqs", (seqs // 2,)))
    if gpu:
        dims.append(Dimension("engine.performance_mode", ("interactivity",)))
    if tokens // 2 >= max(seqs, 256):
        dims.append(Dimension("engine.max_num_batched_tokens", (tokens // 2,)))
    return dims


def trial_config(cfg: Config, setting: Setting) -> Config:
    """``cfg`` with ``setting`` over it, validated as the config file's values are."""
    return load(cfg.source, {**dict(cfg.overrides), **setting})


# ------------------------------------------------------------------ one level, one trial
@dataclass
class Timing:
    ttft_s: float
    tpot_s: float | None         # (last token - first token) / (tokens - 1)
    gaps_s: list[float]          # between consecutive outputs, per token
    tokens: int


@dataclass
class Level:
    concurrency: int
    requests: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    itl_p95_s: float | None
    good: int                    # requests that met the SLO one by one
    goodput_rps: float
    meets_slo: bool


@dataclass
class Trial:
    setting: Setting
    label: str
    status: str = "ok"                   # ok | failed
    error: str = ""
    build_s: float = 0.0
    wall_s: float = 0.0
    engine: dict[str, Any] = field(default_factory=dict)     # the limits it was built with, its KV cache
    levels: list[Level] = field(default_factory=list)

    @property
    def best(self) -> Level | None:
        ok = [lv for lv in self.levels if lv.meets_slo]
        return max(ok, key=lambda lv: lv.goodput_rps) if ok else None

    @property
    def goodput(self) -> float:
        b = self.best
        return b.goodput_rps if b is not None else 0.0


async def _one(engine: ServingEngine, ids: list[int], out: int) -> Timing:
    req = GenerationRequest(request_id=f"tune-{uuid.uuid4().hex[:12]}", prompt_token_ids=ids,
                            sampling=Sampling(max_tokens=out, ignore_eos=True, temperature=0.0), stream=True)
    t0 = time.monotonic()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    async for deltas in engine.generate(req):
        n = sum(d.num_tokens for d in deltas)
        if n == 0:
            continue
        now = time.monotonic()
        if first is None:
            first = now
        elif last is not None:
            gaps.append((now - last) / n)
        last, tokens = now, tokens + n
    if first is None or last is None:
        raise RuntimeError("a request ended without output")
    return Timing(first - t0, (last - first) / (tokens - 1) if tokens > 1 else None, gaps, tokens)


async def closed_loop(engine: ServingEngine, prompts: list[tuple[list[int], int]], concurrency: int,
                      slo: Slo) -> Level:
    """``concurrency`` clients, each sending its next prompt when its last one ended."""
    it = iter(prompts)
    timings: list[Timing] = []

    async def client() -> None:
        for ids, out in it:
            timings.append(await _one(engine, ids, out))

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.monotonic() - t0
    ttft = percentiles([t.ttft_s for t in timings], (50, 95))
    itl = percentiles([g for t in timings for g in t.gaps_s], (95,))[95]
    ttft50, ttft95 = ttft[50] or 0.0, ttft[95] or 0.0      # every request had a first token
    good = sum(1 for t in timings if slo.met_by(t.ttft_s, t.tpot_s))
    return Level(concurrency, len(timings), round(wall, 3), round(len(timings) / wall, 3),
                 round(sum(t.tokens for t in timings) / wall, 1), round(ttft50, 4), round(ttft95, 4),
                 round(itl, 5) if itl is not None else None, good, round(good / wall, 3),
                 slo.met_by(ttft95, itl))


def ladder(max_num_seqs: int, explicit: Sequence[int] = ()) -> list[int]:
    """The concurrency levels a trial climbs: ``explicit`` (capped), else max_num_seqs / 16,
    / 4 and itself."""
    top = max(1, max_num_seqs)
    levels = [min(c, top) for c in explicit] if explicit else [top // 16, top // 4, top]
    return sorted({c for c in levels if c >= 1})


@dataclass(frozen=True)
class Plan:
    """What every trial runs: the SLO, the prompts by level, the requests per level."""
    slo: Slo
    explicit_levels: tuple[int, ...]
    requests_per_level: int          # 0: twice the concurrency
    max_requests_per_level: int
    prompts: Callable[[int, int], list[tuple[list[int], int]]]   # (concurrency, n) -> prompts

    def count(self, c: int) -> int:
        n = self.requests_per_level or 2 * c
        return max(c, min(n, self.max_requests_per_level))


async def measure(engine: ServingEngine, plan: Plan, max_num_seqs: int, on_level: Callable[[int], None]
                  ) -> list[Level]:
    """Climb the ladder while the SLO holds; where it is crossed, try the midpoint once."""
    levels: list[Level] = []
    steps = ladder(max_num_seqs, plan.explicit_levels)
    for c in steps:
        on_level(c)
        lv = await closed_loop(engine, plan.prompts(c, plan.count(c)), c, plan.slo)
        levels.append(lv)
        if not lv.meets_slo:
            passed = [x for x in levels if x.meets_slo]
            mid = int(math.sqrt(passed[-1].concurrency * c)) if passed else 0
            if passed and passed[-1].concurrency < mid < c:
                on_level(mid)
                levels.append(await closed_loop(engine, plan.prompts(mid, plan.count(mid)), mid, plan.slo))
            break
    return levels


async def run_trial(base: Config, setting: Setting, plan: Plan, open_engine: EngineOpener,
                    on_step: Callable[[str], None]) -> Trial:
    """One setting: build, warm, measure, dispose. Failures are recorded, never raised."""
    trial = Trial(dict(setting), label(setting))
    t0 = time.monotonic()
    engine: ServingEngine | None = None
    try:
        cfg = trial_config(base, setting)
        limits = sizing.engine_limits(cfg, sizing.probe_device())
        cfg = sizing.apply_engine(cfg, limits)
        trial.engine = {"max_num_seqs": limits.max_num_seqs.value,
                        "max_num_batched_tokens": limits.max_num_batched_tokens.value}
        on_step("building the engine")
        engine = await open_engine(cfg, on_step)
        trial.build_s = round(time.monotonic() - t0, 2)
        trial.engine["kv_cache_tokens"] = engine.figures().get("kv_cache_tokens")
        on_step("warming up")
        await warmup.run(engine, cfg)
        trial.levels = await measure(engine, plan, limits.max_num_seqs.value,
                                     lambda c: on_step(f"closed loop at {c}"))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        trial.status, trial.error = "failed", f"{type(e).__name__}: {first}"
    finally:
        if engine is not None:
            await close(engine)       # a healthy engine shuts down on its own first;
            await dispose(engine)     # what outlived that is killed and reaped
    trial.wall_s = round(time.monotonic() - t0, 2)
    return trial


def label(setting: Setting) -> str:
    return ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in setting.items()) or "the config's own"


# ------------------------------------------------------------------ the search
class ProgressLine:
    """One line on stderr (redrawn on a terminal, else one line per step): trials done of
    planned, what runs now, elapsed and the ETA: the mean trial so far times the trials
    left, but no later than the budget's end plus one trial (no trial starts past it);
    before the first trial ends, the budget."""

    def __init__(self, planned: int, budget_s: float, stream: Any = sys.stderr,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.planned, self.budget_s, self.stream, self.clock = planned, budget_s, stream, clock
        self.t0 = clock()
        self.done: list[float] = []
        self.tty = bool(getattr(stream, "isatty", lambda: False)())

    def eta_s(self) -> float:
        if not self.done:
            return self.budget_s
        mean = statistics.fmean(self.done)
        left = max(0, self.planned - len(self.done))
        return min(mean * left, max(0.0, self.budget_s - (self.clock() - self.t0)) + mean)

    def show(self, what: str) -> None:
        n = len(self.done)
        width = 20
        bar = "#" * round(width * min(n, self.planned) / max(1, self.planned))
        line = (f"[{bar:<{width}}] trial {min(n + 1, self.planned)}/{self.planned}: {what}  "
                f"elapsed {_mmss(self.clock() - self.t0)}  ETA {_mmss(self.eta_s())}")
        if self.tty:
            self.stream.write("\r\x1b[2K" + line[:200])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def trial_done(self, seconds: float) -> None:
        self.done.append(seconds)

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _mmss(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 60}:{s % 60:02d}"


@dataclass
class SearchResult:
    trials: list[Trial]
    best: Trial | None
    best_unquantized: Trial | None
    not_tried: list[str]


async def search(cfg: Config, dims: list[Dimension], plan: Plan, budget_s: float, open_engine: EngineOpener,
                 progress: ProgressLine) -> SearchResult:
    """Coordinate descent from the config's own setting (see the module's contract)."""
    trials: list[Trial] = []
    not_tried: list[str] = []
    t0 = time.monotonic()

    async def trial(setting: Setting) -> Trial:
        t = await run_trial(cfg, setting, plan, open_engine, lambda s: progress.show(f"{label(setting)}: {s}"))
        trials.append(t)
        progress.trial_done(t.wall_s)
        return t

    best = await trial({})
    for dim in dims:
        for v in dim.values:
            setting = {**best.setting, dim.key: v}
            spent = time.monotonic() - t0
            mean = statistics.fmean(progress.done)
            if spent + mean > budget_s:
                not_tried.append(label({dim.key: v}))
                continue
            t = await trial(setting)
            if t.status == "ok" and t.goodput > best.goodput * (1 + MIN_GAIN):
                best = t
    progress.finish()
    ok = [t for t in trials if t.status == "ok" and t.best is not None]
    unq = [t for t in ok if not any(k in QUANTIZING_KEYS for k in t.setting)]
    top = max(ok, key=lambda t: t.goodput) if ok else None
    return SearchResult(trials, top, max(unq, key=lambda t: t.goodput) if unq else None, not_tried)


# ------------------------------------------------------------------ the profile
def admission_for(trial: Trial, slo: Slo, typical_prompt: int, max_model_len: int) -> dict[str, int]:
    """max_in_flight: the best level's concurrency. max_queued: as many as can wait and
    still see their first token within the SLO, at the rate that level finished requests
    (the q-th waiting gets a slot after q / rate seconds, then its own TTFT)."""
    b = trial.best
    assert b is not None
    queued = max(0, math.floor(b.requests_per_s * max(0.0, slo.ttft_p95_s - b.ttft_p95_s)))
    return {"max_in_flight": b.concurrency, "max_queued": queued,
            "max_queued_prompt_tokens": max(queued * typical_prompt, max_model_len)}


def profile_settings(trial: Trial, slo: Slo, typical_prompt: int, max_model_len: int) -> dict[str, Value]:
    """The drop-in's keys, dotted: the engine as the trial built it, then admission."""
    out: dict[str, Value] = {"engine.max_num_seqs": trial.engine["max_num_seqs"],
                             "engine.max_num_batched_tokens": trial.engine["max_num_batched_tokens"]}
    out.update(trial.setting)
    out.update({f"admission.{k}": v for k, v in admission_for(trial, slo, typical_prompt, max_model_len).items()})
    return out


def profile_text(settings: dict[str, Value], header: list[str]) -> str:
    lines = [f"# {h}" for h in header]
    sections: dict[str, list[str]] = {}
    for dotted, v in settings.items():
        sec, key = dotted.split(".", 1)
        sections.setdefault(sec, []).append(f"{key} = {json.dumps(v)}")
    for sec, kv in sections.items():
        lines += ["", f"[{sec}]", *kv]
    return "\n".join(lines) + "\n"


def cost_per_1k(goodput_rps: float, gpu_hour_cost: float) -> float | None:
    """$ per 1k requests at ``goodput_rps``: the cost benchmark's own arithmetic."""
    cost: float | None = economics({"requests_per_s": goodput_rps}, gpu_hour_cost)["cost_per_1k_requests"]
    return cost


# ------------------------------------------------------------------ report
def as_dict(res: SearchResult, meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "trials": [dataclasses.asdict(t) | {"goodput_rps": t.goodput,
                                                          "best_concurrency": t.best.concurrency if t.best else None}
                               for t in res.trials],
            "best": res.best.label if res.best else None,
            "best_unquantized": res.best_unquantized.label if res.best_unquantized else None,
            "not_tried": res.not_tried}


def render(res: SearchResult, meta: dict[str, Any], markdown: bool = False) -> str:
    base = res.trials[0].goodput if res.trials else 0.0
    rows = []
    for t in res.trials:
        b = t.best
        rows.append([t.label, t.status if t.status != "ok" else ("yes" if b else "no SLO level"),
                     fmt(t.goodput), fmt(t.goodput / base, "x") if base and t.status == "ok" else "-",
                     b.concurrency if b else "-", fmt(b.output_tokens_per_s) if b else "-",
                     fmt(b.ttft_p95_s, "s") if b else "-", fmt(b.itl_p95_s, "s") if b else "-",
                     fmt(cost_per_1k(t.goodput, meta["gpu_hour_cost"]), "$"), fmt(t.build_s, "s"),
                     t.error[:80] if t.error else ""])
    headers = ["setting", "met SLO", "goodput req/s", "vs own", "in flight", "out tok/s", "p95 TTFT",
               "p95 ITL", "$/1k req", "build", "error"]
    head = (f"SLO: p95 TTFT <= {meta['slo']['ttft_p95_s']} s, p95 ITL <= {meta['slo']['itl_p95_s']} s; "
            f"workload: {meta['workload']}; device: {meta['device']}; {len(res.trials)} trials in "
            f"{fmt(meta['wall_s'], 's')}")
    if markdown:
        md = [head, "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        levels = ["", "Every level (closed loop at the concurrency; goodput = requests that met the SLO, per second):",
                  "", "| setting | concurrency | requests | req/s | out tok/s | p50 TTFT | p95 TTFT | p95 ITL | "
                  "goodput | met |", "|" + "---|" * 10]
        for t in res.trials:
            levels += [f"| {t.label} | {lv.concurrency} | {lv.requests} | {fmt(lv.requests_per_s)} | "
                       f"{fmt(lv.output_tokens_per_s)} | {fmt(lv.ttft_p50_s, 's')} | {fmt(lv.ttft_p95_s, 's')} | "
                       f"{fmt(lv.itl_p95_s, 's')} | {fmt(lv.goodput_rps)} | {fmt(lv.meets_slo)} |" for lv in t.levels]
        tail = ["", f"Not tried (budget): {', '.join(res.not_tried)}"] if res.not_tried else []
        return "\n".join(md + levels + tail) + "\n"
    return head + "\n" + table(headers, rows, left=(0, 1, 10))


# ------------------------------------------------------------------ the command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ttft-p95", type=float, default=None, help="SLO: p95 time to first token, seconds "
                   "(default: the config's sizing.target_ttft_p95_s)")
    p.add_argument("--itl-p95", type=float, default=0.1, help="SLO: p95 inter-token latency, seconds (0.1)")
    p.add_argument("--workload", help="a traffic shape from `qwenbox logs --shape FILE` (default: fixed lengths)")
    p.add_argument("--prompt-tokens", type=int, help="prompt length (default: sizing.typical_prompt_tokens)")
    p.add_argument("--output-tokens", type=int, help="output length (default: sizing.typical_output_tokens)")
    p.add_argument("--try", dest="tries", action="append", default=[], metavar="engine.KEY=V[,V...]",
                   help="values to try for a key, instead of the default search space (repeatable)")
    p.add_argument("--allow-quantization", action="store_true",
                   help="also try an FP8 KV cache and FP8 weights (they change the answers: docs/tuning.md)")
    p.add_argument("--levels", help="concurrency levels to climb, e.g. 64,256,1024 (default: max_num_seqs/16, /4, x1)")
    p.add_argument("--requests-per-level", type=int, default=0, help="requests per level (default: 2 x concurrency)")
    p.add_argument("--max-requests-per-level", type=int, default=2048)
    p.add_argument("--budget-min", type=float, default=15.0, help="stop starting trials past this (15)")
    p.add_argument("--gpu-hour-cost", type=float, default=DEFAULT_GPU_HOUR_COST, help="$ per GPU-hour, for $/1k")
    p.add_argument("--out", default="qwenbox-tune", help="directory for tune.json, tune.md and the profile")


def _options(args: argparse.Namespace, cfg: Config) -> tuple[Slo, Workload, tuple[int, ...]]:
    ttft = args.ttft_p95 if args.ttft_p95 is not None else cfg.sizing.target_ttft_p95_s
    for name, v, lo in (("--ttft-p95", ttft, 0.001), ("--itl-p95", args.itl_p95, 0.0001),
                        ("--budget-min", args.budget_min, 0.1), ("--max-requests-per-level",
                                                                 args.max_requests_per_level, 1),
                        ("--requests-per-level", args.requests_per_level, 0), ("--gpu-hour-cost",
                                                                               args.gpu_hour_cost, 0.0)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= lo):
            raise OptionError(f"{name} must be a number >= {lo}")
    levels: tuple[int, ...] = ()
    if args.levels:
        try:
            levels = tuple(int(x) for x in args.levels.split(","))
        except ValueError:
            raise OptionError("--levels: expected numbers, e.g. 64,256,1024") from None
        if any(c < 1 or c > 8192 for c in levels):
            raise OptionError("--levels: each level must be 1..8192")
    if args.workload:
        wl = Workload.from_shape(args.workload)
    else:
        p = args.prompt_tokens or cfg.sizing.typical_prompt_tokens
        o = args.output_tokens or cfg.sizing.typical_output_tokens
        if p < 1 or o < 1:
            raise OptionError("--prompt-tokens and --output-tokens must be >= 1")
        wl = Workload.fixed(p, o)
    return Slo(ttft, args.itl_p95), wl.fitted(cfg.model.max_model_len), levels


def daemon_answers(path: str) -> bool:
    if not path:
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Prompts:
    """Prompts by (concurrency, n), made once and the same for every trial; every new set is
    checked with all made before it (distinct, no shared KV-cache block: no prompt rides on
    another's prefix cache)."""

    def __init__(self, cfg: Config, wl: Workload) -> None:
        self.info = tok_info(load_tokenizer(cfg.model.local_tokenizer_dir or cfg.model.local_dir))
        self.wl, self.block_size = wl, cfg.engine.block_size
        self.made: dict[tuple[int, int], list[tuple[list[int], int]]] = {}
        self.check: dict[str, Any] = {}

    def __call__(self, c: int, n: int) -> list[tuple[list[int], int]]:
        if (c, n) not in self.made:
            rng = random.Random(f"tune-{c}-{n}")
            shapes = [self.wl.requests[i % len(self.wl.requests)] for i in range(n)]
            self.made[(c, n)] = [(random_id_prompts(1, p, self.info, rng)[0], o) for p, o in shapes]
            every = [ids for ps in self.made.values() for ids, _ in ps]
            self.check = check_prompt_set(every, "tune prompts", allowed_prefix=0, block_size=self.block_size)
        return self.made[(c, n)]


async def _amain(args: argparse.Namespace, cfg: Config) -> int:
    slo, wl, levels = _options(args, cfg)
    dims = parse_try(args.tries) if args.tries else None
    if dims and not args.allow_quantization and any(d.key in QUANTIZING_KEYS for d in dims):
        raise OptionError("--try of engine.quantization or engine.kv_cache_dtype needs --allow-quantization")
    if daemon_answers(cfg.server.socket):
        raise OptionError(f"a qwenbox daemon answers on {cfg.server.socket}: stop it first "
                          "(systemctl stop qwenbox.socket qwenbox): the tuner needs the card to itself")
    device = sizing.probe_device()
    limits = sizing.engine_limits(cfg, device)
    dims = dims if dims is not None else search_space(cfg, limits, args.allow_quantization)
    for d in dims:
        for v in d.values:
            try:                # a bad --try value is an error now, not a failed trial later
                trial_config(cfg, {d.key: v})
            except ConfigError as e:
                raise OptionError(f"--try {d.key}={v}: {e}") from None
    prompts = Prompts(cfg, wl)
    plan = Plan(slo, levels, args.requests_per_level, args.max_requests_per_level, prompts)
    for c in ladder(limits.max_num_seqs.value, levels):
        prompts(c, plan.count(c))
    planned = 1 + sum(len(d.values) for d in dims)
    progress = ProgressLine(planned, args.budget_min * 60)
    t0 = time.monotonic()
    res = await search(cfg, dims, plan, args.budget_min * 60, open_vllm_engine, progress)
    meta = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config_files": list(cfg.files) or [cfg.source],
            "model": cfg.model.name, "device": device.describe(), "slo": dataclasses.asdict(slo),
            "workload": wl.source, "gpu_hour_cost": args.gpu_hour_cost, "budget_min": args.budget_min,
            "wall_s": round(time.monotonic() - t0, 1), "search_space": [dataclasses.asdict(d) for d in dims],
            "prompt_check": prompts.check}
    return write_outputs(args, cfg, res, meta, slo, wl)


def write_outputs(args: argparse.Namespace, cfg: Config, res: SearchResult, meta: dict[str, Any], slo: Slo,
                  wl: Workload) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    typical_prompt = wl.typical()[0]
    profiles = {}
    for name, t in ((PROFILE, res.best), (PROFILE_UNQUANTIZED, res.best_unquantized)):
        if t is None or (name == PROFILE_UNQUANTIZED and t is res.best):
            continue
        settings = profile_settings(t, slo, typical_prompt, cfg.model.max_model_len)
        trial_config(cfg, settings)           # it loads, or this is a bug: raise
        base = res.trials[0].goodput
        header = [f"written by `qwenbox tune` {meta['when']} for {meta['device']}, model {meta['model']}",
                  f"SLO p95 TTFT <= {slo.ttft_p95_s} s, p95 ITL <= {slo.itl_p95_s} s; workload {wl.source}",
                  f"goodput {t.goodput:.2f} req/s" + (f" ({t.goodput / base:.2f}x the config's own setting)"
                                                      if base else "") + f"; trial: {t.label}",
                  f"apply: install -m 0644 {name} /etc/qwenbox/conf.d/ && systemctl restart qwenbox"]
        write_atomic(out / name, profile_text(settings, header))
        profiles[name] = settings
    meta["profiles"] = profiles
    write_atomic(out / "tune.json", json.dumps(as_dict(res, meta), indent=2, default=str) + "\n")
    write_atomic(out / "tune.md", render(res, meta, markdown=True))
    print(render(res, meta))
    if res.not_tried:
        print(f"not tried within --budget-min {args.budget_min:g}: {', '.join(res.not_tried)}")
    if res.best is None:
        print(f"no setting met the SLO at any level; nothing to apply (figures in {out / 'tune.json'})")
        return 1
    print(f"best: {res.best.label}: {res.best.goodput:.2f} req/s within the SLO -> {out / PROFILE}")
    return 0


def main(args: argparse.Namespace, cfg: Config) -> int:
    try:
        return asyncio.run(_amain(args, cfg))
    except (OptionError, PromptSetError) as e:
        print(f"qwenbox tune: {e}", file=sys.stderr)
        return 2
