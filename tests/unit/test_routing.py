"""Compiling services, VirtualServices and DestinationRules into route tables (pure, no I/O).

Each test writes the manifests an operator would, compiles a snapshot, and checks where
requests and connections would go: which cluster (service, port, subset), which endpoints,
which policy, and what a reference that leads nowhere reports.
"""

from __future__ import annotations

import pytest
from meshagent.agent.proxy.routing import (
    DEFAULT_RETRY,
    ClusterKey,
    OutlierPolicy,
    RetryPolicy,
    TrafficPolicy,
    compile_routes,
    is_http_port,
    port_protocol,
    single_endpoint_routes,
)
from meshagent.common.istio.support import service_fqdn
from meshagent.common.snapshot import Endpoint, Service, ServicePort, Snapshot, Workload

NS = "shop"
REVIEWS = f"reviews.{NS}.svc.cluster.local"
RATINGS = f"ratings.{NS}.svc.cluster.local"


def _workload(name: str, ns: str = NS, **labels: str) -> Workload:
    return Workload(
        uid=f"uid-{name}",
        namespace=ns,
        name=name,
        node="n1",
        ips=[f"10.0.0.{len(name)}"],
        labels=labels,
    )


def _service(name: str, ns: str, ports: list[ServicePort], pods: list[str]) -> Service:
    endpoints = [
        Endpoint(
            ip=f"10.1.{i}.1",
            node="n1",
            workload_uid=f"uid-{pod}",
            ports={p.port: p.port + 1000 for p in ports},
        )
        for i, pod in enumerate(pods)
    ]
    return Service(
        namespace=ns, name=name, vips=[f"10.96.{len(name)}.1"], ports=ports, endpoints=endpoints
    )


HTTP = ServicePort(name="http", port=9080, target_port=9080)
GRPC = ServicePort(name="grpc", port=9090, target_port=9090)
TCP = ServicePort(name="db", port=5432, target_port=5432)


def snapshot(*resources: dict, services: list[Service] | None = None) -> Snapshot:
    workloads = [
        _workload("r1", app="reviews", version="v1"),
        _workload("r2", app="reviews", version="v2"),
        _workload("r3", app="reviews", version="v3", track="canary"),
        _workload("t1", app="ratings"),
        _workload("o1", ns="other", app="reviews"),
    ]
    services = services or [
        _service("reviews", NS, [HTTP, GRPC, TCP], ["r1", "r2", "r3"]),
        _service("ratings", NS, [HTTP], ["t1"]),
        _service("reviews", "other", [HTTP], ["o1"]),
    ]
    return Snapshot(
        node="n1", workloads=workloads, services=services, istio_resources=list(resources)
    )


def vs(spec: dict, name: str = "reviews", ns: str = NS) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def dr(spec: dict, name: str = "reviews", ns: str = NS) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


SUBSETS = dr(
    {
        "host": "reviews",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
            {"name": "canary", "labels": {"track": "canary"}},
        ],
    }
)


def pods(spec) -> set[str]:
    return {u.endpoint.workload_uid.removeprefix("uid-") for u in spec.endpoints}


def route_for(table, method="GET", target="/", headers=None, host=REVIEWS, port=9080):
    return table.http_routes(host, port).match(method, target, headers or {})


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "http"),
    [
        (ServicePort(name="http", port=80, target_port=80), "http1"),
        (ServicePort(name="http-web", port=80, target_port=80), "http1"),
        (ServicePort(name="HTTP", port=80, target_port=80), "http1"),
        (ServicePort(name="web", port=80, target_port=80, app_protocol="http"), "http1"),
        (ServicePort(name="http", port=80, target_port=80, app_protocol="grpc"), "http2"),
        (ServicePort(name="http", port=80, target_port=80, app_protocol="tcp"), "tcp"),
        (ServicePort(name="x", port=80, target_port=80, app_protocol="kubernetes.io/h2c"), "http2"),
        (ServicePort(name="http2", port=80, target_port=80), "http2"),
        (ServicePort(name="http2-b", port=80, target_port=80), "http2"),
        (ServicePort(name="h2c", port=80, target_port=80), "http2"),
        (ServicePort(name="grpc-api", port=80, target_port=80), "http2"),
        (ServicePort(name="grpc-web", port=80, target_port=80), "http1"),
        (ServicePort(name="grpc-web-ui", port=80, target_port=80), "http1"),
        (ServicePort(name="httpx", port=80, target_port=80), "tcp"),
        (ServicePort(name="tcp-db", port=80, target_port=80), "tcp"),
        (ServicePort(name="tls", port=443, target_port=443), "tcp"),
        (ServicePort(name="mysql", port=3306, target_port=3306), "tcp"),
        (ServicePort(name="", port=80, target_port=80), "tcp"),
        (ServicePort(name="http", port=53, target_port=53, protocol="UDP"), "tcp"),
    ],
)
def test_protocol_detection(port, http):
    assert port_protocol(port) == http
    assert is_http_port(port) is (http != "tcp")


