"""A pod's workload (name and kind) as Istio derives it, so replicas share metric series.

What flows through: a Pod object (a dict as the Kubernetes API or a manifest gives it) in; its
workload's name and kind out. The controller stamps the name on each snapshot `Workload`
(`workload_name`), and the agents' metrics label ``source_workload``/``destination_workload``
with it (`meshagent.agent.telemetry.labels`).

The rules are Istio's (``GetDeployMetaFromPod`` in istio's pkg/kube), so dashboards built for
Istio group the same pods:

- only a pod whose name was generated (``metadata.generateName`` set) is looked into; any
  other pod is a bare pod, its own workload, even with an owner;
- its controlling owner reference (``controller: true``) names the workload and its kind:
  ReplicaSet, StatefulSet, DaemonSet, Job, ...;
- a ReplicaSet whose name ends with the pod's ``pod-template-hash`` label is a Deployment's:
  the workload is the ReplicaSet's name without ``-<hash>`` (``rollouts-pod-template-hash``:
  an Argo Rollout's, likewise);
- a ReplicationController with a ``deploymentconfig`` label is an OpenShift DeploymentConfig
  of that name;
- a Job named ``<name>-<8 to 11 digits>`` (the scheduled time in minutes) is a CronJob's:
  the workload is ``<name>``;
- with no controlling owner, the pod's own name (kind ``Pod``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["WorkloadRef", "pod_workload"]

_CRONJOB_JOB_RE = re.compile(r"(.+)-\d{8,11}\Z")


class WorkloadRef(NamedTuple):
    name: str
    kind: str


def _controller(owners: Any) -> Mapping[str, Any] | None:
    for ref in owners if isinstance(owners, list) else ():
        if isinstance(ref, Mapping) and ref.get("controller") is True and ref.get("name"):
            return ref
    return None


def pod_workload(pod: Mapping[str, Any]) -> WorkloadRef:
    """The workload of `pod` by Istio's rules (module docstring)."""
    meta = pod.get("metadata") or {}
    name = str(meta.get("name") or "")
    own = WorkloadRef(name, "Pod")
    if not meta.get("generateName"):
        return own
    ref = _controller(meta.get("ownerReferences"))
    if ref is None:
        return own
    labels = meta.get("labels") or {}
    owner, kind = str(ref["name"]), str(ref.get("kind") or "")
    if kind == "ReplicaSet":
        for label, workload_kind in (
            ("pod-template-hash", "Deployment"),
            ("rollouts-pod-template-hash", "Rollout"),
        ):
            suffix = str(labels.get(label) or "")
            if suffix and owner.endswith(suffix):
                return WorkloadRef(owner.removesuffix(f"-{suffix}"), workload_kind)
    elif kind == "ReplicationController" and labels.get("deploymentconfig"):
        return WorkloadRef(str(labels["deploymentconfig"]), "DeploymentConfig")
    elif kind == "Job":
        cron = _CRONJOB_JOB_RE.match(owner)
        if cron:
            return WorkloadRef(cron.group(1), "CronJob")
    return WorkloadRef(owner, kind)
