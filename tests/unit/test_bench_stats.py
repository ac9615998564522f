"""benchmarks/stats.py: summaries, ratios and added latency as the report uses them."""

from __future__ import annotations

import pytest

from benchmarks.stats import added, ratio, summarize


def test_summary_median_and_spread():
    s = summarize([10.0, 12.0, 8.0])
    assert (s.median, s.low, s.high, s.n) == (10.0, 8.0, 12.0, 3)
    assert s.spread_pct == pytest.approx(40.0)
    assert s.as_dict()["spread_pct"] == 40.0
    assert summarize([0.0, 0.0]).spread_pct is None  # no share of zero


def test_ratio_is_none_without_a_denominator():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


def test_added_pairs_rounds():
    assert added([1.5, 2.0, 1.0], [1.0, 1.0, 1.25]) == [0.5, 1.0, -0.25]
    with pytest.raises(ValueError, match="baseline"):
        added([1.0], [1.0, 2.0])