@pytest.mark.parametrize(
    ("host", "ns", "fqdn"),
    [
        ("reviews", "shop", "reviews.shop.svc.cluster.local"),
        ("reviews.other", "shop", "reviews.other.svc.cluster.local"),
        ("reviews.other.svc", "shop", "reviews.other.svc.cluster.local"),
        ("reviews.other.svc.cluster.local", "shop", "reviews.other.svc.cluster.local"),
        ("Reviews.Shop.svc.cluster.local.", "x", "reviews.shop.svc.cluster.local"),
        ("*.shop.svc.cluster.local", "x", "*.shop.svc.cluster.local"),
    ],
)
def test_host_resolution(host, ns, fqdn):
    assert service_fqdn(host, ns) == fqdn


def test_no_virtual_service_routes_to_the_whole_service():
    table = compile_routes(snapshot())
    route = route_for(table, "POST", "/anything")
    cluster = route.destinations.pick()
    assert cluster.key == ClusterKey(REVIEWS, 9080, "")
    assert pods(cluster) == {"r1", "r2", "r3"}
    assert {u.port for u in cluster.endpoints} == {10080}  # the pod port of service port 9080
    assert route.retry == DEFAULT_RETRY and route.timeout is None and route.fault is None
    assert cluster.policy == TrafficPolicy()  # LEAST_REQUEST, no limits, no outlier detection
    # A tcp port gets TCP routes only; a grpc port HTTP routes, and TCP ones for
    # clients that do not speak HTTP/2 on it.
    assert table.http_routes(REVIEWS, 5432) is None
    assert table.http_routes(REVIEWS, 9090).match("POST", "/a.B/C", {}) is not None
    assert table.tcp_routes(REVIEWS, 9090).destinations.pick().key == ClusterKey(REVIEWS, 9090)
    assert table.tcp_routes(REVIEWS, 5432).destinations.pick().key == ClusterKey(REVIEWS, 5432)
    assert table.problems == ()


def test_weighted_subsets_and_pick_by_weight():
    table = compile_routes(
        snapshot(
            SUBSETS,
            vs(
                {
                    "hosts": ["reviews"],
                    "http": [
                        {
                            "route": [
                                {"destination": {"host": "reviews", "subset": "v1"}, "weight": 75},
                                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 25},
                                {
                                    "destination": {"host": "reviews", "subset": "canary"},
                                    "weight": 0,
                                },
                            ]
                        }
                    ],
                }
            ),
        )
    )
    dests = route_for(table).destinations
    assert [pods(dests.pick(lambda v=v: v)) for v in (0.0, 0.74, 0.75, 0.999)] == [
        {"r1"},
        {"r1"},
        {"r2"},
        {"r2"},
    ]
    assert len(dests.clusters) == 2  # weight 0 never picked
    assert ClusterKey(REVIEWS, 9080, "v2") in table.clusters


def test_subset_labels_select_endpoints_by_workload_labels():
    table = compile_routes(
        snapshot(
            SUBSETS,
            vs(
                {
                    "hosts": ["reviews"],
                    "http": [{"route": [{"destination": {"host": "reviews", "subset": "canary"}}]}],
                }
            ),
        )
    )
    assert pods(route_for(table).destinations.pick()) == {"r3"}


