"""Schema for `networking.istio.io` ServiceEntry: hosts outside the cluster, made services.

An entry names hosts (and optionally the addresses they are reached at) and the endpoints
behind them, so VirtualService, DestinationRule and AuthorizationPolicy rules on those hosts
have a destination. The subset meshagent can carry is accepted: static IP endpoints
(`resolution: STATIC`), the original destination (`NONE`), and names the controller resolves
(`DNS`: every address of each endpoint's name, or of each host when there are no endpoints;
`DNS_ROUND_ROBIN`: the first address only, as Envoy's LOGICAL_DNS), either location. What
needs more machinery is refused naming the field: endpoints by Unix socket, `workloadSelector`
(endpoints from pods), `subjectAltNames` (TLS origination checks), NONE without addresses
(the proxy matches connections by destination address), CIDR addresses with DNS resolution
(Istio allows them only with NONE and STATIC), endpoint labels, locality, network, weight
and service account (nothing uses them), and
in-cluster hosts (one label, `*.svc`, `*.svc.<domain>`). A two-label host (`httpbin.org`) is
the external host wherever a resource names it (common/istio/support.py resolve_host), though
elsewhere `name.namespace` reads as a Kubernetes Service.

Reference: https://istio.io/latest/docs/reference/config/networking/service-entry/
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from meshagent.common.istio.base import IpBlock, IstioModel, IstioResource, NonEmptyStr, Port
from meshagent.common.istio.networking import NETWORKING_API_VERSIONS, ExportTo
from meshagent.common.istio.support import CLUSTER_DOMAIN
from pydantic import AfterValidator, Field, field_validator, model_validator

# Port protocols the proxy serves: HTTP ones at L7, the others as opaque TCP (HTTPS and TLS
# pass through untouched, as Istio forwards them without an SNI route).
PORT_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", "TCP", "TLS", "HTTPS"})
RESOLVED = frozenset({"DNS", "DNS_ROUND_ROBIN"})  # names the controller resolves
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")  # RFC 1123 host name


def _entry_host(value: str) -> str:
    host = value.lower().rstrip(".")
    if host == "*":
        raise ValueError("host '*' is not allowed: name the host (a '*.' prefix is allowed)")
    if "*" in host[1:] or (host.startswith("*") and not host.startswith("*.")):
        raise ValueError(f"host {value!r}: a wildcard is only allowed as a '*.' prefix")
    labels = host.split(".")
    if len(labels) < 2 or labels[-1] == "svc" or host.endswith(f".svc.{CLUSTER_DOMAIN}"):
        raise ValueError(
            f"host {value!r} is a Kubernetes Service name (short, name.namespace.svc or "
            f"*.svc.{CLUSTER_DOMAIN} forms): in-cluster hosts are not supported by meshagent "
            "yet; name the external host (e.g. httpbin.org, api.example.com)"
        )
    return host


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def is_range(address: str) -> bool:
    """An `addresses` entry that covers more than one address (a CIDR block, not `/32`)."""
    return ipaddress.ip_network(address, strict=False).num_addresses > 1


def node_local(address: str) -> bool:
    """Whether an endpoint address would reach the dialling node itself rather than a server:
    the node proxy dials entry endpoints from the node's own network namespace, where loopback
    (the agent's admin port among others), unspecified, link-local and multicast addresses are
    the node's, not a pod's as in an Istio sidecar."""
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast


def _endpoint_address(value: str) -> str:
    """An IP address, or a DNS name (for resolution DNS; `_consistent` checks that)."""
    if is_ip(value):
        if node_local(value):
            raise ValueError(
                f"endpoint address {value!r} is the node's own (loopback, link-local, "
                "unspecified or multicast): meshagent's node proxy would dial itself"
            )
        return value
    if value.startswith("unix://"):
        raise ValueError(
            f"endpoint address {value!r}: Unix domain socket endpoints are not "
            "supported by meshagent yet"
        )
    if not _DNS_NAME.fullmatch(value.lower()):
        raise ValueError(f"endpoint address {value!r} is neither an IP address nor a DNS name")
    return value.lower().rstrip(".")


EntryHost = Annotated[NonEmptyStr, AfterValidator(_entry_host)]


class EntryPort(IstioModel):
    """A port of the entry's hosts: clients connect to `number`; endpoints are dialled on
    `targetPort` (or the endpoint's own `ports` entry for the port's name, or `number`)."""

    number: Port
    protocol: str = "TCP"
    name: str = ""
    target_port: Port | None = None

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        if value.upper() not in PORT_PROTOCOLS:
            supported = ", ".join(sorted(PORT_PROTOCOLS))
            raise ValueError(
                f"protocol {value!r} is not supported by meshagent yet (use one of: {supported})"
            )
        return value.upper()


class EntryEndpoint(IstioModel):
    """One endpoint: an IP (or, with DNS resolution, a name) and, by port name, the port to
    dial there."""

    address: Annotated[NonEmptyStr, AfterValidator(_endpoint_address)]
    ports: dict[str, Port] = {}


class ServiceEntrySpec(IstioModel):
    hosts: tuple[EntryHost, ...] = Field(min_length=1)
    addresses: tuple[IpBlock, ...] = ()
    ports: tuple[EntryPort, ...] = ()
    location: Literal["MESH_EXTERNAL", "MESH_INTERNAL"] = "MESH_EXTERNAL"
    resolution: str = "NONE"
    endpoints: tuple[EntryEndpoint, ...] = ()
    export_to: ExportTo = None
    workload_selector: Any = None
    subject_alt_names: Any = None

    @field_validator("resolution")
    @classmethod
    def _resolved_here(cls, value: str) -> str:
        if value not in ("STATIC", "NONE", *RESOLVED):
            raise ValueError(
                f"resolution {value!r} is not one of STATIC, NONE, DNS, DNS_ROUND_ROBIN"
            )
        return value

    @field_validator("workload_selector")
    @classmethod
    def _no_selector(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError(
                "workloadSelector (endpoints from pods or WorkloadEntries) is not supported "
                "by meshagent yet: list static endpoints"
            )
        return value

    @field_validator("subject_alt_names")
    @classmethod
    def _no_san(cls, value: Any) -> Any:
        if value:
            raise ValueError(
                "subjectAltNames (identity checks of TLS to the endpoints) is not supported "
                "by meshagent yet"
            )
        return None

    @field_validator("ports")
    @classmethod
    def _unique_ports(cls, value: tuple[EntryPort, ...]) -> tuple[EntryPort, ...]:
        numbers: set[int] = set()
        names: set[str] = set()
        for port in value:
            if port.number in numbers:
                raise ValueError(f"port number {port.number} is listed more than once")
            if port.name and port.name in names:
                raise ValueError(f"port name {port.name!r} is listed more than once")
            numbers.add(port.number)
            names.add(port.name)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServiceEntrySpec:
        if any(is_range(a) for a in self.addresses) and self.resolution in RESOLVED:
            raise ValueError(
                "CIDR addresses are allowed only for resolution NONE or STATIC (as Istio "
                "refuses them with DNS)"
            )
        if self.resolution == "NONE" and not self.addresses:
            raise ValueError(
                "resolution NONE without addresses is not supported by meshagent yet (the "
                "proxy matches a connection by its destination address): list addresses"
            )
        if self.resolution == "NONE" and self.endpoints:
            raise ValueError("endpoints are not allowed with resolution NONE (use STATIC)")
        names = {port.name for port in self.ports if port.name}
        for index, endpoint in enumerate(self.endpoints):
            unknown = sorted(set(endpoint.ports) - names)
            if unknown:
                raise ValueError(
                    f"endpoints[{index}].ports names {unknown}, which are not names of "
                    "the entry's ports"
                )
        if self.resolution == "STATIC" and any(h.startswith("*") for h in self.hosts):
            raise ValueError(
                "wildcard hosts with resolution STATIC are not supported by meshagent yet "
                "(use NONE)"
            )
        named = [e.address for e in self.endpoints if not is_ip(e.address)]
        if named and self.resolution not in RESOLVED:
            raise ValueError(
                f"endpoints by name ({named[0]!r}) need resolution DNS or DNS_ROUND_ROBIN"
            )
        if self.resolution in RESOLVED and not self.endpoints:
            wild = [h for h in self.hosts if h.startswith("*")]
            if wild:  # Istio's webhook: there is no name to resolve
                raise ValueError(
                    f"wildcard host {wild[0]!r} with resolution {self.resolution} needs "
                    "endpoints (a name cannot be resolved)"
                )
        if self.resolution == "DNS_ROUND_ROBIN" and len(self.endpoints) > 1:
            raise ValueError("resolution DNS_ROUND_ROBIN allows one endpoint at most (Istio)")
        return self

    def names_to_resolve(self) -> tuple[str, ...]:
        """What the controller resolves for this entry: its endpoints' names, or, without
        endpoints, its hosts (resolution DNS or DNS_ROUND_ROBIN only)."""
        if self.resolution not in RESOLVED:
            return ()
        if self.endpoints:
            return tuple(e.address for e in self.endpoints if not is_ip(e.address))
        return self.hosts


class ServiceEntry(IstioResource):
    """An Istio ServiceEntry: hosts outside the cluster, their ports and endpoints."""

    API_VERSIONS = NETWORKING_API_VERSIONS

    kind: Literal["ServiceEntry"]
    spec: ServiceEntrySpec


def entry_hosts(docs: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The hosts the valid ServiceEntries among `docs` declare: what a VirtualService or
    DestinationRule may name besides Services (support.skip_reason)."""
    hosts: set[str] = set()
    for doc in docs:
        if isinstance(doc, Mapping) and doc.get("kind") == "ServiceEntry":
            try:
                hosts.update(ServiceEntry.model_validate(doc).spec.hosts)
            except ValueError:
                continue  # refused, and reported where it is parsed
    return frozenset(hosts)
