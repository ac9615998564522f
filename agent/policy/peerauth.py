"""PeerAuthentication: which mTLS mode each workload accepts, with Istio's precedence.

A workload's mode comes from the most specific policy that says something: a
policy in its namespace whose selector matches it, then its namespace's policy
without a selector, then the mesh-wide policy (root namespace, no selector);
UNSET at one level defers to the next, and nothing at all means PERMISSIVE
(Istio's default). Port-level modes come only from the workload-specific policy
and fall back to the workload's mode. Among several matching selector policies
the first by name wins (Istio takes the oldest; we have no creation time).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `meshagent status` resolves modes without loading every model it can
    from meshagent.common.istio.security import PeerAuthentication

DEFAULT_MODE = "PERMISSIVE"
ROOT_NAMESPACE = "istio-system"


@dataclass(frozen=True)
class MtlsPolicy:
    mode: str  # STRICT | PERMISSIVE | DISABLE
    ports: Mapping[int, str] = field(default_factory=dict)  # port -> mode, where it differs

    def mode_for(self, port: int) -> str:
        return self.ports.get(port, self.mode)


def _selects(policy: PeerAuthentication, labels: Mapping[str, str]) -> bool:
    selector = policy.spec.selector
    wanted = selector.match_labels if selector else {}
    return all(labels.get(k) == v for k, v in wanted.items())


def resolve(
    policies: Iterable[PeerAuthentication],
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str = ROOT_NAMESPACE,
) -> MtlsPolicy:
    ordered = sorted(policies, key=lambda p: (p.namespace, p.name))
    specific = next(
        (
            p
            for p in ordered
            if p.namespace == namespace
            and p.spec.selector
            and p.spec.selector.match_labels
            and _selects(p, labels)
        ),
        None,
    )
    ns_wide = next((p for p in ordered if p.namespace == namespace and not _has_selector(p)), None)
    mesh_wide = next(
        (p for p in ordered if p.namespace == root_namespace and not _has_selector(p)), None
    )
    mode = DEFAULT_MODE
    for policy in (mesh_wide, ns_wide, specific):  # later levels override earlier ones
        if policy is not None and policy.mode != "UNSET":
            mode = policy.mode
    ports: dict[int, str] = {}
    if specific is not None and specific.spec.port_level_mtls:
        for port, mtls in specific.spec.port_level_mtls.items():
            if mtls.mode != "UNSET" and mtls.mode != mode:
                ports[int(port)] = mtls.mode
    return MtlsPolicy(mode, ports)


def _has_selector(policy: PeerAuthentication) -> bool:
    return bool(policy.spec.selector and policy.spec.selector.match_labels)
