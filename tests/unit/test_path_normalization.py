"""Request path normalization (common/pathnorm.py) and where it applies.

Tables per mode (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES): the bypasses of issue
#21, the cases Envoy's own path utility tests cover (re-stated here as we understand them),
Istio's normalization reference, refusals (400), the query left alone; then the HTTP engine
(normalizes before the request filter, route matching and forwarding), the authorization
evaluator's host matching, and `meshctl authz check` (explain) judging the normalized path.
"""

from __future__ import annotations

import re

import h11
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from meshagent.agent.proxy.http import (
    HttpContext,
    HttpSettings,
    LocalResponse,
    RequestInfo,
    RequestRecord,
    open_connection_pool,
    proxy_http1,
)
from meshagent.agent.proxy.http.memstream import memory_stream_pair
from meshagent.agent.proxy.lb import Clusters
from meshagent.agent.proxy.routing import single_endpoint_routes
from meshagent.common import authz
from meshagent.common.istio.resource import parse_resource
from meshagent.common.pathnorm import (
    DEFAULT_MODE,
    InvalidPath,
    PathNormalization,
    normalize_path,
    normalize_target,
)
from meshagent.common.snapshot import Endpoint, Snapshot, Workload
from meshagent.controller.explain import ExplainError, explain

NONE = PathNormalization.NONE
BASE = PathNormalization.BASE
MERGE = PathNormalization.MERGE_SLASHES
DECODE = PathNormalization.DECODE_AND_MERGE_SLASHES
MODES = (NONE, BASE, MERGE, DECODE)

# The four requests of issue #21 that reached the server past a DENY on /admin*.
BYPASSES = ["/./admin/x", "/public/../admin/x", "//admin/x", "/%61dmin/x"]

# target -> what each mode makes of it: (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
TABLE: list[tuple[str, tuple[str, str, str, str]]] = [
    # already normal: unchanged everywhere
    ("/", ("/", "/", "/", "/")),
    ("/xyz", ("/xyz", "/xyz", "/xyz", "/xyz")),
    ("/x/y/z/", ("/x/y/z/", "/x/y/z/", "/x/y/z/", "/x/y/z/")),
    ("/A/B/C", ("/A/B/C", "/A/B/C", "/A/B/C", "/A/B/C")),  # never case-folded
    ("/a/.hidden/..x", ("/a/.hidden/..x",) * 4),  # dots inside a segment are not segments
    # the issue's bypasses
    ("/./admin/x", ("/./admin/x", "/admin/x", "/admin/x", "/admin/x")),
    ("/public/../admin/x", ("/public/../admin/x", "/admin/x", "/admin/x", "/admin/x")),
    ("//admin/x", ("//admin/x", "//admin/x", "/admin/x", "/admin/x")),
    ("/%61dmin/x", ("/%61dmin/x", "/admin/x", "/admin/x", "/admin/x")),
    # dot segments (RFC 3986 5.2.4); ".." never climbs above the root and is not an error
    ("/a/b/../c", ("/a/b/../c", "/a/c", "/a/c", "/a/c")),
    ("/a/b/./c", ("/a/b/./c", "/a/b/c", "/a/b/c", "/a/b/c")),
    ("/a/b/../../../../c", ("/a/b/../../../../c", "/c", "/c", "/c")),
    ("/../a/b", ("/../a/b", "/a/b", "/a/b", "/a/b")),
    ("/./a/b", ("/./a/b", "/a/b", "/a/b", "/a/b")),
    ("/..", ("/..", "/", "/", "/")),
    ("/a/b/..", ("/a/b/..", "/a/", "/a/", "/a/")),  # a final dot segment keeps the slash
    ("/a/.", ("/a/.", "/a/", "/a/", "/a/")),
    # encoded dots are dots (decoded before segments are looked at)
    ("/a/b/%2E%2E/c", ("/a/b/%2E%2E/c", "/a/c", "/a/c", "/a/c")),
    ("/a/b/%2e%2e/c", ("/a/b/%2e%2e/c", "/a/c", "/a/c", "/a/c")),
    ("/a/b/%2E./c", ("/a/b/%2E./c", "/a/c", "/a/c", "/a/c")),
    ("/a/b/%2E/c", ("/a/b/%2E/c", "/a/b/c", "/a/b/c", "/a/b/c")),
    # unreserved characters decoded; other encodings kept, hex digits upper-cased
    ("/%41%7a%30%2d%5f%7e", ("/%41%7a%30%2d%5f%7e", "/Az0-_~", "/Az0-_~", "/Az0-_~")),
    ("/%c0%af", ("/%c0%af", "/%C0%AF", "/%C0%AF", "/%C0%AF")),  # non-ASCII bytes stay encoded
    ("/a%3bb%3Fc", ("/a%3bb%3Fc", "/a%3Bb%3Fc", "/a%3Bb%3Fc", "/a%3Bb%3Fc")),
    ("/%252F", ("/%252F",) * 4),  # decoded once only: never "/"
    # backslashes are slashes (Istio: "\\da" -> "/da")
    ("/a/..\\c", ("/a/..\\c", "/c", "/c", "/c")),
    ("/admin\\x", ("/admin\\x", "/admin/x", "/admin/x", "/admin/x")),
    # encoded slashes and backslashes: only DECODE_AND_MERGE_SLASHES decodes them
    ("/a/%2F%2f/c", ("/a/%2F%2f/c", "/a/%2F%2F/c", "/a/%2F%2F/c", "/a/c")),
    ("/%5c%25", ("/%5c%25", "/%5C%25", "/%5C%25", "/%25")),
    ("/admin%2Fx", ("/admin%2Fx", "/admin%2Fx", "/admin%2Fx", "/admin/x")),
    ("/a%5cadmin", ("/a%5cadmin", "/a%5Cadmin", "/a%5Cadmin", "/a/admin")),
    ("/x%2F..%2Fadmin", ("/x%2F..%2Fadmin", "/x%2F..%2Fadmin", "/x%2F..%2Fadmin", "/admin")),
    (
        "/x/%2E%2e/z%2f%2Fabc%5C../def",
        (
            "/x/%2E%2e/z%2f%2Fabc%5C../def",
            "/z%2F%2Fabc%5C../def",
            "/z%2F%2Fabc%5C../def",
            "/z/def",
        ),
    ),
    # slashes merged (a trailing one stays) after dot segments are gone
    ("/a//b/c", ("/a//b/c", "/a//b/c", "/a/b/c", "/a/b/c")),
    ("/a////b/c//", ("/a////b/c//", "/a////b/c//", "/a/b/c/", "/a/b/c/")),
    ("/a/.//b", ("/a/.//b", "/a//b", "/a/b", "/a/b")),
    # the query is not part of the path: left exactly as received
    ("/a//b?a=///c", ("/a//b?a=///c", "/a//b?a=///c", "/a/b?a=///c", "/a/b?a=///c")),
    ("/a/../b?x=/../%2f%zz", ("/a/../b?x=/../%2f%zz",) + ("/b?x=/../%2f%zz",) * 3),
    ("//a/?b", ("//a/?b", "//a/?b", "/a/?b", "/a/?b")),
    ("/a//b?", ("/a//b?", "/a//b?", "/a/b?", "/a/b?")),
    ("*", ("*",) * 4),  # OPTIONS *
]

