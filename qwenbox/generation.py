"""Plain data that crosses the border between the API and the engine (no vllm types).

Contract:
- ``Sampling`` is the one sampling type: its field names are vLLM's ``SamplingParams``
  keywords, so ``engine.py`` passes them through without spelling them out again. A field
  left ``None`` means "not given"; ``merged_over(defaults)`` fills those from another
  ``Sampling`` and is the only place client values and server defaults meet.
- ``RULES`` are the legal ranges of the numeric sampling fields: the API validates client
  values with them and the config validates its shaping defaults with the same rules.
- ``Guided`` is a constraint on what may be generated (vLLM's structured outputs): a JSON
  schema, or any JSON object. The engine writes it as compact JSON (no free whitespace).
- ``GenerationRequest`` is what ``api/convert.py`` builds and ``engine.py`` runs;
  ``Delta`` is what the engine yields back (with ``TokenLogprob``s when asked);
  ``Progress`` is what the watchdog reads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypedDict

# One chat message as the model's chat template reads it: "role" and "content" (text), and
# where the turn has them "tool_calls" (OpenAI's shape, arguments as an object where they
# parse as one) or "tool_call_id".
ChatMessage = dict[str, object]


class ConfigBounds(TypedDict):
    """A ``Rule`` as the keywords of ``config._opt``."""
    min: float | None
    max: float | None
    min_exclusive: bool




@dataclass(frozen=True)
class Guided:
    """Guided decoding: the output must be JSON matching ``json_schema`` (its JSON text),
    or, with ``json_object``, any JSON object. Exactly one of the two is set."""
    json_schema: str | None = None
    json_object: bool = False


# What vLLM's ``SamplingParams`` is given: a ``Sampling`` field's value, ``stop`` as a list,
# ``logit_bias`` as {token id: bias}, ``guided`` as the ``Guided`` (engine.py makes vLLM's).
SamplingValue = int | float | bool | list[str] | dict[int, float] | Guided | None


@dataclass(frozen=True)
class Rule:
    """A numeric field's legal range; ``lo_open`` makes the lower bound exclusive."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    integer: bool = False

    def check(self, v: float) -> str | None:
        """None when ``v`` is legal, else what is wrong with it (for an error message)."""
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return f"must be {'>' if self.lo_open else '>='} {self.lo}, got {v!r}"
        if self.hi is not None and v > self.hi:
            return f"must be <= {self.hi}, got {v!r}"
        return None

    def as_config_bounds(self) -> ConfigBounds:
        return {"min": self.lo, "max": self.hi, "min_exclusive": self.lo_open}


# OpenAI's documented ranges, and vLLM's where OpenAI has none. A seed must fit the
# 64-bit range torch's generator takes (signed or unsigned).
RULES: dict[str, Rule] = {
    "temperature": Rule(0.0, 2.0),
    "top_p": Rule(0.0, 1.0, lo_open=True),
    "min_p": Rule(0.0, 1.0),
    "presence_penalty": Rule(-2.0, 2.0),
    "frequency_penalty": Rule(-2.0, 2.0),
    "repetition_penalty": Rule(0.0, 2.0, lo_open=True),
    "seed": Rule(-(1 << 63), (1 << 64) - 1, integer=True),
}


@dataclass(frozen=True)
class Sampling:
    """How to sample, by vLLM's ``SamplingParams`` names; ``None`` = not given."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()      # (token id, bias added to its logit), by id
    logprobs: int | None = None          # per generated token: its logprob and this many alternatives
    prompt_logprobs: int | None = None   # the same for every prompt token (echo)
    guided: Guided | None = None         # structured output
    # False where a tool-call parser must see the model's special tokens (vLLM's advice)
    skip_special_tokens: bool = True

    def merged_over(self, defaults: Sampling) -> Sampling:
        """This sampling with every field it left ``None`` taken from ``defaults``."""
        return dataclasses.replace(self, **{
            f.name: getattr(defaults, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) is None and getattr(defaults, f.name) is not None})

    def engine_kwargs(self) -> dict[str, SamplingValue]:
        """Keywords for vLLM's ``SamplingParams``: the fields that are set (vLLM's own
        defaults apply to the rest), ``stop`` as a list, ``logit_bias`` as a dict."""
        kw: dict[str, SamplingValue] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                        if getattr(self, f.name) is not None}
        kw["stop"] = list(self.stop) or None
        kw["logit_bias"] = dict(self.logit_bias) or None
        return kw


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling          # resolved: max_tokens and the shaped fields are set
    priority: int = 0           # lower runs first (vLLM priority scheduling)
    stream: bool = False        # deltas as they come, else one final output per choice


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token at a position: its text (as the tokenizer decodes it alone), id
    and log probability (finite: vLLM's -inf for a masked token is given as -9999.0)."""
    token: str
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The token at one position and its log probability, with the ``top`` alternatives
    asked for (most likely first)."""
    token: str
    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """Part of one tool call of a choice, OpenAI's streamed shape: the first part of call
    ``index`` carries its ``id`` and ``name``; ``arguments`` parts are JSON text that adds up."""
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Delta:
    """New output of one choice since the last Delta (or all of it when not streaming)."""
    index: int
    text: str
    num_tokens: int                 # tokens in this delta
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None    # one per token of this delta, when asked
    # Each prompt token's (None for the first, which has no context), when asked; on a
    # choice's first delta only.
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()      # set by the API's tool-call parsing, never by the engine


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
