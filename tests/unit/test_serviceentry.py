"""ServiceEntry: what the schema accepts and refuses (Istio's ServiceEntry reference), and the
snapshot services an accepted entry becomes."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from meshagent.common.istio.serviceentry import ServiceEntry
from meshagent.controller import webhook
from meshagent.controller.checkfiles import check_files
from meshagent.controller.compiler import compile_snapshot
from meshagent.controller.describe import describe
from meshagent.controller.model import ClusterModel
from meshagent.controller.serviceentry import compile_entries, entry_services
from meshagent.controller.validation import classify_model
from pydantic import ValidationError


def _entry(name: str = "ext", namespace: str = "app", **spec: Any) -> dict:
    spec.setdefault("hosts", ["api.example.com"])
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


_STATIC = {
    "addresses": ["10.9.0.5"],
    "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8080}],
    "location": "MESH_EXTERNAL",
    "resolution": "STATIC",
    "endpoints": [{"address": "192.0.2.10"}, {"address": "192.0.2.11", "ports": {"http": 9090}}],
}


def _refusal(**spec: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        ServiceEntry.model_validate(_entry(**spec))
    return str(caught.value)


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
def test_accepts_static_entry_in_every_api_version(version: str) -> None:
    doc = _entry(**_STATIC)
    doc["apiVersion"] = f"networking.istio.io/{version}"
    entry = ServiceEntry.model_validate(doc)
    assert entry.spec.hosts == ("api.example.com",)
    assert entry.spec.ports[0].target_port == 8080
    assert entry.spec.endpoints[1].ports == {"http": 9090}


def test_accepts_none_resolution_and_mesh_internal() -> None:
    entry = ServiceEntry.model_validate(
        _entry(
            addresses=["10.9.0.6/32"],
            ports=[{"number": 5432, "name": "tcp", "protocol": "TCP"}],
            location="MESH_INTERNAL",
        )
    )
    assert entry.spec.resolution == "NONE"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"resolution": "STATIC", "endpoints": [{"address": "db.example"}]}, "resolution DNS"),
        ({"resolution": "DNS", "endpoints": [{"address": "bad_name.example"}]}, "DNS name"),
        ({"resolution": "DNS", "hosts": ["*.example.com"]}, "needs endpoints"),
        (
            {
                "resolution": "DNS_ROUND_ROBIN",
                "endpoints": [{"address": "a.example"}, {"address": "b.example"}],
            },
            "one endpoint at most",
        ),
        ({"resolution": "DNS_ANYHOW"}, "not one of"),
        ({"resolution": "STATIC", "endpoints": [{"address": "127.0.0.1"}]}, "node's own"),
        ({"resolution": "DNS", "endpoints": [{"address": "::1"}]}, "node's own"),
        ({"resolution": "STATIC", "endpoints": [{"address": "169.254.169.254"}]}, "node's own"),
        ({"resolution": "STATIC", "endpoints": [{"address": "unix:///s"}]}, "Unix domain"),
        ({"addresses": ["10.0.0.0/24"], "resolution": "DNS"}, "only for resolution NONE or"),
        (
            {"addresses": ["2001:db8::/64"], "resolution": "DNS_ROUND_ROBIN"},
            "only for resolution NONE or STATIC",
        ),
        ({"addresses": ["not-an-ip"], "resolution": "STATIC"}, "not an IP address"),
        ({"resolution": "NONE"}, "NONE without addresses"),
        (
            {"addresses": ["10.0.0.1"], "endpoints": [{"address": "192.0.2.1"}]},
            "not allowed with resolution NONE",
        ),
        ({"resolution": "STATIC", "workloadSelector": {"labels": {"a": "b"}}}, "workloadSelector"),
        ({"resolution": "STATIC", "subjectAltNames": ["spiffe://x"]}, "subjectAltNames"),
        ({"resolution": "STATIC", "exportTo": ["."]}, "exportTo"),
        ({"resolution": "STATIC", "hosts": ["*"]}, "host '*'"),
        ({"resolution": "STATIC", "hosts": ["reviews"]}, "in-cluster hosts"),
        ({"resolution": "STATIC", "hosts": ["reviews.shop.svc"]}, "in-cluster hosts"),
        ({"resolution": "STATIC", "hosts": ["r.shop.svc.cluster.local"]}, "in-cluster hosts"),
        ({"resolution": "STATIC", "hosts": ["*.example.com"]}, "wildcard hosts"),
        ({"resolution": "STATIC", "ports": [{"number": 27017, "protocol": "MONGO"}]}, "MONGO"),
        (
            {"resolution": "STATIC", "ports": [{"number": 80}, {"number": 80, "name": "b"}]},
            "more than once",
        ),
        (
            {
                "resolution": "STATIC",
                "ports": [{"number": 80, "name": "http"}],
                "endpoints": [{"address": "192.0.2.1", "ports": {"grpc": 1}}],
            },
            "not names of the entry's ports",
        ),
        ({"resolution": "STATIC", "location": "MESH_NOWHERE"}, "location"),
        (
            {"resolution": "STATIC", "endpoints": [{"address": "192.0.2.1", "weight": 2}]},
            "weight",
        ),
    ],
)
def test_refuses_what_the_data_path_cannot_honour(spec: dict, needle: str) -> None:
    assert needle in _refusal(**spec)


def test_static_entry_becomes_a_service_per_host() -> None:
    doc = _entry(**{**_STATIC, "hosts": ["api.example.com", "api2.example.com"]})
    services = entry_services(ServiceEntry.model_validate(doc))
    assert [s.hostname for s in services] == ["api.example.com", "api2.example.com"]
    svc = services[0]
    assert svc.namespace == "app"
    assert svc.vips == ["10.9.0.5"]
    assert [(p.port, p.target_port, p.app_protocol) for p in svc.ports] == [(80, 8080, "http")]
    # targetPort unless the endpoint maps the port's name; on no node, no workload
    assert [(e.ip, e.ports, e.node, e.workload_uid) for e in svc.endpoints] == [
        ("192.0.2.10", {80: 8080}, "", ""),
        ("192.0.2.11", {80: 9090}, "", ""),
    ]


def test_none_entry_dials_the_original_destination() -> None:
    doc = _entry(
        addresses=["10.9.0.7/32", "10.9.0.6"],
        ports=[{"number": 443, "name": "tls", "protocol": "TLS", "targetPort": 8443}],
    )
    (svc,) = entry_services(ServiceEntry.model_validate(doc))
    assert svc.vips == ["10.9.0.6", "10.9.0.7"]
    assert [(e.ip, e.ports) for e in svc.endpoints] == [
        ("10.9.0.6", {443: 443}),
        ("10.9.0.7", {443: 443}),
    ]


def test_cidr_addresses_become_vip_ranges_as_istio_masks_them() -> None:
    """Istio: `addresses` "could be CIDR prefix"; a connection whose destination is in one is the
    entry's (allowed with NONE and STATIC only)."""
    doc = _entry(
        addresses=["10.9.0.7/32", "192.0.2.77/24", "2001:db8::/64"],
        ports=[{"number": 443, "name": "tls", "protocol": "TLS"}],
    )
    (svc,) = entry_services(ServiceEntry.model_validate(doc))
    assert svc.vips == ["10.9.0.7"]
    assert svc.vip_ranges == ["192.0.2.0/24", "2001:db8::/64"]
    assert svc.original_destination
    static = _entry(**{**_STATIC, "addresses": ["198.51.100.0/24"]})
    (svc,) = entry_services(ServiceEntry.model_validate(static))
    assert (svc.vips, svc.vip_ranges, svc.original_destination) == ([], ["198.51.100.0/24"], False)
    text = "\n".join(describe(ServiceEntry.model_validate(doc), []))
    assert (
        "connections to 10.9.0.7, any address in 192.0.2.0/24, any address in 2001:db8::/64" in text
    )


