"""The lab's plan: placement, addresses, names and hosts files."""

from __future__ import annotations

import pytest
from meshagent.lab.paths import POD_NET_OCTET
from meshagent.lab.topology import (
    LabPlan,
    PlanError,
    add_objects,
    cluster_objects,
    hosts_file,
    make_nodes,
)


def pod(name, ns="shop", node=None, labels=None):
    spec = {"containers": [{"name": "c", "command": ["sleep", "1"]}]}
    if node:
        spec["nodeName"] = node
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": spec,
    }


def test_pods_spread_over_nodes_and_get_addresses_in_their_node_cidr():
    plan = LabPlan(nodes=make_nodes(2))
    add_objects(plan, [pod("a"), pod("b"), pod("c"), pod("d", node="node-2")])
    nodes = {p.name: p.node for p in plan.pods.values()}
    assert nodes == {"a": "node-1", "b": "node-2", "c": "node-1", "d": "node-2"}
    for p in plan.pods.values():
        index = p.node.split("-")[1]
        assert p.ip.startswith(f"10.{POD_NET_OCTET}.{index}.")
    assert len({p.ip for p in plan.pods.values()}) == 4
    assert all(len(p.host_veth) <= 15 for p in plan.pods.values())


def test_unknown_node_is_an_error_naming_it():
    plan = LabPlan(nodes=make_nodes(2))
    with pytest.raises(PlanError, match="node-7"):
        add_objects(plan, [pod("a", node="node-7")])


def test_services_get_vips_and_resolve_in_hosts_files():
    plan = LabPlan(nodes=make_nodes(1))
    svc = {
        "kind": "Service",
        "metadata": {"name": "reviews", "namespace": "shop"},
        "spec": {"selector": {"app": "r"}, "ports": [{"port": 9080}]},
    }
    fixed = {
        "kind": "Service",
        "metadata": {"name": "db", "namespace": "data"},
        "spec": {"clusterIP": "10.96.5.5", "ports": [{"port": 5432}]},
    }
    add_objects(plan, [pod("a"), svc, fixed])
    vip = plan.services["shop/reviews"]["spec"]["clusterIP"]
    assert vip.startswith("10.96.") and vip != "10.96.5.5"
    hosts = hosts_file(plan, plan.pods["shop/a"])
    assert f"{vip} reviews reviews.shop reviews.shop.svc reviews.shop.svc.cluster.local" in hosts
    assert "10.96.5.5 db.data db.data.svc db.data.svc.cluster.local" in hosts


def test_cluster_objects_carry_pod_status_and_nodes():
    plan = LabPlan(nodes=make_nodes(2))
    add_objects(plan, [pod("a")])
    objs = cluster_objects(plan)
    nodes = [o for o in objs if o["kind"] == "Node"]
    assert [n["status"]["addresses"][0]["address"] for n in nodes] == ["172.30.0.11", "172.30.0.12"]
    (p,) = [o for o in objs if o["kind"] == "Pod"]
    assert p["spec"]["nodeName"] == "node-1"
    assert p["status"]["podIP"] == plan.pods["shop/a"].ip
    assert p["status"]["phase"] == "Running"
