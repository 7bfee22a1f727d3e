"""Plain data that crosses the border between the API and the engine (no vllm types).

``GenerationRequest`` is what ``api/convert.py`` builds from an OpenAI request and what
``engine.py`` turns into vLLM's SamplingParams; ``Delta`` is what the engine yields back.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    priority: int = 0          # lower runs first (vLLM priority scheduling)
    stream: bool = False       # deltas as they come, else one final output per choice


@dataclass
class Delta:
    """New output of one choice since the last Delta (or all of it when not streaming)."""
    index: int
    text: str
    num_tokens: int                 # tokens in this delta
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running


@dataclass
class Progress:
    """Counters the watchdog and /metrics read; monotonic within one engine instance."""
    generated_tokens: int = 0
    prompt_tokens: int = 0
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    last_step_monotonic: float = 0.0
    steps: int = 0