def test_first_entry_by_name_wins_a_shared_host() -> None:
    late = ServiceEntry.model_validate(_entry("b", **{**_STATIC, "addresses": ["10.9.0.9"]}))
    early = ServiceEntry.model_validate(_entry("a", **_STATIC))
    other_ns = ServiceEntry.model_validate(_entry("c", namespace="other", **_STATIC))
    services = compile_entries([late, other_ns, early])
    assert [(s.namespace, s.hostname, s.vips) for s in services] == [
        ("app", "api.example.com", ["10.9.0.5"]),
        ("other", "api.example.com", ["10.9.0.5"]),
    ]


def _model(*objs: dict) -> ClusterModel:
    model = ClusterModel()
    for obj in objs:
        model.upsert(obj["kind"], obj)
    return model


_ROUTE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "ext", "namespace": "app"},
    "spec": {
        "hosts": ["api.example.com"],
        "http": [{"route": [{"destination": {"host": "api.example.com"}}]}],
    },
}


def test_a_two_label_host_is_the_external_host_once_an_entry_declares_it() -> None:
    """`httpbin.org`, Istio's egress example: with the entry, routes naming it are the
    entry's (not Service httpbin of namespace org), and validation says nothing of it."""
    from meshagent.common.istio.support import dns_form_note, resolve_host

    assert resolve_host("httpbin.org", "default", {"httpbin.org"}) == "httpbin.org"
    assert resolve_host("HttpBin.org.", "default", {"httpbin.org"}) == "httpbin.org"
    assert resolve_host("httpbin.org", "default") == "httpbin.org.svc.cluster.local"
    assert resolve_host("reviews", "shop", {"httpbin.org"}) == "reviews.shop.svc.cluster.local"
    assert dns_form_note("httpbin.org", {"httpbin.org"}) is None
    assert "read as Service httpbin in namespace org" in dns_form_note("httpbin.org")


