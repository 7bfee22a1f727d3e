"""Text tables and JSON files for what ``qwenbox bench`` and ``qwenbox logs`` print and write.

Contract: ``fmt`` turns one value into a short human string ("-" for None); ``table``
lays rows out in aligned columns under a header; ``write_json`` writes a report
(dataclasses and paths included) creating parent directories; ``dig`` reads a value
from nested report dicts without tripping over a missing level.
"""
from __future__ import annotations

import json
import os
from collections.abc import Container, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path

from ..jsontypes import Json


def fmt(v: object, unit: str = "") -> str:
    """``unit`` picks the form: "s" seconds (ms below one), "x" ratio, "%" fraction, "$" price."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if unit == "s" and isinstance(v, (int, float)):
        return f"{v * 1000:.1f} ms" if abs(v) < 1 else f"{v:.2f} s"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    if isinstance(v, float):
        if unit == "x":
            return f"{v:.2f}x"
        if unit == "%":
            return f"{v * 100:.1f}%"
        if unit == "$":
            return f"${v:.4g}"
        if abs(v) >= 1000:
            return f"{v:,.0f}{unit}"
        return f"{v:.3g}{unit}"
    return f"{v}{unit}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "", *,
          left: Container[int] = (0,), indent: str = "") -> str:
    """Columns in ``left`` are left-aligned (labels, text), the others right-aligned (figures)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = [title] if title else []
    for n, r in enumerate(cells):
        line = "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=False)))
        out.append(indent + line.rstrip())
        if n == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: str | os.PathLike[str], obj: object) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return p


def _json_default(o: object) -> object:
    if is_dataclass(o) and not isinstance(o, type):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def dig(d: Json, *path: str) -> Json:
    """``d[path[0]][path[1]]...``, or None where a level is missing or not a dict."""
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d
