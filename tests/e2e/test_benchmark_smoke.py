"""Issue #9: the benchmark harness runs end to end in its smoke mode (seconds per scenario, one
run, a few idle connections), so it cannot rot. Only its outputs are checked, that they exist
and parse: timings on a shared test machine prove nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from matplotlib.image import imread

from tests.e2e.conftest import _require_root

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_smoke_run_writes_json_markdown_and_chart(tmp_path):
    _require_root()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MESHLAB_INSTANCE": os.environ.get("MESHLAB_INSTANCE", "bench")},
    )
    log = proc.stdout + proc.stderr
    assert (tmp_path / "latest.json").exists(), log

    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["mode"] == "smoke"
    assert results["machine"]["cores"] >= 1
    assert {m["id"] for m in results["metrics"]}, log
    assert all({"title", "target", "measured", "met"} <= set(t) for t in results["targets"])

    table = (tmp_path / "latest.md").read_text()
    assert table.startswith("# meshagent benchmarks")
    assert "| figure | direct | mesh-same-node | mesh-cross-node | sidecar-pair |" in table
    # issue 18: the L7 level paths, at the level node-1's status shows, in the HTTP/1.1 tables
    assert results["l7_levels"] == {
        "mesh-same-node": "observe",
        "mesh-cross-node": "observe",
        "mesh-same-node-full": "full",
        "mesh-same-node-l4": "l4",
        "mesh-cross-node-full": "full",
        "mesh-cross-node-l4": "l4",
        # by its VirtualService alone: `full` at the source, `observe` at the pods' node
        "mesh-cross-node-routed": "full (pods observe)",
    }, log
    c16 = next(m for m in results["metrics"] if m["id"] == "http_c16_rps")
    assert {"mesh-cross-node-full", "mesh-cross-node-l4", "mesh-cross-node-routed"} <= set(
        c16["paths"]
    ), log
    assert (
        "| mesh-same-node-l4 | mesh-cross-node-full | mesh-cross-node-l4 | mesh-cross-node-routed |"
        in table
    )

    # issue 18 item 4: the proxies' memory as PSS (the agent's forks share pages), split by role
    memory = {m["id"]: m["paths"] for m in results["metrics"] if m["id"].endswith("pss_mib")}
    for metric in ("fixed_proxy_pss_mib", "fixed_node1_main_pss_mib", "fixed_node2_pss_mib"):
        assert {"mesh-cross-node", "sidecar-pair"} <= set(memory.get(metric, {})), (metric, log)
    forkserver = memory["fixed_node1_forkserver_pss_mib"]
    assert forkserver["mesh-cross-node"]["median"] > 0 and "sidecar-pair" not in forkserver, log
    assert "node proxies' memory, both nodes (PSS at the fixed rate)" in table

    height, width = imread(tmp_path / "latest.png", format="png").shape[:2]  # decodes
    assert width > 1000 and height > 500