def test_a_route_on_an_entry_host_applies_only_with_the_entry() -> None:
    alone = compile_snapshot(_model(_ROUTE), "node-1")
    assert alone.istio_resources == []
    assert classify_model(_model(_ROUTE))[2][0].path == "spec.hosts"  # skipped, says why
    snap = compile_snapshot(_model(_entry(**_STATIC), _ROUTE), "node-1")
    # the entry travels as a service with its host, the route beside the other resources
    assert [r["kind"] for r in snap.istio_resources] == ["VirtualService"]
    (svc,) = snap.services
    assert (svc.hostname, svc.vips, snap.entry_hosts()) == (
        "api.example.com",
        ["10.9.0.5"],
        frozenset({"api.example.com"}),
    )
    accepted, rejected, skipped = classify_model(_model(_entry(**_STATIC), _ROUTE))
    assert sorted(r.kind for r in accepted) == ["ServiceEntry", "VirtualService"]
    assert (rejected, skipped) == ([], [])


def test_a_refused_entry_adds_no_service_and_no_host() -> None:
    bad = _entry(resolution="DNS_ANYHOW", ports=[{"number": 80, "name": "http"}])
    snap = compile_snapshot(_model(bad, _ROUTE), "node-1")
    assert (snap.services, snap.istio_resources) == ([], [])
    (error,) = classify_model(_model(bad))[1]
    assert (error.kind, error.path) == ("ServiceEntry", "spec.resolution")


def test_validate_explain_knows_the_entry_and_its_routes(tmp_path) -> None:
    path = tmp_path / "entry.yaml"
    path.write_text(yaml.safe_dump_all([_entry(**_STATIC), _ROUTE]))
    report = check_files([path])
    entry, route = report.verdicts
    assert (entry.outcome, route.outcome, route.warnings) == ("ok", "ok", [])
    text = "\n".join(describe(entry.resource, report.services))
    assert "api.example.com" in text and "connections to 10.9.0.5" in text
    assert "192.0.2.11 (80->9090)" in text and "plain TCP" in text
    assert "port 80 (http, http): L7, per request" in text
    # without the entry the route names an unknown host: skipped, saying why
    path.write_text(yaml.safe_dump(_ROUTE))
    (alone,) = check_files([path]).verdicts
    assert alone.outcome == "skipped" and "no ServiceEntry declares" in alone.problems[0][1]


def test_the_webhook_admits_a_route_on_an_entry_host_without_a_skip_warning() -> None:
    request = {"uid": "u", "operation": "CREATE", "namespace": "app", "object": _ROUTE}
    warned: list[str] = []
    assert webhook.judge(request, warned, frozenset({"api.example.com"})) is None
    assert warned == []
    assert webhook.judge(request, warned) is None
    assert len(warned) == 1 and "no ServiceEntry declares" in warned[0]


def test_validate_warns_that_a_policy_naming_an_entry_host_does_not_act_on_it(tmp_path) -> None:
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-ext", "namespace": "app"},
        "spec": {
            "action": "DENY",
            "rules": [{"to": [{"operation": {"hosts": ["api.example.com", "web.app"]}}]}],
        },
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump_all([_entry(**_STATIC), policy]))
    _entry_verdict, verdict = check_files([path]).verdicts
    ((where, message),) = verdict.warnings
    assert where == "spec.rules[0].to[0].operation.hosts"
    assert "['api.example.com']" in message and "not checked" in message
    path.write_text(yaml.safe_dump(policy))
    assert check_files([path]).verdicts[0].warnings == []


