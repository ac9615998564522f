"""benchmarks/report.py: from raw samples to the ratios, the targets' status and the Markdown
table, on made-up figures."""

from __future__ import annotations

import pytest

from benchmarks import report
from benchmarks.report import CROSS, DIRECT, SAME, SIDECAR


def _samples() -> report.Samples:
    return {
        "tcp_1_gbps": {
            DIRECT: [8.0, 9.0, 8.8],
            SAME: [7.5, 7.0, 7.9],
            CROSS: [4.4, 4.2, 4.0],
            SIDECAR: [4.1, 4.0, 3.9],
        },
        "http_c1_p50_ms": {
            DIRECT: [0.05, 0.06, 0.05],
            CROSS: [0.20, None, 0.25],  # round 2 failed on this path
            SIDECAR: [0.22, 0.21, 0.23],
        },
        "fixed_p90_ms": {DIRECT: [0.2, 0.2, 0.2], CROSS: [0.35, 0.5, 0.3]},
        "fixed_cpu_per_krps": {CROSS: [0.25, 0.3, 0.2], SIDECAR: [0.2, 0.2, 0.2]},
        "idle_kib_per_conn": {CROSS: [9.0, 9.5, 8.0]},
    }


def test_added_latency_pairs_each_round_with_direct_and_skips_failed_rounds():
    samples = _samples()
    report.derive_added(samples)
    added = samples["http_c1_added_p50_ms"]
    assert DIRECT not in added
    assert added[CROSS] == pytest.approx([0.15, 0.20])
    assert added[SIDECAR] == pytest.approx([0.17, 0.15, 0.18])
    assert samples["fixed_added_p90_ms"][CROSS] == pytest.approx([0.15, 0.3, 0.1])


def test_metric_table_has_medians_spreads_and_both_ratios():
    rows = {r["id"]: r for r in report.metric_table(report.summaries(_samples()))}
    cross = rows["tcp_1_gbps"]["paths"][CROSS]
    assert cross["median"] == 4.2
    assert (cross["min"], cross["max"], cross["n"]) == (4.0, 4.4, 3)
    assert cross["vs_direct"] == pytest.approx(4.2 / 8.8)
    assert cross["vs_sidecar_pair"] == pytest.approx(4.2 / 4.0)
    assert rows["tcp_1_gbps"]["better"] == "higher"
    assert rows["fixed_cpu_per_krps"]["paths"][CROSS]["vs_direct"] is None  # direct has none
    assert "tcp_4_gbps" not in rows  # not measured: no row


def test_targets_report_met_missed_and_not_measured():
    samples = _samples()
    report.derive_added(samples)
    targets = {
        (t["title"], t["target"]): t
        for t in report.evaluate_targets(report.summaries(samples), None)
    }
    bulk = targets[("mesh-cross-node bulk throughput (1 stream)", "≥ 1.0 x sidecar-pair")]
    assert bulk["met"] is True and "1.05 x" in bulk["measured"]
    half = targets[("mesh-cross-node bulk throughput (1 stream)", "≥ 0.5 x direct")]
    assert half["met"] is False
    same = targets[("mesh-same-node bulk throughput (1 stream)", "≥ 0.9 x direct")]
    assert same["met"] is False  # 7.5 / 8.8
    p90 = targets[("mesh-cross-node at 1,000 req/s: added p90", "≤ 0.2 ms")]
    assert p90["met"] is True and p90["measured"] == "0.150 ms"
    assert targets[("mesh-cross-node at 1,000 req/s: added p99", "≤ 0.3 ms")]["met"] is None
    latency = targets[
        ("mesh-cross-node added p50 latency, 1 connection", "≤ sidecar-pair's added p50")
    ]
    assert latency["met"] is False  # 0.175 ms against 0.17 ms
    assert targets[("mesh-cross-node proxy memory per idle connection", "≤ 10 KiB")]["met"] is True
    push = targets[("controller push to 100 agents, p99", "≤ 1 s")]
    assert push["met"] is None and "not measured" in push["measured"]


