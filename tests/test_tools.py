"""qwenbox.tools: `qwenbox serve` imports none of it; the statistics and tables the
benchmarks and the log analyzer share."""
import json
import subprocess
import sys

import pytest

from helpers import ROOT
from qwenbox.tools import report, stats


def test_serve_imports_nothing_from_tools(tmp_path):
    # A fresh interpreter: the command line parsed and `serve` run up to its config error
    # (a missing file), then everything the daemon itself imports.
    code = f"""
import json, sys
from qwenbox import cli
cli.main(["serve", "--config", {str(tmp_path / "missing.toml")!r}])
import qwenbox.daemon
print(json.dumps(sorted(m for m in sys.modules if m.startswith("qwenbox"))))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.splitlines()[-1])
    assert "qwenbox.cli" in loaded and "qwenbox.daemon" in loaded
    assert [m for m in loaded if m == "qwenbox.tools" or m.startswith("qwenbox.tools.")] == []


def test_bench_and_logs_options_are_there_when_asked_for():
    from qwenbox import cli
    args = cli.build_parser().parse_args(["bench", "load", "--levels", "1,2", "--burst", "0"])
    assert (args.mode, args.levels, args.burst, args.max_tokens) == ("load", "1,2", 0, 32)
    args = cli.build_parser().parse_args(["logs", "--journal", "-u", "other"])
    assert args.journal and args.unit == "other" and args.files == []


def test_percentiles_interpolate_between_order_statistics():
    assert stats.percentiles([3, 1, 2], (50,)) == {50: 2}
    assert stats.percentiles([1, 2, 3, 4], (50, 95)) == {50: 2.5, 95: pytest.approx(3.85)}
    assert stats.percentiles([0.01 * (i + 1) for i in range(100)], (50,))[50] == pytest.approx(0.505)
    assert stats.percentiles([5], (50, 95)) == {50: 5, 95: 5}
    assert stats.percentiles([None, float("nan")], (50,)) == {50: None}


def test_summary_median_ratio():
    s = stats.summary([0.1, 0.2, None, 0.4])
    assert s["n"] == 3 and s["min"] == 0.1 and s["max"] == 0.4 and s["p50"] == 0.2
    assert s["mean"] == pytest.approx(0.7 / 3)
    assert s["min"] <= s["p50"] <= s["p95"] <= s["p99"] <= s["max"]
    assert stats.summary([]) == {"n": 0, "p50": None, "p95": None, "p99": None, "mean": None, "min": None,
                                 "max": None}
    assert stats.median([0.5, None, 0.1, 0.2]) == 0.2 and stats.median([]) is None
    assert stats.ratio(1, 0) is None and stats.ratio(None, 2) is None and stats.ratio(3, 2) == 1.5


def test_fmt_and_table():
    assert [report.fmt(v, "s") for v in (None, 0.0123, 2, 2.5)] == ["-", "12.3 ms", "2.00 s", "2.50 s"]
    assert report.fmt(1.5, "x") == "1.50x" and report.fmt(0.25, "%") == "25.0%" and report.fmt(12345) == "12,345"
    text = report.table(["name", "n", "note"], [["a", 1, "x"], ["bb", 22, "yy"]], "T", left=(0, 2), indent="  ")
    assert text.splitlines() == ["T", "  name   n  note", "  ----  --  ----", "  a      1  x", "  bb    22  yy"]
    assert report.dig({"a": {"b": 1}}, "a", "b") == 1 and report.dig({"a": 1}, "a", "b") is None
