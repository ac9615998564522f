"""Where the lab may bind a Pod without a node: kube-scheduler's node filters (nodeSelector,
required node affinity, taints and tolerations), as lab/placement.py applies them."""

from __future__ import annotations

from meshagent.lab.placement import fits, tolerates

NOT_READY = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}


def _node(name: str, labels: dict | None = None, taints: list | None = None) -> dict:
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": {"taints": taints or []}}


def _pod(**spec) -> dict:
    return {"metadata": {"name": "p", "namespace": "shop"}, "spec": spec}


def _required(*terms: dict) -> dict:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}
        }
    }


def test_a_daemonset_pod_fits_only_the_node_its_affinity_names():
    # what the DaemonSet controller writes into each pod it creates
    pod = _pod(
        affinity=_required(
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-2"]}]}
        )
    )
    assert not fits(pod, _node("node-1"))
    assert fits(pod, _node("node-2"))


def test_a_pod_without_constraints_fits_an_untainted_node_only():
    assert fits(_pod(), _node("node-1"))
    assert not fits(_pod(), _node("node-1", taints=[NOT_READY]))
    soft = {"key": "spot", "effect": "PreferNoSchedule"}
    assert fits(_pod(), _node("node-1", taints=[soft]))  # a preference, not a filter


def test_node_selector_needs_every_label():
    pod = _pod(nodeSelector={"zone": "a", "disk": "ssd"})
    assert fits(pod, _node("n", {"zone": "a", "disk": "ssd", "extra": "1"}))
    assert not fits(pod, _node("n", {"zone": "a"}))
    assert not fits(pod, _node("n", {"zone": "b", "disk": "ssd"}))


def test_terms_are_ored_and_requirements_within_a_term_anded():
    pod = _pod(
        affinity=_required(
            {
                "matchExpressions": [
                    {"key": "zone", "operator": "In", "values": ["a", "b"]},
                    {"key": "gpu", "operator": "DoesNotExist"},
                ]
            },
            {"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["8"]}]},
        )
    )
    assert fits(pod, _node("n", {"zone": "b"}))
    assert not fits(pod, _node("n", {"zone": "b", "gpu": "1"}))
    assert fits(pod, _node("n", {"zone": "c", "cores": "16"}))
    assert not fits(pod, _node("n", {"zone": "c", "cores": "8"}))
    assert not fits(pod, _node("n", {"cores": "many"}))


def test_not_in_and_exists_and_lt():
    pod = _pod(
        affinity=_required(
            {
                "matchExpressions": [
                    {"key": "tier", "operator": "NotIn", "values": ["edge"]},
                    {"key": "kubernetes.io/os", "operator": "Exists"},
                    {"key": "age", "operator": "Lt", "values": ["3"]},
                ]
            }
        )
    )
    assert fits(pod, _node("n", {"kubernetes.io/os": "linux", "age": "2"}))
    assert not fits(pod, _node("n", {"kubernetes.io/os": "linux", "age": "2", "tier": "edge"}))
    assert not fits(pod, _node("n", {"age": "2"}))
    assert not fits(pod, _node("n", {"kubernetes.io/os": "linux", "age": "3"}))


def test_an_empty_term_matches_no_node():
    assert not fits(_pod(affinity=_required({})), _node("n", {"a": "b"}))


def test_tolerations_match_by_key_value_and_effect():
    dedicated = {"key": "dedicated", "value": "mesh", "effect": "NoSchedule"}
    assert tolerates([{"key": "dedicated", "value": "mesh"}], [dedicated])
    assert tolerates([{"key": "dedicated", "operator": "Equal", "value": "mesh"}], [dedicated])
    assert not tolerates([{"key": "dedicated", "value": "other"}], [dedicated])
    assert not tolerates(
        [{"key": "dedicated", "value": "mesh", "effect": "NoExecute"}], [dedicated]
    )
    assert tolerates([{"key": "dedicated", "operator": "Exists"}], [dedicated])
    assert tolerates([{"operator": "Exists"}], [dedicated, NOT_READY])  # tolerates everything
    assert not tolerates([{"key": "dedicated", "operator": "Exists"}], [dedicated, NOT_READY])
    pod = _pod(tolerations=[{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}])
    assert fits(pod, _node("n", taints=[NOT_READY]))


class _BindingApi:
    """Records the bindings and the status conditions the scheduler posts."""

    def __init__(self) -> None:
        self.bound: dict[str, str] = {}
        self.conditions: dict[str, list[dict]] = {}

    def create(self, path: str, body: dict) -> dict:
        self.bound[body["metadata"]["name"]] = body["target"]["name"]
        return body

    def merge_patch(self, path: str, patch: dict) -> dict:
        self.conditions[path.split("/")[-2]] = patch["status"]["conditions"]
        return patch


def test_the_scheduler_binds_a_pod_to_a_fitting_node_and_keeps_the_others_pending():
    from meshagent.lab.kubelet import Scheduler
    from meshagent.lab.topology import make_nodes

    api = _BindingApi()
    scheduler = Scheduler(make_nodes(2), api)  # type: ignore[arg-type]
    scheduler.nodes_listed([_node("node-1"), _node("node-2", {"disk": "ssd"})])
    pinned = _pod(
        affinity=_required(
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}
        )
    )
    busy = [
        {"metadata": {"name": f"b{i}", "namespace": "shop"}, "spec": {"nodeName": "node-1"}}
        for i in range(3)
    ]
    pinned["metadata"]["name"] = "ds-pod"
    nowhere = _pod(nodeSelector={"disk": "nvme"})
    nowhere["metadata"]["name"] = "nowhere"
    scheduler.listed([*busy, pinned, nowhere])
    assert api.bound == {"ds-pod": "node-1"}  # not the less loaded node-2
    # the pending one says why, as kube-scheduler's condition does
    (condition,) = api.conditions["nowhere"]
    assert (condition["type"], condition["status"], condition["reason"]) == (
        "PodScheduled",
        "False",
        "Unschedulable",
    )
    assert condition["message"].startswith("0/2 nodes are available: no node matches")
    assert "ds-pod" not in api.conditions
    # a node that gets the label lets the pending pod be bound
    scheduler.node_event("MODIFIED", _node("node-2", {"disk": "nvme"}))
    assert api.bound == {"ds-pod": "node-1", "nowhere": "node-2"}