# Paths no mode but NONE accepts: 400 with the reason.
REFUSED = [
    ("/%zz", "invalid percent-encoding"),
    ("/%", "invalid percent-encoding"),
    ("/abc%2", "invalid percent-encoding"),
    ("/xyz/AAAAA%%0000/abc", "invalid percent-encoding"),
    ("/xyz/.%00../abc", "%00"),
    ("/xyz/%00.%00./abc", "%00"),
    ("/a#frag", "fragment"),
    ("/a?b#frag", "fragment"),
    ("a/b/../c", "neither a path"),
    ("ftp://h/a", "neither a path"),
    ("http:///a", "no host"),
]


@pytest.mark.parametrize(("target", "expected"), TABLE, ids=[t for t, _ in TABLE])
def test_each_mode_normalizes_as_documented(target: str, expected: tuple[str, ...]) -> None:
    got = tuple(normalize_target(target, mode).target for mode in MODES)
    assert got == expected


@pytest.mark.parametrize("target", BYPASSES)
def test_the_default_closes_every_bypass_of_the_issue(target: str) -> None:
    assert DEFAULT_MODE is DECODE
    assert normalize_target(target).target == "/admin/x"


@pytest.mark.parametrize(("target", "reason"), REFUSED, ids=[t for t, _ in REFUSED])
def test_paths_that_cannot_be_normalized_are_refused_in_plain_words(
    target: str, reason: str
) -> None:
    for mode in (BASE, MERGE, DECODE):
        with pytest.raises(InvalidPath, match=re.escape(reason)):
            normalize_target(target, mode)
    assert normalize_target(target, NONE).target == target  # NONE forwards anything as is


def test_absolute_form_becomes_origin_form_and_names_the_host() -> None:
    assert normalize_target("http://Reviews.shop:9080/./admin/x?q=1") == (
        "/admin/x?q=1",
        "Reviews.shop:9080",
    )
    assert normalize_target("HTTPS://h") == ("/", "h")
    assert normalize_target("http://h?q") == ("/?q", "h")
    assert normalize_target("http://h/a", NONE) == ("http://h/a", None)


