"""`qwenbox compile-cache`: fill vLLM's compile caches before the first real start.

On a GPU a first boot spends most of its time in torch.compile and kernel JIT (measured
34.5 s of 104 s on an H200); the results are cached under the engine's cache directory and
reused by every later start. They depend on the model's architecture and the engine
settings (max_model_len, sleep mode, scheduler limits, ...), not on the weights, so this
command builds the engine from the model's config with random weights (vLLM's "dummy"
load format: the weight files are not read), runs the same warm-up as ``serve``, and exits.

Contract: ``await fill(cfg)`` -> the figures of that build (``import_s``, ``engine_s``,
``compile_s``, ``warmup_s``...). Run it with the same config, user and environment as the
service, so that it fills the caches the service reads.
"""
from __future__ import annotations

import time

from . import warmup
from .config import Config
from .engine_protocol import FigureValue


async def fill(cfg: Config) -> dict[str, FigureValue]:
    from .engine import Engine

    t0 = time.monotonic()
    engine = await Engine.open(cfg, load_format="dummy")
    try:
        report = await warmup.run(engine, cfg)
    finally:
        await engine.close()
    figures = engine.cold_start.as_dict()
    figures.update(warmup_s=round(report.total_s, 3), total_s=round(time.monotonic() - t0, 3))
    return figures
