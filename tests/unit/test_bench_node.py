"""benchmarks/node.py's pure parts: the lab's workload (servers and client Deployments as the
lab applies them) and the verdict on issue #22's targets."""

from __future__ import annotations

import re

from meshagent.common.manifests import load_documents
from meshagent.lab.paths import INSTANCE_PATTERN

from benchmarks import node, run
from benchmarks.node import MB, clients_manifest, servers_manifest, targets


def _measured(*, page: int, scrape: float, growth: float, status: float, exec_s: float) -> dict:
    node = {"page_bytes": page, "median_scrape_s": scrape, "agent_rss_growth_pct": growth}
    return {
        "nodes": {"node-1": node, "node-2": {**node, "page_bytes": page // 2}},
        "status_pods": 101,
        "status_s": status,
        "status_pods_s": status,
        "exec_true_s": exec_s,
    }


def test_the_workload_is_a_meshed_service_with_a_server_per_node_and_owned_clients():
    servers = load_documents(servers_manifest(), "servers")
    assert servers[0]["metadata"]["labels"] == {"meshagent.io/mesh": "enabled"}
    pods = [d for d in servers if d["kind"] == "Pod"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == ["node-1", "node-2"]
    assert next(d for d in servers if d["kind"] == "Service")["spec"]["ports"][0]["name"] == "http"

    clients = load_documents(clients_manifest(10, 12), "clients")
    deployments = [d for d in clients if d["kind"] == "Deployment"]
    assert len(deployments) == 10
    assert sum(d["spec"]["replicas"] for d in deployments) == 120
    accounts = {d["metadata"]["name"] for d in clients if d["kind"] == "ServiceAccount"}
    assert {d["spec"]["template"]["spec"]["serviceAccountName"] for d in deployments} == accounts


def test_targets_are_met_or_missed_by_the_worst_node_and_the_slower_status():
    met = targets(_measured(page=2 * MB, scrape=0.05, growth=-3.0, status=0.2, exec_s=0.08))
    assert [t["met"] for t in met] == [True] * 5
    assert met[0]["measured"] == "2.00 MB"

    missed = targets(_measured(page=3 * MB, scrape=0.2, growth=12.0, status=1.1, exec_s=0.3))
    assert [t["met"] for t in missed] == [False] * 5
    assert "101 pods" in missed[3]["title"]


def test_each_benchmarks_own_lab_instance_is_a_valid_instance_name():
    # A default the lab refuses fails only where MESHLAB_INSTANCE is unset, as in CI.
    for default in (node.DEFAULT_INSTANCE, run.DEFAULT_INSTANCE):
        assert re.fullmatch(INSTANCE_PATTERN, default), default


def test_the_table_shows_each_node_pss_where_it_was_recorded():
    """The node's PSS (its agent, fork server and workers share pages: RSS counts them in
    each) beside the RSS columns; results taken before it was recorded show a dash."""
    import json
    from pathlib import Path

    results = json.loads((Path(node.__file__).parent / "results" / "node.json").read_text())
    for figures in results["measured"]["nodes"].values():
        figures["rss_before"].pop("node_pss_mb", None)
        figures["rss_after"].pop("node_pss_mb", None)
    assert "| - → - MB |" in node.markdown(results)
    for figures in results["measured"]["nodes"].values():
        figures["rss_before"]["node_pss_mb"], figures["rss_after"]["node_pss_mb"] = 90.0, 95.5
    assert "| 90.0 → 95.5 MB |" in node.markdown(results)
