"""qwenbox.tools: the statistics and tables the benchmarks and the log analyzer share."""
import pytest

from qwenbox.tools import report, stats


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
