"""Locality-aware balancing (common/locality.py, agent/proxy/lb.py, agent/proxy/routing.py),
against Istio's documentation of `localityLbSetting` and Envoy's priority load: which
endpoints a client prefers, how traffic spills as the preferred ones are ejected, and how
`distribute` shares it."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from meshagent.agent.proxy.lb import ClusterState
from meshagent.agent.proxy.routing import (
    ClusterKey,
    ClusterSpec,
    OutlierPolicy,
    TrafficPolicy,
    UpstreamEndpoint,
    compile_routes,
)
from meshagent.common import locality
from meshagent.common.istio import networking as net
from meshagent.common.snapshot import Endpoint, Node, Service, ServicePort, Snapshot, Workload

from tests.unit.test_lb import FakeClock, fail

HERE = "r1/z1/s1"


@pytest.mark.parametrize(
    ("endpoint", "priority"),
    [
        ("r1/z1/s1", 0),
        ("r1/z1/s2", 1),
        ("r1/z2/s1", 2),
        ("r2/z1/s1", 3),  # the failover region below
        ("r3/z1/s1", 4),
    ],
)
def test_failover_priorities_as_istio_orders_them(endpoint, priority):
    failover = [net.LocalityFailover.model_validate({"from": "r1", "to": "r2"})]
    assert locality.failover_priority(HERE, endpoint, failover) == priority


@pytest.mark.parametrize(
    ("pattern", "where", "hit"),
    [
        ("r1/z1/*", "r1/z1/s9", True),
        ("r1/*", "r1/z7/s9", True),
        ("r1", "r1/z7/", True),  # a region pattern covers its zones
        ("r1/z1/s1", "r1/z1/s2", False),
        ("*", "r5/z/s", True),
        ("r2/*", "r1/z1/s1", False),
    ],
)
def test_locality_patterns(pattern, where, hit):
    assert locality.matches(pattern, where) is hit


def test_labels_give_the_locality_and_no_region_none():
    labels = {locality.REGION_LABEL: "r1", locality.ZONE_LABEL: "z1"}
    assert locality.of_labels(labels) == "r1/z1/"
    assert locality.of_labels({locality.ZONE_LABEL: "z1"}) == ""


def test_priority_load_spills_with_envoys_overprovisioning():
    assert locality.level_loads([(4, 4), (4, 4)]) == [1.0, 0.0]
    loads = locality.level_loads([(2, 4), (4, 4)])  # half healthy: 70 % stay
    assert loads == pytest.approx([0.7, 0.3])
    assert locality.level_loads([(0, 4), (4, 4)]) == [0.0, 1.0]
    assert locality.level_loads([(1, 10), (1, 10)]) == pytest.approx([0.5, 0.5])  # scaled
    assert locality.level_loads([(0, 2), (0, 2)]) == [0.0, 0.0]


def _endpoints(*nodes: str) -> tuple[UpstreamEndpoint, ...]:
    return tuple(
        UpstreamEndpoint(
            Endpoint(ip=f"10.0.0.{i}", node=n, workload_uid=f"w{i}", ports={80: 80}), 80
        )
        for i, n in enumerate(nodes, 1)
    )


def _state(spec: ClusterSpec, seed: int = 3) -> ClusterState:
    return ClusterState(spec, clock=FakeClock(), rng=random.Random(seed))


def test_the_best_priority_takes_all_until_its_endpoints_are_ejected():
    policy = TrafficPolicy(lb="ROUND_ROBIN", outlier=OutlierPolicy(consecutive_5xx=1))
    spec = ClusterSpec(
        ClusterKey("s.ns.svc.cluster.local", 80),
        _endpoints("near-a", "near-b", "far"),
        policy,
        priorities=(0, 0, 2),
    )
    c = _state(spec)
    assert Counter(c.pick().endpoint.node for _ in range(200)).keys() == {"near-a", "near-b"}
    near_a = next(ep for ep in c.endpoints if ep.endpoint.node == "near-a")
    fail(c, near_a)  # half of priority 0 ejected: 70 % stay, 30 % spill to priority 2
    seen = Counter(c.pick().endpoint.node for _ in range(2000))
    assert seen["near-a"] == 0
    assert 0.64 < seen["near-b"] / 2000 < 0.76, seen
    near_b = next(ep for ep in c.endpoints if ep.endpoint.node == "near-b")
    fail(c, near_b)  # max ejection percent still lets the last one go
    assert {c.pick().endpoint.node for _ in range(50)} <= {"far", "near-b"}


def test_distribute_shares_traffic_by_locality():
    spec = ClusterSpec(
        ClusterKey("s.ns.svc.cluster.local", 80),
        _endpoints("a1", "a2", "b1"),
        TrafficPolicy(lb="ROUND_ROBIN"),
        localities=("r1/z1/", "r1/z1/", "r1/z2/"),
        shares=(20.0, 20.0, 80.0),
    )
    c = _state(spec)
    seen = Counter(c.pick().endpoint.node for _ in range(4000))
    assert 0.76 < seen["b1"] / 4000 < 0.84, seen
    assert abs(seen["a1"] - seen["a2"]) < 200, seen  # the zone's share split between its two


def _snapshot(dr_spec: dict, node_localities: dict[str, str]) -> Snapshot:
    nodes = [
        Node(name=n, address=f"172.30.0.{i}", locality=loc)
        for i, (n, loc) in enumerate(node_localities.items(), 11)
    ]
    workloads = [
        Workload(
            uid=f"uid-{n}",
            namespace="shop",
            name=f"web-{n}",
            node=n,
            ips=[f"10.1.{i}.1"],
            labels={"app": "web"},
        )
        for i, n in enumerate(node_localities)
    ]
    endpoints = [
        Endpoint(ip=w.ips[0], node=w.node, workload_uid=w.uid, ports={80: 8080}) for w in workloads
    ]
    port = ServicePort(name="http", port=80, target_port=8080)
    service = Service(
        namespace="shop", name="web", vips=["10.96.0.9"], ports=[port], endpoints=endpoints
    )
    dr = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"host": "web", "trafficPolicy": dr_spec},
    }
    return Snapshot(
        node="node-1", nodes=nodes, workloads=workloads, services=[service], istio_resources=[dr]
    )


ZONES = {"node-1": "r1/z1/", "node-2": "r1/z1/", "node-3": "r1/z2/"}


def _cluster(dr_spec: dict, zones: dict[str, str] = ZONES) -> ClusterSpec:
    table = compile_routes(_snapshot(dr_spec, zones))
    return table.http_routes("web.shop.svc.cluster.local", 80).routes[0].destinations.pick()


def test_failover_applies_only_with_outlier_detection_and_labelled_nodes():
    with_od = {"outlierDetection": {"consecutive5xxErrors": 1}}
    assert _cluster(with_od).priorities == (0, 0, 2)
    assert _cluster({"loadBalancer": {"simple": "RANDOM"}}).priorities == ()
    off = {**with_od, "loadBalancer": {"localityLbSetting": {"enabled": False}}}
    assert _cluster(off).priorities == ()
    assert _cluster(with_od, dict.fromkeys(ZONES, "")).priorities == ()


def test_distribute_from_the_clients_locality():
    dr = {
        "loadBalancer": {
            "localityLbSetting": {
                "distribute": [
                    {"from": "r9/*", "to": {"r9/*": 100}},
                    {"from": "r1/z1/*", "to": {"r1/z1/*": 20, "r1/z2/*": 80}},
                ]
            }
        }
    }
    spec = _cluster(dr)
    assert spec.shares == (20.0, 20.0, 80.0) and spec.localities == tuple(ZONES.values())
    assert spec.priorities == () and spec.policy.lb == "LEAST_REQUEST"


# failoverPriority, as Istio's reference documents it (LocalityLoadBalancerSetting
# .failoverPriority): with N labels, an endpoint matching the client on all N has priority 0,
# on the first N-1 only 1, ..., on none (or not on the first) N; a label counts only if all
# before it matched; `key=value` compares the endpoint with the value instead of the client.
DOC_LABELS = (
    "topology.istio.io/network",
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.istio.io/subzone",
)
CLIENT = locality.Place("node-1", "r1/z1/s1")


@pytest.mark.parametrize(
    ("labels", "endpoint", "priority"),
    [
        # Istio's example list: network, region, zone, subzone (one network in meshagent)
        (DOC_LABELS, locality.Place("node-2", "r1/z1/s1"), 0),
        (DOC_LABELS, locality.Place("node-2", "r1/z1/s2"), 1),
        (DOC_LABELS, locality.Place("node-2", "r1/z2/s1"), 2),
        (DOC_LABELS, locality.Place("node-2", "r2/z1/s1"), 3),
        # a zone counts only with its region: another region's z1 is the lowest priority
        (DOC_LABELS[1:3], locality.Place("node-2", "r2/z1/s1"), 2),
        # kubernetes.io/hostname is the node: the client's own node first
        (("kubernetes.io/hostname",), locality.Place("node-1", "r1/z1/s1"), 0),
        (("kubernetes.io/hostname",), locality.Place("node-2", "r1/z1/s1"), 1),
        # key=value: the endpoint's value against the one written, not the client's
        (("topology.kubernetes.io/zone=z2",), locality.Place("node-2", "r1/z2/"), 0),
        (("topology.kubernetes.io/zone=z2",), locality.Place("node-2", "r1/z1/"), 1),
        # key=value on a pod label: the endpoint pod's own label
        (("pool=gold", "topology.kubernetes.io/zone"),
         locality.Place("node-2", "r1/z9/", {"pool": "gold"}), 1),
        (("pool=gold", "topology.kubernetes.io/zone"),
         locality.Place("node-2", "r1/z1/", {"pool": "gold"}), 0),
        (("pool=gold", "topology.kubernetes.io/zone"),
         locality.Place("node-2", "r1/z1/", {"pool": "blue"}), 2),
        # network and cluster without a value: every endpoint shares the client's
        (("topology.istio.io/cluster", "topology.istio.io/network"),
         locality.Place("node-9", "r7/z7/"), 0),
        (("topology.istio.io/network=net2",), locality.Place("node-2", "r1/z1/s1"), 1),
        (("topology.istio.io/network=net2",),
         locality.Place("node-2", "r1/z1/s1", {"topology.istio.io/network": "net2"}), 0),
    ],
)  # fmt: skip
def test_failover_priority_levels_as_istio_documents_them(labels, endpoint, priority):
    assert locality.label_priority(CLIENT, endpoint, labels) == priority


def test_failover_priority_replaces_the_locality_levels_and_needs_outlier_detection():
    zones = {"node-1": "r1/z1/", "node-2": "r1/z1/", "node-3": "r1/z2/"}
    od = {"outlierDetection": {"consecutive5xxErrors": 1}}
    prefer_z2 = {"localityLbSetting": {"failoverPriority": ["topology.kubernetes.io/zone=z2"]}}
    # the client (node-1) is in z1, but the list ranks z2 first: node-3's endpoint is preferred
    assert _cluster({**od, "loadBalancer": prefer_z2}, zones).priorities == (1, 1, 0)
    assert _cluster({"loadBalancer": prefer_z2}, zones).priorities == ()  # no outlier detection
    by_node = {"localityLbSetting": {"failoverPriority": ["kubernetes.io/hostname"]}}
    assert _cluster({**od, "loadBalancer": by_node}, zones).priorities == (0, 1, 1)
    # unlabelled nodes still have names
    assert _cluster({**od, "loadBalancer": by_node}, dict.fromkeys(zones, "")).priorities == (
        0,
        1,
        1,
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"failoverPriority": ["app"]}, "compares the client pod's own label"),
        ({"failoverPriority": ["bad key!"]}, "is not a label key or key=value"),
        ({"failoverPriority": ["topology.kubernetes.io/zone"],
          "failover": [{"from": "r1", "to": "r2"}]}, "failover together with failoverPriority"),
        ({"failoverPriority": ["topology.kubernetes.io/zone"],
          "distribute": [{"from": "r1/*", "to": {"r1/*": 100}}]},
         "set distribute or failoverPriority"),
    ],
)  # fmt: skip
def test_failover_priority_refusals_name_the_cause(setting, message):
    with pytest.raises(ValueError, match=message):
        net.LocalityLbSetting.model_validate(setting)


def test_failover_priority_accepts_istio_s_documented_lists():
    setting = net.LocalityLbSetting.model_validate({"failoverPriority": list(DOC_LABELS)})
    assert setting.failover_priority == DOC_LABELS
    cluster = net.LocalityLbSetting.model_validate(
        {"failoverPriority": ["topology.istio.io/cluster"]}
    )
    assert cluster.failover_priority == ("topology.istio.io/cluster",)
    pinned = net.LocalityLbSetting.model_validate({"failoverPriority": ["example.com/pool=gold"]})
    assert pinned.failover_priority == ("example.com/pool=gold",)
