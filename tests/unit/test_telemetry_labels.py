"""Istio's labels from snapshot workloads and services: the names dashboards group by."""

import pytest
from meshagent.agent.telemetry.labels import (
    HTTP_LABELS,
    TCP_LABELS,
    UNKNOWN_PEER,
    ConnectionLabels,
    Peer,
    local_hop_security,
    peer_from_workload,
    service_ref,
    workload_name,
)
from meshagent.common.snapshot import Service, ServicePort, Workload
from meshagent.common.spiffe import Identity


@pytest.mark.parametrize(
    ("pod", "labels", "expected"),
    [
        # Deployment: <deployment>-<pod-template-hash>-<random>
        ("reviews-v1-7d8f9c5b6-x2k9p", {"pod-template-hash": "7d8f9c5b6"}, "reviews-v1"),
        # the hash label wins over a name that only looks generated
        ("web-bcdfgh-zz", {"pod-template-hash": "bcdfgh"}, "web"),
        # Job, and a CronJob's job (<cronjob>-<scheduled minutes>)
        ("migrate-x7k2p", {"job-name": "migrate"}, "migrate"),
        ("backup-28934520-q8w4z", {"job-name": "backup-28934520"}, "backup"),
        # StatefulSet: <statefulset>-<ordinal>
        ("db-2", {"statefulset.kubernetes.io/pod-name": "db-2"}, "db"),
        # DaemonSet: <daemonset>-<random>
        (
            "fluent-bit-4x9zq",
            {"controller-revision-hash": "6b9f", "pod-template-generation": "1"},
            "fluent-bit",
        ),
        # no controller labels, but shaped like a Deployment's pod
        ("checkout-5b8c7d9f4-q2w5z", {}, "checkout"),
        # bare pods are their own workload, as in Istio (the app label is not the workload)
        ("reviews-v1", {"app": "reviews"}, "reviews-v1"),
        ("frontend", {}, "frontend"),
        # vowels never appear in generated suffixes: a plain hyphenated name stays whole
        ("order-service-api", {}, "order-service-api"),
    ],
)
def test_workload_name_is_the_owning_controller(pod, labels, expected):
    assert workload_name(pod, labels) == expected


def _workload(**kw):
    base = dict(uid="u1", namespace="shop", name="reviews-v1", node="node-2", ips=["10.1.2.3"])
    base.update(kw)
    return Workload(**base)


def test_peer_from_a_lab_pod_follows_istio():
    peer = peer_from_workload(
        _workload(service_account="reviews", labels={"app": "reviews", "version": "v1"})
    )
    assert peer == Peer(
        workload="reviews-v1",
        workload_namespace="shop",
        principal="spiffe://cluster.local/ns/shop/sa/reviews",
        app="reviews",
        version="v1",
        canonical_service="reviews",
        canonical_revision="v1",
        cluster="Kubernetes",
    )


def test_peer_without_app_labels_falls_back_like_istio():
    peer = peer_from_workload(_workload(name="frontend", labels={}), trust_domain="corp.example")
    assert (peer.app, peer.version) == ("frontend", "latest")
    assert peer.principal == "spiffe://corp.example/ns/shop/sa/default"


def test_canonical_labels_take_precedence():
    labels = {
        "app": "a",
        "version": "v",
        "app.kubernetes.io/name": "k8s-name",
        "service.istio.io/canonical-name": "canon",
        "service.istio.io/canonical-revision": "r7",
    }
    peer = peer_from_workload(_workload(labels=labels))
    assert (peer.canonical_service, peer.canonical_revision) == ("canon", "r7")


def test_principal_from_the_handshake_replaces_the_expected_one():
    peer = peer_from_workload(_workload())
    proven = Identity("cluster.local", "shop", "other")
    assert peer.with_principal(proven).principal == "spiffe://cluster.local/ns/shop/sa/other"
    assert peer.with_principal(None).principal == "unknown"


def test_service_ref_is_the_fqdn():
    svc = Service(
        namespace="shop",
        name="reviews",
        vips=["10.96.0.7"],
        ports=[ServicePort(port=9080, target_port=9080)],
    )
    ref = service_ref(svc)
    assert (ref.hostname, ref.name, ref.namespace) == (
        "reviews.shop.svc.cluster.local",
        "reviews",
        "shop",
    )


def test_connection_labels_fill_every_istio_label_in_order():
    labels = ConnectionLabels("destination", connection_security_policy="mutual_tls")
    as_dict = labels.as_dict()
    assert len(labels.values) == len(TCP_LABELS) - 1  # response_flags comes with each report
    assert as_dict["reporter"] == "destination"
    assert as_dict["source_workload"] == "unknown"
    assert as_dict["connection_security_policy"] == "mutual_tls"
    assert as_dict["request_protocol"] == "tcp"
    assert HTTP_LABELS[: len(TCP_LABELS)] == TCP_LABELS


def test_connection_labels_are_equal_and_hash_alike_when_built_alike():
    a = ConnectionLabels("source", UNKNOWN_PEER, Peer(workload="x"))
    b = ConnectionLabels("source", UNKNOWN_PEER, Peer(workload="x"))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != ConnectionLabels("destination", UNKNOWN_PEER, Peer(workload="x"))


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("reporter", {"reporter": "client"}),
        ("request_protocol", {"reporter": "source", "request_protocol": "udp"}),
        ("connection_security_policy", {"reporter": "source", "connection_security_policy": "tls"}),
    ],
)
def test_bad_label_values_are_refused_by_name(field, kwargs):
    with pytest.raises(ValueError, match=field):
        ConnectionLabels(**kwargs)


def test_a_node_local_hop_between_meshed_pods_is_mutual_tls():
    meshed_here = _workload(node="node-2", meshed=True)
    assert local_hop_security(True, meshed_here, "node-2") == "mutual_tls"
    # an unknown source, a pod outside the mesh, an address that is no pod, another node
    assert local_hop_security(False, meshed_here, "node-2") == "none"
    assert local_hop_security(True, _workload(node="node-2", meshed=False), "node-2") == "none"
    assert local_hop_security(True, None, "node-2") == "none"
    assert local_hop_security(True, meshed_here, "node-1") == "none"


def test_a_workloads_peer_is_made_once_and_a_new_snapshots_object_is_read_again():
    first = _workload(labels={"app": "reviews", "version": "v1"})
    assert peer_from_workload(first) is peer_from_workload(first)  # the second is a lookup
    # the pod relabelled: the next snapshot's object, equal uid, new labels
    again = _workload(labels={"app": "reviews", "version": "v2"})
    assert peer_from_workload(again).version == "v2"
    assert peer_from_workload(first).version == "v1"
    # the trust domain is part of what the peer says
    other_domain = peer_from_workload(first, trust_domain="corp.example")
    assert other_domain.principal == "spiffe://corp.example/ns/shop/sa/default"