# resolution DNS (issue #21): the controller resolves names (controller/resolver.py) and the
# entry's endpoints are their addresses; names not resolved yet give no endpoint.
_PORTS = [{"number": 80, "name": "http", "protocol": "HTTP"}, {"number": 443, "name": "https"}]
RESOLVED = {
    "api.example.com": ("192.0.2.20", "192.0.2.21"),
    "db.example.net": ("198.51.100.7",),
}


@pytest.mark.parametrize(
    ("spec", "endpoints"),
    [
        # no endpoints: the host's own addresses (Istio's bookinfo googleapis entry)
        ({"resolution": "DNS"}, {"192.0.2.20", "192.0.2.21"}),
        ({"resolution": "DNS_ROUND_ROBIN"}, {"192.0.2.20"}),  # LOGICAL_DNS: the first
        ({"resolution": "DNS", "hosts": ["not.resolved.example"]}, set()),
        # endpoints by name or by IP, one endpoint per address
        (
            {
                "resolution": "DNS",
                "endpoints": [
                    {"address": "db.example.net"},
                    {"address": "203.0.113.9"},
                    {"address": "198.51.100.7"},
                ],
            },
            {"198.51.100.7", "203.0.113.9"},
        ),
    ],
)
def test_dns_entries_take_the_addresses_their_names_resolve_to(spec: dict, endpoints: set):
    entry = ServiceEntry.model_validate(_entry(ports=_PORTS, **spec))
    [service] = entry_services(entry, RESOLVED)
    assert {e.ip for e in service.endpoints} == endpoints
    assert all(e.ports == {80: 80, 443: 443} for e in service.endpoints)
    assert service.vips == []  # the entry applies to connections to those addresses


def test_a_dns_entry_names_what_to_resolve_and_validate_warns_what_it_means():
    from meshagent.common.istio.support import warnings

    hosts = ServiceEntry.model_validate(_entry(ports=_PORTS, resolution="DNS"))
    named = ServiceEntry.model_validate(
        _entry(ports=_PORTS, resolution="DNS", endpoints=[{"address": "DB.example.net."}])
    )
    static = ServiceEntry.model_validate(_entry(**_STATIC))
    assert hosts.spec.names_to_resolve() == ("api.example.com",)
    assert named.spec.names_to_resolve() == ("db.example.net",)
    assert static.spec.names_to_resolve() == () and warnings(static) == []
    [(field, message)] = warnings(hosts)
    assert field == "spec.resolution" and "is not matched" in message


def test_the_proxy_finds_a_cidr_entry_by_the_most_specific_block_and_dials_the_original() -> None:
    """Agent side: an exact VIP first, then the narrowest block holding the destination, on a
    port of the entry; a NONE entry's one endpoint is the address the client dialled."""
    from meshagent.agent.proxy.outbound import dial_address
    from meshagent.agent.proxy.routing import ORIGINAL_DESTINATION
    from meshagent.agent.state import Tables
    from meshagent.common.snapshot import Snapshot

    port = [{"number": 5432, "name": "tcp", "protocol": "TCP"}]
    wide = _entry("wide", hosts=["db.example.com"], addresses=["10.20.0.0/16"], ports=port)
    narrow = _entry("narrow", hosts=["hot.example.com"], addresses=["10.20.30.0/24"], ports=port)
    exact = _entry("exact", hosts=["one.example.com"], addresses=["10.20.30.40"], ports=port)
    v6 = _entry("v6", hosts=["v6.example.com"], addresses=["2001:db8::/32"], ports=port)
    services = compile_entries(ServiceEntry.model_validate(d) for d in (wide, narrow, exact, v6))
    tables = Tables.build(Snapshot(node="node-1", services=services).with_version())

    def host(ip: str, number: int = 5432) -> str | None:
        route = tables.route_for((ip, number))
        return route.service.hostname if route else None

    assert host("10.20.30.40") == "one.example.com"
    assert host("10.20.30.41") == "hot.example.com"
    assert host("10.20.99.1") == "db.example.com"
    assert host("2001:db8:1::5") == "v6.example.com"
    assert host("10.21.0.1") is None  # outside every block
    assert host("10.20.99.1", 5433) is None  # not a port of the entry
    cluster = tables.routes.tcp_routes("db.example.com", 5432).destinations.pick()
    (upstream,) = cluster.endpoints
    assert upstream.endpoint.ip == ORIGINAL_DESTINATION and upstream.port == 5432
    assert dial_address(tables, upstream.endpoint, "10.20.99.1") == "10.20.99.1"
