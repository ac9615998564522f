"""The proxy dials an endpoint in the family of the VIP the client dialled (as kube-proxy)."""

from __future__ import annotations

from meshagent.agent.proxy.outbound import dial_address
from meshagent.agent.state import Tables
from meshagent.common.snapshot import Endpoint, Service, ServicePort, Snapshot, Workload

DUAL = Workload(
    uid="u1", namespace="ds", name="server", node="node-2", ips=["10.0.2.10", "fd00::2:a"]
)
V4_ONLY = Workload(uid="u2", namespace="ds", name="old", node="node-2", ips=["10.0.2.11"])


def _tables() -> Tables:
    snap = Snapshot(
        node="node-1",
        workloads=[DUAL, V4_ONLY],
        services=[
            Service(
                namespace="ds",
                name="server",
                vips=["10.96.0.10", "fd00:10:96::a"],
                ports=[ServicePort(name="http", port=80, target_port=8080)],
            )
        ],
    ).with_version()
    return Tables.build(snap)


def test_ipv6_vip_dials_the_pods_ipv6_address():
    ep = Endpoint(ip="10.0.2.10", node="node-2", workload_uid="u1", ports={80: 8080})
    assert dial_address(_tables(), ep, "fd00:10:96::a") == "fd00::2:a"


def test_ipv4_vip_and_ipv4_mapped_dial_ipv4():
    ep = Endpoint(ip="10.0.2.10", node="node-2", workload_uid="u1", ports={80: 8080})
    assert dial_address(_tables(), ep, "10.96.0.10") == "10.0.2.10"


def test_a_pod_without_that_family_is_dialled_at_its_primary_address():
    ep = Endpoint(ip="10.0.2.11", node="node-2", workload_uid="u2", ports={80: 8080})
    assert dial_address(_tables(), ep, "fd00:10:96::a") == "10.0.2.11"
    assert dial_address(None, ep, "fd00:10:96::a") == "10.0.2.11"