def test_normalize_path_takes_the_path_alone() -> None:
    assert normalize_path("/a/%2e%2E/b%2f?") == "/b/?"  # no query split here: "?" is a char
    with pytest.raises(InvalidPath, match="does not start with '/'"):
        normalize_path("admin")


_PATH_CHARS = st.sampled_from(["/", ".", "..", "%2e", "%2F", "%5c", "\\", "a", "%41", "%3b", "~"])


@given(st.lists(_PATH_CHARS, max_size=12), st.sampled_from([BASE, MERGE, DECODE]))
def test_normalizing_twice_changes_nothing(parts: list[str], mode: PathNormalization) -> None:
    """The destination's proxy normalizes what the source's proxy forwarded: a no-op."""
    once = normalize_path("/" + "".join(parts), mode)
    assert normalize_path(once, mode) == once
    if mode is not BASE:
        assert "//" not in once
    assert "/./" not in once + "/" and "/../" not in once + "/"


# ---------------------------------------------------------------------------------------------
# The HTTP engine: the filter, the routes and the upstream see the normalized request.

DENY_ADMIN = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-admin", "namespace": "shop"},
    "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]},
}
_POLICIES = authz.PolicySet([parse_resource(DENY_ADMIN)])
_REVIEWS = authz.Workload("shop", {"app": "reviews"})


async def _exchange(
    raw: bytes, mode: PathNormalization = DEFAULT_MODE
) -> tuple[int, bytes, list[tuple[bytes, bytes]], list[RequestRecord]]:
    """One client connection sending `raw` through proxy_http1 (DENY /admin* as its filter)
    to an upstream that records (target, host) of what it gets. Returns (status, body,
    upstream requests, records)."""
    seen: list[tuple[bytes, bytes]] = []
    records: list[RequestRecord] = []

    async def upstream(stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                host = next(v for n, v in event.headers if n == b"host")
                seen.append((event.target, host))
            if isinstance(event, h11.EndOfMessage):
                await stream.send_all(
                    conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"2")]))
                    + conn.send(h11.Data(data=b"ok"))
                    + conn.send(h11.EndOfMessage())
                )
                conn.start_next_cycle()

    async def request_filter(info: RequestInfo) -> LocalResponse | None:
        http = authz.HttpAttrs(info.method, info.path, info.authority, info.header_map())
        request = authz.Request(None, None, "10.0.0.1", "10.0.0.3", 9080, http)
        if _POLICIES.evaluate(_REVIEWS, request).allowed:
            return None
        return LocalResponse(403, b"RBAC: access denied", flags=("RBAC",))

    endpoint = Endpoint(ip="10.0.0.3", node="n", workload_uid="r", ports={9080: 9080})
    routes = single_endpoint_routes("reviews.shop.svc.cluster.local", 9080, endpoint, 9080)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery, open_connection_pool() as pool:

            async def connect(ep: Endpoint, port: int, _spec=None) -> trio.abc.HalfCloseableStream:
                near, far = memory_stream_pair()
                nursery.start_soon(upstream, far)
                return near

            client, server = memory_stream_pair()
            ctx = HttpContext(
                routes=lambda: routes,
                clusters=Clusters(),
                pool=pool,
                connect=connect,
                request_filter=request_filter,
                on_request_done=records.append,
                settings=HttpSettings(path_normalization=mode),
            )
            nursery.start_soon(proxy_http1, server, ctx)
            await client.send_all(raw)
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            status, body = 0, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await client.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            await client.aclose()
            nursery.cancel_scope.cancel()
    return status, body, seen, records


def _get(target: str, host: str = "reviews.shop:9080") -> bytes:
    return f"GET {target} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()


@pytest.mark.parametrize("target", ["/admin/x", *BYPASSES, "/admin%2Fx", "/public/..%5Cadmin/x"])
async def test_the_engine_denies_every_spelling_of_admin(target: str) -> None:
    status, body, seen, records = await _exchange(_get(target))
    assert (status, body, seen) == (403, b"RBAC: access denied", [])
    assert records[0].target.startswith("/admin")


async def test_the_upstream_gets_the_normalized_path_and_the_query_as_sent() -> None:
    status, body, seen, records = await _exchange(_get("/public/./a//b/%7Ex?next=/../%2f"))
    assert (status, body) == (200, b"ok")
    assert seen == [(b"/public/a/b/~x?next=/../%2f", b"reviews.shop:9080")]
    assert records[0].target == "/public/a/b/~x?next=/../%2f"


async def test_an_absolute_form_target_is_forwarded_in_origin_form_with_its_host() -> None:
    status, _, seen, _ = await _exchange(_get("http://Reviews.shop:9080//public/x", "other"))
    assert status == 200
    assert seen == [(b"/public/x", b"Reviews.shop:9080")]
    status, _, seen, _ = await _exchange(_get("http://reviews.shop/%61dmin"))
    assert (status, seen) == (403, [])


