"""Issue #9: the node proxy on every core: worker processes share 15001/15008 (SO_REUSEPORT),
and status and metrics cover them all; a worker that dies is started again."""

from __future__ import annotations

import os
import signal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import EXAMPLES, meshlab, proxy_workers
from tests.waiting import wait_until

WORKERS = 2
NODES = ("node-1", "node-2")
REQUESTS = 40  # one connection each: the kernel spreads them over the workers' listeners
URL = "http://reviews.shop:9080/"


@pytest.fixture(scope="module")
def lab(lab_factory):
    with proxy_workers(WORKERS):
        return lab_factory(EXAMPLES / "demo.yaml", nodes=2)


def _requests(count: int) -> list[str]:
    """HTTP codes of ``count`` curls from the frontend pod, one connection each."""
    script = (
        f'for i in $(seq {count}); do curl -s -o /dev/null -m 5 -w "%{{http_code}}\\n" {URL}; done'
    )
    out = meshlab("exec", "shop/frontend", "--", "sh", "-c", script, timeout=120).stdout
    return out.split()


def _source_requests(node: str) -> float:
    page = meshlab("exec", "--node", node, "--", "curl", "-s", "127.0.0.1:15020/metrics").stdout
    families = {f.name: f for f in text_string_to_metric_families(page)}
    assert families["meshagent_proxy_workers"].samples[0].value == WORKERS
    return sum(
        s.value
        for s in families["istio_requests"].samples
        if s.name == "istio_requests_total" and s.labels["reporter"] == "source"
    )


def test_workers_share_the_connections_and_report_as_one_proxy(lab):
    agent = lab.status("node-1")["agent"]
    workers = agent["workers"]
    assert len(workers) == WORKERS
    assert len({w["pid"] for w in workers}) == WORKERS and all(w["pid"] for w in workers)

    assert _requests(REQUESTS) == ["200"] * REQUESTS
    # workers report their share every second: wait for the report that has every request
    view = wait_until(
        lambda: lab.status("node-1"),
        lambda view: sum(w["outbound_accepted"] for w in view["agent"]["workers"]) >= REQUESTS,
        what=f"node-1's workers report {REQUESTS} accepted connections between them",
    )
    workers = view["agent"]["workers"]
    assert all(w["outbound_accepted"] > 0 for w in workers), workers
    assert sum(w["outbound_accepted"] for w in workers) == REQUESTS
    assert view["connections"]["outbound"]["accepted"] == REQUESTS
    # one scrape counts every worker's requests, once
    counted = wait_until(
        lambda: _source_requests("node-1"),
        lambda n: n >= REQUESTS,
        what=f"node-1 counts {REQUESTS} requests as their source",
    )
    assert counted == REQUESTS
    screen = meshlab("exec", "--node", "node-1", "--", "meshagent", "status").stdout
    assert f"Proxy:       {WORKERS} workers (pids " in screen, screen


def test_a_dead_worker_is_started_again_and_counts_stay(lab):
    before = _source_requests("node-1")
    victim = lab.status("node-1")["agent"]["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    again = wait_until(
        lambda: lab.status("node-1")["agent"]["workers"][0],
        lambda worker: worker["pid"] and worker["pid"] != victim["pid"],
        what=f"worker 0 started again after its process {victim['pid']} was killed",
        timeout=20,
    )
    assert again["restarts"] == victim["restarts"] + 1, again
    assert again["pid"] != victim["pid"]

    assert _requests(REQUESTS) == ["200"] * REQUESTS
    # the dead worker's counts stay in the totals: they never go backwards
    counted = wait_until(
        lambda: _source_requests("node-1"),
        lambda n: n >= before + REQUESTS,
        what=f"node-1 counts {before:g} + {REQUESTS} requests as their source",
    )
    assert counted == before + REQUESTS


def test_workers_follow_a_change_by_its_delta(lab):
    """Issue #19 item 1: a change reaches each worker as the delta the agent applied (its view
    built from its own), not as the whole snapshot again: on both nodes every worker serves
    the agent's new version, having taken one snapshot whole (when it started) and the rest
    as deltas; and the policy the delta brought is in force."""
    before = {node: lab.status(node)["agent"] for node in NODES}
    for agent in before.values():
        assert {w["snapshots_applied"].get("whole") for w in agent["workers"]} == {1}, agent
    meshlab("apply", "-f", str(EXAMPLES / "demo-policy.yaml"))
    for node in NODES:
        view = wait_until(
            lambda node=node: lab.status(node)["agent"],
            lambda agent, node=node: (
                agent["snapshot_version"] != before[node]["snapshot_version"]
                and all(
                    w["snapshot_version"] == agent["snapshot_version"] for w in agent["workers"]
                )
            ),
            what=f"{node}'s workers serve the agent's snapshot after the policy was applied",
        )
        for worker in view["workers"]:
            assert worker["snapshots_applied"]["whole"] == 1, (node, worker)
            assert worker["snapshots_applied"]["delta"] >= 1, (node, worker)
    # the delta's policy is in force in the workers: only the frontend may call reviews
    intruder = "curl -s -o /dev/null -m 2 -w %{http_code} " + URL
    wait_until(
        lambda: meshlab("exec", "shop/intruder", "--", "sh", "-c", intruder, check=False).stdout,
        lambda code: code != "200",
        what="the intruder is refused once the policy is in",
    )
    assert _requests(3) == ["200"] * 3
