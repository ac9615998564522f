"""ServiceEntry -> snapshot services: hosts outside the cluster as the data path sees them.

The redirect needs nothing new: every TCP connection of a meshed pod already reaches the
node's proxy, which finds the service by the connection's destination (a VIP, or an
endpoint's address) and dials endpoints that are not pods directly, in plain TCP (no HBONE:
there is no proxy at the other end). So an entry becomes one snapshot Service per host, with
`host` set (the name routes, policies and metrics use), the entry's addresses as VIPs and its
endpoints on no node and no workload. `location` changes nothing on this path: MESH_INTERNAL
endpoints are dialled in plain TCP too, since they have no meshagent proxy to tunnel to.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from meshagent.common.istio.resource import ResourceError, parse_resource
from meshagent.common.istio.serviceentry import EntryPort, ServiceEntry
from meshagent.common.snapshot import Endpoint, Service, ServicePort
from meshagent.controller.model import ClusterModel


def _vip(address: str) -> str:
    # Validation allows single-address blocks only ("10.0.0.1" or "10.0.0.1/32").
    return str(ipaddress.ip_network(address, strict=False).network_address)


def _service_port(port: EntryPort) -> ServicePort:
    return ServicePort(
        name=port.name,
        port=port.number,
        target_port=port.target_port or port.number,
        app_protocol=port.protocol.lower(),
    )


def _endpoints(entry: ServiceEntry, vips: list[str]) -> list[Endpoint]:
    spec = entry.spec
    if spec.resolution == "NONE":
        # The original destination: the address the client dialled, on the port it dialled.
        ports = {p.number: p.number for p in spec.ports}
        return [Endpoint(ip=vip, node="", workload_uid="", ports=ports) for vip in vips]
    return [
        Endpoint(
            ip=str(ipaddress.ip_address(e.address)),
            node="",
            workload_uid="",
            ports={p.number: e.ports.get(p.name) or p.target_port or p.number for p in spec.ports},
        )
        for e in spec.endpoints
    ]


def entry_services(entry: ServiceEntry) -> list[Service]:
    """One Service per host of `entry`, sharing its addresses, ports and endpoints."""
    vips = sorted({_vip(a) for a in entry.spec.addresses})
    ports = [_service_port(p) for p in entry.spec.ports]
    endpoints = sorted(_endpoints(entry, vips), key=lambda e: e.ip)
    return [
        Service(
            namespace=entry.namespace,
            name=host,
            host=host,
            vips=vips,
            ports=ports,
            endpoints=endpoints,
        )
        for host in entry.spec.hosts
    ]


def compile_entries(entries: Iterable[ServiceEntry]) -> list[Service]:
    """The services of every entry, in (namespace, host) order; where two entries of one
    namespace declare the same host, the first by (namespace, name) wins, as for Istio's
    oldest-first precedence a tie of creation times falls back to the name."""
    out: dict[tuple[str, str], Service] = {}
    for entry in sorted(entries, key=lambda e: (e.namespace, e.name)):
        for service in entry_services(entry):
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
