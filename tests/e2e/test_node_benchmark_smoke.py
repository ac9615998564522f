"""Issue #22 item 4: `python -m benchmarks.node --smoke` runs end to end in a lab (2 client
pods, 2 scrapes per node), so the full-node benchmark cannot rot. Its outputs are checked, not
its timings (a shared test machine proves nothing about speed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import _require_root

REPO = Path(__file__).resolve().parents[2]


def test_node_benchmark_smoke_run_writes_every_figure(tmp_path):
    _require_root()
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (Debian: kubernetes-client)")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.node", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log

    results = json.loads((tmp_path / "node.json").read_text())
    m = results["measured"]
    assert results["settings"]["mode"] == "smoke"
    assert m["clients_answered"] == m["clients"] == 2, m
    for node in ("node-1", "node-2"):
        figures = m["nodes"][node]
        # the page has the mesh's series and the agent was found with its workers
        assert figures["page_bytes"] > 1000, figures
        assert len(figures["scrape_s"]) == 2
        assert figures["rss_before"]["agent_mb"] > 0 and figures["rss_before"]["workers_mb"]
    assert m["status_pods"] >= 2  # node-1's server and its clients, as status lists them
    assert results["machine"]["commit"] and results["machine"]["loadavg_end"]
    assert len(results["targets"]) == 5

    table = (tmp_path / "node.md").read_text()
    assert table.startswith("# A full node (issue 22)")
    assert "| target | goal | measured | status |" in table
