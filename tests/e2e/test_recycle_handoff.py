"""Issue #17: a proxy worker replaced in its slot (agent/workers/recycle.py) hands its plain
same-node connections to its replacement (SCM_RIGHTS, agent/proxy/handoff.py) and exits at
once instead of holding them to its drain deadline (an hour).

Node-1's workers are replaced as a grown one is (the admin port's `POST /workers/recycle`
takes the memory watch's path: a fresh worker forked for each slot, the old one drains);
shop/frontend holds connections to echo-local on its node (a tcp- port: plain L4 relays)
through the replacement, each still echoing, while the replaced workers are gone (its own
module: one lab per module).
"""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import EXAMPLES, meshlab, render_manifest
from tests.e2e.test_upgrade import _alive
from tests.e2e.test_upgrade_connections import CONNS_MANIFEST, ConnHolder
from tests.waiting import wait_until

NODE = "node-1"
HELD = 4


def handed() -> dict[str, float]:
    """node-1's meshagent_connections_handed_total by direction, in one scrape (every worker
    of the agent, past ones too)."""
    page = meshlab("exec", "--node", NODE, "--", "curl", "-s", "127.0.0.1:15020/metrics").stdout
    counts = {"in": 0.0, "out": 0.0}
    for family in text_string_to_metric_families(page):
        if family.name == "meshagent_connections_handed":
            for s in family.samples:
                if s.name.endswith("_total"):
                    counts[s.labels["direction"]] += s.value
    return counts


def test_a_replaced_worker_hands_its_connections_to_its_replacement(lab_factory, tmp_path):
    lab = lab_factory(EXAMPLES / "demo.yaml", render_manifest(CONNS_MANIFEST, tmp_path), nodes=2)
    first = {w["index"]: w["pid"] for w in lab.status(NODE)["agent"]["workers"]}
    holder = ConnHolder(HELD, ("echo-local",))
    try:
        assert holder.connected() == {"connected": HELD, "failures": []}
        start = holder.report()
        assert start["open"] == start["echoed"] == HELD, start
        recycle = ("curl", "-s", "-X", "POST", "127.0.0.1:15000/workers/recycle")
        answer = json.loads(meshlab("exec", "--node", NODE, "--", *recycle).stdout)
        assert answer == {"recycled": len(first)}, answer
        # every worker of node-1 replaced at least once, and nothing left draining
        workers = wait_until(
            lambda: lab.status(NODE)["agent"]["workers"],
            lambda ws: all(w["recycled"] >= 1 and not w["retiring_pids"] for w in ws),
            what="each of node-1's workers replaced, the old ones gone",
            timeout=180,
            interval=1.0,
        )
        assert all(w["pid"] != first[w["index"]] for w in workers), (first, workers)
        # the replaced workers did not drain for an hour: they handed what they held and left
        assert not any(_alive(pid) for pid in first.values()), first
        counts = handed()
        assert counts["out"] >= HELD and counts["in"] == counts["out"], counts
        after = holder.report()
        assert after["open"] == after["echoed"] == HELD and after["failures"] == [], after
        assert after["rounds"] > start["rounds"]
    finally:
        closed = holder.close()
    assert closed.get("closed") == HELD, closed
