"""The pre-warm plan: what runs between "engine built" and "READY=1", and its timings.

Contract: ``plan(cfg)`` lists the steps; ``await run(engine, cfg, on_step)`` runs them in
order and returns a ``WarmupReport``. Steps:
  1. one dummy prefill per prompt-length bucket (cfg.warmup.prompt_buckets, capped by
     max_model_len), each followed by ``decode_steps`` decode steps: the first request of
     each size pays any lazy compilation, allocator growth or kernel autotuning here;
  2. ``concurrency`` requests at once, so batched decode paths are warm too;
  3. the prefix cache is reset (dummy prompts must not hold cache blocks), then
  4. the configured system prompt is prefilled so it sits in the prefix cache for the
     first user request, and
  5. one request on top of that cached prefix runs, sampling like real traffic, so the
     first user request finds the prefix-hit path warm too.
The batch step and step 5 sample with the shaping defaults (temperature, top-p, presence
penalty): those kernels are loaded lazily on first use otherwise.
Dummy prompts are built from real text so their tokens are ordinary tokens of the model's
vocabulary; each bucket starts differently so no bucket rides on another's cached prefix.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

from .config import Config
from .engine_protocol import PromptTokenizer, ServingEngine
from .generation import GenerationRequest, Sampling

_FILLER = ("The quick brown fox jumps over the lazy dog while the scheduler batches prefill "
           "and decode steps, and the cache keeps every block it has seen. ")


class ShapedSampling(TypedDict):
    """The shaping defaults' sampling fields (``serving_sampling``)."""
    temperature: float
    top_p: float
    presence_penalty: float


class StepFigures(TypedDict):
    name: str
    prompt_tokens: int
    requests: int
    ttft_s: float
    total_s: float


class WarmupFigures(TypedDict):
    """``WarmupReport.as_dict()``: what /health shows under ``warmup``."""
    total_s: float
    system_prompt_tokens: int
    steps: list[StepFigures]


@dataclass
class Step:
    name: str
    prompt_tokens: int
    requests: int = 1


@dataclass
class StepResult:
    name: str
    prompt_tokens: int
    requests: int
    ttft_s: float
    total_s: float


@dataclass
class WarmupReport:
    steps: list[StepResult] = field(default_factory=list)
    total_s: float = 0.0
    system_prompt_tokens: int = 0

    def as_dict(self) -> WarmupFigures:
        return {"total_s": round(self.total_s, 3), "system_prompt_tokens": self.system_prompt_tokens,
                "steps": [{"name": s.name, "prompt_tokens": s.prompt_tokens, "requests": s.requests,
                           "ttft_s": round(s.ttft_s, 4), "total_s": round(s.total_s, 4)} for s in self.steps]}


def plan(cfg: Config) -> list[Step]:
    if not cfg.warmup.enabled:
        return []
    steps = [Step(f"prefill {b}", b) for b in cfg.warmup_buckets]
    if cfg.warmup.concurrency > 1:
        steps.append(Step(f"batch x{cfg.warmup.concurrency}", min(cfg.warmup_buckets), cfg.warmup.concurrency))
    return steps


def dummy_prompt(tokenizer: PromptTokenizer, length: int, salt: str) -> list[int]:
    """``length`` ordinary tokens, starting with ``salt`` so prompts don't share a prefix."""
    ids = tokenizer.encode(f"{salt}. ")
    filler = tokenizer.encode(_FILLER)
    while len(ids) < length:
        ids.extend(filler)
    return ids[:length]


def serving_sampling(cfg: Config) -> ShapedSampling:
    """The sampling settings most real requests get (shaping defaults): random sampling with
    top-p and a presence penalty load kernels that greedy decoding never touches."""
    return {"temperature": cfg.shaping.temperature, "top_p": cfg.shaping.top_p,
            "presence_penalty": cfg.shaping.presence_penalty}


