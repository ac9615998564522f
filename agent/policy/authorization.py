"""Authorization at the destination: every connection (and, on HTTP ports, every request)
to a local meshed pod is checked against the AuthorizationPolicies that select it.

Used by the inbound tunnel handler (cross-node traffic: the source identity comes
from the peer certificate) and by the same-node path (the source is a local pod
whose identity the node knows). Dry-run policies are evaluated and their would-be
denials counted and logged, never enforced.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from meshagent.common import authz
from meshagent.common.snapshot import Workload
from meshagent.common.spiffe import Identity

log = logging.getLogger(__name__)


@dataclass
class AuthzStats:
    allowed: int = 0
    denied: int = 0
    dry_run_denied: int = 0
    denials: Counter = field(default_factory=Counter)  # (source, destination, policy) -> count
    recent: list[dict] = field(default_factory=list)  # the last few denials, for status

    def record_denial(self, entry: dict) -> None:
        self.recent.append(entry)
        del self.recent[:-20]


class DestinationPolicies:
    """The policies that select one destination workload, kept while the PolicySet (the
    snapshot's) stays the same: a connection's per-request checks then skip the selection."""

    __slots__ = ("_policies", "_selected", "destination")

    def __init__(self, destination: Workload) -> None:
        self.destination = destination
        self._policies: authz.PolicySet | None = None
        self._selected: authz.WorkloadPolicies | None = None

    def get(self, policies: authz.PolicySet) -> authz.WorkloadPolicies:
        if policies is not self._policies or self._selected is None:
            d = self.destination
            self._selected = policies.for_workload(authz.Workload(d.namespace, d.labels))
            self._policies = policies
        return self._selected


def applies(selected: authz.WorkloadPolicies) -> bool:
    """Whether any policy (enforced, audit or dry-run) selects the workload; when none does,
    every request is allowed and its attributes are never read."""
    return bool(
        selected.deny
        or selected.allow
        or selected.audit
        or selected.custom
        or selected.dry_deny
        or selected.dry_allow
    )


def attributes(
    source: Identity | None,
    source_ip: str,
    destination_ip: str,
    port: int,
    http: authz.HttpAttrs | None,
) -> authz.Request:
    """What the policies see of a connection (`http` None) or request."""
    return authz.Request(
        source_principal=source.principal if source else None,
        source_namespace=source.namespace if source else None,
        source_ip=source_ip,
        destination_ip=destination_ip,
        destination_port=port,
        http=http,
    )


def check(
    policies: authz.PolicySet,
    stats: AuthzStats,
    *,
    source: Identity | None,
    source_ip: str,
    destination: Workload,
    destination_ip: str,
    port: int,
    http: authz.HttpAttrs | None = None,
    selected: authz.WorkloadPolicies | None = None,
) -> authz.Decision:
    """Decide a connection (`http` None) or an HTTP request to `destination`, count it and
    log denials. `selected`: the destination's policies out of `policies`, when the caller
    keeps them (`DestinationPolicies`)."""
    request = attributes(source, source_ip, destination_ip, port, http)
    if selected is not None:
        decision = selected.evaluate(request)
    else:
        target = authz.Workload(destination.namespace, destination.labels)
        decision = policies.evaluate(target, request)
    if decision.allowed and not decision.dry_run_denials:
        stats.allowed += 1
        return decision
    who = source.uri if source else source_ip
    dest = f"{destination.namespace}/{destination.name}:{port}"
    for would in decision.dry_run_denials:
        stats.dry_run_denied += 1
        log.info(
            "dry-run: %s -> %s would be denied by %s: %s", who, dest, would.policy, would.reason
        )
    if decision.allowed:
        stats.allowed += 1
    else:
        stats.denied += 1
        stats.denials[(who, dest, decision.policy or "")] += 1
        stats.record_denial(
            {
                "time": round(time.time(), 3),  # workers' lists are merged in time order
                "source": who,
                "destination": dest,
                "policy": decision.policy,
                "reason": decision.reason,
            }
        )
        log.warning("denied %s -> %s by %s: %s", who, dest, decision.policy, decision.reason)
    return decision
