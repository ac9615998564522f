"""Issue #16 item 2: a Service's endpoints come from its EndpointSlices, as kube-proxy reads
them; a Service without any slice in the model falls back to its selector (the lab's manifest
folder). One table of cases: each builds a model of plain dicts, compiles it and compares the
endpoints of one Service as (ip, workload_uid, node, ports)."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import trio
from meshagent.agent.proxy.outbound import dial_address
from meshagent.agent.proxy.routing import compile_routes
from meshagent.agent.proxy.upstream import Connector
from meshagent.agent.state import Tables
from meshagent.controller.compiler import compile_shared, compile_snapshot
from meshagent.controller.model import ClusterModel

NS = "shop"


def namespace(name: str = NS, meshed: bool = True) -> dict:
    labels = {"meshagent.io/mesh": "enabled"} if meshed else {}
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(
    name: str,
    ips: str | list[str],
    *,
    node: str = "node-1",
    ns: str = NS,
    labels: dict | None = None,
    ready: bool = True,
    deleting: bool = False,
    ports: dict[str, int] | None = None,
    host_network: bool = False,
) -> dict:
    ips = [ips] if isinstance(ips, str) else ips
    meta = {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": labels or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    container = {"name": "main"}
    if ports:
        container["ports"] = [{"name": k, "containerPort": v} for k, v in ports.items()]
    spec = {"nodeName": node, "containers": [container]}
    if host_network:
        spec["hostNetwork"] = True
    return {
        "kind": "Pod",
        "metadata": meta,
        "spec": spec,
        "status": {
            "phase": "Running",
            "podIP": ips[0],
            "podIPs": [{"ip": ip} for ip in ips],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def service(
    name: str,
    ports: list[tuple[str, int, int | str]],
    *,
    ns: str = NS,
    selector: dict | None = None,
    cluster_ips: list[str] | None = None,
    families: list[str] | None = None,
) -> dict:
    cluster_ips = ["10.96.0.10"] if cluster_ips is None else cluster_ips
    spec: dict = {
        **({"clusterIP": cluster_ips[0], "clusterIPs": cluster_ips} if cluster_ips else {}),
        "ports": [{"name": n, "port": p, "targetPort": t, "protocol": "TCP"} for n, p, t in ports],
    }
    if families:
        spec["ipFamilies"] = families
    if selector:
        spec["selector"] = selector
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def ep(
    ip: str,
    pod_name: str | None = None,
    *,
    node: str | None = None,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    ns: str = NS,
) -> dict:
    out: dict = {"addresses": [ip]}
    conditions = {
        k: v
        for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
        if v is not None
    }
    if conditions:
        out["conditions"] = conditions
    if pod_name:
        out["targetRef"] = {
            "kind": "Pod",
            "namespace": ns,
            "name": pod_name,
            "uid": f"uid-{pod_name}",
        }
    if node:
        out["nodeName"] = node
    return out


def slice_(
    name: str,
    svc: str,
    endpoints: list[dict],
    ports: list[tuple[str, int]],
    *,
    family: str = "IPv4",
    ns: str = NS,
) -> dict:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": family,
        "endpoints": endpoints or None,
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
    }


def model_of(*objects: dict) -> ClusterModel:
    model = ClusterModel()
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    for kind, objs in by_kind.items():
        model.replace(kind, objs)
    return model


def endpoints_of(model: ClusterModel, name: str, ns: str = NS) -> list[tuple]:
    snap = compile_snapshot(model, "node-1")
    svc = next(s for s in snap.services if (s.namespace, s.name) == (ns, name))
    return [(e.ip, e.workload_uid, e.node, e.ports) for e in svc.endpoints]


HTTP = [("http", 80, 8080)]
WEB = {"app": "web"}

CASES = {
    # -- where endpoints come from ----------------------------------------------------------
    "selector-less Service with a hand-made slice": (
        [
            namespace(),
            service("db", [("pg", 5432, 5432)]),
            slice_("db-1", "db", [ep("192.168.5.10")], [("pg", 5432)]),
        ],
        "db",
        [("192.168.5.10", "address:192.168.5.10", "", {5432: 5432})],
    ),
    "kubernetes.default: the API server's address, https 443 -> 6443": (
        [
            namespace("default", meshed=False),
            service("kubernetes", [("https", 443, 6443)], ns="default", cluster_ips=["10.96.0.1"]),
            slice_("kubernetes", "kubernetes", [ep("172.30.0.1")], [("https", 6443)], ns="default"),
        ],
        ("kubernetes", "default"),
        [("172.30.0.1", "address:172.30.0.1", "", {443: 6443})],
    ),
    "a slice that names its pod: the pod's workload and node": (
        [
            namespace(),
            pod("web-a", "10.244.1.5", node="node-2", labels=WEB),
            service("web", HTTP, selector=WEB),
            slice_("web-x", "web", [ep("10.244.1.5", "web-a", node="node-2")], [("http", 8080)]),
        ],
        "web",
        [("10.244.1.5", "uid-web-a", "node-2", {80: 8080})],
    ),
    "a hand-made slice without targetRef at a pod's address: that pod": (
        [
            namespace(),
            pod("web-a", "10.244.1.5", node="node-2"),
            service("manual", HTTP),
            slice_("manual-1", "manual", [ep("10.244.1.5")], [("http", 8080)]),
        ],
        "manual",
        [("10.244.1.5", "uid-web-a", "node-2", {80: 8080})],
    ),
    "host-network pods share an address: never taken for the endpoint": (
        [
            namespace(),
            pod("agent", "172.30.0.11", node="node-1", host_network=True),
            service("node-svc", HTTP),
            slice_("node-svc-1", "node-svc", [ep("172.30.0.11")], [("http", 8080)]),
        ],
        "node-svc",
        [("172.30.0.11", "address:172.30.0.11", "", {80: 8080})],
    ),
    "targetRef to a pod the model does not have (yet): its uid and the slice's node": (
        [
            namespace(),
            service("web", HTTP, selector=WEB),
            slice_("web-x", "web", [ep("10.244.2.9", "web-z", node="node-2")], [("http", 8080)]),
        ],
        "web",
        [("10.244.2.9", "uid-web-z", "node-2", {80: 8080})],
    ),
    "the slice is authoritative: an empty one means no endpoints, whatever the selector": (
        [
            namespace(),
            pod("web-a", "10.244.1.5", labels=WEB),
            service("web", HTTP, selector=WEB),
            slice_("web-x", "web", [], [("http", 8080)]),
        ],
        "web",
        [],
    ),
    "a slice of the same name in another namespace does not count": (
        [
            namespace(),
            namespace("other"),
            service("db", [("pg", 5432, 5432)]),
            slice_("db-1", "db", [ep("192.168.5.10")], [("pg", 5432)], ns="other"),
        ],
        "db",
        [],
    ),
    "FQDN slices are ignored": (
        [
            namespace(),
            service("ext", HTTP),
            slice_("ext-1", "ext", [ep("example.com")], [("http", 80)], family="FQDN"),
            slice_("ext-2", "ext", [ep("192.168.5.11")], [("http", 80)]),
        ],
        "ext",
        [("192.168.5.11", "address:192.168.5.11", "", {80: 80})],
    ),
    # -- ports ------------------------------------------------------------------------------
    "named target port: each pod's own number, from its slice": (
        [
            namespace(),
            pod("web-a", "10.244.1.5", labels=WEB, ports={"web": 8080}),
            pod("web-b", "10.244.1.6", labels=WEB, ports={"web": 9090}),
            service("web", [("http", 80, "web")], selector=WEB),
            slice_("web-x", "web", [ep("10.244.1.5", "web-a")], [("http", 8080)]),
            slice_("web-y", "web", [ep("10.244.1.6", "web-b")], [("http", 9090)]),
        ],
        "web",
        [
            ("10.244.1.5", "uid-web-a", "node-1", {80: 8080}),
            ("10.244.1.6", "uid-web-b", "node-1", {80: 9090}),
        ],
    ),
    "two ports, mapped by name; a slice port the Service lacks is ignored": (
        [
            namespace(),
            pod("api-a", "10.244.1.7"),
            service("api", [("http", 80, 8080), ("grpc", 9090, "grpc")]),
            slice_(
                "api-x",
                "api",
                [ep("10.244.1.7", "api-a")],
                [("grpc", 50051), ("http", 8080), ("metrics", 9100)],
            ),
        ],
        "api",
        [("10.244.1.7", "uid-api-a", "node-1", {80: 8080, 9090: 50051})],
    ),
    "a Service port no slice carries has no endpoints": (
        [
            namespace(),
            pod("api-a", "10.244.1.7"),
            service("api", [("http", 80, 8080), ("admin", 81, 8081)]),
            slice_("api-x", "api", [ep("10.244.1.7", "api-a")], [("http", 8080)]),
        ],
        "api",
        [("10.244.1.7", "uid-api-a", "node-1", {80: 8080})],
    ),
    "an unnamed single port": (
        [
            namespace(),
            service("one", [("", 80, 8080)]),
            slice_("one-1", "one", [ep("192.168.5.12")], [("", 8080)]),
        ],
        "one",
        [("192.168.5.12", "address:192.168.5.12", "", {80: 8080})],
    ),
    # -- address families -------------------------------------------------------------------
    "dual-stack pod in an IPv4 and an IPv6 slice: one endpoint, IPv4 primary": (
        [
            namespace(),
            pod("ds-a", ["10.244.1.8", "fd00:244:1::8"], labels=WEB),
            service(
                "ds",
                HTTP,
                selector=WEB,
                cluster_ips=["10.96.0.20", "fd00:96::20"],
                families=["IPv4", "IPv6"],
            ),
            slice_("ds-4", "ds", [ep("10.244.1.8", "ds-a")], [("http", 8080)]),
            slice_("ds-6", "ds", [ep("fd00:244:1::8", "ds-a")], [("http", 8080)], family="IPv6"),
        ],
        "ds",
        [("10.244.1.8", "uid-ds-a", "node-1", {80: 8080})],
    ),
    "IPv6-primary Service: the pod's IPv6 address": (
        [
            namespace(),
            pod("ds-a", ["10.244.1.8", "fd00:244:1::8"], labels=WEB),
            service(
                "ds",
                HTTP,
                selector=WEB,
                cluster_ips=["fd00:96::20", "10.96.0.20"],
                families=["IPv6", "IPv4"],
            ),
            slice_("ds-4", "ds", [ep("10.244.1.8", "ds-a")], [("http", 8080)]),
            slice_("ds-6", "ds", [ep("fd00:244:1::8", "ds-a")], [("http", 8080)], family="IPv6"),
        ],
        "ds",
        [("fd00:244:1::8", "uid-ds-a", "node-1", {80: 8080})],
    ),
    "IPv6-only Service of a dual-stack pod": (
        [
            namespace(),
            pod("ds-a", ["10.244.1.8", "fd00:244:1::8"], labels=WEB),
            service("v6", HTTP, selector=WEB, cluster_ips=["fd00:96::21"], families=["IPv6"]),
            slice_("v6-6", "v6", [ep("fd00:244:1::8", "ds-a")], [("http", 8080)], family="IPv6"),
        ],
        "v6",
        [("fd00:244:1::8", "uid-ds-a", "node-1", {80: 8080})],
    ),
    "an IPv4 Service ignores a hand-made IPv6 slice (a VIP reaches its own family)": (
        [
            namespace(),
            service("db", [("pg", 5432, 5432)]),
            slice_("db-4", "db", [ep("192.168.5.10")], [("pg", 5432)]),
            slice_("db-6", "db", [ep("fd00:5::10")], [("pg", 5432)], family="IPv6"),
        ],
        "db",
        [("192.168.5.10", "address:192.168.5.10", "", {5432: 5432})],
    ),
    "an address of the wrong family for its slice is ignored": (
        [
            namespace(),
            service("db", [("pg", 5432, 5432)]),
            slice_("db-4", "db", [ep("fd00:5::10"), ep("192.168.5.10")], [("pg", 5432)]),
        ],
        "db",
        [("192.168.5.10", "address:192.168.5.10", "", {5432: 5432})],
    ),
    "headless dual-stack: no VIPs, every family (hand-made endpoints: one per address)": (
        [
            namespace(),
            service("hl", HTTP, cluster_ips=["None"], families=["IPv4", "IPv6"]),
            slice_("hl-4", "hl", [ep("192.168.5.13")], [("http", 8080)]),
            slice_("hl-6", "hl", [ep("fd00:5::13")], [("http", 8080)], family="IPv6"),
        ],
        "hl",
        [
            ("192.168.5.13", "address:192.168.5.13", "", {80: 8080}),
            ("fd00:5::13", "address:fd00:5::13", "", {80: 8080}),
        ],
    ),
    "headless with pods: still endpoints (the proxy knows the Service of a pod address)": (
        [
            namespace(),
            pod("db-0", "10.244.1.20", labels={"app": "db"}),
            service("db", [("tcp-pg", 5432, 5432)], cluster_ips=["None"], selector={"app": "db"}),
            slice_("db-x", "db", [ep("10.244.1.20", "db-0")], [("tcp-pg", 5432)]),
        ],
        "db",
        [("10.244.1.20", "uid-db-0", "node-1", {5432: 5432})],
    ),
    # -- conditions -------------------------------------------------------------------------
    "no conditions at all: ready (nil is true)": (
        [
            namespace(),
            service("db", [("pg", 5432, 5432)]),
            slice_("db-1", "db", [ep("192.168.5.10", ready=None)], [("pg", 5432)]),
        ],
        "db",
        [("192.168.5.10", "address:192.168.5.10", "", {5432: 5432})],
    ),
    "not ready, not terminating: left out": (
        [
            namespace(),
            service("db", [("pg", 5432, 5432)]),
            slice_(
                "db-1",
                "db",
                [ep("192.168.5.10", ready=False, serving=False), ep("192.168.5.11")],
                [("pg", 5432)],
            ),
        ],
        "db",
        [("192.168.5.11", "address:192.168.5.11", "", {5432: 5432})],
    ),
    "not ready even as the only one (not terminating: no fallback)": (
        [
            namespace(),
            service("db", [("pg", 5432, 5432)]),
            slice_("db-1", "db", [ep("192.168.5.10", ready=False, serving=True)], [("pg", 5432)]),
        ],
        "db",
        [],
    ),
    "one ready, one terminating: no new connection to the terminating one": (
        [
            namespace(),
            pod("web-a", "10.244.1.5", labels=WEB),
            pod("web-b", "10.244.1.6", labels=WEB, deleting=True),
            service("web", HTTP, selector=WEB),
            slice_(
                "web-x",
                "web",
                [
                    ep("10.244.1.5", "web-a", ready=True, serving=True, terminating=False),
                    ep("10.244.1.6", "web-b", ready=False, serving=True, terminating=True),
                ],
                [("http", 8080)],
            ),
        ],
        "web",
        [("10.244.1.5", "uid-web-a", "node-1", {80: 8080})],
    ),
    "all terminating: the serving ones still get connections, not the others": (
        [
            namespace(),
            pod("web-a", "10.244.1.5", labels=WEB, deleting=True),
            pod("web-b", "10.244.1.6", labels=WEB, deleting=True, ready=False),
            service("web", HTTP, selector=WEB),
            slice_(
                "web-x",
                "web",
                [
                    ep("10.244.1.5", "web-a", ready=False, serving=True, terminating=True),
                    ep("10.244.1.6", "web-b", ready=False, serving=False, terminating=True),
                ],
                [("http", 8080)],
            ),
        ],
        "web",
        [("10.244.1.5", "uid-web-a", "node-1", {80: 8080})],
    ),
    "all terminating and none serving: no endpoint": (
        [
            namespace(),
            service("db", [("pg", 5432, 5432)]),
            slice_(
                "db-1",
                "db",
                [ep("192.168.5.10", ready=False, serving=False, terminating=True)],
                [("pg", 5432)],
            ),
        ],
        "db",
        [],
    ),
    "ready and terminating (publishNotReadyAddresses): ready decides, as kube-proxy": (
        [
            namespace(),
            service("db", [("pg", 5432, 5432)]),
            slice_(
                "db-1",
                "db",
                [ep("192.168.5.10", ready=True, serving=True, terminating=True)],
                [("pg", 5432)],
            ),
        ],
        "db",
        [("192.168.5.10", "address:192.168.5.10", "", {5432: 5432})],
    ),
    "the fallback is per Service port": (
        [
            namespace(),
            service("api", [("http", 80, 8080), ("admin", 81, 8081)]),
            slice_("api-1", "api", [ep("192.168.5.20"), ep("192.168.5.21")], [("http", 8080)]),
            slice_(
                "api-2",
                "api",
                [ep("192.168.5.22", ready=False, serving=True, terminating=True)],
                [("admin", 8081), ("http", 8080)],
            ),
        ],
        "api",
        [
            ("192.168.5.20", "address:192.168.5.20", "", {80: 8080}),
            ("192.168.5.21", "address:192.168.5.21", "", {80: 8080}),
            ("192.168.5.22", "address:192.168.5.22", "", {81: 8081}),
        ],
    ),
    "a pod terminating in one family's slice and not yet in the other's: terminating": (
        [
            namespace(),
            pod("ds-a", ["10.244.1.8", "fd00:244:1::8"], labels=WEB, deleting=True),
            pod("ds-b", ["10.244.1.9", "fd00:244:1::9"], labels=WEB),
            service(
                "ds",
                HTTP,
                selector=WEB,
                cluster_ips=["10.96.0.20", "fd00:96::20"],
                families=["IPv4", "IPv6"],
            ),
            slice_(
                "ds-4",
                "ds",
                [
                    ep("10.244.1.8", "ds-a", ready=False, serving=True, terminating=True),
                    ep("10.244.1.9", "ds-b"),
                ],
                [("http", 8080)],
            ),
            slice_(
                "ds-6",
                "ds",
                [ep("fd00:244:1::8", "ds-a"), ep("fd00:244:1::9", "ds-b")],
                [("http", 8080)],
                family="IPv6",
            ),
        ],
        "ds",
        [("10.244.1.9", "uid-ds-b", "node-1", {80: 8080})],
    ),
    # -- the fallback: a Service with no slice in the model --------------------------------
    "no slice: the selector's ready pods (the lab)": (
        [
            namespace(),
            pod("web-a", "10.244.1.5", labels=WEB, ports={"web": 8080}),
            pod("web-b", "10.244.1.6", labels=WEB, ready=False),
            pod("other", "10.244.1.7", labels={"app": "other"}),
            service("web", [("http", 80, "web")], selector=WEB),
        ],
        "web",
        [("10.244.1.5", "uid-web-a", "node-1", {80: 8080})],
    ),
    "no slice: a pod with deletionTimestamp gets no new connection": (
        [
            namespace(),
            pod("web-a", "10.244.1.5", labels=WEB),
            pod("web-b", "10.244.1.6", labels=WEB, deleting=True),
            service("web", HTTP, selector=WEB),
        ],
        "web",
        [("10.244.1.5", "uid-web-a", "node-1", {80: 8080})],
    ),
    "no slice: all pods being deleted, the Ready ones serve on": (
        [
            namespace(),
            pod("web-a", "10.244.1.5", labels=WEB, deleting=True),
            pod("web-b", "10.244.1.6", labels=WEB, deleting=True, ready=False),
            service("web", HTTP, selector=WEB),
        ],
        "web",
        [("10.244.1.5", "uid-web-a", "node-1", {80: 8080})],
    ),
    "no slice and no selector: no endpoints": (
        [namespace(), pod("web-a", "10.244.1.5", labels=WEB), service("db", HTTP)],
        "db",
        [],
    ),
    "no slice, dual-stack pod: its primary address": (
        [
            namespace(),
            pod("ds-a", ["fd00:244:1::8", "10.244.1.8"], labels=WEB),
            service("ds", HTTP, selector=WEB, cluster_ips=[]),
        ],
        "ds",
        [("fd00:244:1::8", "uid-ds-a", "node-1", {80: 8080})],
    ),
}


@pytest.mark.parametrize("objects,name,expected", CASES.values(), ids=list(CASES))
def test_endpoints(objects, name, expected):
    name, ns = name if isinstance(name, tuple) else (name, NS)
    assert endpoints_of(model_of(*objects), name, ns) == expected


def test_headless_service_has_no_vip():
    model = model_of(
        *CASES[
            "headless with pods: still endpoints (the proxy knows the Service of a pod address)"
        ][0]
    )
    (svc,) = [s for s in compile_snapshot(model, "node-1").services if s.name == "db"]
    assert svc.vips == []
    # and the proxy maps the pod's address and port to that Service (protocol, l7 level)
    tables = Tables.build(compile_shared(model).for_node("node-1"))
    assert tables.service_by_endpoint[("10.244.1.20", 5432)].name == "db"


def test_a_pod_behind_a_slice_is_shared_with_every_node():
    """An unmeshed pod behind a Service is needed by every node (the endpoint's workload):
    found through the slice as it was through the selector."""
    model = model_of(
        namespace("batch", meshed=False),
        pod("web-a", "10.244.2.5", node="node-2", ns="batch"),
        service("web", HTTP, ns="batch"),
        slice_(
            "web-x", "web", [ep("10.244.2.5", "web-a", ns="batch")], [("http", 8080)], ns="batch"
        ),
    )
    shared = compile_shared(model)
    assert [w.name for w in shared.snapshot.workloads] == ["web-a"]
    assert shared.local == {}


def test_an_endpoint_that_is_no_pod_is_routed_and_dialled_at_its_address():
    """The agent side of a hand-made endpoint: routes list it, and the dial address is its
    own whatever the VIP's family (there is no workload to find another address in)."""
    model = model_of(*CASES["kubernetes.default: the API server's address, https 443 -> 6443"][0])
    snap = compile_shared(model).for_node("node-1")
    tables = Tables.build(snap)
    routes = compile_routes(snap)
    assert not routes.problems
    (endpoint,) = next(s for s in snap.services if s.name == "kubernetes").endpoints
    assert dial_address(tables, endpoint, "10.96.0.1") == "172.30.0.1"
    assert tables.workload_by_uid.get(endpoint.workload_uid) is None


async def test_the_proxy_dials_an_endpoint_that_is_no_pod_directly_in_plaintext():
    """Connector.open finds no workload at a hand-made endpoint's address: it connects there
    directly (passthrough), even for a meshed source with a tunnel pool at hand."""
    received = []

    async def handler(stream):
        received.append(await stream.receive_some(5))
        await stream.aclose()

    model = model_of(
        namespace(),
        pod("client", "10.244.1.30"),
        service("db", [("tcp-pg", 5432, 5432)]),
        slice_("db-1", "db", [ep("127.0.0.1")], [("tcp-pg", 5432)]),
    )
    snap = compile_shared(model).for_node("node-1")
    store = SimpleNamespace(tables=Tables.build(snap))
    inputs = SimpleNamespace(store=store, node="node-1", trust_domain="cluster.local")
    sentinel = object()  # a pool and identities that must not be used
    connector = Connector(inputs, pool=sentinel, identities=sentinel)
    (endpoint,) = next(s for s in snap.services if s.name == "db").endpoints
    source = store.tables.workload_by_ip["10.244.1.30"]
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        upstream = await connector.open(source, endpoint.ip, port, "10.244.1.30")
        assert upstream.security == "none" and upstream.peer is None
        await upstream.stream.send_all(b"hello")
        await upstream.stream.aclose()
        with trio.fail_after(5):
            while not received:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert received == [b"hello"]
