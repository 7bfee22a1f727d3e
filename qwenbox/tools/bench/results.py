"""Where a benchmark's results go, and the facts about the machine recorded with them.

Contract: ``out_path`` is ``--out`` or a time-stamped file under ``bench-results/``
(``bench all`` writes one file per mode); the logs of the servers a run starts go beside
it in ``log_dir_for(out)``. ``machine``/``finish`` record host, CPUs, memory and the load
average at start and end; ``busy_note`` says when other work will make the timings noisy.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any, TypedDict


class Gpu(TypedDict):
    """One GPU as ``gpu_memory`` lists it (``nvidia-smi``'s figures, MiB)."""
    index: int
    name: str
    used_mib: float
    total_mib: float


def default_out(kind: str) -> Path:
    return Path("bench-results") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def out_path(args: Any, kind: str) -> Path:
    """--out, or a time-stamped file under bench-results/; ``all`` writes one file per kind."""
    if not args.out:
        return default_out(kind)
    p = Path(args.out)
    if getattr(args, "mode", kind) == "all":
        p = p.with_name(f"{p.stem}-{kind}{p.suffix or '.json'}")
    return p


def log_dir_for(out: Path) -> Path:
    return out.with_name(out.stem + "-logs")


def machine() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                            "cpus": os.cpu_count(), "platform": platform.platform(),
                            "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1)}
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def busy_note() -> str | None:
    """Other work on the machine skews every timing here: say so when it is there."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return None
    cpus = os.cpu_count() or 1
    if load1 > 0.5 * cpus:
        return (f"note: load average {load1:.2f} on {cpus} CPUs before the run: other work is running, "
                f"timings will be noisy")
    return None


def finish(res: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]


def gpu_memory() -> dict[str, Any]:
    """GPU memory in use now, per GPU, from ``nvidia-smi``; ``available`` False (and why)
    where there is none - the figure is then n/a, never 0."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return {"available": False, "why": "no nvidia-smi on this machine"}
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.used,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"available": False, "why": f"nvidia-smi failed: {e}"}
    if out.returncode != 0:
        return {"available": False, "why": f"nvidia-smi exited {out.returncode}: {out.stderr.strip()[:200]}"}
    gpus: list[Gpu] = []
    for line in out.stdout.strip().splitlines():
        bits = [b.strip() for b in line.split(",")]
        if len(bits) == 4:
            try:
                gpus.append({"index": int(bits[0]), "name": bits[1], "used_mib": float(bits[2]),
                             "total_mib": float(bits[3])})
            except ValueError:
                continue
    if not gpus:
        return {"available": False, "why": "nvidia-smi listed no GPU"}
    return {"available": True, "gpus": gpus, "used_mib": sum(g["used_mib"] for g in gpus),
            "name": ", ".join(sorted({g["name"] for g in gpus}))}
