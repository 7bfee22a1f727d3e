"""Where pulled models live, and how a model name becomes the directory the engine loads.

Contract:
- ``model.path`` (and ``model.tokenizer``) is either a local directory (a path: it starts
  with ``/``, ``.`` or ``~``, has more than one ``/``, or names an existing directory) or a
  Hugging Face id ``org/name`` (or ``name``).
- A hub id is served from ``<model.models_dir>/<org>/<name>``, and only once ``qwenbox pull``
  has finished there: it writes ``MARKER`` (repo, commit, files with sizes and hashes) last,
  atomically, after verifying every file. A directory without it is an unfinished pull.
- Nothing here touches the network or imports huggingface_hub: ``qwenbox serve`` uses it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

DEFAULT_MODELS_DIR = "/var/lib/qwenbox/models"
MARKER = ".qwenbox-pull.json"

# The hub's own rule for repo ids (huggingface_hub's validate_repo_id), without importing it:
# one or two names of letters, digits, "-", "_", "."; no "--" or ".." anywhere.
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.\-]{0,95}(/[\w.\-]{1,96})?")


def looks_local(name: str) -> bool:
    """A Hugging Face id is 'org/name'; anything path-like is treated as a local directory."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.path.isdir(name)


def is_hub_id(name: str) -> bool:
    """``name`` is a well-formed hub id (and not a local path)."""
    return (bool(name) and not looks_local(name) and _HUB_ID_RE.fullmatch(name) is not None
            and ".." not in name and "--" not in name and not name.endswith("."))


def pulled_dir(models_dir: str | os.PathLike[str], repo_id: str) -> Path:
    """Where ``qwenbox pull`` puts ``repo_id`` (complete or not)."""
    return Path(models_dir) / repo_id


def read_marker(model_dir: str | os.PathLike[str]) -> dict[str, object] | None:
    """The completed pull's record in ``model_dir``, or None (no pull finished there)."""
    try:
        with open(Path(model_dir) / MARKER, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def local_dir(name: str, models_dir: str) -> str:
    """The directory the engine loads for ``name``: a local path as given, a hub id's pulled
    directory (whether or not the pull is complete: ``missing`` says that)."""
    return str(pulled_dir(models_dir, name)) if is_hub_id(name) else name


def is_pulled(name: str, models_dir: str) -> bool:
    """A hub id whose pull into ``models_dir`` has finished (its ``MARKER`` is there)."""
    return read_marker(pulled_dir(models_dir, name)) is not None
