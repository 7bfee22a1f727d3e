"""The name for a JSON value whose shape qwenbox does not fix.

A document read from outside (a server's /health answer, a report file read back) or a
report being built up before it is written has no one shape to check: ``Json`` says "a
JSON value" where a bare ``Any`` says nothing, and a search finds every such place. A value
whose shape is fixed gets a TypedDict or a dataclass instead. The engine seam's modules
may not use it (no explicit Any there: pyproject.toml).
"""
from __future__ import annotations

from typing import Any, TypeAlias

Json: TypeAlias = Any
JsonObject: TypeAlias = dict[str, Json]
