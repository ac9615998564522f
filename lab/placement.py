"""Which nodes a Pod may be bound to, as kube-scheduler's filters decide (the lab has none).

The lab kubelet's scheduler and `meshlab apply` place a Pod without ``spec.nodeName`` only on
a node that passes the filters a real scheduler applies first: ``spec.nodeSelector``, the
required node affinity (``matchExpressions`` on the node's labels, ``matchFields`` on
``metadata.name``: how the DaemonSet controller pins each of its pods to its node) and the
node's NoSchedule/NoExecute taints against the pod's tolerations. Preferred affinity, pod
(anti-)affinity and resources are not weighed: the lab's nodes are alike and never full.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["NO_NODE_FITS", "fits", "matches_term", "tolerates"]

# Why a pod stays unplaced, in the words the scheduler's Unschedulable condition and
# `meshlab apply`'s refusal use.
NO_NODE_FITS = "no node matches its nodeSelector, required node affinity and tolerations"
_BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")


def _requirement_met(requirement: dict, value: str | None) -> bool:
    """One NodeSelectorRequirement against the node's value for its key (None: absent)."""
    operator = requirement.get("operator")
    values = requirement.get("values") or []
    if operator == "In":
        return value is not None and value in values
    if operator == "NotIn":
        return value is None or value not in values
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    if operator in ("Gt", "Lt"):
        try:
            have, bound = int(value or ""), int(values[0])
        except (ValueError, IndexError):
            return False
        return have > bound if operator == "Gt" else have < bound
    return False  # an operator the API would have refused


def matches_term(term: dict, node: dict) -> bool:
    """A NodeSelectorTerm: all its requirements hold; an empty term matches no node."""
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    field_values = {"metadata.name": meta.get("name")}
    return all(_requirement_met(r, labels.get(r.get("key", ""))) for r in expressions) and all(
        _requirement_met(r, field_values.get(r.get("key", ""))) for r in fields
    )


def _toleration_matches(toleration: dict, taint: dict) -> bool:
    effect = toleration.get("effect")
    if effect and effect != taint.get("effect"):
        return False
    if toleration.get("operator", "Equal") == "Exists":
        return not toleration.get("key") or toleration.get("key") == taint.get("key")
    return toleration.get("key") == taint.get("key") and (toleration.get("value") or "") == (
        taint.get("value") or ""
    )


def tolerates(tolerations: Iterable[dict], taints: Iterable[dict]) -> bool:
    """Whether every NoSchedule/NoExecute taint is matched by one of the tolerations."""
    tolerations = list(tolerations)
    return all(
        any(_toleration_matches(t, taint) for t in tolerations)
        for taint in taints
        if taint.get("effect") in _BLOCKING_EFFECTS
    )


def fits(pod: dict, node: dict) -> bool:
    """Whether kube-scheduler's node filters would let ``pod`` onto ``node`` (Node objects)."""
    spec = pod.get("spec") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    if any(labels.get(key) != value for key, value in (spec.get("nodeSelector") or {}).items()):
        return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    if required and not any(
        matches_term(term, node) for term in required.get("nodeSelectorTerms") or []
    ):
        return False
    return tolerates(spec.get("tolerations") or [], (node.get("spec") or {}).get("taints") or [])