@pytest.mark.parametrize(
    ("push", "seconds"),
    [
        ({"p99_s": 0.4}, 0.4),
        ({"p99_ms": 250}, 0.25),
        ({"agents": 100, "latency": {"p50_ms": 10, "p99_ms": 1200}}, 1.2),
        ({"agents": 100}, None),
        (None, None),
    ],
)
def test_push_latency_p99_in_the_forms_accepted(push, seconds):
    assert report.push_p99_seconds(push) == seconds


def test_push_latency_target_from_the_file():
    targets = report.evaluate_targets({}, {"p99_ms": 1200})
    push = targets[-1]
    assert push["met"] is False and push["measured"] == "1.20 s"


def _results(sums: dict) -> dict:
    return {
        "command": "python -m benchmarks.run",
        "mode": "full",
        "finished_at": "2026-01-01T00:00:00+00:00",
        "machine": {
            "cores": 2,
            "cpu_model": "Test CPU",
            "kernel": "6.1.0",
            "python": "3.11.2",
            "commit": "abc123",
            "dirty": False,
            "loadavg_start": "0.10",
            "loadavg_end": "1.50",
            "other_labs": [],
        },
        "settings": {
            "runs": 3,
            "tcp_seconds": 4,
            "tcp_omit": 1,
            "http_seconds": 4,
            "latency_seconds": 3,
            "rate": 1000,
            "rate_seconds": 5,
            "rate_connections": 16,
            "newconn_seconds": 3,
            "idle_connections": 5000,
        },
        "paths": dict(report.PATH_NOTES),
        "idle_proxy_cpu_cores": {"node agents (both nodes)": 0.01},
        "metrics": report.metric_table(sums),
        "targets": report.evaluate_targets(sums, None),
        "errors": [{"round": 1, "scenario": "http-c1", "path": CROSS, "error": "wrk: timeout"}],
    }


def test_markdown_has_a_table_per_scenario_targets_and_machine():
    samples = _samples()
    report.derive_added(samples)
    text = report.markdown(_results(report.summaries(samples)))
    assert "2 cores (Test CPU), kernel 6.1.0" in text and "at commit `abc123`" in text
    assert "## Bulk TCP (iperf3)" in text
    assert "| 1 stream (Gbit/s, higher is better) | 8.80 ±6% (2.20xs) |" in text
    assert "4.20 ±5% (0.48xd, 1.05xs)" in text
    assert "| mesh-cross-node at 1,000 req/s: added p90 | ≤ 0.2 ms | 0.150 ms | met |" in text
    assert "- run 2, http-c1, `mesh-cross-node`: wrk: timeout" in text


def test_tool_errors_are_listed_per_scenario_and_path():
    samples = {
        "newconn_errors": {CROSS: [0, 12, None], DIRECT: [0, 0, 0]},
        "newconn_rps": {CROSS: [1.0, 2.0, 3.0]},
    }
    assert report._tool_errors(samples) == ["newconn on `mesh-cross-node`: 0, 12, -"]


def test_the_h2_table_has_its_figures_and_settings_and_no_issue_9_targets():
    samples = {
        "h2_rps": {DIRECT: [9000.0], CROSS: [900.0], SIDECAR: [3000.0]},
        "grpc_cps": {DIRECT: [2000.0], CROSS: [500.0], SIDECAR: [1000.0]},
        "grpc_errors": {CROSS: [3]},
    }
    results = _results(report.summaries(samples))
    results["settings"].update(h2_seconds=5, h2_connections=10, h2_streams=10, grpc_concurrency=10)
    results.update(scenarios=["h2-keepalive", "grpc-unary"], targets=[], samples=samples)
    text = report.markdown(results)
    assert "## HTTP/2 (h2c) keep-alive, 10 connections x 10 streams (h2load)" in text
    assert (
        "| requests (req/s, higher is better) | 9,000 (3.00xs) | — | 900 (0.10xd, 0.30xs) |" in text
    )
    assert (
        "| calls (calls/s, higher is better) | 2,000 (2.00xs) | — | 500 (0.25xd, 0.50xs) |" in text
    )
    assert "Targets" not in text and "iperf3 run" not in text
    assert "5 s per h2load run (`-c 10 -m 10 -D 5`" in text
    assert "grpc on `mesh-cross-node`: 3" in text