def test_match_semantics():
    table = compile_routes(
        snapshot(
            SUBSETS,
            vs(
                {
                    "hosts": ["reviews"],
                    "http": [
                        {
                            "name": "exact",
                            "match": [{"uri": {"exact": "/login"}}],
                            "route": [{"destination": {"host": "reviews", "subset": "v1"}}],
                        },
                        {
                            "name": "prefix",
                            "match": [{"uri": {"prefix": "/api?x"}}],
                            "route": [{"destination": {"host": "reviews", "subset": "v1"}}],
                        },
                        {
                            "name": "regex",
                            "match": [{"uri": {"regex": "/item/[0-9]+"}}],
                            "route": [{"destination": {"host": "reviews", "subset": "v1"}}],
                        },
                        {
                            "name": "either",
                            "match": [
                                {"method": {"exact": "DELETE"}},
                                {"headers": {"x-user": {"prefix": "admin-"}}},
                            ],
                            "route": [{"destination": {"host": "reviews", "subset": "v1"}}],
                        },
                        {
                            "name": "both",
                            "match": [
                                {
                                    "method": {"regex": "P(UT|OST)"},
                                    "headers": {"x-a": {"exact": "1"}, "x-b": {"exact": "2"}},
                                }
                            ],
                            "route": [{"destination": {"host": "reviews", "subset": "v1"}}],
                        },
                        {
                            "name": "rest",
                            "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
                        },
                    ],
                }
            ),
        )
    )

    def name(method="GET", target="/", **headers):
        return route_for(
            table, method, target, {k.replace("_", "-"): v for k, v in headers.items()}
        ).name

    assert table.http_routes(REVIEWS, 9080).uses_headers
    assert name(target="/login?next=/") == "exact"  # exact ignores the query string
    assert name(target="/login/") == "rest"
    assert name(target="/api?x=1") == "prefix"  # prefix sees the whole target
    assert name(target="/api/v1") == "rest"
    assert name(target="/item/42?full=1") == "regex"
    assert name(target="/item/42x") == "rest"  # a regex matches in full
    assert name("DELETE") == "either"
    assert name(x_user="admin-jo") == "either"
    assert name(x_user="jo-admin-") == "rest"
    assert name("PUT", x_a="1", x_b="2") == "both"
    assert name("PUT", x_a="1") == "rest"  # every condition of one entry must hold
    assert name("PATCH", x_a="1", x_b="2") == "rest"


def test_port_specific_matches_apply_to_their_port_only():
    ports = [
        ServicePort(name="http", port=80, target_port=80),
        ServicePort(name="http-admin", port=8080, target_port=8080),
    ]
    table = compile_routes(
        snapshot(
            SUBSETS,
            vs(
                {
                    "hosts": ["reviews"],
                    "http": [
                        {
                            "name": "admin",
                            "match": [{"port": 8080}],
                            "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
                        },
                        {
                            "name": "rest",
                            "route": [{"destination": {"host": "reviews", "subset": "v1"}}],
                        },
                    ],
                }
            ),
            services=[_service("reviews", NS, ports, ["r1", "r2"])],
        )
    )
    assert route_for(table, port=8080).name == "admin"
    assert route_for(table, port=80).name == "rest"
    # The destination keeps the request's port when the service has it.
    assert route_for(table, port=8080).destinations.pick().key == ClusterKey(REVIEWS, 8080, "v2")


def test_no_matching_rule_means_no_route():
    table = compile_routes(
        snapshot(
            vs(
                {
                    "hosts": ["reviews"],
                    "http": [
                        {
                            "match": [{"uri": {"prefix": "/api"}}],
                            "route": [{"destination": {"host": "reviews"}}],
                        }
                    ],
                }
            )
        )
    )
    assert route_for(table, target="/web") is None


def test_virtual_service_hosts_in_every_form_and_namespace():
    other_ns = vs(
        {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "ratings.shop"}}]}]},
        ns="other",
    )
    dotted = vs(
        {
            "hosts": ["ratings.shop"],
            "http": [
                {
                    "route": [
                        {
                            "destination": {
                                "host": "reviews.shop.svc.cluster.local",
                                "port": {"number": 9080},
                            }
                        }
                    ]
                }
            ],
        },
        name="ratings",
    )
    table = compile_routes(snapshot(other_ns, dotted))
    # "reviews" in namespace other means reviews.other, not reviews.shop.
    assert route_for(table).destinations.pick().key == ClusterKey(REVIEWS, 9080)
    other = route_for(table, host="reviews.other.svc.cluster.local")
    assert other.destinations.pick().key == ClusterKey(RATINGS, 9080)
    assert route_for(table, host=RATINGS).destinations.pick().key == ClusterKey(REVIEWS, 9080)


