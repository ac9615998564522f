"""Schema for `networking.istio.io` ServiceEntry: hosts outside the cluster, made services.

An entry names hosts (and optionally the addresses they are reached at) and the endpoints
behind them, so VirtualService, DestinationRule and AuthorizationPolicy rules on those hosts
have a destination. The subset meshagent can carry is accepted: static IP endpoints
(`resolution: STATIC`) or the original destination (`NONE`), either location. What needs more
machinery is refused naming the field: `DNS`/`DNS_ROUND_ROBIN` resolution (the controller
does not resolve names yet), endpoints by hostname or Unix socket, `workloadSelector`
(endpoints from pods), `subjectAltNames` (TLS origination checks), CIDR addresses wider
than one IP and NONE without addresses (the proxy matches connections by exact address),
endpoint labels, locality, network, weight and service account (nothing uses them), and
hosts the data path reads as Kubernetes Services (fewer than three labels, `*.svc.<domain>`).

Reference: https://istio.io/latest/docs/reference/config/networking/service-entry/
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from meshagent.common.istio.base import IpBlock, IstioModel, IstioResource, NonEmptyStr, Port
from meshagent.common.istio.networking import NETWORKING_API_VERSIONS, ExportTo
from meshagent.common.istio.support import is_service_host
from pydantic import AfterValidator, Field, field_validator, model_validator

# Port protocols the proxy serves: HTTP ones at L7, the others as opaque TCP (HTTPS and TLS
# pass through untouched, as Istio forwards them without an SNI route).
PORT_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", "TCP", "TLS", "HTTPS"})
_UNRESOLVED = frozenset({"DNS", "DNS_ROUND_ROBIN"})


def _entry_host(value: str) -> str:
    host = value.lower().rstrip(".")
    if host == "*":
        raise ValueError("host '*' is not allowed: name the host (a '*.' prefix is allowed)")
    if "*" in host[1:] or (host.startswith("*") and not host.startswith("*.")):
        raise ValueError(f"host {value!r}: a wildcard is only allowed as a '*.' prefix")
    if len(host.split(".")) < 3 or is_service_host(host, "default"):
        raise ValueError(
            f"host {value!r} reads as a Kubernetes Service name (short, name.namespace or "
            "*.svc.cluster.local forms), which meshagent resolves as a Service: hosts of "
            "two labels or fewer, and in-cluster hosts, are not supported by meshagent yet"
        )
    return host


def _ip_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if value.startswith("unix://"):
            raise ValueError(
                f"endpoint address {value!r}: Unix domain socket endpoints are not "
                "supported by meshagent yet"
            ) from None
        raise ValueError(
            f"endpoint address {value!r} is not an IP address: endpoints by hostname need "
            "DNS resolution, which meshagent does not support yet"
        ) from None
    return value


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
    """One static endpoint: an IP and, by port name, the port to dial there."""

    address: Annotated[NonEmptyStr, AfterValidator(_ip_address)]
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
        if value in _UNRESOLVED:
            raise ValueError(
                f"resolution {value} is not supported by meshagent yet (the controller does "
                "not resolve hostnames): use STATIC with IP endpoints, or NONE"
            )
        if value not in ("STATIC", "NONE"):
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

    @field_validator("addresses")
    @classmethod
    def _single_addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            network = ipaddress.ip_network(address, strict=False)
            if network.num_addresses != 1:
                raise ValueError(
                    f"address {address!r}: CIDR blocks wider than one address are not "
                    "supported by meshagent yet (the proxy matches a connection by its exact "
                    "destination address)"
                )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServiceEntrySpec:
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
        return self


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
