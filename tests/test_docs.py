"""What the docs say the code does, checked against the code: every list of what a reload
applies (README.md, docs/systemd.md, the shipped qwenbox.toml) against
``config.RELOADABLE``, and README's exit-code table against ``ExitCode``."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from qwenbox.config import RELOADABLE
from qwenbox.exitcode import ExitCode

ROOT = Path(__file__).parent.parent


def _paragraph(path: Path, starts: str) -> str:
    """The lines of ``path`` from the first that contains ``starts`` to the next blank one
    (or, in a comment block, the next line that is not a non-empty comment)."""
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if starts in line)
    comment = lines[first].startswith("#")
    out = []
    for line in lines[first:]:
        if not line.strip() or (comment and (not line.startswith("#") or not line.strip("# "))):
            break
        out.append(line)
    return "\n".join(out)


def _named(text: str) -> tuple[set[str], set[str]]:
    """The whole sections (``[name]``) and the ``section.key`` names a text lists."""
    sections = set(re.findall(r"\[(\w+)\]", text))
    keys = {f"{s}.{k}" for s in RELOADABLE for k in re.findall(rf"\b{s}\.(\w+)", text)}
    return sections, keys


RELOAD_LISTS = [(ROOT / "README.md", "systemctl reload qwenbox"), (ROOT / "docs" / "systemd.md", "**Reload**"),
                (ROOT / "etc" / "qwenbox" / "qwenbox.toml", "SIGHUP")]


@pytest.mark.parametrize("path, starts", RELOAD_LISTS, ids=[str(p.relative_to(ROOT)) for p, _ in RELOAD_LISTS])
def test_every_reload_list_names_what_a_reload_applies(path: Path, starts: str) -> None:
    sections, keys = _named(_paragraph(path, starts))
    assert sections == {s for s, only in RELOADABLE.items() if only is None}
    assert keys == {f"{s}.{k}" for s, only in RELOADABLE.items() if only for k in only}


def test_readme_lists_every_exit_code() -> None:
    table = _paragraph(ROOT / "README.md", "| code | meaning |")
    listed = {int(c) for row in table.splitlines()[2:] for c in row.split("|")[1].split(",")}
    assert listed == {int(c) for c in ExitCode}
