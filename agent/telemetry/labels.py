"""Istio's metric labels: who talked to whom, derived once per connection.

What flows through: the proxy hands in the snapshot's `Workload` of each end (or nothing for a
peer outside the mesh) and the `Service` it resolved; out come `Peer`, `ServiceRef` and one
frozen `ConnectionLabels` per connection, whose `values` tuple is exactly what the Istio metric
families in `metrics.py` take. Building it costs a few microseconds; it is meant to be built
when a connection is accepted and reused for every byte count and HTTP request on it.

Names follow Istio's standard metrics
(https://istio.io/latest/docs/reference/config/metrics/) and what Istio's proxies emit:

- workload name: the one the controller derived from the pod's owner references by Istio's
  rules (`meshagent.common.workloadname`: Deployment via its ReplicaSet, StatefulSet,
  DaemonSet, Job, CronJob via its Job, else the bare pod), carried in the snapshot as
  `Workload.workload_name`. From an older controller that does not send it, it is read from
  the labels Kubernetes' controllers stamp on their pods:
  ``pod-template-hash`` (Deployment: the pod name minus ``-<hash>-<suffix>``), ``job-name``
  (Job; a CronJob's job name ``<cronjob>-<minutes>`` gives the CronJob, as Istio does),
  ``statefulset.kubernetes.io/pod-name`` (StatefulSet: minus ``-<ordinal>``),
  ``controller-revision-hash`` with ``pod-template-generation`` (DaemonSet: minus the random
  suffix). Without any of those, a name shaped like a Deployment pod's
  (``<name>-<6-10 chars>-<5 chars>`` in Kubernetes' random alphabet) loses its suffixes;
  anything else is a bare pod and its own workload, as in Istio.
- app and version: like ztunnel, the canonical service and revision: labels
  ``service.istio.io/canonical-name``, ``app.kubernetes.io/name``, ``app``, else the workload
  name; ``service.istio.io/canonical-revision``, ``app.kubernetes.io/version``, ``version``,
  else ``latest``.
- principal: the SPIFFE URI (``spiffe://cluster.local/ns/shop/sa/frontend``), as Istio's
  proxies report it. On the destination side pass the identity from the peer certificate
  (`Peer.with_principal`): that is the one that was authenticated.
- cluster: ``Kubernetes``, Istio's default cluster name, unless told otherwise.
- anything not known is ``unknown``, as in Istio.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from meshagent.common.istio.telemetry import PEER_FIELDS
from meshagent.common.spiffe import DEFAULT_TRUST_DOMAIN, Identity, workload_identity

if TYPE_CHECKING:
    from meshagent.common.snapshot import Service, Workload

__all__ = [
    "DEFAULT_CLUSTER",
    "HTTP_LABELS",
    "TCP_LABELS",
    "UNKNOWN",
    "UNKNOWN_PEER",
    "UNKNOWN_SERVICE",
    "ConnectionLabels",
    "Peer",
    "ServiceRef",
    "canonical_revision",
    "canonical_service",
    "local_hop_security",
    "peer_from_workload",
    "service_ref",
    "workload_name",
]

UNKNOWN = "unknown"
DEFAULT_CLUSTER = "Kubernetes"  # Istio's default clusterName
NO_RESPONSE_FLAGS = "-"

Reporter = Literal["source", "destination"]
RequestProtocol = Literal["tcp", "http", "grpc"]
SecurityPolicy = Literal["mutual_tls", "none", "unknown"]
_REPORTERS = frozenset(("source", "destination"))
_PROTOCOLS = frozenset(("tcp", "http", "grpc"))
_POLICIES = frozenset(("mutual_tls", "none", "unknown"))

# The label names, in the order `ConnectionLabels.values` fills them. TCP families end with
# response_flags; HTTP families add response_code and grpc_response_status (empty unless gRPC).
_PEER_FIELDS = PEER_FIELDS
_CONNECTION_LABELS = (
    "reporter",
    *(f"source_{f}" for f in _PEER_FIELDS),
    *(f"destination_{f}" for f in _PEER_FIELDS),
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "connection_security_policy",
)
TCP_LABELS: tuple[str, ...] = (*_CONNECTION_LABELS, "response_flags")
HTTP_LABELS: tuple[str, ...] = (*TCP_LABELS, "response_code", "grpc_response_status")

# Kubernetes names generated pods from this alphabet (no vowels, no 0/1/3: no words, no
# look-alikes); a Deployment pod is <deployment>-<pod-template-hash>-<5 random>.
_SAFE = "bcdfghjklmnpqrstvwxz2456789"
_DEPLOYMENT_POD_RE = re.compile(rf"(.+)-[{_SAFE}]{{6,10}}-[{_SAFE}]{{5}}\Z")
_RANDOM_SUFFIX_RE = re.compile(rf"(.+)-[{_SAFE}]{{5}}\Z")
_ORDINAL_RE = re.compile(r"(.+)-\d+\Z")
_CRONJOB_JOB_RE = re.compile(r"(.+)-\d{8,11}\Z")  # <cronjob>-<scheduled time in minutes>


def workload_name(pod_name: str, labels: Mapping[str, str]) -> str:
    """The owning controller's name, read from the labels its controller stamps on the pod
    (see the module docstring); the pod's own name when it has no recognisable owner."""
    template_hash = labels.get("pod-template-hash")
    if template_hash:
        head, sep, _ = pod_name.rpartition(f"-{template_hash}-")
        if sep and head:
            return head
    job = labels.get("job-name")
    if job:
        cron = _CRONJOB_JOB_RE.match(job)
        return cron.group(1) if cron else job
    if "statefulset.kubernetes.io/pod-name" in labels:
        ordinal = _ORDINAL_RE.match(pod_name)
        if ordinal:
            return ordinal.group(1)
    if "controller-revision-hash" in labels and "pod-template-generation" in labels:
        suffix = _RANDOM_SUFFIX_RE.match(pod_name)
        if suffix:
            return suffix.group(1)
    deployment = _DEPLOYMENT_POD_RE.match(pod_name)
    if deployment:
        return deployment.group(1)
    return pod_name


