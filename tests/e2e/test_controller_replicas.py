"""Issue #19 item 3 in the lab (a real kube-apiserver): two `meshctl serve --kubernetes`
replicas (MESHLAB_CONTROLLER_REPLICAS=2), every agent given both addresses.

- each agent is on the replica its node name hashes to (node-1 and node-2 on different ones),
  both serving;
- the replica node-1's agent uses is killed while shop/frontend (node-1) dials a server on
  node-2 without pause: the agent moves to the other replica, a Service created after the
  kill reaches node-1's snapshot, and every connection meanwhile goes through the mesh.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import yaml
from meshagent.agent.configclient import replica_order
from meshagent.lab import lab as lablib
from meshagent.lab.topology import UNDERLAY_BRIDGE_IP

from tests.e2e.conftest import EXAMPLES, Lab, lab_env, meshlab
from tests.e2e.test_restart import meshed, prober  # noqa: F401 (prober: a fixture)
from tests.waiting import wait_until

REPLICAS = 2
CONVERGE = 30  # seconds (2 shared cores)
SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "after-the-kill", "namespace": "shop"},
    "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]},
}


@pytest.fixture(scope="module")
def demo_lab(lab_factory) -> Iterator[Lab]:
    """The demo with two controller replicas (test_restart's `prober` runs in it)."""
    with lab_env("MESHLAB_CONTROLLER_REPLICAS", str(REPLICAS)):
        yield lab_factory(EXAMPLES / "demo.yaml", nodes=2)


def agents_on(replica: int) -> set[str]:
    view = lablib.controller_view(replica=replica) or {}
    return {a["node"] for a in view.get("agents") or [] if a["connected"]}


def home(node: str) -> int:
    """The replica (0-based) the agent of ``node`` starts at."""
    ports = [lablib.controller_ports(r)[0] for r in range(REPLICAS)]
    first = replica_order([(UNDERLAY_BRIDGE_IP, p) for p in ports], node)[0]
    return ports.index(first[1])


def test_agents_spread_over_both_replicas(demo_lab) -> None:
    assert {home("node-1"), home("node-2")} == {0, 1}
    wait_until(
        lambda: [agents_on(r) for r in range(REPLICAS)],
        lambda got: all(node in got[home(node)] for node in ("node-1", "node-2")),
        what="each agent connected to the replica its node hashes to",
        timeout=CONVERGE,
    )
    for node in ("node-1", "node-2"):
        port = lablib.controller_ports(home(node))[0]
        link = demo_lab.status(node)["agent"]["controller"]
        assert link["connected"] and link["address"] == f"{UNDERLAY_BRIDGE_IP}:{port}", link


def test_killing_an_agents_replica_moves_it_and_traffic_keeps_flowing(
    demo_lab,
    prober,  # noqa: F811 (the fixture imported above)
    tmp_path,
) -> None:
    probe, client = prober
    gone, other = home("node-1"), 1 - home("node-1")
    killed_at = time.time()
    meshlab("controller", "stop", "--replica", str(gone + 1))
    try:
        wait_until(
            lambda: demo_lab.status("node-1")["agent"]["controller"],
            lambda link: (
                link["connected"]
                and link["address"] == f"{UNDERLAY_BRIDGE_IP}:{lablib.controller_ports(other)[0]}"
            ),
            what="node-1's agent connected to the other replica",
            timeout=CONVERGE,
        )
        manifest = tmp_path / "service.yaml"
        manifest.write_text(yaml.safe_dump(SERVICE))
        meshlab("apply", "-f", str(manifest))
        wait_until(
            lambda: demo_lab.endpoints("node-1", "shop", "after-the-kill"),
            bool,
            what="the Service created after the kill in node-1's snapshot",
            timeout=CONVERGE,
        )
        converged_at = time.time()
        view = lablib.controller_view(replica=other) or {}
        acked = {a["node"]: a["acked_version"] for a in view.get("agents") or [] if a["connected"]}
        assert acked.get("node-1") == demo_lab.status("node-1")["agent"]["snapshot_version"]
    finally:
        meshlab("controller", "start", "--replica", str(gone + 1))
    window = [a for a in probe.since(killed_at) if a["t"] <= converged_at]
    assert len(window) >= 10, f"only {len(window)} attempts while the agent moved"
    failed = [a for a in window if not meshed(a, client)]
    assert not failed, f"{len(failed)} of {len(window)} attempts not through the mesh: {failed[:3]}"
    print(f"{len(window)} attempts in {converged_at - killed_at:.1f}s, all through the mesh")
