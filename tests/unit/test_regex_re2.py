"""VirtualService regexes are RE2, as Istio documents them and Envoy's safe_regex runs them.

Validation refuses what RE2 refuses (lookarounds, backreferences, ...) naming the resource and
the field; the proxy matches with the same engine, in full, with RE2's ASCII classes.
"""

from __future__ import annotations

import pytest
from meshagent.agent.proxy.routing import compile_routes
from meshagent.common.istio import ResourceError, parse_documents, parse_resource
from meshagent.common.istio.networking import MAX_REGEX_PROGRAM_SIZE, compile_regex
from meshagent.common.snapshot import Endpoint, Service, ServicePort, Snapshot, Workload

HOST = "reviews.shop.svc.cluster.local"


def _vs(match: dict, name: str = "reviews-routes") -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "hosts": ["reviews"],
            "http": [
                {
                    "name": "matched",
                    "match": [match],
                    "route": [{"destination": {"host": "reviews"}}],
                },
                {"name": "rest", "route": [{"destination": {"host": "reviews"}}]},
            ],
        },
    }


# Patterns Python's `re` accepts and RE2 refuses: each would have been a silent difference.
REFUSED = [
    ("(?=admin)/.*", "invalid perl operator: (?="),  # lookahead
    ("(?!admin)/.*", "invalid perl operator: (?!"),  # negative lookahead
    ("/.*(?<=admin)", "invalid perl operator: (?<"),  # lookbehind
    ("/(a)\\1", "invalid escape sequence: \\1"),  # backreference
    ("/(?P<x>a)(?P=x)", "invalid perl operator: (?P"),  # named backreference
    ("/a*+", "bad repetition operator: *+"),  # possessive quantifier
    ("/(?>a)", "invalid perl operator: (?>"),  # atomic group
    ("/x\\Z", "invalid escape sequence: \\Z"),  # Python's end anchor (RE2 writes \z)
]


@pytest.mark.parametrize(("pattern", "reason"), REFUSED, ids=[p for p, _ in REFUSED])
def test_validation_refuses_what_re2_refuses_with_the_field_path(pattern: str, reason: str):
    with pytest.raises(ResourceError) as info:
        parse_resource(_vs({"uri": {"regex": pattern}}))
    err = info.value
    assert (err.kind, err.namespace, err.name) == ("VirtualService", "shop", "reviews-routes")
    assert err.path == "spec.http[0].match[0].uri.regex"
    assert f"invalid regex {pattern!r}" in err.message and reason in err.message
    assert "RE2" in err.message


@pytest.mark.parametrize(
    ("match", "path"),
    [
        (
            {"headers": {"x-user": {"regex": "(?=bob).*"}}},
            "spec.http[0].match[0].headers.x-user.regex",
        ),
        ({"method": {"regex": "(GET)\\1"}}, "spec.http[0].match[0].method.regex"),
    ],
)
def test_header_and_method_regexes_are_re2_too(match: dict, path: str) -> None:
    with pytest.raises(ResourceError) as info:
        parse_resource(_vs(match))
    assert info.value.path == path and "invalid regex" in info.value.message


def test_a_refused_regex_rejects_its_resource_only() -> None:
    good, bad = parse_documents([_vs({"uri": {"regex": "(?=x)"}}, "bad"), _vs({}, "good")])
    assert [r.name for r in good] == ["good"] and [e.name for e in bad] == ["bad"]
    assert str(bad[0]).startswith("VirtualService shop/bad: spec.http[0].match[0].uri.regex: ")


def test_too_complex_a_program_is_refused() -> None:
    assert compile_regex("\\pL{20}").programsize <= MAX_REGEX_PROGRAM_SIZE
    with pytest.raises(ValueError, match="too complex"):
        compile_regex("\\pL{30}")


def test_re2_only_syntax_is_accepted() -> None:
    for pattern in ("/[[:digit:]]+", "/\\pL+", "/(?i)Admin", "/a\\z", "/(?P<id>[0-9]+)"):
        parse_resource(_vs({"uri": {"regex": pattern}}))


# ---------------------------------------------------------------------------------------------
# Matching in the proxy's route table.


def _route_for(match: dict):
    snap = Snapshot(
        node="n1",
        workloads=[
            Workload(uid="r", namespace="shop", name="reviews", node="n1", ips=["10.0.0.3"])
        ],
        services=[
            Service(
                namespace="shop",
                name="reviews",
                vips=["10.96.0.3"],
                ports=[ServicePort(name="http", port=9080, target_port=9080)],
                endpoints=[
                    Endpoint(ip="10.0.0.3", node="n1", workload_uid="r", ports={9080: 9080})
                ],
            )
        ],
        istio_resources=[_vs(match)],
    )
    routes = compile_routes(snap).http_routes(HOST, 9080)
    assert routes is not None

    def name(target: str = "/", method: str = "GET", headers: dict | None = None) -> str:
        route = routes.match(method, target, headers or {})
        assert route is not None
        return route.name

    return name


def test_digit_class_is_ascii_only() -> None:
    name = _route_for({"uri": {"regex": "/item/\\d+"}})
    assert name("/item/42") == "matched"
    assert name("/item/\u0664\u0662") == "rest"  # Arabic-Indic digits: Python's \d takes them


def test_word_class_and_posix_classes() -> None:
    assert _route_for({"uri": {"regex": "/\\w+"}})("/caf\u00e9") == "rest"  # \w is ASCII
    assert _route_for({"uri": {"regex": "/[[:digit:]]+"}})("/2024") == "matched"
    assert _route_for({"uri": {"regex": "/\\pL+"}})("/caf\u00e9") == "matched"


def test_a_regex_must_match_the_whole_value() -> None:
    name = _route_for({"uri": {"regex": "/item/[0-9]+"}})
    assert name("/item/42") == "matched"
    assert name("/item/42?full=1") == "matched"  # the query is not part of the path
    assert name("/item/42x") == "rest"
    assert name("/shop/item/42") == "rest"
    header = _route_for({"headers": {"x-user": {"regex": "bob|alice"}}})
    assert header(headers={"x-user": "alice"}) == "matched"
    assert header(headers={"x-user": "alice2"}) == "rest"
    assert header(headers={"x-user": "xbob"}) == "rest"


def test_alternation_is_leftmost_first_but_still_anchored() -> None:
    # RE2 and Envoy anchor the whole pattern, not the first alternative: "a|ab" matches "ab".
    assert _route_for({"uri": {"regex": "/a|/ab"}})("/ab") == "matched"
