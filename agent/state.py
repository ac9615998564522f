"""The agent's one store of the pushed snapshot and the data-plane view derived from it.

One writer (the config client, or the saved copy at start) calls `apply`; the
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshagent.agent.hbone.tls import check_trust_bundle
from meshagent.agent.policy.peerauth import MtlsPolicy
from meshagent.agent.policy.peerauth import resolve as resolve_mtls
from meshagent.agent.proxy.routing import (
    DEFAULT_ROOT_NAMESPACE,
    Protocol,
    RouteTable,
    compile_routes,
    port_protocol,
)
from meshagent.agent.savedview import SNAPSHOT_FILE
from meshagent.common import snapshotdelta
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
    # ServiceEntry CIDR addresses (Service.vip_ranges): (block, port) -> route, the most
    # specific block first; consulted when no exact VIP matches
    by_vip_range: tuple[tuple[IPNetwork, int, ServicePortRoute], ...] = ()

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
        if snap.trust_bundle:
            try:
                check_trust_bundle(snap.trust_bundle)
            except ValueError as exc:
                raise SnapshotRejected(f"trust bundle: {exc}") from None
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
        workloads = snap.all_workloads()
        workload_by_ip = {ip: w for w in workloads for ip in w.ips}
        workload_by_uid = {w.uid: w for w in workloads}
        node_address = {n.name: n.address for n in snap.nodes}
        try:
            hosts = snap.entry_hosts()
            istio = [parse_resource(doc, entry_hosts=hosts) for doc in snap.istio_resources]
        except ResourceError as exc:
            raise SnapshotRejected(f"invalid Istio resource in snapshot: {exc}") from None
        authz = PolicySet(
            [r for r in istio if isinstance(r, AuthorizationPolicy)],
            root_namespace=root_namespace,
            trust_domains=trust_domains,
        )
        service_by_endpoint = {
            (e.ip, pod_port): svc
            for svc in snap.services
            for e in svc.endpoints
            for pod_port in e.ports.values()
        }
        pod_protocols: dict[tuple[str, int], Protocol] = {}
        for svc in snap.services:
            for sp in svc.ports:
                protocol = port_protocol(sp)
                if protocol == "tcp":
                    continue
                for e in svc.endpoints:
                    if sp.port in e.ports:
                        key = (e.ip, e.ports[sp.port])
                        if pod_protocols.get(key) != "http1":
                            pod_protocols[key] = protocol
        try:
            routes = compile_routes(snap, root_namespace=root_namespace)
        except (ResourceError, ValueError) as exc:
            raise SnapshotRejected(f"routes do not compile: {exc}") from None
        return cls(
            snap,
            by_vip_port,
            workload_by_ip,
            workload_by_uid,
            node_address,
            istio,
            authz,
            service_by_endpoint,
            pod_protocols,
            routes,
            _metrics_policy(snap, root_namespace),
            tuple(sorted(by_vip_range, key=lambda r: -r[0].prefixlen)),
        )

    def pod_protocol(self, ip: str, port: int) -> Protocol:
        return self.pod_protocols.get((ip, port), "tcp")

    def local_meshed(self) -> list[Workload]:
        return [w for w in self.snapshot.workloads if w.meshed and w.node == self.snapshot.node]


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
        self._document: dict | None = None  # the snapshot in force, as the controller sent it
        self._document_json: str | None = None  # ... encoded once, when first asked for
        self._listeners: list[Callable[[Tables], None]] = []

    @property
    def version(self) -> str:
        return self.tables.snapshot.version if self.tables else ""

    def document_json(self) -> str | None:
        """The snapshot in force as the controller sent it (JSON): what proxy workers are fed,
        so they check the same document the agent did, whatever fields its model adds."""
        if self._document_json is None and self._document is not None:
            self._document_json = json.dumps(self._document, separators=(",", ":"))
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
        if snap.version != wire_version(data):  # the document as sent (version skew)
            raise SnapshotRejected(f"snapshot version {snap.version!r} does not match its content")
        try:
            tables = Tables.build(
                snap, root_namespace=self.root_namespace, trust_domains=self.trust_domains
            )
        except SnapshotRejected:
            raise
        except Exception as exc:  # a builder's bug refuses this snapshot, not the agent
            log.exception("building the data-plane view of snapshot %s failed", snap.version)
            raise SnapshotRejected(f"cannot build snapshot: {type(exc).__name__}: {exc}") from None
        self.tables = tables
        self._document, self._document_json = data, None
        if save:
            self._save()
        for callback in self._listeners:
            try:
                callback(tables)
            except Exception:  # listeners only swap in what was built; one bug ends no other
                log.exception("snapshot listener %r failed", callback)
        return snap

    def apply_delta(self, base: str, version: str, changes: dict) -> Snapshot:
        """Apply the changes from the held version `base` to `version` (common/snapshotdelta.py)
        as `apply` does a whole snapshot. Raises SnapshotRejected if this agent does not hold
        `base` or the result is not exactly `version` (the controller then sends it whole)."""
        held = self._document
        if held is None or held.get("version") != base:
            holding = held.get("version") if held else "nothing"
            raise SnapshotRejected(f"delta from {base!r}, but this agent holds {holding!r}")
        try:
            body = snapshotdelta.apply(held, changes)  # to the document as received
        except snapshotdelta.DeltaError as exc:
            raise SnapshotRejected(str(exc)) from None
        body["version"] = version
        return self.apply(body)

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
        """The document as received, so a restarted (or upgraded) agent checks the same bytes."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / (SNAPSHOT_FILE + ".tmp")
        tmp.write_text(self.document_json() or "")
        os.replace(tmp, self.state_dir / SNAPSHOT_FILE)
