"""ServiceEntry -> snapshot services: hosts outside the cluster as the data path sees them.

The redirect needs nothing new: every TCP connection of a meshed pod already reaches the
node's proxy, which finds the service by the connection's destination (a VIP, or an
endpoint's address) and dials endpoints that are not pods directly, in plain TCP (no HBONE:
there is no proxy at the other end). So an entry becomes one snapshot Service per host, with
`host` set (the name routes, policies and metrics use), the entry's addresses as VIPs (CIDR
blocks as `vip_ranges`: the proxy takes a connection to any address in one) and its
endpoints on no node and no workload; with resolution NONE, `original_destination`: each
connection goes where its client dialled. `location` changes nothing on this path: MESH_INTERNAL
endpoints are dialled in plain TCP too, since they have no meshagent proxy to tunnel to. With
`resolution: DNS` the endpoints are the addresses the controller resolved the names to
(controller/resolver.py); an entry without `addresses` then applies to connections made to
those addresses, as a STATIC one to its endpoints'.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from meshagent.common.istio.resource import ResourceError, parse_resource
from meshagent.common.istio.serviceentry import (
    RESOLVED,
    EntryEndpoint,
    EntryPort,
    ServiceEntry,
    is_ip,
    is_range,
)
from meshagent.common.snapshot import Endpoint, Service, ServicePort
from meshagent.controller.model import ClusterModel


def _vip(address: str) -> str:
    """A single-address entry ("10.0.0.1" or "10.0.0.1/32") as the VIP it is."""
    return str(ipaddress.ip_network(address, strict=False).network_address)


def _range(address: str) -> str:
    """A CIDR entry in its canonical form ("10.0.0.7/24" is "10.0.0.0/24", as Istio masks it)."""
    return str(ipaddress.ip_network(address, strict=False))


def _service_port(port: EntryPort) -> ServicePort:
    return ServicePort(
        name=port.name,
        port=port.number,
        target_port=port.target_port or port.number,
        app_protocol=port.protocol.lower(),
    )


Resolved = Mapping[str, tuple[str, ...]]  # name -> addresses (controller/resolver.py)


def _addresses(address: str, resolution: str, resolved: Resolved) -> tuple[str, ...]:
    """An endpoint's addresses: itself when it is an IP, else what its name resolved to (all
    of them with DNS, the first with DNS_ROUND_ROBIN, as Envoy's STRICT_DNS and LOGICAL_DNS)."""
    if is_ip(address):
        return (str(ipaddress.ip_address(address)),)
    found = resolved.get(address, ())
    return found[:1] if resolution == "DNS_ROUND_ROBIN" else found


def _endpoints(
    entry: ServiceEntry, vips: list[str], host: str, resolved: Resolved
) -> list[Endpoint]:
    spec = entry.spec
    if spec.resolution == "NONE":
        # The original destination: the address the client dialled, on the port it dialled.
        ports = {p.number: p.number for p in spec.ports}
        return [Endpoint(ip=vip, node="", workload_uid="", ports=ports) for vip in vips]
    listed = spec.endpoints
    if not listed and spec.resolution in RESOLVED:  # DNS without endpoints: the host itself
        listed = (EntryEndpoint(address=host),)
    out: list[Endpoint] = []
    for e in listed:
        ports = {p.number: e.ports.get(p.name) or p.target_port or p.number for p in spec.ports}
        out += [
            Endpoint(ip=ip, node="", workload_uid="", ports=ports)
            for ip in _addresses(e.address, spec.resolution, resolved)
            if spec.resolution not in RESOLVED or all(known.ip != ip for known in out)
        ]  # a name and an IP (or two names) for one address: one endpoint
    return sorted(out, key=lambda e: e.ip)


def entry_services(entry: ServiceEntry, resolved: Resolved | None = None) -> list[Service]:
    """One Service per host of `entry`, sharing its addresses and ports, and its endpoints
    (with DNS resolution and no endpoints listed, each host's own addresses). `resolved`: the
    addresses of the names resolution DNS needs (none yet: no endpoint for them)."""
    addresses = entry.spec.addresses
    vips = sorted({_vip(a) for a in addresses if not is_range(a)})
    ranges = sorted({_range(a) for a in addresses if is_range(a)})
    ports = [_service_port(p) for p in entry.spec.ports]
    return [
        Service(
            namespace=entry.namespace,
            name=host,
            host=host,
            vips=vips,
            vip_ranges=ranges,
            original_destination=entry.spec.resolution == "NONE",
            ports=ports,
            endpoints=_endpoints(entry, vips, host, resolved or {}),
        )
        for host in entry.spec.hosts
    ]


def compile_entries(
    entries: Iterable[ServiceEntry], resolved: Resolved | None = None
) -> list[Service]:
    """The services of every entry, in (namespace, host) order; where two entries of one
    namespace declare the same host, the first by (namespace, name) wins, as for Istio's
    oldest-first precedence a tie of creation times falls back to the name."""
    out: dict[tuple[str, str], Service] = {}
    for entry in sorted(entries, key=lambda e: (e.namespace, e.name)):
        for service in entry_services(entry, resolved):
            out.setdefault((service.namespace, service.name), service)
    return [out[key] for key in sorted(out)]


def model_entries(model: ClusterModel) -> list[ServiceEntry]:
    """The model's ServiceEntries that pass validation (the refused ones are reported by the
    validator and change nothing)."""
    out = []
    for obj in model.objects("ServiceEntry"):
        try:
            resource = parse_resource(obj)
        except ResourceError:
            continue
        if isinstance(resource, ServiceEntry):
            out.append(resource)
    return out


def model_entry_hosts(model: ClusterModel) -> frozenset[str]:
    """The hosts the model's accepted ServiceEntries declare (for support.skip_reason)."""
    return frozenset(host for entry in model_entries(model) for host in entry.spec.hosts)
