"""A DENY AuthorizationPolicy the controller refuses still denies: fail closed.

The admission webhook keeps invalid Istio resources out of the cluster, but one can still
get in: applied while the webhook was off (deleted, or the controller down under a
`failurePolicy: Ignore` someone chose), or written before an upgrade narrowed the subset.
The controller refuses it (`meshctl status`, `meshagent_controller_rejected_resources`) and
leaves it out of the snapshot. For an ALLOW or AUDIT policy that errs on the side the user
can see; for a DENY it silently lets through exactly what the user meant to stop.

So a refused AuthorizationPolicy whose ``spec.action`` reads ``DENY`` (and that is not a
dry run) is compiled into a synthetic policy named ``<name>.unenforceable`` in the same
namespace: ``action: DENY`` with one empty rule (deny everything) and the original's
selector. The agents evaluate it like any policy: its namespace's workloads that the
selector picks, or every workload of the mesh when the namespace is the root namespace.
When the selector itself cannot be read (not a ``matchLabels`` map of strings), which
workloads it meant is unknown, so the deny holds for every workload of its namespace.
Each one is listed by `meshctl status` (``unenforceable``), counted by the gauge
`meshagent_controller_unenforceable_policies` (one series per policy, value 1) and logged
once; fixing or deleting the policy lifts it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshagent.common.istio import ResourceError, parse_resource
from meshagent.common.istio.base import DRY_RUN_ANNOTATION, WorkloadSelector, parse_go_bool
from meshagent.common.istio.security import SECURITY_API_VERSIONS
from pydantic import ValidationError

SUFFIX = ".unenforceable"
ANNOTATION = "meshagent.io/unenforceable"
DEFAULT_API_VERSION = "security.istio.io/v1"


@dataclass(frozen=True)
class Unenforceable:
    """A refused DENY AuthorizationPolicy and the deny-all that stands in for it."""

    namespace: str
    name: str
    api_version: str
    selector: dict[str, str] | None  # matchLabels; None: every workload of the namespace
    selector_readable: bool
    reason: str  # why the policy was refused (field path first)

    @property
    def policy_name(self) -> str:
        return f"{self.name}{SUFFIX}"

    def manifest(self) -> dict[str, Any]:
        """The synthetic policy, as the snapshot carries Istio resources."""
        spec: dict[str, Any] = {"action": "DENY", "rules": [{}]}
        if self.selector:
            spec["selector"] = {"matchLabels": dict(self.selector)}
        return {
            "apiVersion": self.api_version,
            "kind": "AuthorizationPolicy",
            "metadata": {
                "name": self.policy_name,
                "namespace": self.namespace,
                "annotations": {ANNOTATION: self.reason},
            },
            "spec": spec,
        }

    def as_dict(self, workloads: Iterable[str] = ()) -> dict[str, Any]:
        """For `/status`: which policy, what it now denies and why."""
        return {
            "resource": f"AuthorizationPolicy {self.namespace}/{self.name}",
            "policy": f"{self.namespace}/{self.policy_name}",
            "namespace": self.namespace,
            "selector": self.selector,
            "selector_readable": self.selector_readable,
            "workloads": sorted(workloads),
            "reason": self.reason,
        }

    def selects(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in (self.selector or {}).items())


def _reason(error: ResourceError) -> str:
    return "; ".join(f"{path}: {msg}" if path else msg for path, msg in error.problems)


def _read_selector(spec: Mapping[str, Any]) -> tuple[dict[str, str] | None, bool]:
    raw = spec.get("selector")
    if raw is None:
        return None, True
    try:
        selector = WorkloadSelector.model_validate(raw)
    except ValidationError:
        return None, False
    return dict(selector.match_labels) or None, True


def unenforceable_deny(
    obj: Mapping[str, Any], error: ResourceError, default_namespace: str = "default"
) -> Unenforceable | None:
    """The deny-all standing in for refused object ``obj`` (``error`` says why), or None
    when it is not an enforced DENY AuthorizationPolicy (nothing to fail closed on)."""
    if obj.get("kind") != "AuthorizationPolicy":
        return None
    spec = obj.get("spec")
    if not isinstance(spec, Mapping) or spec.get("action") != "DENY":
        return None
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    annotations = meta.get("annotations")
    if isinstance(annotations, Mapping):
        dry_run = annotations.get(DRY_RUN_ANNOTATION)
        if isinstance(dry_run, str) and parse_go_bool(dry_run) is True:
            return None  # a dry run is never enforced, valid or not
    name, namespace = meta.get("name"), meta.get("namespace") or default_namespace
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return None  # the API server never gives such an object
    api_version = obj.get("apiVersion")
    if api_version not in SECURITY_API_VERSIONS:
        api_version = DEFAULT_API_VERSION
    selector, readable = _read_selector(spec)
    return Unenforceable(namespace, name, str(api_version), selector, readable, _reason(error))


def unenforceable_policies(
    objects: Iterable[Mapping[str, Any]], default_namespace: str = "default"
) -> list[Unenforceable]:
    """Every refused enforced DENY among ``objects`` (AuthorizationPolicy dicts), sorted."""
    out = []
    for obj in objects:
        try:
            parse_resource(obj, default_namespace)
        except ResourceError as exc:
            found = unenforceable_deny(obj, exc, default_namespace)
            if found is not None:
                out.append(found)
    return sorted(out, key=lambda u: (u.namespace, u.name))
