"""The per-node snapshot: what the controller pushes and the agent serves from.

One schema, used by both sides (DESIGN.md section 4). The controller builds it
from the cluster model; the agent validates it whole at the boundary and turns
it into its lookup tables, refusing a bad snapshot entirely. The version is a
content hash, so unchanged input gives the same version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from meshagent.common.failmode import DEFAULT_FAIL_MODE
from pydantic import BaseModel, ConfigDict, Field

MESH_LABEL = "meshagent.io/mesh"
# How much of L7 a Service port gets (DESIGN.md section 1): bytes relayed, relayed while a
# parser counts requests, or the per-request engine. Decided by the controller
# (controller/l7level.py); `L7_ANNOTATION` on a Service forces it (`off` = l4).
L7Level = Literal["l4", "observe", "full"]
L7_ANNOTATION = "meshagent.io/l7"


def level_key(namespace: str, name: str, port: int) -> str:
    """The key of a Service port in `Snapshot.l7_levels`."""
    return f"{namespace}/{name}:{port}"


def pods_level_key(namespace: str, name: str, port: int) -> str:
    """The key, in `Snapshot.l7_levels`, of the level a Service port's pods are served at by
    their own node's proxy, where it is lower than the port's (common/l7.py)."""
    return f"{level_key(namespace, name, port)}@pods"


class _Model(BaseModel):
    # Unknown fields are ignored, not refused: during an upgrade an agent one version behind
    # the controller (or ahead of it) must still take its snapshots and serve what it knows.
    # Istio resources travel as manifests and are parsed strictly by the agent (issue #21).
    model_config = ConfigDict(extra="ignore", frozen=True)


_NOT_SHARED = {"version", "node", "local_workloads"}


def _body_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _local_digest(local: list) -> str:
    return hashlib.sha256(json.dumps(local, sort_keys=True).encode()).hexdigest()


def _version(body_digest: str, node: str, local_digest: str) -> str:
    key = f"{body_digest}/{node}/{local_digest}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def wire_version(data: dict) -> str:
    """The content version of a snapshot in its wire form (JSON as sent), as the controller
    computed it from its model. The agent checks a snapshot by the document it received, not
    by its own model's re-serialization: a model with a field more or less (an agent and a
    controller of different versions) would otherwise hash the same content differently."""
    body = {k: v for k, v in data.items() if k not in _NOT_SHARED}
    return _version(
        _body_digest(body),
        str(data.get("node", "")),
        _local_digest(data.get("local_workloads", [])),
    )


def joined_version(pieces: dict[str, str], node: str) -> str:
    """`wire_version` from each top-level field's JSON as `_body_digest` writes it (sorted
    keys, default separators), hashed piece by piece: the agent keeps each item's JSON and
    joins only the collections a delta changed (agent/helddoc.py) instead of encoding the
    whole document again. Same scheme, same version: nothing changes between releases."""
    body = hashlib.sha256(b"{")
    shared = [k for k in sorted(pieces) if k not in _NOT_SHARED]
    for i, k in enumerate(shared):
        body.update(f"{', ' if i else ''}{json.dumps(k)}: ".encode())
        body.update(pieces[k].encode())
    body.update(b"}")
    local = hashlib.sha256(pieces.get("local_workloads", "[]").encode()).hexdigest()
    return _version(body.hexdigest(), node, local)


class Workload(_Model):
    uid: str
    namespace: str
    name: str
    node: str
    ips: list[str]
    service_account: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    meshed: bool = False
    fail_mode: Literal["closed", "open"] = DEFAULT_FAIL_MODE  # FAIL_MODE_LABEL, resolved
    # The pod's workload as Istio names it (common.workloadname), for the metrics' *_workload
    # labels; "" from an older controller: the agent then reads it from the pod's labels.
    workload_name: str = ""


class ServicePort(_Model):
    name: str = ""
    port: int
    target_port: int | str
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    app_protocol: str | None = None


class Endpoint(_Model):
    """One ready pod behind a Service, with the target port per service port."""

    ip: str
    node: str
    workload_uid: str
    ports: dict[int, int]  # service port -> the pod's port


class Service(_Model):
    namespace: str
    name: str
    vips: list[str]
    ports: list[ServicePort]
    endpoints: list[Endpoint] = Field(default_factory=list)
    # The host of a ServiceEntry-made service (its endpoints are on no node and no workload);
    # None for a Kubernetes Service. Older agents ignore it.
    host: str | None = None
    # A ServiceEntry's CIDR `addresses` wider than one address: a connection to any address in
    # one (on a port of the service) is this service's, the exact `vips` and the most specific
    # block first. Older agents ignore it (they match the exact VIPs only).
    vip_ranges: list[str] = Field(default_factory=list)
    # Resolution NONE: each connection goes to the address its client dialled (Envoy's
    # ORIGINAL_DST), whatever `endpoints` list (older agents dial those: one per exact VIP).
    original_destination: bool = False

    @property
    def hostname(self) -> str:
        if self.host:
            return self.host
        return f"{self.name}.{self.namespace}.svc.cluster.local"


class Node(_Model):
    name: str
    address: str  # where other nodes' proxies reach this node's proxy (HBONE)
    # region/zone/subzone from the node's topology labels ("" without a region): what
    # locality-aware balancing compares (common/locality.py)
    locality: str = ""


class Snapshot(_Model):
    node: str
    version: str = ""
    nodes: list[Node] = Field(default_factory=list)
    workloads: list[Workload] = Field(default_factory=list)
    services: list[Service] = Field(default_factory=list)
    trust_bundle: str | None = None
    # Accepted Istio resources (AuthorizationPolicy, PeerAuthentication, VirtualService,
    # DestinationRule) as validated manifests; the agent parses them with
    # meshagent.common.istio.parse_resource into the typed models it evaluates.
    istio_resources: list[dict] = Field(default_factory=list)
    # Accepted Telemetry resources (metrics overrides) as manifests, apart from
    # istio_resources, which an agent older than the kind would refuse whole.
    telemetry: list[dict] = Field(default_factory=list)
    # The JWKS documents of RequestAuthentication rules, fetched by the controller (the agents
    # make no outbound calls), by URL (JwtRule.keys_url); absent: not fetched (fail closed).
    jwks: dict[str, str] = Field(default_factory=dict)
    # This node's pods that no other node needs (not meshed, not behind a Service): kept out
    # of `workloads` so a change to one of them gives a new version to this node only.
    local_workloads: list[Workload] = Field(default_factory=list)
    # The L7 level of each Service port (`level_key`). A port without one (a snapshot from a
    # controller older than the field) is served as before: `full` on HTTP ports, else `l4`.
    # Beside it, under `pods_level_key`, the level its pods' own node serves them at where that
    # is lower (only the source decides per request: a VirtualService, a DestinationRule); an
    # agent that predates those keys looks up none of them and serves the pods as before.
    l7_levels: dict[str, L7Level] = Field(default_factory=dict)

    def all_workloads(self) -> list[Workload]:
        return [*self.workloads, *self.local_workloads]

    def entry_hosts(self) -> frozenset[str]:
        """The hosts of the ServiceEntry-made services: what the Istio resources may name
        besides Services (common.istio.parse_resource's `entry_hosts`)."""
        return frozenset(s.host for s in self.services if s.host)

    def body_digest(self) -> str:
        """Digest of the part all nodes share (all but node, version and local workloads),
        so the controller hashes it once per change, not once per node."""
        return _body_digest(self.model_dump(mode="json", exclude=_NOT_SHARED))

    def local_digest(self) -> str:
        return _local_digest([w.model_dump(mode="json") for w in self.local_workloads])

    def content_version(self, body_digest: str | None = None) -> str:
        digest = body_digest or self.body_digest()
        return _version(digest, self.node, self.local_digest())

    def with_version(self) -> Snapshot:
        return self.model_copy(update={"version": self.content_version()})

    def for_node(self, node: str, body_digest: str, local: list[Workload]) -> Snapshot:
        """This (shared) snapshot addressed to `node` with its local workloads, versioned
        without hashing the shared part again."""
        snap = self.model_copy(update={"node": node, "local_workloads": local})
        return snap.model_copy(update={"version": snap.content_version(body_digest)})