def canonical_service(labels: Mapping[str, str], workload: str) -> str:
    """Istio's canonical service name: the first of its labels that is set, else the workload."""
    return (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or workload
    )


def canonical_revision(labels: Mapping[str, str]) -> str:
    """Istio's canonical revision: the first of its labels that is set, else ``latest``."""
    return (
        labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )


@dataclass(frozen=True, slots=True)
class Peer:
    """One end of a connection as Istio's labels name it (source_* or destination_*)."""

    workload: str = UNKNOWN
    workload_namespace: str = UNKNOWN
    principal: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN
    cluster: str = UNKNOWN

    def with_principal(self, identity: Identity | str | None) -> Peer:
        """This peer as authenticated by `identity` (the peer certificate's SPIFFE ID);
        ``None`` (plaintext) makes the principal unknown."""
        if identity is None:
            principal = UNKNOWN
        elif isinstance(identity, Identity):
            principal = identity.uri
        else:
            principal = identity
        return replace(self, principal=principal)

    def values(self) -> tuple[str, ...]:
        return (
            self.workload,
            self.workload_namespace,
            self.principal,
            self.app,
            self.version,
            self.canonical_service,
            self.canonical_revision,
            self.cluster,
        )


UNKNOWN_PEER = Peer()


# Peers made from snapshot workloads, by the Workload object (snapshots are frozen, and a new
# one brings new objects): a connection's labels are then a lookup, not a parse of the pod's
# name and labels (~45 Python calls, twice per connection on each node). Bounded.
_PEERS: dict[tuple[int, str, str], tuple[Workload, Peer]] = {}
_PEERS_LIMIT = 4096


def peer_from_workload(
    workload: Workload,
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    cluster: str = DEFAULT_CLUSTER,
) -> Peer:
    """The labels of a workload from the snapshot; its principal is the identity its service
    account is given (`with_principal` replaces it with what a handshake proved)."""
    key = (id(workload), trust_domain, cluster)
    hit = _PEERS.get(key)
    if hit is not None and hit[0] is workload:
        return hit[1]
    peer = _peer_of(workload, trust_domain, cluster)
    if len(_PEERS) >= _PEERS_LIMIT:
        _PEERS.clear()
    _PEERS[key] = (workload, peer)
    return peer


