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

from pydantic import BaseModel, ConfigDict, Field

MESH_LABEL = "meshagent.io/mesh"
# What a meshed pod's connections do while its node's agent is down: `open` (straight to
# their destination, unmeshed) or `closed` (refused), on the Namespace or the Pod (which wins).
FAIL_MODE_LABEL = "meshagent.io/fail-mode"
FAIL_MODES = ("closed", "open")
DEFAULT_FAIL_MODE = "closed"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


class Node(_Model):
    name: str
    address: str  # where other nodes' proxies reach this node's proxy (HBONE)


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
    # This node's pods that no other node needs (not meshed, not behind a Service): kept out
    # of `workloads` so a change to one of them gives a new version to this node only.
    local_workloads: list[Workload] = Field(default_factory=list)

    def all_workloads(self) -> list[Workload]:
        return [*self.workloads, *self.local_workloads]

    def body_digest(self) -> str:
        """Digest of the part all nodes share (all but node, version and local workloads),
        so the controller hashes it once per change, not once per node."""
        body = self.model_dump(mode="json", exclude={"version", "node", "local_workloads"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def local_digest(self) -> str:
        local = [w.model_dump(mode="json") for w in self.local_workloads]
        return hashlib.sha256(json.dumps(local, sort_keys=True).encode()).hexdigest()

    def content_version(self, body_digest: str | None = None) -> str:
        digest = body_digest or self.body_digest()
        key = f"{digest}/{self.node}/{self.local_digest()}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def with_version(self) -> Snapshot:
        return self.model_copy(update={"version": self.content_version()})

    def for_node(self, node: str, body_digest: str, local: list[Workload]) -> Snapshot:
        """This (shared) snapshot addressed to `node` with its local workloads, versioned
        without hashing the shared part again."""
        snap = self.model_copy(update={"node": node, "local_workloads": local})
        return snap.model_copy(update={"version": snap.content_version(body_digest)})
