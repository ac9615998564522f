"""DestinationRule `loadBalancer.consistentHash` (issue #21): the schema as Istio documents it,
what a request or connection is hashed on (agent/proxy/hashkey.py, Envoy's hash policies), and
how the balancer sticks a key to an endpoint (agent/proxy/lb.py)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from meshagent.agent.proxy.hashkey import connection_key, request_key
from meshagent.agent.proxy.http.types import RequestInfo
from meshagent.agent.proxy.routing import HashPolicy, compile_routes
from meshagent.common.istio.resource import ResourceError, parse_resource
from meshagent.controller.describe import describe

from tests.unit.test_lb import cluster, ip
from tests.unit.test_routing import REVIEWS, dr, snapshot


def _dr(lb: dict) -> dict:
    return dr({"host": "reviews", "trafficPolicy": {"loadBalancer": lb}})


@pytest.mark.parametrize(
    ("hash_", "policy"),
    [
        ({"httpHeaderName": "X-User"}, HashPolicy("header", "x-user")),
        ({"httpCookie": {"name": "user", "ttl": "0s"}}, HashPolicy("cookie", "user", 0.0)),
        (
            {"httpCookie": {"name": "u", "path": "/", "ttl": "60s"}, "minimumRingSize": 1024},
            HashPolicy("cookie", "u", 60.0, "/"),
        ),
        ({"useSourceIp": True, "ringHash": {"minimumRingSize": 64}}, HashPolicy("source_ip")),
        (
            {"httpQueryParameterName": "user", "maglev": {"tableSize": 65537}},
            HashPolicy("query", "user"),
        ),
    ],
)
def test_schema_and_compiled_policy(hash_, policy):
    table = compile_routes(snapshot(_dr({"consistentHash": hash_})))
    spec = table.http_routes(REVIEWS, 9080).match("GET", "/", {}).destinations.pick()
    assert spec.policy.hash == policy
    assert spec.policy.lb == "RANDOM"  # what a request without a key gets, as Envoy's ring


@pytest.mark.parametrize(
    ("lb", "error"),
    [
        ({"consistentHash": {}}, "exactly one of httpHeaderName"),
        ({"consistentHash": {"httpHeaderName": "a", "useSourceIp": True}}, "exactly one"),
        ({"consistentHash": {"useSourceIp": False}}, "exactly one"),
        ({"simple": "RANDOM", "consistentHash": {"useSourceIp": True}}, "simple or consistent"),
        ({"consistentHash": {"httpCookie": {"ttl": "1s"}}}, "name"),
        (
            {"consistentHash": {"useSourceIp": True, "ringHash": {}, "maglev": {}}},
            "ringHash or maglev",
        ),
    ],
)
def test_schema_refuses(lb, error):
    with pytest.raises(ResourceError, match=error):
        parse_resource(_dr(lb))


def _info(target: str = "/", headers=(), peer: str = "10.0.0.9") -> RequestInfo:
    return RequestInfo("GET", target, "reviews", list(headers), peer=peer)


@pytest.mark.parametrize(
    ("policy", "target", "headers", "key"),
    [
        (HashPolicy("header", "x-user"), "/", [(b"x-user", b"ann")], b"ann"),
        (HashPolicy("header", "x-user"), "/", [(b"x-user", b"a"), (b"x-user", b"b")], b"a,b"),
        (HashPolicy("header", "x-user"), "/", [], None),
        (HashPolicy("query", "u"), "/p?x=1&u=a%20b&u=c", [], b"a%20b"),  # first, not decoded
        (HashPolicy("query", "u"), "/p?uu=1", [], None),
        (HashPolicy("cookie", "s"), "/", [(b"cookie", b'a=1; s="xyz"')], b"xyz"),
        (HashPolicy("cookie", "s"), "/", [(b"cookie", b"a=1"), (b"cookie", b"s=2")], b"2"),
        (HashPolicy("cookie", "s"), "/", [(b"cookie", b"a=1")], None),  # no ttl: none made
        (HashPolicy("source_ip"), "/", [], b"10.0.0.1"),
    ],
)
def test_request_keys(policy, target, headers, key):
    got, cookie = request_key(policy, _info(target, headers), "10.0.0.1", random.Random(1))
    assert got == key and cookie is None


def test_a_missing_cookie_with_ttl_is_made_and_set_on_the_response():
    policy = HashPolicy("cookie", "sticky", 3600.0, "/app")
    key, op = request_key(policy, _info(), "10.0.0.1", random.Random(1))
    assert key is not None and len(key) == 16
    ((name, value),) = op.apply([])
    assert name == b"set-cookie"
    assert value == b'sticky="' + key + b'"; Max-Age=3600; Path=/app; HttpOnly'
    # ttl 0: a session cookie (no Max-Age)
    _, op = request_key(HashPolicy("cookie", "s", 0.0), _info(), "", random.Random(2))
    assert b"Max-Age" not in op.apply([])[0][1]


def test_only_source_ip_hashes_connections():
    assert connection_key(HashPolicy("source_ip"), "10.0.0.7") == b"10.0.0.7"
    assert connection_key(HashPolicy("header", "x-user"), "10.0.0.7") is None
    assert connection_key(None, "10.0.0.7") is None


def test_same_key_sticks_different_keys_spread_and_a_leaving_endpoint_moves_only_its_keys():
    c = cluster(5, name="hash", lb="RANDOM", hash=HashPolicy("header", "x-user"))
    keys = [f"user-{i}".encode() for i in range(200)]
    first = {k: ip(c.pick((), k)) for k in keys}
    assert all(ip(c.pick((), k)) == first[k] for k in keys for _ in range(3))
    spread = Counter(first.values())
    assert len(spread) == 5 and min(spread.values()) >= 20, spread
    # a retry (the first endpoint excluded) moves to another endpoint, the same for a key
    k = keys[0]
    tried = [c.pick((), k)]
    assert ip(c.pick(tried, k)) != first[k] and ip(c.pick(tried, k)) == ip(c.pick(tried, k))
    # the endpoint that leaves takes only its own keys elsewhere
    gone = first[k]
    spec = c.spec
    c.update(
        type(spec)(spec.key, tuple(u for u in spec.endpoints if u.endpoint.ip != gone), spec.policy)
    )
    after = {k2: ip(c.pick((), k2)) for k2 in keys}
    assert all(after[k2] == first[k2] for k2 in keys if first[k2] != gone)
    assert all(after[k2] != gone for k2 in keys)


def test_without_a_key_the_pick_is_random():
    c = cluster(3, name="nokey", lb="RANDOM", hash=HashPolicy("header", "x-user"))
    assert len({ip(c.pick()) for _ in range(60)}) == 3


def test_explain_says_what_sticks():
    text = "\n".join(
        describe(
            parse_resource(_dr({"consistentHash": {"httpCookie": {"name": "u", "ttl": "10s"}}}))
        )
    )
    assert "consistent hashing on the request's cookie 'u' (set by the proxy" in text
    text = "\n".join(describe(parse_resource(_dr({"consistentHash": {"useSourceIp": True}}))))
    assert "per connection on TCP ports" in text