def _peer_of(workload: Workload, trust_domain: str, cluster: str) -> Peer:
    name = workload.workload_name or workload_name(workload.name, workload.labels)
    service = canonical_service(workload.labels, name)
    revision = canonical_revision(workload.labels)
    identity = workload_identity(workload, trust_domain)
    return Peer(
        workload=name,
        workload_namespace=workload.namespace,
        principal=identity.uri,
        app=service,
        version=revision,
        canonical_service=service,
        canonical_revision=revision,
        cluster=cluster,
    )


@dataclass(frozen=True, slots=True)
class ServiceRef:
    """destination_service (the FQDN), destination_service_name, ..._namespace."""

    hostname: str = UNKNOWN
    name: str = UNKNOWN
    namespace: str = UNKNOWN


UNKNOWN_SERVICE = ServiceRef()


def service_ref(service: Service, *, cluster_domain: str = "cluster.local") -> ServiceRef:
    """The destination_service labels of a snapshot Service: ``<name>.<ns>.svc.<domain>``, or
    a ServiceEntry's host (its name is the host too, as Istio labels it)."""
    return ServiceRef(
        hostname=service.host or f"{service.name}.{service.namespace}.svc.{cluster_domain}",
        name=service.name,
        namespace=service.namespace,
    )


@dataclass(frozen=True, slots=True)
class ConnectionLabels:
    """Everything Istio's labels say about one connection except what each report adds
    (response flags, HTTP status). Built once per connection; hashing is cached, so the metric
    children for it are found with one dictionary lookup per report.

    `reporter` is ``source`` on the proxy that captured the client's connection (outbound) and
    ``destination`` on the proxy that delivers to the server (inbound). The security policy is
    ``mutual_tls`` when the traffic crossed an HBONE tunnel (or arrived through one) or was a
    node-local hop between meshed pods (`local_hop_security`), ``none`` for plaintext,
    ``unknown`` when the reporter cannot tell.
    """

    reporter: Reporter
    source: Peer = UNKNOWN_PEER
    destination: Peer = UNKNOWN_PEER
    service: ServiceRef = UNKNOWN_SERVICE
    request_protocol: RequestProtocol = "tcp"
    connection_security_policy: SecurityPolicy = "unknown"
    values: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("reporter", self.reporter, _REPORTERS),
            ("request_protocol", self.request_protocol, _PROTOCOLS),
            ("connection_security_policy", self.connection_security_policy, _POLICIES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {sorted(allowed)}")
        values = (
            self.reporter,
            *self.source.values(),
            *self.destination.values(),
            self.service.hostname,
            self.service.name,
            self.service.namespace,
            self.request_protocol,
            self.connection_security_policy,
        )
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "_hash", hash(values))

    def __hash__(self) -> int:
        return self._hash

    def as_dict(self) -> dict[str, str]:
        """Label name -> value (without the per-report labels), for tests and logs."""
        return dict(zip(_CONNECTION_LABELS, self.values, strict=True))


def local_hop_security(
    source_meshed: bool, destination: Workload | None, node: str
) -> SecurityPolicy:
    """``connection_security_policy`` of a hop that stays on `node` (no tunnel).

    ``mutual_tls`` when a meshed source (its identity established by this node's proxy from the
    kernel's record of its connection, as for a tunnel it would be from its certificate) reaches
    a meshed pod of this node: the destination's policies are checked against that identity and
    no byte of it crosses the network, so it carries the guarantees mutual TLS gives across
    nodes, and Istio ambient reports ``mutual_tls`` for all of its meshed traffic too; a fully
    meshed namespace then shows 100 % mTLS whatever the placement. ``none`` for anything else
    (an unknown source, a destination outside the mesh or on another node reached directly).
    """
    if (
        source_meshed
        and destination is not None
        and destination.meshed
        and destination.node == node
    ):
        return "mutual_tls"
    return "none"
