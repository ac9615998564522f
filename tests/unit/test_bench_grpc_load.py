"""benchmarks/grpc_load.py's summary (the calls themselves need grpcio and a server: the
benchmark's smoke run)."""

from __future__ import annotations

from collections import Counter

from benchmarks.grpc_load import percentile, report


def test_nearest_rank_percentiles():
    ordered = [float(i) for i in range(1, 101)]
    assert percentile(ordered, 0.5) == 50 and percentile(ordered, 0.99) == 99
    assert percentile([7.0], 0.99) == 7 and percentile([], 0.5) == 0


def test_report_in_milliseconds_with_errors_by_code():
    out = report([0.002, 0.001, 0.003], Counter({"UNAVAILABLE": 1}), 1.5)
    assert out == {
        "calls": 3,
        "window_s": 1.5,
        "errors": {"UNAVAILABLE": 1},
        "p50_ms": 2.0,
        "p99_ms": 3.0,
    }