@pytest.mark.parametrize(("target", "reason"), REFUSED[:7])
async def test_an_unnormalizable_path_is_400_with_the_reason(target: str, reason: str) -> None:
    status, body, seen, records = await _exchange(_get(target))
    assert status == 400 and seen == []
    assert body.startswith(b"bad request: ") and reason.encode() in body
    assert records[0].status == 400 and records[0].target == target


async def test_mode_none_forwards_the_path_untouched() -> None:
    status, _, seen, _ = await _exchange(_get("/public/../admin/x"), NONE)
    assert (status, seen) == (200, [(b"/public/../admin/x", b"reviews.shop:9080")])


async def test_base_mode_keeps_double_slashes() -> None:
    status, _, seen, _ = await _exchange(_get("//admin/x"), BASE)
    assert (status, seen) == (200, [(b"//admin/x", b"reviews.shop:9080")])


# ---------------------------------------------------------------------------------------------
# Hosts: case-insensitive, with or without the port.


def _host_policy(action: str, field: str, hosts: list[str]) -> authz.PolicySet:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "hosts", "namespace": "shop"},
        "spec": {"action": action, "rules": [{"to": [{"operation": {field: hosts}}]}]},
    }
    return authz.PolicySet([parse_resource(doc)])


@pytest.mark.parametrize(
    ("host", "denied"),
    [
        ("reviews.shop", True),
        ("Reviews.SHOP", True),
        ("reviews.shop:9080", True),
        ("REVIEWS.shop:80", True),
        ("reviews.shop.evil", False),
        ("ratings.shop:9080", False),
    ],
)
def test_host_values_match_case_insensitively_with_or_without_port(host: str, denied: bool):
    policies = _host_policy("DENY", "hosts", ["reviews.shop"])
    http = authz.HttpAttrs("GET", "/", host, {})
    request = authz.Request(None, None, "10.0.0.1", "10.0.0.3", 9080, http)
    assert policies.evaluate(_REVIEWS, request).allowed is not denied


def test_host_values_with_a_port_and_ipv6_literals() -> None:
    def allowed(policies: authz.PolicySet, host: str) -> bool:
        http = authz.HttpAttrs("GET", "/", host, {})
        request = authz.Request(None, None, "10.0.0.1", "10.0.0.3", 9080, http)
        return policies.evaluate(_REVIEWS, request).allowed

    with_port = _host_policy("ALLOW", "hosts", ["reviews.shop:9080"])
    assert allowed(with_port, "reviews.shop:9080") and not allowed(with_port, "reviews.shop")
    v6 = _host_policy("DENY", "hosts", ["[fd00::3]"])
    assert not allowed(v6, "[fd00::3]:9080") and not allowed(v6, "[FD00::3]")
    assert allowed(v6, "[fd00::4]:9080")
    not_hosts = _host_policy("DENY", "notHosts", ["reviews.shop"])
    assert allowed(not_hosts, "reviews.shop:9080") and not allowed(not_hosts, "evil:9080")
    assert authz.strip_port("::1") == "::1" and authz.strip_port("a:b") == "a:b"


# ---------------------------------------------------------------------------------------------
# meshctl authz check judges the path the proxies would forward.


def _snap() -> Snapshot:
    def pod(uid: str, name: str, ip: str, **extra) -> Workload:
        return Workload(
            uid=uid, namespace="shop", name=name, node="n1", ips=[ip], meshed=True, **extra
        )

    return Snapshot(
        node="",
        workloads=[
            pod("f", "frontend", "10.0.0.1", service_account="frontend"),
            pod("r", "reviews", "10.0.0.3", labels={"app": "reviews"}),
        ],
        istio_resources=[DENY_ADMIN],
    )


@pytest.mark.parametrize("path", BYPASSES)
def test_explain_normalizes_the_path_like_the_proxies(path: str) -> None:
    result = explain(_snap(), "shop/frontend", "shop/reviews:9080", method="GET", path=path)
    assert not result.decision.allowed and result.decision.policy == "shop/deny-admin"
    assert result.http is not None and result.http.path == "/admin/x"
    assert f"GET /admin/x (sent as {path}) " in result.render()


def test_explain_with_mode_none_and_with_an_invalid_path() -> None:
    snap = _snap()
    raw = explain(
        snap, "shop/frontend", "shop/reviews:9080", path="//admin/x", path_normalization=NONE
    )
    assert raw.decision.allowed and raw.sent_path is None
    with pytest.raises(ExplainError, match="400 Bad Request: invalid percent-encoding"):
        explain(snap, "shop/frontend", "shop/reviews:9080", path="/%zz/admin")