def test_one_virtual_service_per_host_preferring_the_services_namespace():
    mine = vs(
        {
            "hosts": ["reviews"],
            "http": [{"name": "mine", "route": [{"destination": {"host": "reviews"}}]}],
        }
    )
    foreign = vs(
        {
            "hosts": ["reviews.shop.svc.cluster.local"],
            "http": [{"name": "foreign", "route": [{"destination": {"host": "ratings.shop"}}]}],
        },
        name="a",
        ns="aaa",
    )
    wildcard = vs(
        {
            "hosts": ["*.shop.svc.cluster.local"],
            "http": [{"name": "wild", "route": [{"destination": {"host": "reviews.shop"}}]}],
        },
        name="w",
        ns="aaa",
    )
    table = compile_routes(snapshot(foreign, mine, wildcard))
    assert route_for(table).name == "mine"
    assert any("aaa/a ignored" in p for p in table.problems)
    assert route_for(table, host=RATINGS).name == "wild"  # no exact VS for ratings


def test_destination_rule_policy_merging():
    table = compile_routes(
        snapshot(
            dr(
                {
                    "host": "reviews",
                    "trafficPolicy": {
                        "loadBalancer": {"simple": "ROUND_ROBIN"},
                        "connectionPool": {
                            "tcp": {"maxConnections": 10, "connectTimeout": "2s"},
                            "http": {"http1MaxPendingRequests": 5, "maxRequestsPerConnection": 0},
                        },
                        "outlierDetection": {"consecutiveGatewayErrors": 3},
                        "portLevelSettings": [
                            {"port": {"number": 5432}, "loadBalancer": {"simple": "RANDOM"}}
                        ],
                    },
                    "subsets": [
                        {"name": "v1", "labels": {"version": "v1"}},
                        {
                            "name": "v2",
                            "labels": {"version": "v2"},
                            "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
                        },
                        {
                            "name": "v3",
                            "labels": {"version": "v3"},
                            "trafficPolicy": {
                                "loadBalancer": {"simple": "RANDOM"},
                                "portLevelSettings": [
                                    {
                                        "port": {"number": 9080},
                                        "outlierDetection": {"interval": "1s"},
                                    }
                                ],
                            },
                        },
                    ],
                }
            ),
            vs(
                {
                    "hosts": ["reviews"],
                    "http": [
                        {
                            "route": [
                                {"destination": {"host": "reviews", "subset": s}, "weight": w}
                                for s, w in (("v1", 40), ("v2", 30), ("v3", 30))
                            ]
                        }
                    ],
                }
            ),
        )
    )
    top = TrafficPolicy(
        lb="ROUND_ROBIN",
        connect_timeout=2.0,
        max_connections=10,
        max_pending_requests=5,
        outlier=OutlierPolicy(consecutive_gateway=3),
    )
    c = table.clusters
    assert c[ClusterKey(REVIEWS, 9080, "v1")].policy == top
    assert c[ClusterKey(REVIEWS, 9080, "v2")].policy == TrafficPolicy(
        lb="LEAST_REQUEST",
        connect_timeout=2.0,
        max_connections=10,
        max_pending_requests=5,
        outlier=OutlierPolicy(consecutive_gateway=3),
    )
    # The subset's port-level settings replace all three policies, with defaults for the rest.
    assert c[ClusterKey(REVIEWS, 9080, "v3")].policy == TrafficPolicy(
        outlier=OutlierPolicy(interval=1.0)
    )
    # The rule's port-level settings replace its top level for that port.
    assert table.tcp_routes(REVIEWS, 5432).destinations.pick().policy == TrafficPolicy(lb="RANDOM")


def test_outlier_detection_defaults_are_istios():
    table = compile_routes(
        snapshot(dr({"host": "reviews", "trafficPolicy": {"outlierDetection": {}}}))
    )
    assert route_for(table).destinations.pick().policy.outlier == OutlierPolicy(
        consecutive_5xx=5,
        consecutive_gateway=0,
        interval=10.0,
        base_ejection_time=30.0,
        max_ejection_percent=10,
    )


