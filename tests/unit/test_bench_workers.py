"""The 1-vs-2-workers table of `python -m benchmarks.workers` (benchmarks/workers.py)."""

from __future__ import annotations

from benchmarks.workers import table


def test_the_table_shows_medians_spread_and_the_ratio_of_two_workers_to_one():
    samples = {
        "1": {
            "tcp_1_gbps": {"mesh-cross-node": [1.0, 1.2, 1.1], "mesh-same-node": [8.0]},
            "http_c16_rps": {"mesh-cross-node": [1000.0, 1100.0, 900.0]},
        },
        "2": {
            "tcp_1_gbps": {"mesh-cross-node": [1.5, 1.6, 1.7], "mesh-same-node": [None]},
            "http_c16_rps": {"mesh-cross-node": [1500.0, 1500.0, 1500.0]},
        },
    }
    rows = table(samples).splitlines()
    assert rows[0] == "| figure | path | 1 worker | 2 workers | 2 / 1 |"
    assert "| bulk TCP, 1 stream (Gbit/s) | mesh-cross-node | 1.1 ±9% | 1.6 ±6% | 1.45x |" in rows
    # a path with no figure for one count shows a dash, not a made-up ratio
    assert "| bulk TCP, 1 stream (Gbit/s) | mesh-same-node | 8 ±0% | — | — |" in rows
    assert (
        "| HTTP keep-alive, 16 connections (req/s) | mesh-cross-node | 1,000 ±10% | 1,500 ±0% "
        "| 1.50x |" in rows
    )
    assert "| HTTP keep-alive, 16 connections (req/s) | mesh-same-node | — | — | — |" in rows
