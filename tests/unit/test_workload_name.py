"""A pod's workload by Istio's rules (GetDeployMetaFromPod): what source_workload and
destination_workload say, so that replicas share one series."""

import pytest
from meshagent.agent.telemetry.labels import peer_from_workload
from meshagent.common.snapshot import Workload
from meshagent.common.workloadname import WorkloadRef, pod_workload


def _pod(name, *, generate="", owner=None, labels=None, controller=True):
    meta = {"name": name, "namespace": "shop", "labels": labels or {}}
    if generate:
        meta["generateName"] = generate
    if owner:
        kind, owner_name = owner
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": kind, "name": owner_name, "controller": controller}
        ]
    return {"metadata": meta}


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        # Deployment via its ReplicaSet <deployment>-<pod-template-hash>
        (
            _pod(
                "reviews-v1-7d8f9c5b6-x2k9p",
                generate="reviews-v1-7d8f9c5b6-",
                owner=("ReplicaSet", "reviews-v1-7d8f9c5b6"),
                labels={"pod-template-hash": "7d8f9c5b6"},
            ),
            WorkloadRef("reviews-v1", "Deployment"),
        ),
        # a ReplicaSet of its own (no template hash): the ReplicaSet
        (
            _pod("rs-abcde", generate="rs-", owner=("ReplicaSet", "rs")),
            WorkloadRef("rs", "ReplicaSet"),
        ),
        # an Argo Rollout's ReplicaSet
        (
            _pod(
                "canary-6f7d8-zzq2p",
                generate="canary-6f7d8-",
                owner=("ReplicaSet", "canary-6f7d8"),
                labels={"rollouts-pod-template-hash": "6f7d8"},
            ),
            WorkloadRef("canary", "Rollout"),
        ),
        # StatefulSet: the set's name, not the ordinal pod name
        (
            _pod("db-1", generate="db-", owner=("StatefulSet", "db")),
            WorkloadRef("db", "StatefulSet"),
        ),
        # DaemonSet
        (
            _pod("fluent-bit-4x9zq", generate="fluent-bit-", owner=("DaemonSet", "fluent-bit")),
            WorkloadRef("fluent-bit", "DaemonSet"),
        ),
        # Job, and a CronJob's Job <cronjob>-<scheduled minutes> (8 to 11 digits)
        (
            _pod("migrate-x7k2p", generate="migrate-", owner=("Job", "migrate")),
            WorkloadRef("migrate", "Job"),
        ),
        (
            _pod(
                "backup-28934520-q8w4z",
                generate="backup-28934520-",
                owner=("Job", "backup-28934520"),
            ),
            WorkloadRef("backup", "CronJob"),
        ),
        (
            _pod("v-123-q8w4z", generate="v-123-", owner=("Job", "v-123")),
            WorkloadRef("v-123", "Job"),
        ),
        # OpenShift DeploymentConfig via its ReplicationController
        (
            _pod(
                "app-3-x8k2p",
                generate="app-3-",
                owner=("ReplicationController", "app-3"),
                labels={"deploymentconfig": "app"},
            ),
            WorkloadRef("app", "DeploymentConfig"),
        ),
        # bare pods are their own workload, however their name looks
        (_pod("checkout-5b8c7d9f4-q2w5z"), WorkloadRef("checkout-5b8c7d9f4-q2w5z", "Pod")),
        (_pod("frontend", labels={"app": "web"}), WorkloadRef("frontend", "Pod")),
        # a name not generated: its own workload even with an owner (as in Istio)
        (_pod("db-0", owner=("StatefulSet", "db")), WorkloadRef("db-0", "Pod")),
        # generated, but no controlling owner: itself
        (
            _pod("x-abcde", generate="x-", owner=("ReplicaSet", "x"), controller=False),
            WorkloadRef("x-abcde", "Pod"),
        ),
        (_pod("y-abcde", generate="y-"), WorkloadRef("y-abcde", "Pod")),
    ],
)
def test_pod_workload_follows_istio(pod, expected):
    assert pod_workload(pod) == expected


def test_malformed_owner_references_leave_the_pod_its_own_workload():
    pod = _pod("z-abcde", generate="z-")
    pod["metadata"]["ownerReferences"] = ["nonsense", {"controller": True}]
    assert pod_workload(pod) == WorkloadRef("z-abcde", "Pod")


def _workload(**kw):
    return Workload(uid="u", namespace="shop", node="n", ips=["10.0.0.1"], **kw)


def test_metrics_take_the_controllers_workload_name_over_the_pods_labels():
    peer = peer_from_workload(_workload(name="db-1", workload_name="db", labels={}))
    assert (peer.workload, peer.canonical_service, peer.app) == ("db", "db", "db")
    # from an older controller (no workload_name), the labels still fold replicas
    old = peer_from_workload(
        _workload(name="web-5b8c7d9f4-q2w5z", labels={"pod-template-hash": "5b8c7d9f4"})
    )
    assert old.workload == "web"


def test_canonical_labels_name_the_service_and_revision_before_the_workload():
    labels = {"app.kubernetes.io/name": "shop-ui", "app.kubernetes.io/version": "2.1", "app": "x"}
    peer = peer_from_workload(_workload(name="ui-0", workload_name="ui", labels=labels))
    assert (peer.workload, peer.app, peer.version) == ("ui", "shop-ui", "2.1")
    assert (peer.canonical_service, peer.canonical_revision) == ("shop-ui", "2.1")