def test_level_paths_get_columns_where_measured_and_issue_18_targets():
    """Issue 18: the L7 level paths show in the scenarios they ran (and only there), and the
    level targets read them: `full` with a route (a VirtualService alone: the routed path)
    against the pair, `l4` same-node against direct."""
    samples = {
        "tcp_1_gbps": {DIRECT: [8.0], SAME: [7.0], CROSS: [4.0], SIDECAR: [4.0]},
        "http_c16_rps": {
            DIRECT: [20000.0],
            SAME: [6000.0],
            CROSS: [5000.0],
            SIDECAR: [10000.0],
            report.CROSS_FULL: [4000.0],
            report.CROSS_ROUTED: [4500.0],
            report.CROSS_L4: [9000.0],
            report.SAME_L4: [17000.0],
        },
    }
    sums = report.summaries(samples)
    results = _results(sums)
    results["l7_levels"] = {SAME: "observe", report.CROSS_FULL: "full"}
    text = report.markdown(results)
    assert "| figure | direct | mesh-same-node | mesh-cross-node | sidecar-pair |\n" in text
    c16 = text.split("## HTTP/1.1 keep-alive, 16 connections (wrk)")[1].split("##")[0]
    assert (
        "| figure | direct | mesh-same-node | mesh-cross-node | sidecar-pair | "
        "mesh-same-node-l4 | mesh-cross-node-full | mesh-cross-node-l4 | "
        "mesh-cross-node-routed |" in c16
    )
    assert "| 4,000 (0.20xd, 0.40xs) |" in c16
    assert "`mesh-same-node` observe, `mesh-cross-node-full` full" in text
    targets = {t["title"]: t for t in report.evaluate_targets(sums, None) if t["issue"] == 18}
    assert targets["cross-node keep-alive c16, `observe` (default on HTTP ports)"]["met"] is False
    full = targets["cross-node keep-alive c16, `full` with a route"]
    assert full["met"] is False and full["measured"].startswith("0.45 x")
    assert targets["same-node keep-alive c16, `l4`"]["met"] is True  # 0.85
    assert targets["idle connection, cross-node"]["met"] is None
    assert "## Targets (issue 18)" in text and "| same-node keep-alive c16, `l4` |" in text


def test_memory_target_reads_pss_with_rss_beside_and_the_split_has_rows():
    """Issue 18's memory target is the PSS summed over both nodes' proxy processes (forks share
    pages: RSS summed counts them once per process), RSS shown beside; the per-node split by
    role gets its own rows."""
    title = "node proxies' memory, both nodes (PSS at the fixed rate)"
    samples = {
        "fixed_proxy_pss_mib": {CROSS: [118.0, 110.0, 130.0]},
        "fixed_proxy_rss_mib": {CROSS: [430.0, 420.0, 440.0]},
        report.node_memory_id(1, "fork server"): {CROSS: [20.0]},
        report.node_memory_id(2, None): {CROSS: [55.0]},
    }
    sums = report.summaries(samples)
    memory = {t["title"]: t for t in report.evaluate_targets(sums, None)}[title]
    assert memory["met"] is True and memory["measured"] == "118 MiB PSS (RSS summed 430 MiB)"
    unmeasured = {t["title"]: t for t in report.evaluate_targets({}, None)}[title]
    assert unmeasured["met"] is None
    text = report.markdown(_results(sums))
    assert "| node-1: workers' fork server, PSS (MiB, lower is better) | — | — | 20.0 |" in text
    assert "| node-2: all, PSS (MiB, lower is better) | — | — | 55.0 |" in text
    assert "| both nodes, RSS summed over processes (MiB, lower is better) |" in text
