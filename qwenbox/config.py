"""The one typed, frozen configuration object and its loader.

Contract:
- ``load(path, overrides)`` reads the main TOML file, then the drop-ins: every ``*.toml``
  in ``conf.d/`` beside it (``/etc/qwenbox/conf.d/*.toml`` for the shipped file), in name
  order, each merged over what came before (tables key by key; later files win; names
  starting with "." and files not ending in ``.toml`` are ignored), then ``overrides``;
  it returns a frozen ``Config`` whose ``files`` lists the files read, in that order.
  Loading the main file again (a SIGHUP reload) reads its drop-ins again.
- Anything wrong with a file raises ``ConfigError`` whose ``str()`` names the file that
  has the bad value (a drop-in's own path for a drop-in), the line (where it can be
  found) and the dotted key path, e.g.
  ``/etc/qwenbox/qwenbox.toml:14: engine.max_num_seqs: expected an integer or "auto", got 'many'``.
  Every file is checked on its own (unknown keys, types, ranges), so a bad value is an
  error even where a later file overrides it; rules across keys are checked on the merge
  and name the file that set the key they report.
- Unknown keys, wrong types, out-of-range values and a missing local model path are errors;
  nothing is silently ignored or coerced (an int is accepted where a float is expected).
- Sizing keys (``engine.max_num_seqs``, ``engine.max_num_batched_tokens``,
  ``admission.max_in_flight``, ``admission.max_queued``, ``admission.max_queued_prompt_tokens``)
  take an integer or the string ``"auto"`` (``AUTO``): ``qwenbox.sizing`` chooses those
  for the card (engine keys before the engine is built, admission keys from what the
  built engine reports) and ``sizing.apply`` puts the numbers in; explicit values win.
  Code that needs a number from one of them reads it from an applied config.
- ``load(..., need_model=True)`` (serve, check-config, compile-cache) also requires that a
  Hugging Face id in ``model.path``/``model.tokenizer`` has been pulled into
  ``model.models_dir`` (``qwenbox pull``; ``models.py``): nothing downloads at start.
  ``ModelConfig.local_dir``/``local_tokenizer_dir`` are what the engine loads.
- Every key and its default is documented once, in the shipped ``etc/qwenbox/qwenbox.toml``;
  a test checks that file and these dataclasses agree.
- ``reloaded(old, new)`` is what a SIGHUP may change on a running daemon: the sections and
  keys in ``RELOADABLE``; other changed keys are reported as needing a restart.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import shlex
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, get_origin, get_type_hints

from . import models
from .generation import RULES, Rule

DEFAULT_CONFIG_PATH = "/etc/qwenbox/qwenbox.toml"
# Drop-ins: DROPIN_DIR beside the main file, every *.toml in it, in name order.
DROPIN_DIR = "conf.d"

# A sizing key's value "auto": qwenbox.sizing chooses it for the card (see that module).
AUTO: Literal["auto"] = "auto"
Auto = Literal["auto"]

# vLLM's quantization methods (vllm/model_executor/layers/quantization/__init__.py,
# QUANTIZATION_METHODS of vLLM 0.26.0, the GPU build); "" = none. A pre-quantized checkpoint
# (e.g. an FP8 one) needs none of them: vLLM reads its method from the model's config.json.
QUANTIZATION_METHODS = (
    "awq", "auto_awq", "fp8", "fbgemm_fp8", "fp_quant", "modelopt", "modelopt_fp4", "modelopt_mxfp8",
    "modelopt_mixed", "auto_gptq", "gptq", "gptq_marlin", "awq_marlin", "humming", "compressed-tensors",
    "bitsandbytes", "experts_int8", "quark", "moe_wna16", "torchao", "inc", "mxfp4", "gpt_oss_mxfp4",
    "deepseek_v4_fp8", "online", "fp8_per_tensor", "fp8_per_block", "fp8_per_channel",
    "int8_per_channel_weight_only", "nvfp4_per_token", "mxfp8")


class ConfigError(Exception):
    """A config problem a human can act on: file, line, key path, message."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None):
        self.message, self.file, self.line, self.key = message, file, line, key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line:
            where += f":{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


@dataclass(frozen=True)
class _Bounds:
    """What a key's value is checked against (``_opt``'s keywords); a field without ``_opt``
    has the defaults: no bounds."""
    min: float | None = None
    max: float | None = None
    choices: tuple[str | int, ...] | None = None
    min_exclusive: bool = False
    list_of: str | int | None = None
    auto: bool = False


