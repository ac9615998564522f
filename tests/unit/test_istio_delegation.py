"""VirtualService delegation (common/istio/delegation.py), as Istio's documentation and its
merge (pilot's mergeHTTPRoute/hasConflict) decide it: which delegate rules survive under a
root rule, with which joined match, and what they inherit; and where the requests then go
once compiled (agent/proxy/routing.py)."""

from __future__ import annotations

import pytest
from meshagent.agent.proxy.routing import compile_routes
from meshagent.common.istio import networking as net
from meshagent.common.istio.delegation import merge_delegates
from meshagent.common.istio.resource import parse_resource

from tests.unit.test_routing import REVIEWS, SUBSETS, pods, snapshot


def virtual_service(name: str, spec: dict, ns: str = "shop") -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def to(subset: str) -> list[dict]:
    return [{"destination": {"host": "reviews", "subset": subset}}]


ROOT = virtual_service(
    "root",
    {
        "hosts": ["reviews"],
        "http": [
            {
                "name": "api",
                "match": [{"uri": {"prefix": "/api"}, "headers": {"x-team": {"exact": "a"}}}],
                "delegate": {"name": "api-routes"},
                "timeout": "3s",
            },
            {"route": to("canary")},
        ],
    },
)
DELEGATE = virtual_service(
    "api-routes",
    {
        "http": [
            {"name": "v2", "match": [{"uri": {"prefix": "/api/v2"}}], "route": to("v2")},
            {"match": [{"uri": {"exact": "/other"}}], "route": to("v2")},  # outside /api
            {"route": to("v1"), "timeout": "1s"},
        ]
    },
)


def merged(*docs: dict) -> tuple[list[net.VirtualService], list[str]]:
    return merge_delegates(parse_resource(d) for d in docs)


def test_delegate_rules_take_the_root_rules_place_joined_with_its_match():
    (root,), warnings = merged(ROOT, DELEGATE)
    names = [rule.name for rule in root.spec.http]
    assert names == ["api-v2", "api", None]  # root-name[-delegate-name]; the root's last rule
    v2, rest, last = root.spec.http
    (entry,) = v2.match
    assert entry.uri.prefix == "/api/v2" and entry.headers["x-team"].exact == "a"
    assert v2.timeout == 3.0  # inherited from the root rule
    (entry,) = rest.match
    assert entry.uri.prefix == "/api"  # the delegate rule without match takes the root's
    assert rest.timeout == 1.0  # its own setting wins
    assert last.route[0].destination.subset == "canary"
    assert warnings == [
        "VirtualService shop/api-routes http[1]: its match cannot lie within the match of "
        "shop/root http[0] that delegates to it: ignored"
    ]


@pytest.mark.parametrize(
    ("root_uri", "leaf_uri", "conflict"),
    [
        ({"prefix": "/a"}, {"prefix": "/a/b"}, False),
        ({"prefix": "/a/b"}, {"prefix": "/a"}, True),  # wider than the root
        ({"prefix": "/a"}, {"exact": "/a/x"}, False),
        ({"exact": "/a"}, {"exact": "/a"}, False),
        ({"exact": "/a"}, {"exact": "/b"}, True),
        ({"exact": "/a"}, {"prefix": "/a"}, True),
        ({"regex": "/a.*"}, {"prefix": "/a"}, True),  # a regex beside any other uri match
        ({"prefix": "/a"}, {"regex": "/a.*"}, True),
        (None, {"regex": "/a.*"}, False),
    ],
)
def test_which_delegate_matches_lie_within_the_roots(root_uri, leaf_uri, conflict):
    root_match = [{"uri": root_uri}] if root_uri else [{"port": 9080}]
    root = virtual_service(
        "root", {"hosts": ["reviews"], "http": [{"match": root_match, "delegate": {"name": "d"}}]}
    )
    leaf = virtual_service("d", {"http": [{"match": [{"uri": leaf_uri}], "route": to("v2")}]})
    (vs,), warnings = merged(root, leaf)
    assert (len(vs.spec.http) == 0) == conflict
    assert bool(warnings) == conflict


def test_a_missing_delegate_drops_only_its_rule_and_delegates_route_nothing_alone():
    (root,), warnings = merged(ROOT)
    assert [rule.route[0].destination.subset for rule in root.spec.http] == ["canary"]
    assert warnings == [
        "VirtualService shop/root http[0]: delegate shop/api-routes not found (a "
        "VirtualService without hosts): the rule is ignored"
    ]
    assert merged(DELEGATE) == ([], [])


def test_a_delegate_in_another_namespace_is_named_with_it():
    root = virtual_service(
        "root",
        {"hosts": ["reviews"], "http": [{"delegate": {"name": "d", "namespace": "team"}}]},
    )
    leaf = virtual_service("d", {"http": [{"route": to("v2")}]}, ns="team")
    (vs,), warnings = merged(root, leaf, virtual_service("d", {"http": [{"route": to("v1")}]}))
    assert [r.route[0].destination.subset for r in vs.spec.http] == ["v2"] and not warnings


def test_compiled_requests_go_where_the_merged_rules_send_them():
    table = compile_routes(snapshot(SUBSETS, ROOT, DELEGATE))
    routes = table.http_routes(REVIEWS, 9080)

    def where(path: str, team: str = "a") -> set[str] | None:
        route = routes.match("GET", path, {"x-team": team})
        return pods(route.destinations.pick()) if route else None

    assert where("/api/v2/x") == {"r2"}
    assert where("/api/x") == {"r1"}
    assert where("/api/x", team="b") == {"r3"}  # the root's match fails: its next rule
    assert where("/other") == {"r3"}
    assert any("cannot lie within" in p for p in table.problems)
