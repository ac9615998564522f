"""Issue #19 item 1: the agent builds the next data-plane view from the previous one. Over any
sequence of cluster changes sent as deltas, the view the store builds incrementally
(agent/helddoc.py, `Tables.after`) has exactly the tables `Tables.build` makes of the full
snapshot of the same version, and a delta that fails leaves the view in force untouched."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from meshagent.agent.helddoc import HeldDocument
from meshagent.agent.lookup import Index
from meshagent.agent.proxy.lb import Clusters
from meshagent.agent.state import SnapshotRejected, SnapshotStore, Tables
from meshagent.common import snapshotdelta
from meshagent.common.snapshot import Snapshot, joined_version, wire_version
from meshagent.controller.compiler import compile_shared
from meshagent.controller.model import ClusterModel

from tests.unit.test_snapshot_delta import (
    BUNDLES,
    NAMESPACES,
    NODES,
    _change,
    _cluster,
    changes,
    replay,
)

FIELDS = (*snapshotdelta.SHARED_FIELDS, "local_workloads")


def _by_version(ns: str, ports: list[dict]) -> dict:
    """A Service selecting every `version: v1` pod of ``ns``: its endpoints are also other
    Services' (two Services claim one pod port; HTTP and gRPC ports on one pod port)."""
    return {
        "kind": "Service",
        "metadata": {"name": "by-version", "namespace": ns},
        "spec": {"clusterIP": f"10.96.{NAMESPACES.index(ns)}.99", "selector": {"version": "v1"}},
        "ports": ports,
    }


def _shared_service(ns: str, two_ports: bool) -> dict:
    ports = [{"name": "http", "port": 80, "targetPort": 8080}]
    if two_ports:
        ports.append({"name": "grpc", "port": 90, "targetPort": 8080})
    svc = _by_version(ns, ports)
    svc["spec"]["ports"] = svc.pop("ports")
    return svc


def _subset_routing(ns: str, failover_by_label: bool) -> list[dict]:
    """svc0's DestinationRule with subsets by pod label (and, if asked, a failover priority
    by pod label) and a VirtualService sending to one: clusters that read the workloads."""
    policy: dict = {}
    if failover_by_label:
        policy = {
            "loadBalancer": {"localityLbSetting": {"failoverPriority": ["version=v1"]}},
            "outlierDetection": {"consecutive5xxErrors": 3},
        }
    host = f"svc0.{ns}.svc.cluster.local"
    return [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "svc0", "namespace": ns},
            "spec": {
                "host": host,
                "trafficPolicy": policy,
                "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"}},
                ],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "svc0", "namespace": ns},
            "spec": {
                "hosts": [host],
                "http": [{"route": [{"destination": {"host": host, "subset": "v1"}}]}],
            },
        },
    ]


view_changes = st.one_of(
    changes,
    st.tuples(st.just("shared-service"), st.sampled_from(NAMESPACES), st.booleans()),
    st.tuples(st.just("delete-shared-service"), st.sampled_from(NAMESPACES)),
    st.tuples(st.just("subsets"), st.sampled_from(NAMESPACES), st.booleans()),
)


def _view_change(model: ClusterModel, step: tuple) -> None:
    if step[0] == "shared-service":
        model.upsert("Service", _shared_service(step[1], step[2]))
    elif step[0] == "delete-shared-service":
        model.delete("Service", {"metadata": {"name": "by-version", "namespace": step[1]}})
    elif step[0] == "subsets":
        for resource in _subset_routing(step[1], step[2]):
            model.upsert(resource["kind"], resource)
    else:
        _change(model, step)


def _contents(tables: Tables) -> dict:
    """What the data plane reads of a view, comparable."""
    return {
        "snapshot": tables.snapshot.model_dump(mode="json"),
        "by_vip_port": tables.by_vip_port,
        "by_vip_range": tables.by_vip_range,
        "workload_by_ip": tables.workload_by_ip,
        "workload_by_uid": tables.workload_by_uid,
        "node_address": tables.node_address,
        "istio": tables.istio,
        "service_by_endpoint": tables.service_by_endpoint,
        "pod_protocols": tables.pod_protocols,
        "routes": tables.routes,
        "metrics_policy": tables.metrics_policy,
        # compiled from the policies above: which ones, for which namespace
        "authz": {ns: [p.ref for p in ps] for ns, ps in tables.authz._by_namespace.items()},
        "jwks": tables.snapshot.jwks,
    }


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(view_changes, min_size=1, max_size=14), node=st.sampled_from(NODES))
# a pod leaves a subset by a label change its Service's endpoints do not see (same Service)
@example(
    steps=[("subsets", "shop", False), ("pod", 0, "shop", "node-1", "svc0", "v2")], node="node-1"
)
@example(
    steps=[("subsets", "shop", True), ("pod", 0, "shop", "node-1", "svc0", "v2")], node="node-2"
)
def test_the_view_built_from_deltas_equals_the_view_of_the_full_snapshot(tmp_path, steps, node):
    for store, new, delta, previous in replay(tmp_path, steps, node, _view_change):
        tables = store.tables
        assert tables is not None and tables is not previous
        full = Tables.build(Snapshot.model_validate(new.model_dump(mode="json")))
        assert _contents(tables) == _contents(full)
        # what nothing of the delta reads is kept as the same object
        if not {"istio_resources", "services"} & delta.keys():
            assert tables.istio is previous.istio and tables.authz is previous.authz
        if not {"services", "workloads", "nodes", "istio_resources"} & delta.keys():
            assert tables.routes is previous.routes
        elif not {"nodes", "istio_resources"} & delta.keys():
            # a cluster of a Service that is the same object is kept, unless it reads the
            # workloads (a subset, a failover priority by label) and they changed
            was_svc = {svc.hostname: svc for svc in previous.snapshot.services}
            now_svc = {svc.hostname: svc for svc in tables.snapshot.services}
            for key, spec in tables.routes.clusters.items():
                if key not in previous.routes.clusters or was_svc.get(key.hostname) is not (
                    now_svc.get(key.hostname)
                ):
                    continue
                locality = spec.policy.locality
                by_labels = bool(key.subset or (locality and locality.failover_priority))
                if "workloads" not in delta or not by_labels:
                    assert spec is previous.routes.clusters[key]


