"""Validation of the Istio resources in the cluster model.

The model holds raw object dicts (from manifest files or the Kubernetes API); every object of
a supported Istio kind flows through `parse_resource` and comes out either as a typed resource
(accepted, for the compiler) or as a ResourceError (rejected, for `/status`, the
`meshagent_controller_rejected_resources` gauge and one ERROR log line). A bad resource is
rejected alone: the others still apply, so one typo never takes down a namespace's policy.
A resource that does not concern the mesh (a VirtualService bound to gateways only, an
`exportTo` narrower than every namespace, hosts outside the cluster) is skipped: left out like
a rejected one, but logged once as a WARNING and listed under `skipped`, not counted as an error.
A rejected DENY AuthorizationPolicy fails closed (controller/failclosed.py): the validator
lists it in `unenforceable`, sets `meshagent_controller_unenforceable_policies` and logs it.
"""

from __future__ import annotations

import logging

import trio
from meshagent.common.istio import (
    SUPPORTED_KINDS,
    IstioResource,
    ResourceError,
    ResourceSkipped,
    parse_resource,
)
from meshagent.controller.failclosed import Unenforceable, unenforceable_policies
from meshagent.controller.model import ClusterModel
from meshagent.controller.serviceentry import model_entry_hosts
from prometheus_client import Gauge

log = logging.getLogger(__name__)

REJECTED = Gauge(
    "meshagent_controller_rejected_resources",
    "Istio resources in the cluster that the controller currently refuses, by kind "
    "(see `meshctl status` for which field of which resource, and why).",
    ["kind"],
)
UNENFORCEABLE = Gauge(
    "meshagent_controller_unenforceable_policies",
    "Refused DENY AuthorizationPolicies the mesh enforces as deny-all for the workloads they "
    "select (fail closed), one series of value 1 per policy; `meshctl status` says why.",
    ["namespace", "name"],
)

# Kubernetes' default for objects that do not say their namespace (as `kubectl apply`).
DEFAULT_NAMESPACE = "default"


def resource_name(error: ResourceError) -> str:
    """`Kind namespace/name`, as users see it in logs, `/status` and `meshctl`."""
    return f"{error.kind} {error.namespace}/{error.name}"


def reason(error: ResourceError) -> str:
    """Everything wrong with the resource, the first problem without its path (which is
    reported separately) and any further ones with theirs."""
    (_path, first), *more = error.problems
    return "; ".join(
        [first, *(f"{path}: {message}" if path else message for path, message in more)]
    )


def validate_model(model: ClusterModel) -> tuple[list[IstioResource], list[ResourceError]]:
    """Parse every object of the supported Istio kinds in the model. Returns (accepted,
    rejected), each sorted by kind, namespace and name; skipped resources are in neither
    (`classify_model`). Never raises for bad objects."""
    accepted, rejected, _skipped = classify_model(model)
    return accepted, rejected


def classify_model(
    model: ClusterModel,
) -> tuple[list[IstioResource], list[ResourceError], list[ResourceSkipped]]:
    """(accepted, rejected, skipped), each sorted by kind, namespace and name."""
    accepted: list[IstioResource] = []
    rejected: list[ResourceError] = []
    skipped: list[ResourceSkipped] = []
    entry_hosts = model_entry_hosts(model)
    for kind in sorted(SUPPORTED_KINDS):
        for obj in model.objects(kind):
            try:
                accepted.append(parse_resource(obj, DEFAULT_NAMESPACE, entry_hosts))
            except ResourceSkipped as exc:
                skipped.append(exc)
            except ResourceError as exc:
                rejected.append(exc)
    accepted.sort(key=lambda r: (r.kind, r.namespace, r.name))
    rejected.sort(key=lambda e: (e.kind, e.namespace, e.name))
    skipped.sort(key=lambda e: (e.kind, e.namespace, e.name))
    return accepted, rejected, skipped


class Validator:
    """The last validation result of one model, and the effects of a change in it: the gauge
    follows the current rejections, and each new rejection is logged once (again only when its
    message changes), so a resource that stays broken does not flood the log."""

    def __init__(self) -> None:
        self.accepted: list[IstioResource] = []
        self.rejected: list[ResourceError] = []
        self.skipped: list[ResourceSkipped] = []
        self.unenforceable: list[Unenforceable] = []
        self.generation: int | None = None  # the model generation the result reflects

    def run(self, model: ClusterModel) -> None:
        accepted, rejected, skipped = classify_model(model)
        seen = {str(e) for e in self.skipped}
        for notice in skipped:
            if str(notice) not in seen:
                log.warning("skipped %s", notice)
        self.skipped = skipped
        before = {str(e) for e in self.rejected}
        for error in rejected:
            if str(error) not in before:
                log.error("rejected %s", error)
        now = {resource_name(e) for e in rejected}
        for error in self.rejected:
            if resource_name(error) not in now:
                log.info("%s is no longer rejected", resource_name(error))
        for kind in SUPPORTED_KINDS:
            REJECTED.labels(kind=kind).set(sum(e.kind == kind for e in rejected))
        self.accepted, self.rejected = accepted, rejected
        self._fail_closed(unenforceable_policies(model.objects("AuthorizationPolicy")))
        self.generation = model.generation

    def _fail_closed(self, unenforceable: list[Unenforceable]) -> None:
        before = {(u.namespace, u.name) for u in self.unenforceable}
        now = {(u.namespace, u.name) for u in unenforceable}
        for u in unenforceable:
            if (u.namespace, u.name) not in before:
                scope = (
                    f"workloads with labels {u.selector}"
                    if u.selector
                    else "every workload"
                    + ("" if u.selector_readable else " (its selector cannot be read)")
                )
                log.error(
                    "DENY AuthorizationPolicy %s/%s cannot be enforced as written: denying all"
                    " traffic to %s of namespace %s instead (fail closed, policy %s)",
                    u.namespace,
                    u.name,
                    scope,
                    u.namespace,
                    u.policy_name,
                )
            UNENFORCEABLE.labels(namespace=u.namespace, name=u.name).set(1)
        for namespace, name in before - now:
            UNENFORCEABLE.remove(namespace, name)
            log.info("AuthorizationPolicy %s/%s no longer fails closed", namespace, name)
        self.unenforceable = unenforceable

    async def serve(
        self, model: ClusterModel, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Validate now, say started, then again after every change of the model."""
        seen = model.generation
        self.run(model)
        task_status.started()
        while True:
            seen = await model.wait_changed(seen)
            self.run(model)