async def _one(engine: ServingEngine, prompt: list[int], max_tokens: int,
               sampling: ShapedSampling | None = None) -> tuple[float, float]:
    shaped = (Sampling(max_tokens=max_tokens, ignore_eos=True, **sampling) if sampling is not None
              else Sampling(max_tokens=max_tokens, ignore_eos=True, temperature=0.0))
    req = GenerationRequest(request_id=f"warmup-{uuid.uuid4().hex[:12]}", prompt_token_ids=prompt,
                            sampling=shaped, stream=True)
    t0 = time.monotonic()
    ttft = None
    async for _ in engine.generate(req):
        if ttft is None:
            ttft = time.monotonic() - t0
    return (ttft if ttft is not None else time.monotonic() - t0), time.monotonic() - t0


async def run(engine: ServingEngine, cfg: Config, on_step: Callable[[int, int, str], None] = lambda i, n, s: None
              ) -> WarmupReport:
    import asyncio

    report = WarmupReport()
    steps = plan(cfg)
    t_all = time.monotonic()
    total = len(steps) + (2 if cfg.warmup.system_prompt and cfg.warmup.enabled else 0)
    for i, step in enumerate(steps, 1):
        on_step(i, total, step.name)
        t0 = time.monotonic()
        prompts = [dummy_prompt(engine.tokenizer, step.prompt_tokens, f"warm-up {step.name} #{k}")
                   for k in range(step.requests)]
        # the batch step samples like real traffic; the single prefills decode greedily
        sampling = serving_sampling(cfg) if step.requests > 1 else None
        results = await asyncio.gather(*(_one(engine, p, cfg.warmup.decode_steps, sampling) for p in prompts))
        report.steps.append(StepResult(step.name, step.prompt_tokens, step.requests,
                                       ttft_s=max(r[0] for r in results), total_s=time.monotonic() - t0))
    if steps and cfg.engine.enable_prefix_caching:
        await engine.reset_prefix_cache()
    if cfg.warmup.enabled and cfg.warmup.system_prompt:
        on_step(total - 1, total, "system prompt into the prefix cache")
        t0 = time.monotonic()
        n, ttft = await prefill_system_prompt(engine, cfg)
        report.system_prompt_tokens = n
        report.steps.append(StepResult("system prompt", n, 1, ttft_s=ttft, total_s=time.monotonic() - t0))
        # A first request that reuses cached blocks runs other kernels (prefill on top of a
        # cached prefix) than any step above: measured on an H100, skipping this left the
        # first real chat request 2.5x slower than the next ones.
        on_step(total, total, "a request on the cached system prompt")
        t0 = time.monotonic()
        ids = _after_system_prompt(engine, cfg, _FILLER)
        ttft, _ = await _one(engine, ids, cfg.warmup.decode_steps, serving_sampling(cfg))
        report.steps.append(StepResult("prefix hit", len(ids), 1, ttft_s=ttft, total_s=time.monotonic() - t0))
    report.total_s = time.monotonic() - t_all
    return report


async def prefill_system_prompt(engine: ServingEngine, cfg: Config) -> tuple[int, float]:
    """Put the configured system prompt into the prefix cache (also after a wake-up).

    The prompt is rendered through the chat template exactly as a user request with that
    system prompt renders, so its leading blocks hash the same and are reused.
    Returns (prompt tokens, TTFT seconds); (0, 0.0) when no system prompt is configured.
    """
    if not cfg.warmup.system_prompt:
        return 0, 0.0
    ids = _after_system_prompt(engine, cfg, "hi")
    ttft, _ = await _one(engine, ids, 1)
    return len(ids), ttft


def _after_system_prompt(engine: ServingEngine, cfg: Config, user: str) -> list[int]:
    """Token ids of a chat of the configured system prompt and one user turn."""
    return engine.tokenizer.encode(engine.tokenizer.render_chat(
        [{"role": "system", "content": cfg.warmup.system_prompt}, {"role": "user", "content": user}]))