_T = TypeVar("_T")


def _opt(default: _T, *, min: float | None = None, max: float | None = None,
         choices: tuple[str | int, ...] | None = None, min_exclusive: bool = False,
         list_of: str | int | None = None, auto: bool = False) -> _T:
    """A dataclass field with its validation bounds kept next to its default (``list_of``:
    an example item, for a list whose default is empty; ``auto``: an integer key that also
    takes ``"auto"``)."""
    bounds = _Bounds(min, max, choices, min_exclusive,
                     default[0] if isinstance(default, list) and default else list_of, auto)
    meta = {"bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    path: str = "Qwen/Qwen3-4B-Instruct-2507"
    served_name: str = ""
    dtype: str = _opt("auto", choices=("auto", "bfloat16", "float16", "float32"))
    max_model_len: int = _opt(8192, min=16)
    trust_remote_code: bool = False
    tokenizer: str = ""
    models_dir: str = models.DEFAULT_MODELS_DIR
    # vLLM's parser of the model's tool-call format ("hermes": Qwen3's); "" = tool calls refused
    tool_parser: str = "hermes"

    @property
    def name(self) -> str:
        """The model id clients send; defaults to the path as given."""
        return self.served_name or self.path

    @property
    def local_dir(self) -> str:
        """The directory the engine loads: ``path`` itself, or a hub id's pulled copy."""
        return models.local_dir(self.path, self.models_dir)

    @property
    def local_tokenizer_dir(self) -> str | None:
        """Likewise for ``tokenizer``; None = the model's own."""
        return models.local_dir(self.tokenizer, self.models_dir) if self.tokenizer else None


@dataclass(frozen=True)
class EngineConfig:
    gpu_memory_utilization: float = _opt(0.7, min=0.0, max=1.0, min_exclusive=True)
    max_num_seqs: int | Auto = _opt(AUTO, min=1, max=4096, auto=True)
    max_num_batched_tokens: int | Auto = _opt(AUTO, min=16, auto=True)
    block_size: int = _opt(16, choices=(8, 16, 32, 64, 128))
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    kv_cache_dtype: str = _opt("auto", choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16"))
    kv_offload_gib: float = _opt(0.0, min=0.0)
    cpu_offload_gib: float = _opt(0.0, min=0.0)
    enable_sleep_mode: bool = False
    seed: int = _opt(0, min=0)
    cache_dir: str = ""
    kv_cache_memory_gib: float = _opt(0.0, min=0.0)
    scheduling_policy: str = _opt("priority", choices=("priority", "fcfs"))
    quantization: str = _opt("", choices=("", *QUANTIZATION_METHODS))
    performance_mode: str = _opt("balanced", choices=("balanced", "interactivity", "throughput"))
    max_cudagraph_capture_size: int | Auto = _opt(AUTO, min=1, max=8192, auto=True)


@dataclass(frozen=True)
class ServerConfig:
    socket: str = "/run/qwenbox/qwenbox.sock"
    socket_mode: str = "0660"
    tcp: str = ""
    max_body_bytes: int = _opt(4 * 1024 * 1024, min=1024)
    retry_after_s: int = _opt(5, min=1)
    drain_timeout_s: float = _opt(30.0, min=0.0)
    start_step_timeout_s: float = _opt(300.0, min=1.0)
    access_log: bool = True
    queue_while_loading_s: float = _opt(60.0, min=0.0)
    idle_timeout_s: float = _opt(30.0, min=1.0)
    body_timeout_s: float = _opt(15.0, min=1.0)
    max_connections: int = _opt(4096, min=1)


@dataclass(frozen=True)
class LimitsConfig:
    max_tokens_cap: int = _opt(4096, min=1)
    max_n: int = _opt(4, min=1, max=128)
    max_stop_sequences: int = _opt(8, min=0, max=64)
    max_prompts: int = _opt(32, min=1, max=1024)
    max_prompt_logprobs_tokens: int = _opt(4096, min=0)


@dataclass(frozen=True)
class WarmupConfig:
    enabled: bool = True
    prompt_buckets: list[int] = _opt([16, 512, 2048])
    decode_steps: int = _opt(8, min=1, max=1024)
    concurrency: int = _opt(4, min=1, max=1024)
    system_prompt: str = "You are a helpful assistant."


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _opt("info", choices=("debug", "info", "warning", "error"))
    format: str = _opt("logfmt", choices=("logfmt", "json"))
    file: str = ""


@dataclass(frozen=True)
class WatchdogConfig:
    stall_timeout_s: float = _opt(60.0, min=1.0)
    exit_after_s: float = _opt(120.0, min=0.0)


@dataclass(frozen=True)
class RecoveryConfig:
    max_restarts: int = _opt(3, min=0)
    window_s: float = _opt(600.0, min=1.0)
    hold_requests_s: float = _opt(30.0, min=0.0)
    timeout_s: float = _opt(300.0, min=1.0)


@dataclass(frozen=True)
class AdmissionConfig:
    max_in_flight: int | Auto = _opt(AUTO, min=1, auto=True)
    max_queued: int | Auto = _opt(AUTO, min=0, auto=True)
    max_queued_prompt_tokens: int | Auto = _opt(AUTO, min=0, auto=True)
    queue_timeout_s: float = _opt(30.0, min=0.0, min_exclusive=True)


@dataclass(frozen=True)
class SessionsConfig:
    keepalive_s: float = _opt(120.0, min=0.0)
    reserved_share: float = _opt(0.25, min=0.0, max=0.9)
    max_tracked: int = _opt(10000, min=1)


@dataclass(frozen=True)
class SizingConfig:
    """What ``qwenbox.sizing`` sizes the "auto" keys for: a first-token latency target for
    a request that had to wait, and the request it thinks of as typical."""
    target_ttft_p95_s: float = _opt(2.0, min=0.0, min_exclusive=True)
    typical_prompt_tokens: int = _opt(512, min=1)
    typical_output_tokens: int = _opt(128, min=1)


@dataclass(frozen=True)
class ShapingConfig:
    long_prompt_chars: int = _opt(500, min=0)
    max_tokens_long_prompt: int = _opt(1024, min=1)
    max_tokens_short_prompt: int = _opt(2048, min=1)
    temperature: float = _opt(0.7, **RULES["temperature"].as_config_bounds())
    temperature_summarize: float = _opt(0.3, **RULES["temperature"].as_config_bounds())
    summarize_keywords: list[str] = _opt(["summarize", "summarise", "summary", "tl;dr", "tldr",
                                          "总结", "概括", "摘要"])
    top_p: float = _opt(0.95, **RULES["top_p"].as_config_bounds())
    presence_penalty: float = _opt(0.1, **RULES["presence_penalty"].as_config_bounds())
    on_overlong: str = _opt("reject", choices=("reject", "truncate"))
    pad_prompt_to: int = _opt(0, min=0)


@dataclass(frozen=True)
class StandbyConfig:
    idle_sleep_after_s: float = _opt(0.0, min=0.0)
    sleep_level: int = _opt(1, choices=(1,))


@dataclass(frozen=True)
class UiConfig:
    """`qwenbox ui` (qwenbox/ui/): the chat page, a client of the API on server.socket."""
    listen: str = "127.0.0.1:8300"
    python: str = "/usr/lib/qwenbox-ui/bin/python"
    state_dir: str = "/var/lib/qwenbox-ui"
    stream_below_chars: int = _opt(200, min=0)
    flush_interval_ms: int = _opt(40, min=0, max=1000)
    max_message_chars: int = _opt(16000, min=1, max=200_000)   # socket.io's 1 MB message limit
    start_wait_s: float = _opt(300.0, min=0.0)
    allow_origins: list[str] = _opt([], list_of="")
    title: str = "qwenbox"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    sizing: SizingConfig = field(default_factory=SizingConfig)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    standby: StandbyConfig = field(default_factory=StandbyConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    ui: UiConfig = field(default_factory=UiConfig)
    source: str = field(default="<defaults>", compare=False)
    # The command-line overrides ``load`` applied, as (dotted key, value) pairs: a reload
    # of ``source`` applies them again.
    overrides: tuple[tuple[str, object], ...] = field(default=(), compare=False)
    # The files ``load`` read, in the order they were merged: ``source``, then its drop-ins.
    files: tuple[str, ...] = field(default=(), compare=False)
    # Dotted keys that read "auto" in the files and got their number from
    # ``sizing.apply``: ``reloaded`` keeps that number while the files still say "auto".
    sized: tuple[str, ...] = field(default=(), compare=False)

    @property
    def socket_mode_int(self) -> int:
        return int(self.server.socket_mode, 8)

    @property
    def warmup_buckets(self) -> list[int]:
        """Prompt lengths for warm-up, capped so prompt + decode fits max_model_len."""
        cap = self.model.max_model_len - self.warmup.decode_steps
        return sorted({min(int(b), cap) for b in self.warmup.prompt_buckets if b > 0})


_NOT_SECTIONS = ("source", "overrides", "files", "sized")
SECTIONS = {k: v for k, v in get_type_hints(Config).items() if k not in _NOT_SECTIONS}


# ---------------------------------------------------------------- locating keys in the text
_TABLE_RE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_\-\"']+)\s*=")


def _line_of(text: str, keypath: str) -> int | None:
    """Best-effort line number of ``section.key`` (or ``section``) in TOML text."""
    want = keypath.split(".")
    table: list[str] = []
    for no, line in enumerate(text.splitlines(), 1):
        m = _TABLE_RE.match(line)
        if m:
            table = [p.strip().strip("\"'") for p in m.group(1).split(".")]
            if table == want:
                return no
            continue
        m = _KEY_RE.match(line)
        if m and [*table, m.group(1).strip("\"'")] == want:
            return no
    return None


# ---------------------------------------------------------------- validation
def _type_name(tp: type) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list"}.get(tp, str(tp))


def _check_value(tp: object, value: object, meta: _Bounds, err: Callable[[str], NoReturn]) -> object:
    if meta.auto:
        if value == AUTO:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            err(f'expected an integer or "{AUTO}", got {value!r}')
        tp = int
    if tp is bool:
        if not isinstance(value, bool):
            err(f"expected {_type_name(bool)} (true/false), got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            err(f"expected {_type_name(int)}, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            err(f"expected {_type_name(float)}, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            err(f"expected {_type_name(str)}, got {value!r}")
    elif tp is list or get_origin(tp) is list:
        item = type(meta.list_of) if meta.list_of is not None else int
        if not isinstance(value, list) or not all(
                isinstance(v, item) and not isinstance(v, bool) for v in value):
            err(f"expected a list of {'strings' if item is str else 'integers'}, got {value!r}")
    if meta.choices is not None and value not in meta.choices:
        err(f"must be one of {', '.join(map(repr, meta.choices))}, got {value!r}")
    rule = Rule(meta.min, meta.max, meta.min_exclusive)
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            problem = rule.check(v)
            if problem:
                err(problem)
    return value


def _build_section(cls: type, raw: object, section: str, err_at: Callable[[str, str], NoReturn]) -> Any:
    if not isinstance(raw, dict):
        err_at(section, f"expected a table [{section}], got {raw!r}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, object] = {}
    for key, value in raw.items():
        path = f"{section}.{key}"
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            err_at(path, "unknown key" + (f" (did you mean '{close[0]}'?)" if close else
                                          f"; known keys: {', '.join(sorted(known))}"))
        values[key] = _check_value(hints[key], value, known[key].metadata.get("bounds", _Bounds()),
                                   functools.partial(err_at, path))
    return cls(**values)


def _semantic_checks(cfg: Config, err_at: Callable[[str, str], NoReturn]) -> None:
    """Rules that span keys or touch the file system."""
    try:
        int(cfg.server.socket_mode, 8)
    except ValueError:
        err_at("server.socket_mode", f"expected an octal mode like \"0660\", got {cfg.server.socket_mode!r}")
    if cfg.server.tcp:
        host, _, port = cfg.server.tcp.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            err_at("server.tcp", f"expected \"HOST:PORT\" (e.g. \"127.0.0.1:8000\") or \"\", got {cfg.server.tcp!r}")
    _check_ui(cfg.ui, err_at)
    if not cfg.server.socket and not cfg.server.tcp:
        err_at("server.socket", "no listener: set server.socket or server.tcp")
    if cfg.limits.max_tokens_cap >= cfg.model.max_model_len:
        err_at("limits.max_tokens_cap",
               f"must be below model.max_model_len ({cfg.model.max_model_len}), got {cfg.limits.max_tokens_cap}")
    seqs, batched = cfg.engine.max_num_seqs, cfg.engine.max_num_batched_tokens
    if isinstance(seqs, int) and isinstance(batched, int) and batched < seqs:   # "auto" keeps them apart itself
        err_at("engine.max_num_batched_tokens", f"must be >= engine.max_num_seqs ({seqs}), got {batched}")
    typical = cfg.sizing.typical_prompt_tokens + cfg.sizing.typical_output_tokens
    if typical > cfg.model.max_model_len:
        err_at("sizing.typical_prompt_tokens",
               f"typical_prompt_tokens + typical_output_tokens ({typical}) must be <= model.max_model_len "
               f"({cfg.model.max_model_len})")
    if not cfg.warmup.prompt_buckets and cfg.warmup.enabled:
        err_at("warmup.prompt_buckets", "must list at least one prompt length when warm-up is enabled")
    if cfg.warmup.decode_steps >= cfg.model.max_model_len:
        err_at("warmup.decode_steps", f"must be below model.max_model_len ({cfg.model.max_model_len})")
    if cfg.shaping.pad_prompt_to >= cfg.model.max_model_len:
        err_at("shaping.pad_prompt_to", f"must be below model.max_model_len ({cfg.model.max_model_len})")
    if cfg.standby.idle_sleep_after_s and not cfg.engine.enable_sleep_mode:
        err_at("standby.idle_sleep_after_s", "idle sleep needs engine.enable_sleep_mode = true")
    path = cfg.model.path
    if not path:
        err_at("model.path", "must name a model directory or a Hugging Face model id")
    if models.looks_local(path):
        p = Path(os.path.expanduser(path))
        if not p.is_dir():
            err_at("model.path", f"model directory {str(p)!r} does not exist")
        if not (p / "config.json").is_file():
            err_at("model.path", f"{str(p)!r} is not a model directory (no config.json in it)")
    elif not models.is_hub_id(path):
        err_at("model.path", f"expected a model directory or a Hugging Face id like \"org/name\", got {path!r}")
    tok = cfg.model.tokenizer
    if tok and models.looks_local(tok) and not Path(os.path.expanduser(tok)).is_dir():
        err_at("model.tokenizer", f"tokenizer directory {tok!r} does not exist")
    elif tok and not models.looks_local(tok) and not models.is_hub_id(tok):
        err_at("model.tokenizer", f"expected a directory or a Hugging Face id like \"org/name\", got {tok!r}")
    if not os.path.isabs(cfg.model.models_dir):
        err_at("model.models_dir",
               f"expected an absolute path or one starting with \"./\", got {cfg.model.models_dir!r}")


def _check_pulled(cfg: Config, err_at: Callable[[str, str], NoReturn]) -> None:
    """A hub id is served only from a finished ``qwenbox pull``; the hint names the command."""
    for key, name in (("model.path", cfg.model.path), ("model.tokenizer", cfg.model.tokenizer)):
        if not models.is_hub_id(name) or models.is_pulled(name, cfg.model.models_dir):
            continue
        where = models.pulled_dir(cfg.model.models_dir, name)
        state = "is not completely downloaded to" if where.exists() else "is not downloaded to"
        cmd = f"qwenbox pull {name}"      # the id: it may be the tokenizer's, or from --model
        if cfg.source != DEFAULT_CONFIG_PATH:
            cmd += f" -c {shlex.quote(cfg.source)}"
        if cfg.model.models_dir == models.DEFAULT_MODELS_DIR:   # root's (the package's qwenbox user's)
            cmd = "sudo " + cmd
        err_at(key, f"model {name!r} {state} {cfg.model.models_dir}: run '{cmd}'")


def _check_ui(ui: UiConfig, err_at: Callable[[str, str], NoReturn]) -> None:
    host, _, port = ui.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        err_at("ui.listen", f"expected \"HOST:PORT\" (e.g. \"127.0.0.1:8300\"), got {ui.listen!r}")
    for o in ui.allow_origins:
        if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", o):
            err_at("ui.allow_origins", f"expected origins like \"https://chat.example.org\" "
                                       f"(scheme://host[:port], no path), got {o!r}")


# Keys that hold file paths, and whether a relative one may follow symlinks: a venv's
# bin/python is a link to the base interpreter, and following it would leave the venv.
_PATH_KEYS: dict[str, bool] = {
    "model.path": True, "model.tokenizer": True, "model.models_dir": True, "server.socket": True,
    "engine.cache_dir": True, "logging.file": True, "ui.python": False, "ui.state_dir": True,
}


def _fix_path(p: str, base: Path, follow_links: bool = True) -> str:
    """``p`` with "~" expanded, and made absolute against ``base`` when it starts with "."."""
    if p and not os.path.isabs(os.path.expanduser(p)) and p.startswith("."):
        return str((base / p).resolve()) if follow_links else os.path.normpath(base / p)
    return os.path.expanduser(p) if p else p


def _resolve_relative(cfg: Config, base: Path) -> Config:
    """Relative file paths in the config are relative to the config file's directory."""
    fixed: dict[str, dict[str, str]] = {}
    for dotted, follow in _PATH_KEYS.items():
        section, key = dotted.split(".")
        fixed.setdefault(section, {})[key] = _fix_path(getattr(getattr(cfg, section), key), base, follow)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **keys)
                                       for section, keys in fixed.items()})


def _build_sections(raw: dict[str, Any], err_at: Callable[[str, str], NoReturn]) -> dict[str, Any]:
    """Each table of a parsed document, checked key by key, as its section's dataclass."""
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(name, SECTIONS, n=1)
            err_at(name, "unknown section" + (f" (did you mean '{close[0]}'?)" if close else
                                              f"; known sections: {', '.join(SECTIONS)}"))
        sections[name] = _build_section(SECTIONS[name], value, name, err_at)
    return sections


def from_dict(raw: dict[str, Any], *, source: str = "<dict>", text: str = "",
              base: Path | None = None, need_model: bool = False,
              origins: dict[str, tuple[str, str]] | None = None) -> Config:
    """Validate a parsed TOML document. ``text`` (the file body) lets errors carry lines;
    ``need_model``: see ``load``. ``origins`` (``load``'s merge of several files): the
    (file, text) that set each dotted key, so that an error names that file; keys not in
    it are blamed on ``source``."""
    def err_at(keypath: str, message: str) -> NoReturn:
        file, body = (origins or {}).get(keypath, (source, text))
        raise ConfigError(message, file=file, line=_line_of(body, keypath) if body else None, key=keypath)

    cfg = Config(**_build_sections(raw, err_at), source=source)
    if base is not None:
        cfg = _resolve_relative(cfg, base)
    _semantic_checks(cfg, err_at)
    if need_model:
        _check_pulled(cfg, err_at)
    return cfg


# ---------------------------------------------------------------- reading files
@dataclass(frozen=True)
class _Layer:
    """One file read: its path, its text (for line numbers) and its parsed tables."""
    path: str
    text: str
    raw: dict[str, Any]


def dropin_dir(path: str | os.PathLike[str]) -> Path:
    """Where the drop-ins of the main file ``path`` live: ``conf.d/`` beside it."""
    return Path(os.path.abspath(path)).parent / DROPIN_DIR


def dropin_files(path: str | os.PathLike[str]) -> list[Path]:
    """The drop-ins of the main file ``path``, in the order they are merged (by name).
    Hidden names (editors' lock and swap files) and names not ending in ``.toml`` are
    skipped; a missing ``conf.d/`` means none."""
    d = dropin_dir(path)
    try:
        entries = list(d.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise ConfigError(f"cannot read the drop-in directory: {e.strerror}", file=str(d)) from None
    return sorted((p for p in entries if p.name.endswith(".toml") and not p.name.startswith(".") and p.is_file()),
                  key=lambda p: p.name)


def _read_layer(path: str | os.PathLike[str]) -> _Layer:
    """Read and parse one TOML file; a missing, unreadable or malformed file is a ConfigError naming it."""
    source = str(path)
    try:
        raw_bytes = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError("config file not found", file=source) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror}", file=source) from None
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw_bytes[:e.start].count(b"\n") + 1
        raise ConfigError("file is not valid UTF-8", file=source, line=line) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise ConfigError(f"TOML syntax error: {msg}" + (f" (column {m.group(2)})" if m else ""),
                          file=source, line=int(m.group(1)) if m else None) from None
    return _Layer(source, text, raw)


def _check_layer(layer: _Layer) -> None:
    """Every key of one file on its own (known, right type, in range): an error names this
    file, even where a later file sets the key again."""
    def err_at(keypath: str, message: str) -> NoReturn:
        raise ConfigError(message, file=layer.path, line=_line_of(layer.text, keypath), key=keypath)

    _build_sections(layer.raw, err_at)


def _resolve_layer_paths(layer: _Layer) -> _Layer:
    """A drop-in's relative paths, made absolute against the drop-in's own directory
    (the main file's are resolved against its directory later, with the defaults)."""
    base = Path(layer.path).resolve().parent
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in layer.raw.items()}
    for dotted, follow in _PATH_KEYS.items():
        section, key = dotted.split(".")
        value = raw.get(section, {}).get(key)
        if isinstance(value, str) and value.startswith("."):
            raw[section][key] = _fix_path(value, base, follow)
    return _Layer(layer.path, layer.text, raw)


def _merge(layers: list[_Layer]) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """The layers merged in order (tables key by key, later files win), and for every
    section and dotted key the (file, text) of the layer that set it last."""
    merged: dict[str, Any] = {}
    origins: dict[str, tuple[str, str]] = {}
    for layer in layers:
        for section, table in layer.raw.items():
            merged.setdefault(section, {}).update(table)
            origins[section] = (layer.path, layer.text)
            for key in table:
                origins[f"{section}.{key}"] = (layer.path, layer.text)
    return merged, origins


def load(path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH, overrides: dict[str, Any] | None = None,
         *, need_model: bool = False) -> Config:
    """Read the main file and its drop-ins (``dropin_files``), merge them in order, merge
    ``overrides`` ({"server.socket": ..., "model.path": ...}) over them and validate.
    ``need_model``: also require a hub id's model (and tokenizer) to be pulled into
    ``model.models_dir`` - what starting the engine needs; ``qwenbox pull`` and the UI load
    without it."""
    main = _read_layer(path)
    layers = [main] + [_read_layer(p) for p in dropin_files(path)]
    for layer in layers:
        _check_layer(layer)
    merged, origins = _merge([main] + [_resolve_layer_paths(layer) for layer in layers[1:]])
    applied = tuple((k, v) for k, v in (overrides or {}).items() if v is not None)
    for dotted, value in applied:
        section, key = dotted.split(".", 1)
        merged.setdefault(section, {})[key] = value
        origins.pop(dotted, None)       # blamed on the main file, as before drop-ins existed
    cfg = from_dict(merged, source=str(path), text=main.text, base=Path(path).resolve().parent,
                    need_model=need_model, origins=origins)
    return dataclasses.replace(cfg, overrides=applied, files=tuple(layer.path for layer in layers))


# ---------------------------------------------------------------- SIGHUP reload
# What a running daemon may take from a re-read file without restarting the engine:
# whole sections, or named keys of a section. Everything else needs a restart.
# [sizing] only feeds the admission limits (qwenbox.sizing, after the engine is built).
RELOADABLE: dict[str, tuple[str, ...] | None] = {
    "limits": None, "logging": None, "admission": None, "sessions": None, "shaping": None,
    "watchdog": None, "recovery": None, "sizing": None,
    "server": ("retry_after_s", "drain_timeout_s", "access_log"),
}


def reloaded(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """``old`` with the reloadable settings of ``new`` -> (config, applied keys, ignored keys).

    ``ignored`` lists the changed keys that need a restart (engine, model, listener, ...);
    they keep their running values. Cross-key rules are checked again on the result, so a
    reload can never produce a config that ``load`` would refuse (raises ``ConfigError``).

    A key that ``sizing.apply`` filled in (``old.sized``) and that still reads "auto" is
    unchanged: it keeps its number. A sizing key may come out "auto" (the file changed it
    to "auto"), and ``[sizing]`` may have changed: the caller runs sizing's second step
    again on the result and applies it before handing the limits to admission.
    """
    applied: list[str] = []
    ignored: list[str] = []
    merged: dict[str, Any] = {}
    for section in SECTIONS:
        o, n = getattr(old, section), getattr(new, section)
        if section == "ui":      # read by `qwenbox ui` only; the daemon keeps the file's value
            merged[section] = n
            continue
        keys = RELOADABLE.get(section, ())
        take = {}
        for f in dataclasses.fields(o):
            path = f"{section}.{f.name}"
            if getattr(o, f.name) == getattr(n, f.name) or (path in old.sized and getattr(n, f.name) == AUTO):
                continue
            if keys is None or f.name in keys:
                take[f.name] = getattr(n, f.name)
                applied.append(path)
            else:
                ignored.append(path)
        merged[section] = dataclasses.replace(o, **take) if take else o
    still_sized = tuple(k for k in old.sized if k not in applied)     # an ignored one keeps its number
    cfg = Config(**merged, source=new.source, overrides=new.overrides, files=new.files, sized=still_sized)

    def err_at(keypath: str, message: str) -> NoReturn:
        raise ConfigError(message, file=new.source, key=keypath)

    _semantic_checks(cfg, err_at)
    return cfg, applied, ignored