def test_destination_rule_of_the_services_namespace_wins():
    table = compile_routes(
        snapshot(
            dr(
                {
                    "host": "reviews.shop.svc.cluster.local",
                    "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}},
                },
                name="a",
                ns="aaa",
            ),
            dr({"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}),
        )
    )
    assert route_for(table).destinations.pick().policy.lb == "ROUND_ROBIN"


def test_retries_timeout_and_fault_translation():
    def rule(**extra):
        return {"route": [{"destination": {"host": "reviews"}}], **extra}

    table = compile_routes(
        snapshot(
            vs(
                {
                    "hosts": ["reviews"],
                    "http": [
                        {**rule(retries={"attempts": 0}), "match": [{"uri": {"exact": "/none"}}]},
                        {
                            **rule(
                                retries={"attempts": 2, "retryOn": "unavailable,cancelled,503"},
                                fault={
                                    "abort": {
                                        "grpcStatus": "RESOURCE_EXHAUSTED",
                                        "percentage": {"value": 5},
                                    }
                                },
                            ),
                            "match": [{"uri": {"prefix": "/pkg.Svc/"}}],
                        },
                        {
                            **rule(retries={"attempts": 4, "perTryTimeout": "250ms"}),
                            "match": [{"uri": {"exact": "/n"}}],
                        },
                        {
                            **rule(
                                retries={"attempts": 3, "retryOn": "gateway-error,reset,409"},
                                timeout="1.5s",
                                fault={
                                    "delay": {"fixedDelay": "1s"},
                                    "abort": {"httpStatus": 418, "percentage": {"value": 12.5}},
                                },
                            )
                        },
                    ],
                }
            )
        )
    )
    assert route_for(table, target="/none").retry is None
    grpc = route_for(table, target="/pkg.Svc/Get")
    assert grpc.retry == RetryPolicy(
        attempts=2,
        on_connect_failure=False,
        on_refused_stream=False,  # retryOn names the conditions: refused-stream is not one
        status_codes=frozenset({503}),
        grpc_codes=frozenset({14, 1}),
    )
    assert (grpc.fault.abort_grpc_status, grpc.fault.abort_percent) == (8, 5.0)
    assert route_for(table, target="/n").retry == RetryPolicy(attempts=4, per_try_timeout=0.25)
    full = route_for(table, target="/x")
    assert full.retry == RetryPolicy(
        attempts=3,
        on_gateway_error=True,
        on_reset=True,
        on_connect_failure=False,
        on_refused_stream=False,
        status_codes=frozenset({409}),
    )
    assert full.timeout == 1.5
    assert (full.fault.delay, full.fault.delay_percent) == (1.0, 0.0)  # no percentage: never
    assert (full.fault.abort_status, full.fault.abort_percent) == (418, 12.5)


def test_tcp_routes_with_weights_and_port_match():
    table = compile_routes(
        snapshot(
            SUBSETS,
            vs(
                {
                    "hosts": ["reviews"],
                    "tcp": [
                        {
                            "match": [{"port": 9999}],
                            "route": [{"destination": {"host": "ratings"}}],
                        },
                        {
                            "match": [{"port": 5432}],
                            "route": [
                                {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10},
                            ],
                        },
                    ],
                }
            ),
        )
    )
    db = table.tcp_routes(REVIEWS, 5432).destinations
    assert pods(db.pick(lambda: 0.5)) == {"r1"} and pods(db.pick(lambda: 0.95)) == {"r2"}
    # No tcp rule for 9090: the default route; HTTP ports keep the default too.
    assert table.tcp_routes(REVIEWS, 9090).destinations.pick().key == ClusterKey(REVIEWS, 9090)
    assert route_for(table).destinations.pick().key == ClusterKey(REVIEWS, 9080)


def test_tls_routes_choose_by_sni_on_tls_ports_only():
    tls_port = ServicePort(name="tls-web", port=8443, target_port=8443)
    https_port = ServicePort(name="web", port=443, target_port=443, app_protocol="HTTPS")
    services = [_service("reviews", NS, [tls_port, https_port, TCP], ["r1", "r2", "r3"])]
    v1 = {"destination": {"host": "reviews", "subset": "v1"}}
    table = compile_routes(
        snapshot(
            SUBSETS,
            vs(
                {
                    "hosts": [REVIEWS, "*.example.com"],
                    "tls": [
                        {
                            "match": [{"sniHosts": ["v2.example.com"], "sourceNamespace": "x"}],
                            "route": [{"destination": {"host": "reviews", "subset": "canary"}}],
                        },
                        {
                            "match": [{"sniHosts": ["v2.example.com", "*.v2.example.com"]}],
                            "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
                        },
                        {"match": [{"port": 443, "sniHosts": [REVIEWS]}], "route": [v1]},
                    ],
                }
            ),
            services=services,
        )
    )
    tls = table.tls_routes(REVIEWS, 8443)
    client = _workload("c", app="client")

    def chosen(sni: str | None, port: int = 8443) -> set[str] | None:
        dests = table.tls_routes(REVIEWS, port).destinations_for(sni, client)
        return pods(dests.pick()) if dests else None

    assert chosen("V2.example.com") == {"r2"}  # SNI compares case-insensitively
    assert chosen("a.b.v2.example.com") == {"r2"}
    assert chosen("x.example.com") is None  # no rule: the port's TCP routes decide
    assert chosen(None) is None
    assert chosen(REVIEWS) is None  # the third rule is for port 443
    assert chosen(REVIEWS, 443) == {"r1"}  # an appProtocol HTTPS port
    in_x = _workload("c", ns="x")
    assert pods(tls.destinations_for("v2.example.com", in_x).pick()) == {"r3"}
    assert table.tls_routes(REVIEWS, 5432) is None  # not a tls/https port


def test_references_that_lead_nowhere_are_reported():
    table = compile_routes(
        snapshot(
            SUBSETS,
            vs(
                {
                    "hosts": ["reviews"],
                    "http": [
                        {
                            "match": [{"uri": {"exact": "/a"}}],
                            "route": [{"destination": {"host": "nosuch"}}],
                        },
                        {
                            "match": [{"uri": {"exact": "/b"}}],
                            "route": [{"destination": {"host": "reviews", "subset": "v9"}}],
                        },
                        {
                            "match": [{"uri": {"exact": "/c"}}],
                            "route": [{"destination": {"host": "reviews", "port": {"number": 1}}}],
                        },
                        {"route": [{"destination": {"host": "ratings", "subset": "v1"}}]},
                    ],
                }
            ),
        )
    )
    for target in ("/a", "/b", "/c", "/d"):
        assert route_for(table, target=target).destinations.pick() is None
    text = "\n".join(table.problems)
    assert "host nosuch.shop.svc.cluster.local is not a known service" in text
    assert "has no subset 'v9'" in text and "has no port 1" in text
    assert f"{RATINGS} has no subset 'v1'" in text


def test_destination_port_is_needed_for_a_multi_port_service():
    table = compile_routes(
        snapshot(
            vs(
                {"hosts": ["ratings"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
                name="ratings",
            )
        )
    )
    # ratings:9080 -> reviews has port 9080 too, so it is kept.
    assert route_for(table, host=RATINGS).destinations.pick().key == ClusterKey(REVIEWS, 9080)
    svc = [_service("reviews", NS, [GRPC, TCP], ["r1"]), _service("ratings", NS, [HTTP], ["t1"])]
    table = compile_routes(
        snapshot(
            vs(
                {"hosts": ["ratings"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
                name="ratings",
            ),
            services=svc,
        )
    )
    assert route_for(table, host=RATINGS).destinations.pick() is None
    assert "has several ports" in table.problems[0]


def test_single_endpoint_routes_for_the_destination_proxy():
    ep = Endpoint(ip="10.1.0.1", node="n1", workload_uid="uid-r1", ports={9080: 10080})
    routes = single_endpoint_routes(REVIEWS, 9080, ep, 10080)
    route = routes.match("GET", "/", {})
    assert route.retry is None and route.timeout is None
    cluster = route.destinations.pick()
    assert [u.address for u in cluster.endpoints] == ["10.1.0.1:10080"]
