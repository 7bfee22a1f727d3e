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
from typing import Any


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
