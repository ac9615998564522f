"""Policy reaches live connections: the open L4 connections and what authorized them,
checked again against every new snapshot (issue #17 item 1; ztunnel does the same since
Istio 1.22).

What flows through: a proxy path registers a connection for as long as it relays bytes
(`LiveConnections.track`), with a check that says, for a snapshot's `Tables`, why the
connection may no longer go on (None: it may). `reevaluate` runs every check when a
snapshot is swapped in and cancels the relay of each connection that fails its check: the
path then closes both ends as on any other end of the relay (the client sees its connection
end within the same event-loop turn, well inside the 2 s the issue asks for). Connections
still allowed are not touched. Each close is logged (rate-limited) and counted by kind in
``meshagent_connections_closed_by_policy_total``.

Kinds of `Verdict`: ``denied`` (an AuthorizationPolicy no longer allows it),
``destination_left_mesh`` (the pod is no longer a meshed pod of this node: the inbound
side would refuse it now), ``source_left_mesh`` (the client pod left the mesh: its identity
is withdrawn), ``mtls_required`` (plaintext to another node's pod whose PeerAuthentication
no longer says DISABLE; new connections go through HBONE).

A plaintext connection from outside the mesh to a pod that turns STRICT never passes through
the proxy, so it is not here: the pod's ingress program drops only new connections (SYNs).

HTTP connections are not registered: every request on them is authorized when it comes (a
DENY answers the next request 403), and an idle keep-alive connection carries nothing a
policy could forbid, so it is left to end as HTTP connections do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import trio
from meshagent.agent.policy import authorization
from meshagent.agent.policy.authorization import AuthzStats
from meshagent.agent.telemetry.ratelog import RateLimitedLog
from meshagent.common.snapshot import Workload
from meshagent.common.spiffe import Identity, workload_identity
from prometheus_client import Counter

if TYPE_CHECKING:
    from meshagent.agent.state import Tables

__all__ = [
    "Check",
    "LiveConnection",
    "LiveConnections",
    "Verdict",
    "all_of",
    "destination_check",
    "plaintext_check",
    "source_check",
    "source_left_check",
]

log = logging.getLogger(__name__)

CLOSED_BY_POLICY = Counter(
    "meshagent_connections_closed_by_policy",
    "Open connections the proxy closed because a new snapshot no longer allows them, by kind"
    " (denied, destination_left_mesh, source_left_mesh, mtls_required).",
    ("kind",),
)


class Verdict(NamedTuple):
    """Why a connection must end now: a `kind` (the metric's label) and the details."""

    kind: str
    detail: str


Check = Callable[["Tables"], "Verdict | None"]


def all_of(*checks: Check | None) -> Check:
    """One check made of several (None entries are skipped): the first verdict wins."""
    present = [c for c in checks if c is not None]

    def check(tables: Tables) -> Verdict | None:
        for one in present:
            verdict = one(tables)
            if verdict is not None:
                return verdict
        return None

    return check


class LiveConnection:
    """One open connection registered while inside (`LiveConnections.track`); a class, not a
    generator context manager, as every open L4 connection holds one."""

    __slots__ = ("_open", "check", "closed_by", "description", "scope")

    def __init__(self, description: str, check: Check, registry: set[LiveConnection]) -> None:
        self.description = description  # "source -> destination:port", for the log line
        self.check = check
        self.scope = trio.CancelScope()
        self.closed_by: Verdict | None = None  # set once policy ended it
        self._open = registry

    def __enter__(self) -> LiveConnection:
        self._open.add(self)
        self.scope.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool:
        self._open.discard(self)
        return self.scope.__exit__(*exc)


class LiveConnections:
    """The registry of one proxy process (one per `DataPlane`); single-threaded (trio)."""

    def __init__(self) -> None:
        self._open: set[LiveConnection] = set()
        self._log = RateLimitedLog(log)
        self.closed: dict[str, int] = {}  # kind -> connections closed (for status)

    def __len__(self) -> int:
        return len(self._open)

    def track(self, description: str, check: Check) -> LiveConnection:
        """Run the body (the relay) as a registered connection; a failed check cancels the
        body, which ends normally here (look at ``closed_by`` to tell)."""
        return LiveConnection(description, check, self._open)

    def reevaluate(self, tables: Tables) -> list[Verdict]:
        """Check every open connection against ``tables``; cancel those that fail. Returns
        the verdicts of the connections closed now."""
        closed: list[Verdict] = []
        for conn in list(self._open):
            if conn.closed_by is not None:
                continue
            try:
                verdict = conn.check(tables)
            except Exception:  # a bug in one check leaves that connection as it was
                log.exception("re-checking %s against the new snapshot failed", conn.description)
                continue
            if verdict is None:
                continue
            conn.closed_by = verdict
            conn.scope.cancel()
            closed.append(verdict)
            self.closed_now(conn.description, verdict, tables.snapshot.version)
        return closed

    def closed_now(self, description: str, verdict: Verdict, version: str = "") -> None:
        """Count and log a connection that policy ends (also one refused as it is handed
        over from another process: agent/proxy/handoff.py)."""
        self.closed[verdict.kind] = self.closed.get(verdict.kind, 0) + 1
        CLOSED_BY_POLICY.labels(verdict.kind).inc()
        self._log.warning(
            verdict.kind, "closing %s: %s (snapshot %s)", description, verdict.detail, version
        )


def destination_check(
    node: str,
    trust_domain: str,
    *,
    source: Identity | None,
    source_ip: str,
    ip: str,
    port: int,
    local_identity: Identity | None = None,
) -> Check:
    """What the destination proxy checked when it let the connection in (inbound tunnels,
    same-node connections): the target is still a meshed pod of this node (with the identity
    the client asked for, if it asked) and its AuthorizationPolicies still allow the source."""

    def check(tables: Tables) -> Verdict | None:
        target = tables.workload_by_ip.get(ip)
        if target is None or target.node != node or not target.meshed:
            return Verdict("destination_left_mesh", f"{ip} is no longer a meshed pod here")
        if local_identity is not None and workload_identity(target, trust_domain) != local_identity:
            return Verdict("destination_left_mesh", f"{ip} is no longer {local_identity.uri}")
        decision = authorization.check(
            tables.authz,
            AuthzStats(),  # a re-check is no new decision: the proxy's figures stay as they are
            source=source,
            source_ip=source_ip,
            destination=target,
            destination_ip=ip,
            port=port,
        )
        if decision.allowed:
            return None
        return Verdict("denied", f"denied by {decision.policy or 'default'}: {decision.reason}")

    return check


def source_check(source: Workload) -> Check:
    """The client pod is still in the mesh (its identity is what the connection carries)."""
    return source_left_check(source.uid, source.namespace, source.name)


def source_left_check(uid: str, namespace: str, name: str) -> Check:
    """`source_check` by the pod's uid (a connection handed from another process)."""

    def check(tables: Tables) -> Verdict | None:
        now = tables.workload_by_uid.get(uid)
        if now is None or not now.meshed:
            return Verdict("source_left_mesh", f"{namespace}/{name} left the mesh")
        return None

    return check


def plaintext_check(node: str, ip: str, port: int) -> Check:
    """A connection dialled in plaintext to another node's meshed pod (its mode was DISABLE)
    ends once that pod requires mutual TLS again."""

    def check(tables: Tables) -> Verdict | None:
        dest = tables.workload_by_ip.get(ip)
        if dest is None or not dest.meshed or dest.node == node:
            return None
        mode = tables.mtls_for(dest).mode_for(port)
        if mode == "DISABLE":
            return None
        return Verdict("mtls_required", f"{ip}:{port} now requires mutual TLS ({mode})")

    return check
