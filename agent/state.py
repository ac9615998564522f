"""The agent's one store of the pushed snapshot and the data-plane view derived from it.

One writer (the config client, or the saved copy at start) calls `apply` (a whole snapshot)
or `apply_delta` (the next view built from the one in force: agent/helddoc.py validates only
what the delta brings, `Tables.after` patches the tables and keeps what nothing changed); the
proxy only reads. Everything the data plane derives from a snapshot (lookup tables,
parsed Istio resources, compiled authorization and routes, the parsed trust bundle) is
built into one immutable `Tables` *before* the snapshot is accepted: a snapshot that
fails any of it is refused whole (NACK, with the reason), is never saved, and the last
good one keeps serving. Only then is the view swapped in by one assignment, saved to disk
(so a restarted agent serves while the controller is away, and never replays a snapshot
it refused) and announced to the listeners, which only assign what was built.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from meshagent.agent.hbone.tls import check_trust_bundle
from meshagent.agent.helddoc import Changed, DeltaRefused, HeldDocument
from meshagent.agent.lookup import Index
from meshagent.agent.policy.peerauth import MtlsPolicy
from meshagent.agent.policy.peerauth import resolve as resolve_mtls
from meshagent.agent.proxy.routing import (
    DEFAULT_ROOT_NAMESPACE,
    Protocol,
    ReusableClusters,
    RouteTable,
    compile_routes,
    port_protocol,
)
from meshagent.agent.savedview import SNAPSHOT_FILE
from meshagent.common.authz import PolicySet
from meshagent.common.istio.resource import IstioResource, ResourceError, parse_resource
from meshagent.common.istio.security import (
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
)
from meshagent.common.istio.telemetry import (
    EMPTY_POLICY,
    MetricsPolicy,
    Telemetry,
    compile_metrics_policy,
)
from meshagent.common.jwtauth import JwtPolicies
from meshagent.common.snapshot import Service, ServicePort, Snapshot, Workload, wire_version
from meshagent.common.spiffe import DEFAULT_TRUST_DOMAIN
from pydantic import ValidationError

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SnapshotRejected(Exception):
    """The snapshot cannot be served; the message says why (sent back as the NACK)."""


@dataclass(frozen=True)
class ServicePortRoute:
    """What a (VIP, port) leads to. Endpoints are chosen by the compiled routes and the
    balancer (proxy/routing.py, proxy/lb.py), not here."""

    service: Service
    service_port: ServicePort


@dataclass(frozen=True)
class Tables:
    snapshot: Snapshot
    by_vip_port: dict[tuple[str, int], ServicePortRoute]
    # ServiceEntry CIDR addresses (Service.vip_ranges): (block, port) -> route, the most
    # specific block first; consulted when no exact VIP matches
    by_vip_range: tuple[tuple[IPNetwork, int, ServicePortRoute], ...]
    workload_by_ip: dict[str, Workload]
    workload_by_uid: dict[str, Workload]
    node_address: dict[str, str]
    istio: list[IstioResource]
    authz: PolicySet
    service_by_endpoint: dict[tuple[str, int], Service]  # (pod ip, pod port) -> a service of it
    # (pod ip, pod port) -> the protocol of the Service port(s) in front of it: the destination
    # proxy's guess when the source did not say (a CONNECT without x-meshagent-protocol);
    # HTTP/1.1 wins when several Service ports of different protocols share a pod port.
    pod_protocols: dict[tuple[str, int], Protocol]
    routes: RouteTable  # compiled VirtualServices and DestinationRules (agent/proxy/routing.py)
    # compiled Telemetry metrics overrides (common/istio/telemetry.py), for ProxyMetrics
    metrics_policy: MetricsPolicy = EMPTY_POLICY
    # the dict tables above with their claims, which the next view patches (`after`)
    indexes: _Indexes | None = field(default=None, repr=False, compare=False)

    def route_for(self, destination: tuple[str, int]) -> ServicePortRoute | None:
        """The service port a connection to ``destination`` (ip, port) is for: an exact VIP,
        else the most specific ServiceEntry CIDR block holding the address; None: none."""
        route = self.by_vip_port.get(destination)
        if route is not None or not self.by_vip_range:
            return route
        ip, port = destination
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for network, range_port, candidate in self.by_vip_range:
            if range_port == port and address in network:
                return candidate
        return None

    @functools.cached_property
    def jwt(self) -> JwtPolicies:
        """The RequestAuthentications with the keys the controller fetched (common/jwtauth.py),
        compiled on first use: nothing in it can fail (a key set that does not load refuses
        its issuer's tokens), so it cannot be a reason to refuse the snapshot."""
        resources = [r for r in self.istio if isinstance(r, RequestAuthentication)]
        return JwtPolicies(resources, self.snapshot.jwks, root_namespace=self.authz.root_namespace)

    def peer_authentications(self) -> list[PeerAuthentication]:
        return [r for r in self.istio if isinstance(r, PeerAuthentication)]

    def mtls_for(self, workload: Workload) -> MtlsPolicy:
        return resolve_mtls(self.peer_authentications(), workload.namespace, workload.labels)

    @classmethod
    def build(
        cls,
        snap: Snapshot,
        *,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        trust_domains: tuple[str, ...] = (DEFAULT_TRUST_DOMAIN,),
    ) -> Tables:
        """Everything the data plane needs of ``snap``; raises SnapshotRejected naming the
        first part that cannot be built (nothing is kept of a failed build). ``trust_domains``:
        the mesh's and its aliases, which policy principals are rewritten for."""
        _check_bundle(snap)
        istio = _parse_istio(snap)
        by_ip, by_uid = _workload_indexes(snap)
        by_endpoint, protocols = _endpoint_indexes(snap)
        return cls(
            snap,
            *_vip_tables(snap),
            by_ip.table,
            by_uid.table,
            {n.name: n.address for n in snap.nodes},
            istio,
            _policy_set(istio, root_namespace, trust_domains),
            by_endpoint.table,
            protocols.table,
            _routes(snap, root_namespace),
            _metrics_policy(snap, root_namespace),
            _Indexes(by_ip, by_uid, by_endpoint, protocols),
        )

    def after(
        self,
        snap: Snapshot,
        changed: Changed,
        *,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        trust_domains: tuple[str, ...] = (DEFAULT_TRUST_DOMAIN,),
    ) -> Tables:
        """The view of ``snap``, which a delta (``changed``) made of this view's snapshot,
        built from this view: the dict tables patched by the changed items (agent/lookup.py),
        each compiled part kept as the same object when nothing it reads changed, the rest
        built again as `build` does (same errors). This view is left as it is."""
        fields = changed.fields
        if "trust_bundle" in fields:
            _check_bundle(snap)
        istio = self.istio
        if "istio_resources" in fields or (
            "services" in fields and snap.entry_hosts() != self.snapshot.entry_hosts()
        ):
            istio = _parse_istio(snap)
        indexes = self.indexes
        if indexes is None or fields & {"workloads", "local_workloads"}:
            by_ip, by_uid = _workload_indexes(snap, indexes, changed)
        else:
            by_ip, by_uid = indexes.by_ip, indexes.by_uid
        if indexes is None or "services" in fields:
            by_endpoint, protocols = _endpoint_indexes(snap, indexes, changed)
        else:
            by_endpoint, protocols = indexes.by_endpoint, indexes.protocols
        vips = (self.by_vip_port, self.by_vip_range)
        if "services" in fields:
            vips = _vip_tables(snap)
        nodes = self.node_address
        if "nodes" in fields:
            nodes = {n.name: n.address for n in snap.nodes}
        authz = self.authz
        if istio is not self.istio:
            authz = _policy_set(istio, root_namespace, trust_domains)
        routes = self.routes
        if fields & _ROUTES_READ or istio is not self.istio:
            reuse = None
            if istio is self.istio and "nodes" not in fields:
                reuse = ReusableClusters(
                    self.routes,
                    {svc.hostname: svc for svc in self.snapshot.services},
                    workloads_same="workloads" not in fields,
                )
            routes = _routes(snap, root_namespace, reuse)
        metrics = self.metrics_policy
        if "telemetry" in fields:
            metrics = _metrics_policy(snap, root_namespace)
        tables = Tables(
            snap,
            *vips,
            by_ip.table,
            by_uid.table,
            nodes,
            istio,
            authz,
            by_endpoint.table,
            protocols.table,
            routes,
            metrics,
            _Indexes(by_ip, by_uid, by_endpoint, protocols),
        )
        if "jwt" in self.__dict__ and istio is self.istio and "jwks" not in fields:
            tables.__dict__["jwt"] = self.__dict__["jwt"]  # compiled from the same input
        return tables

    def pod_protocol(self, ip: str, port: int) -> Protocol:
        return self.pod_protocols.get((ip, port), "tcp")

    def local_meshed(self) -> list[Workload]:
        return [w for w in self.snapshot.workloads if w.meshed and w.node == self.snapshot.node]


# what compile_routes reads of a snapshot (besides the parsed Istio resources)
_ROUTES_READ = frozenset({"services", "workloads", "nodes", "istio_resources"})


@dataclass(frozen=True)
class _Indexes:
    by_ip: Index[str]
    by_uid: Index[str]
    by_endpoint: Index[tuple[str, int]]
    protocols: Index[tuple[str, int]]


def _check_bundle(snap: Snapshot) -> None:
    if snap.trust_bundle:
        try:
            check_trust_bundle(snap.trust_bundle)
        except ValueError as exc:
            raise SnapshotRejected(f"trust bundle: {exc}") from None


def _parse_istio(snap: Snapshot) -> list[IstioResource]:
    try:
        hosts = snap.entry_hosts()
        return [parse_resource(doc, entry_hosts=hosts) for doc in snap.istio_resources]
    except ResourceError as exc:
        raise SnapshotRejected(f"invalid Istio resource in snapshot: {exc}") from None


def _policy_set(
    istio: list[IstioResource], root_namespace: str, trust_domains: tuple[str, ...]
) -> PolicySet:
    return PolicySet(
        [r for r in istio if isinstance(r, AuthorizationPolicy)],
        root_namespace=root_namespace,
        trust_domains=trust_domains,
    )


def _routes(
    snap: Snapshot, root_namespace: str, reuse: ReusableClusters | None = None
) -> RouteTable:
    try:
        return compile_routes(snap, root_namespace=root_namespace, reuse=reuse)
    except (ResourceError, ValueError) as exc:
        raise SnapshotRejected(f"routes do not compile: {exc}") from None


def _vip_tables(
    snap: Snapshot,
) -> tuple[
    dict[tuple[str, int], ServicePortRoute], tuple[tuple[IPNetwork, int, ServicePortRoute], ...]
]:
    """By (VIP, port) and by (CIDR block, port), the most specific block first: a pass over
    the Services' ports, built whole."""
    by_vip_port: dict[tuple[str, int], ServicePortRoute] = {}
    by_vip_range: list[tuple[IPNetwork, int, ServicePortRoute]] = []
    for svc in snap.services:
        for port in svc.ports:
            if port.protocol != "TCP":
                continue
            for vip in svc.vips:
                by_vip_port[(vip, port.port)] = ServicePortRoute(svc, port)
            for block in svc.vip_ranges:
                by_vip_range.append(
                    (ipaddress.ip_network(block), port.port, ServicePortRoute(svc, port))
                )
    return by_vip_port, tuple(sorted(by_vip_range, key=lambda r: -r[0].prefixlen))


def _ip_entries(workloads: Iterable[Workload]) -> list[tuple[str, Workload]]:
    return [(ip, w) for w in workloads for ip in w.ips]


def _uid_entries(workloads: Iterable[Workload]) -> list[tuple[str, Workload]]:
    return [(w.uid, w) for w in workloads]


def _workload_indexes(
    snap: Snapshot, previous: _Indexes | None = None, changed: Changed | None = None
) -> tuple[Index[str], Index[str]]:
    """Workload by address and by uid (the last in the snapshot's order wins a shared one):
    ``previous`` patched by the workloads ``changed`` replaced, else built whole."""
    if previous is not None and changed is not None:
        gone = [*changed.before.get("workloads", ()), *changed.before.get("local_workloads", ())]
        new = [*changed.after.get("workloads", ()), *changed.after.get("local_workloads", ())]
        by_ip = previous.by_ip.patched(_ip_entries(gone), _ip_entries(new))
        by_uid = previous.by_uid.patched(_uid_entries(gone), _uid_entries(new))
        if by_ip is not None and by_uid is not None:
            return by_ip, by_uid
    workloads = snap.all_workloads()
    ips, uids = _ip_entries(workloads), _uid_entries(workloads)
    return (
        Index.of(dict(ips), (ip for ip, _ in ips)),
        Index.of(dict(uids), (uid for uid, _ in uids)),
    )


def _endpoint_entries(services: Iterable[Service]) -> list[tuple[tuple[str, int], Service]]:
    return [
        ((e.ip, pod_port), svc)
        for svc in services
        for e in svc.endpoints
        for pod_port in e.ports.values()
    ]


def _protocol_entries(services: Iterable[Service]) -> list[tuple[tuple[str, int], Protocol]]:
    """(pod ip, pod port) -> the protocol of a Service port in front of it, per Service port
    that is not plain TCP."""
    out: list[tuple[tuple[str, int], Protocol]] = []
    for svc in services:
        for sp in svc.ports:
            protocol = port_protocol(sp)
            if protocol == "tcp":
                continue
            for e in svc.endpoints:
                if sp.port in e.ports:
                    out.append(((e.ip, e.ports[sp.port]), protocol))
    return out


def _endpoint_indexes(
    snap: Snapshot, previous: _Indexes | None = None, changed: Changed | None = None
) -> tuple[Index[tuple[str, int]], Index[tuple[str, int]]]:
    """Service by endpoint (the last Service wins) and protocol by endpoint (HTTP/1.1 wins
    when Service ports of different protocols share a pod port): ``previous`` patched by the
    Services ``changed`` replaced, else built whole."""
    if previous is not None and changed is not None:
        gone, new = changed.before.get("services", ()), changed.after.get("services", ())
        by_endpoint = previous.by_endpoint.patched(_endpoint_entries(gone), _endpoint_entries(new))
        protocols = previous.protocols.patched(_protocol_entries(gone), _protocol_entries(new))
        if by_endpoint is not None and protocols is not None:
            return by_endpoint, protocols
    endpoints = _endpoint_entries(snap.services)
    pod_protocols: dict[tuple[str, int], Protocol] = {}
    entries = _protocol_entries(snap.services)
    for key, protocol in entries:
        if pod_protocols.get(key) != "http1":
            pod_protocols[key] = protocol
    return (
        Index.of(dict(endpoints), (key for key, _ in endpoints)),
        Index.of(pod_protocols, (key for key, _ in entries)),
    )


def _metrics_policy(snap: Snapshot, root_namespace: str) -> MetricsPolicy:
    """The snapshot's Telemetry overrides. One this agent cannot read (the controller accepted
    it) is left out with a warning: metrics are no reason to refuse a snapshot."""
    resources = []
    for doc in snap.telemetry:
        try:
            res = parse_resource(doc)
        except ResourceError as exc:
            log.warning("ignoring Telemetry the agent cannot read: %s", exc)
            continue
        if isinstance(res, Telemetry):
            resources.append(res)
    return compile_metrics_policy(resources, root_namespace)


class SnapshotStore:
    def __init__(
        self,
        node: str,
        state_dir: Path,
        *,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        trust_domains: tuple[str, ...] = (DEFAULT_TRUST_DOMAIN,),
    ) -> None:
        self.node = node
        self.state_dir = state_dir
        self.root_namespace = root_namespace
        self.trust_domains = trust_domains
        self.tables: Tables | None = None
        self._held: HeldDocument | None = None  # the snapshot in force, as the controller sent it
        self._document_json: str | None = None  # ... encoded once, when first asked for
        # (base, version, changes) when the snapshot in force came as a delta (workers are
        # fed it: agent/workers/pool.py); None when it came whole
        self.last_delta: tuple[str, str, dict] | None = None
        self._listeners: list[Callable[[Tables], None]] = []

    @property
    def version(self) -> str:
        return self.tables.snapshot.version if self.tables else ""

    def document_json(self) -> str | None:
        """The snapshot in force as the controller sent it (JSON): what a proxy worker that
        holds no snapshot is fed, so it checks the same document the agent did, whatever
        fields its model adds."""
        if self._document_json is None and self._held is not None:
            self._document_json = self._held.document_json()
        return self._document_json

    def on_change(self, callback: Callable[[Tables], None]) -> None:
        self._listeners.append(callback)

    def apply(self, data: dict, *, save: bool = True) -> Snapshot:
        """Validate ``data``, build its whole data-plane view, then switch to it, save it
        (unless ``save`` is false) and tell the listeners. Raises SnapshotRejected, having
        changed and saved nothing, if any of the validation or building fails."""
        try:
            snap = Snapshot.model_validate(data)
        except ValidationError as exc:
            raise SnapshotRejected(f"invalid snapshot: {exc.error_count()} errors: {exc}") from None
        if snap.node != self.node:
            raise SnapshotRejected(f"snapshot is for node {snap.node!r}, this is {self.node!r}")
        held = HeldDocument.of(data, snap)
        # the document as sent (version skew), hashed from the pieces kept for the deltas
        content = held.version() if held.exact else wire_version(data)
        if snap.version != content:
            raise SnapshotRejected(f"snapshot version {snap.version!r} does not match its content")
        tables = self._built(snap, lambda: self._tables_of(snap))
        self._switch(held, tables, None, save)
        return snap

    def apply_delta(self, base: str, version: str, changes: dict, *, save: bool = True) -> Snapshot:
        """Apply the changes from the held version `base` to `version` (common/snapshotdelta.py)
        as `apply` does a whole snapshot, building the next view from the one in force: only
        the items the delta brings are validated, and the tables they concern rebuilt
        (agent/helddoc.py, agent/nextview.py). Raises SnapshotRejected, having changed
        nothing, if this agent does not hold `base`, the delta is invalid or the result is not
        exactly `version` (the controller then sends it whole)."""
        held, previous = self._held, self.tables
        if held is None or previous is None or self.version != base:
            raise SnapshotRejected(
                f"delta from {base!r}, but this agent holds {self.version or 'nothing'!r}"
            )
        try:
            after, changed = held.apply(changes, version)
        except DeltaRefused as exc:
            raise SnapshotRejected(str(exc)) from None
        snap = after.snapshot
        tables = self._built(snap, lambda: self._tables_after(previous, snap, changed))
        self._switch(after, tables, (base, version, changes), save)
        return snap

    def _tables_of(self, snap: Snapshot) -> Tables:
        return Tables.build(
            snap, root_namespace=self.root_namespace, trust_domains=self.trust_domains
        )

    def _tables_after(self, previous: Tables, snap: Snapshot, changed: Changed) -> Tables:
        return previous.after(
            snap, changed, root_namespace=self.root_namespace, trust_domains=self.trust_domains
        )

    def _built(self, snap: Snapshot, build: Callable[[], Tables]) -> Tables:
        try:
            return build()
        except SnapshotRejected:
            raise
        except Exception as exc:  # a builder's bug refuses this snapshot, not the agent
            log.exception("building the data-plane view of snapshot %s failed", snap.version)
            raise SnapshotRejected(f"cannot build snapshot: {type(exc).__name__}: {exc}") from None

    def _switch(
        self,
        held: HeldDocument,
        tables: Tables,
        delta: tuple[str, str, dict] | None,
        save: bool,
    ) -> None:
        """Put what was built in force (one assignment each), save it, tell the listeners."""
        self.tables = tables
        self._held, self._document_json = held, None
        self.last_delta = delta
        if save:
            self._save()
        for callback in self._listeners:
            try:
                callback(tables)
            except Exception:  # listeners only swap in what was built; one bug ends no other
                log.exception("snapshot listener %r failed", callback)

    def load_saved(self) -> bool:
        """Serve the last accepted snapshot from disk, if there is one."""
        path = self.state_dir / SNAPSHOT_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        try:
            self.apply(data, save=False)
        except SnapshotRejected as exc:
            log.warning("saved snapshot ignored: %s", exc)
            return False
        log.info("serving saved snapshot %s", self.version)
        return True

    def _save(self) -> None:
        """The document as received (its content: a restarted or upgraded agent checks the
        same version)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / (SNAPSHOT_FILE + ".tmp")
        with tmp.open("w") as f:  # in parts: the document is not joined to be written
            f.writelines(self._held.document_parts() if self._held else ())
        os.replace(tmp, self.state_dir / SNAPSHOT_FILE)
