"""VirtualService `match[].sourceLabels` and `sourceNamespace` (issue #21): conditions on the
client workload, as Istio documents them, for HTTP rules (per request) and TCP rules (per
connection); decided by the source node's proxy from its local workloads."""

from __future__ import annotations

import pytest
from meshagent.agent.proxy.routing import ClusterKey, compile_routes
from meshagent.common.istio.resource import ResourceError, parse_resource
from meshagent.common.snapshot import Workload
from meshagent.controller.describe import describe

from tests.unit.test_routing import NS, REVIEWS, SUBSETS, snapshot, vs


def _client(ns: str = NS, **labels: str) -> Workload:
    return Workload(uid="uid-c", namespace=ns, name="c", node="n1", ips=["10.0.9.9"], labels=labels)


V2_FOR_CANARY_CLIENTS = vs(
    {
        "hosts": ["reviews"],
        "http": [
            {
                "match": [{"sourceLabels": {"app": "productpage", "track": "canary"}}],
                "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
            },
            {
                "match": [{"sourceNamespace": "other", "uri": {"prefix": "/api"}}],
                "route": [{"destination": {"host": "reviews", "subset": "canary"}}],
            },
            {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
        ],
        "tcp": [
            {
                "match": [{"port": 5432, "sourceLabels": {"app": "admin"}}],
                "route": [{"destination": {"host": "reviews", "port": {"number": 9090}}}],
            },
            {"route": [{"destination": {"host": "reviews", "port": {"number": 5432}}}]},
        ],
    }
)


@pytest.mark.parametrize(
    ("client", "target", "subset"),
    [
        # every label of sourceLabels must be present with the same value; extra labels fine
        (_client(app="productpage", track="canary", x="y"), "/", "v2"),
        (_client(app="productpage"), "/", "v1"),
        (_client(app="productpage", track="stable"), "/", "v1"),
        # sourceNamespace and the other conditions of the same entry must all hold
        (_client("other", app="productpage"), "/api/x", "canary"),
        (_client("other", app="productpage"), "/web", "v1"),
        (_client(NS, app="productpage"), "/api/x", "v1"),
        # a client that is not a known workload matches no entry naming a source
        (None, "/api/x", "v1"),
    ],
)
def test_http_rules_by_client_labels_and_namespace(client, target, subset):
    table = compile_routes(snapshot(V2_FOR_CANARY_CLIENTS, SUBSETS))
    route = table.http_routes(REVIEWS, 9080).match("GET", target, {}, client)
    assert route.destinations.pick().key == ClusterKey(REVIEWS, 9080, subset)


def test_tcp_rules_by_client_labels_per_connection():
    table = compile_routes(snapshot(V2_FOR_CANARY_CLIENTS, SUBSETS))
    db = table.tcp_routes(REVIEWS, 5432)
    assert db.destinations_for(_client(app="admin")).pick().key == ClusterKey(REVIEWS, 9090)
    for other in (_client(app="web"), None):
        assert db.destinations_for(other).pick().key == ClusterKey(REVIEWS, 5432)
    # a source-only rule for another port does not reach this one
    grpc = table.tcp_routes(REVIEWS, 9090)
    assert grpc.destinations_for(_client(app="admin")).pick().key == ClusterKey(REVIEWS, 5432)


def test_tcp_source_rules_alone_fall_back_to_the_service():
    table = compile_routes(
        snapshot(
            vs(
                {
                    "hosts": ["reviews"],
                    "tcp": [
                        {
                            "match": [{"sourceNamespace": "other"}],
                            "route": [
                                {"destination": {"host": "ratings", "port": {"number": 9080}}}
                            ],
                        }
                    ],
                }
            )
        )
    )
    db = table.tcp_routes(REVIEWS, 5432)
    ratings = f"ratings.{NS}.svc.cluster.local"
    assert db.destinations_for(_client("other")).pick().key == ClusterKey(ratings, 9080)
    assert db.destinations_for(_client()).pick().key == ClusterKey(REVIEWS, 5432)


def test_validation_accepts_them_and_refuses_a_bad_namespace():
    parse_resource(V2_FOR_CANARY_CLIENTS)
    bad = vs(
        {
            "hosts": ["reviews"],
            "http": [
                {
                    "match": [{"sourceNamespace": "Not_A_Name"}],
                    "route": [{"destination": {"host": "reviews"}}],
                }
            ],
        }
    )
    with pytest.raises(ResourceError, match="sourceNamespace"):
        parse_resource(bad)


def test_explain_says_which_clients():
    text = "\n".join(describe(parse_resource(V2_FOR_CANARY_CLIENTS)))
    assert "requests with client pod labels app=productpage,track=canary ->" in text
    assert "uri starting '/api' and client pod namespace other ->" in text
    assert "tcp[0] (port 5432) (with client pod labels app=admin):" in text