def test_a_delta_that_fails_leaves_the_view_in_force_untouched(tmp_path):
    model = _cluster()
    store = SnapshotStore("node-1", tmp_path)
    first = compile_shared(model).for_node("node-1")
    store.apply(first.model_dump(mode="json"), save=False)
    before, contents = store.tables, _contents(store.tables)
    _change(model, ("pod", 1, "shop", "node-1", "svc0", "v2"))
    second = compile_shared(model).for_node("node-1")
    good = json.loads(json.dumps(snapshotdelta.diff(first, second, FIELDS)))
    bad_item = json.loads(json.dumps(good))
    bad_item["workloads"]["upsert"][0]["ips"] = "not a list"
    with pytest.raises(SnapshotRejected, match=r"invalid snapshot: 1 errors.*workloads\.0\.ips"):
        store.apply_delta(first.version, second.version, bad_item)
    bad_policy = {
        "istio_resources": {
            "upsert": [
                {
                    "apiVersion": "security.istio.io/v1",
                    "kind": "AuthorizationPolicy",
                    "metadata": {"name": "x", "namespace": "shop"},
                    "spec": {"action": "NOPE"},
                }
            ]
        }
    }
    leads_to = wire_version(snapshotdelta.apply(first.model_dump(mode="json"), bad_policy))
    with pytest.raises(SnapshotRejected, match="invalid Istio resource"):
        store.apply_delta(first.version, leads_to, bad_policy)
    with pytest.raises(SnapshotRejected, match="not a mapping"):
        store.apply_delta(first.version, second.version, ["workloads"])  # type: ignore[arg-type]
    with pytest.raises(SnapshotRejected, match="malformed"):
        store.apply_delta(first.version, second.version, {"workloads": {"remove": 5}})
    assert store.tables is before and store.version == first.version
    assert _contents(store.tables) == contents
    store.apply_delta(first.version, second.version, good)  # the good one still applies
    assert store.version == second.version


def test_the_version_from_the_kept_pieces_is_the_version_of_the_whole_document(tmp_path):
    """The same scheme as `wire_version` (so agents and controllers of other releases agree),
    also for a document with a field this release does not know and one without a field."""
    snap = compile_shared(_cluster(), BUNDLES["root-1"]).for_node("node-1")
    data = snap.model_dump(mode="json")
    data["from_a_newer_controller"] = {"b": [1, 2], "a": "x"}
    del data["telemetry"]
    data["version"] = wire_version(data)
    held = HeldDocument.of(data, Snapshot.model_validate(data))
    assert held.version() == wire_version(data)
    assert json.loads(held.document_json()) == data
    assert joined_version({"node": '"n"'}, "n") == wire_version({"node": "n"})
    # a workload listed twice: the pieces are not the document, which is hashed as sent
    data["workloads"].append(data["workloads"][0])
    data["version"] = wire_version(data)
    assert not HeldDocument.of(data, Snapshot.model_validate(data)).exact
    store = SnapshotStore("node-1", tmp_path)
    assert store.apply(data, save=False).version == data["version"]


def test_an_index_patch_that_touches_a_shared_key_asks_for_a_rebuild():
    index = Index.of({"10.0.0.1": "b", "10.0.0.2": "c"}, ["10.0.0.1", "10.0.0.1", "10.0.0.2"])
    assert index.patched([("10.0.0.1", "a")], []) is None  # a and b claim it: order decides
    patched = index.patched([("10.0.0.2", "c")], [("10.0.0.3", "d")])
    assert patched is not None and patched.table == {"10.0.0.1": "b", "10.0.0.3": "d"}
    assert index.table == {"10.0.0.1": "b", "10.0.0.2": "c"}  # the one in force is unchanged
    assert index.patched([], [("10.0.0.2", "e")]) is None  # a second claim


def test_a_kept_cluster_keeps_the_proxys_balancer_state_as_it_is(tmp_path):
    """A delta that leaves svc0 alone (a pod of svc1 changes) keeps svc0's cluster as the same
    object, and the proxy's balancer state for it is not rebuilt (its endpoints, with their
    outlier and connection counts, stay the very objects they were)."""
    model = _cluster()
    _change(model, ("pod", 1, "shop", "node-1", "svc1", "v1"))
    _change(model, ("service", "svc1", "shop"))
    store = SnapshotStore("node-1", tmp_path)
    held = compile_shared(model).for_node("node-1")
    store.apply(held.model_dump(mode="json"), save=False)
    clusters = Clusters()
    assert store.tables is not None
    clusters.sync(store.tables.routes)
    key = next(k for k in store.tables.routes.clusters if k.hostname.startswith("svc0."))
    before = clusters.get(store.tables.routes.clusters[key]).endpoints

    _change(model, ("pod", 2, "shop", "node-2", "svc1", "v1"))
    new = compile_shared(model).for_node("node-1")
    delta = json.loads(json.dumps(snapshotdelta.diff(held, new, FIELDS)))
    assert "services" in delta  # svc1's endpoints changed, svc0's did not
    store.apply_delta(held.version, new.version, delta, save=False)
    clusters.sync(store.tables.routes)
    assert clusters.get(store.tables.routes.clusters[key]).endpoints is before
