"""VirtualService route actions against Istio's documented semantics (issue #21): `headers`
set/add/remove (rule and destination level), `rewrite` (uri prefix, uriRegexRewrite, authority),
`redirect` and `mirror`/`mirrors`. Pure tables first, then both HTTP engines end to end over
in-memory streams: what the endpoint saw, what the client got."""

from __future__ import annotations

import json
import random

import h11
import pytest
import trio
import trio.testing
from meshagent.agent.proxy.http import HttpContext, open_connection_pool, proxy_http1
from meshagent.agent.proxy.http.memstream import memory_stream_pair
from meshagent.agent.proxy.http.types import RequestRecord
from meshagent.agent.proxy.lb import Clusters
from meshagent.agent.proxy.route_actions import HeaderOps, Redirect, Rewrite, shadow_authority
from meshagent.agent.proxy.routing import compile_routes
from meshagent.common.istio import networking as net
from meshagent.common.istio.resource import parse_resource
from meshagent.common.snapshot import Endpoint, Service, ServicePort, Snapshot, Workload

from tests.unit.test_h2_proxy import HOST as H2_AUTHORITY
from tests.unit.test_h2_proxy import _Lab
from tests.waiting import await_until

NS = "shop"
HOST = f"reviews.{NS}.svc.cluster.local"
PORT = 9080
IPS = {"reviews": "10.0.0.1", "mirror": "10.0.0.2", "other": "10.0.0.3"}


# ---------------------------------------------------------------------------------------------
# Pure semantics


def _ops(**kw) -> HeaderOps:
    ops = HeaderOps.of(net.HeaderOperations.model_validate(kw))
    assert ops is not None
    return ops


@pytest.mark.parametrize(
    ("ops", "before", "after"),
    [
        # set replaces every value of the header; an absent one is added
        (
            {"set": {"x-a": "1"}},
            [(b"x-a", b"0"), (b"x-a", b"9"), (b"y", b"2")],
            [(b"y", b"2"), (b"x-a", b"1")],
        ),
        ({"set": {"x-a": "1"}}, [(b"y", b"2")], [(b"y", b"2"), (b"x-a", b"1")]),
        # add appends one more value, keeping those there
        ({"add": {"x-a": "1"}}, [(b"x-a", b"0")], [(b"x-a", b"0"), (b"x-a", b"1")]),
        # remove drops every value; a name not there is nothing
        ({"remove": ["X-A", "z"]}, [(b"x-a", b"0"), (b"y", b"2")], [(b"y", b"2")]),
        # remove runs before set and add (Envoy): a header removed and added has the new value
        (
            {"remove": ["x-a"], "add": {"x-a": "new"}},
            [(b"x-a", b"old")],
            [(b"x-a", b"new")],
        ),
        # set then add of one name: both values (Istio lists set before add)
        (
            {"set": {"x-a": "s"}, "add": {"x-a": "a"}},
            [(b"x-a", b"old")],
            [(b"x-a", b"s"), (b"x-a", b"a")],
        ),
    ],
)
def test_header_operations(ops, before, after) -> None:
    assert _ops(**ops).apply(before) == after


def test_header_values_are_literal_and_percent_is_escaped() -> None:
    ops = _ops(set={"x-share": "100%%"})
    assert ops.apply([]) == [(b"x-share", b"100%")]


@pytest.mark.parametrize(
    ("rewrite", "target", "prefix", "result"),
    [
        # a prefix match: the matched prefix is replaced, the query string kept
        ({"uri": "/newcatalog"}, "/wpcatalog/item?id=1", "/wpcatalog", "/newcatalog/item?id=1"),
        # exact or regex match (prefix None): the whole path, query kept
        ({"uri": "/v2/ratings"}, "/ratings?x=1", None, "/v2/ratings?x=1"),
        # no uri match is Envoy's "/" prefix route: the leading "/" is what is replaced
        ({"uri": "/v2/"}, "/a/b", "/", "/v2/a/b"),
        # a prefix without a trailing slash rewritten to "/": no double slash (Istio)
        ({"uri": "/"}, "/foo/bar?q", "/foo", "/bar?q"),
        ({"uri": "/"}, "/foo", "/foo", "/"),
        ({"uri": "/"}, "/foo/", "/foo/", "/"),
        # uriRegexRewrite: every match in the path, groups by \1, the query untouched
        (
            {
                "uriRegexRewrite": {
                    "match": "^/service/([^/]+)(/.*)$",
                    "rewrite": "\\2/instance/\\1",
                }
            },
            "/service/foo/v1/api?service=x",
            None,
            "/v1/api/instance/foo?service=x",
        ),
        ({"uriRegexRewrite": {"match": "a", "rewrite": "b"}}, "/aaa?a", None, "/bbb?a"),
        # RE2: \d is ASCII only (a Unicode digit is not rewritten)
        ({"uriRegexRewrite": {"match": "\\d", "rewrite": "N"}}, "/1٣", None, "/N٣"),
        # authority only: the target stays
        ({"authority": "new.example"}, "/x?y", "/", "/x?y"),
    ],
)
def test_uri_rewrite(rewrite, target, prefix, result) -> None:
    rw = Rewrite.of(net.HTTPRewrite.model_validate(rewrite))
    assert rw is not None
    assert rw.target(target, prefix) == result


@pytest.mark.parametrize(
    ("redirect", "target", "authority", "location", "status"),
    [
        # uri replaces the whole path; the query string stays
        (
            {"uri": "/v1/bookRatings"},
            "/v1/getProductRatings?a=1",
            "ratings",
            "http://ratings/v1/bookRatings?a=1",
            301,
        ),
        # a uri with its own query replaces the request's
        ({"uri": "/n?b=2"}, "/o?a=1", "ratings", "http://ratings/n?b=2", 301),
        # authority replaces the host (and its port)
        (
            {"authority": "newratings.default.svc.cluster.local"},
            "/p",
            "ratings:9080",
            "http://newratings.default.svc.cluster.local/p",
            301,
        ),
        # port replaces the port
        ({"port": 8080}, "/p", "ratings:9080", "http://ratings:8080/p", 301),
        # scheme https: the old scheme's default port goes
        ({"scheme": "https"}, "/p", "ratings:80", "https://ratings/p", 301),
        ({"scheme": "https"}, "/p", "ratings:9080", "https://ratings:9080/p", 301),
        ({"scheme": "https", "port": 443}, "/p", "ratings:9080", "https://ratings/p", 301),
        # derivePort FROM_REQUEST_PORT writes the service port; FROM_PROTOCOL_DEFAULT none
        (
            {"derivePort": "FROM_REQUEST_PORT", "scheme": "https"},
            "/p",
            "ratings",
            "https://ratings:9080/p",
            301,
        ),
        (
            {"derivePort": "FROM_PROTOCOL_DEFAULT", "scheme": "https"},
            "/p",
            "ratings:80",
            "https://ratings/p",
            301,
        ),
        # redirectCode
        ({"uri": "/n", "redirectCode": 308}, "/o", "ratings", "http://ratings/n", 308),
        # an IPv6 literal keeps its brackets
        ({"port": 81}, "/", "[fd00::1]:80", "http://[fd00::1]:81/", 301),
    ],
)
def test_redirect_location(redirect, target, authority, location, status) -> None:
    rd = Redirect.of(net.HTTPRedirect.model_validate(redirect))
    assert rd is not None
    assert rd.location(target, authority, 9080) == location
    assert rd.status == status


@pytest.mark.parametrize(
    ("authority", "shadow"),
    [
        ("httpbin", "httpbin-shadow"),
        ("httpbin:8000", "httpbin-shadow:8000"),
        ("[fd00::1]:80", "[fd00::1]-shadow:80"),
    ],
)
def test_the_mirror_host_gets_the_shadow_suffix_before_its_port(authority, shadow) -> None:
    assert shadow_authority(authority) == shadow


def test_mirror_percentage_defaults_to_every_request() -> None:
    rule = net.HTTPRoute.model_validate(
        {"route": [{"destination": {"host": "a"}}], "mirror": {"host": "b"}}
    )
    (only,) = rule.mirror_policies
    assert only.destination.host == "b" and only.percentage is None
    legacy = net.HTTPRoute.model_validate(
        {"route": [{"destination": {"host": "a"}}], "mirror": {"host": "b"}, "mirrorPercent": 5}
    )
    assert legacy.mirror_policies[0].percentage.value == 5


# ---------------------------------------------------------------------------------------------
# Both engines, end to end


def _snapshot(*resources: dict) -> Snapshot:
    workloads, services = [], []
    for name, ip in IPS.items():
        workloads.append(
            Workload(uid=name, namespace=NS, name=name, node="n1", ips=[ip], labels={"app": name})
        )
        endpoint = Endpoint(ip=ip, node="n1", workload_uid=name, ports={PORT: PORT})
        services.append(
            Service(
                namespace=NS,
                name=name,
                vips=[f"10.96.0.{len(services) + 1}"],
                ports=[ServicePort(name="http", port=PORT, target_port=PORT)],
                endpoints=[endpoint],
            )
        )
    return Snapshot(
        node="n1", workloads=workloads, services=services, istio_resources=list(resources)
    )


def _vs(*http: dict) -> dict:
    doc = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": NS},
        "spec": {"hosts": ["reviews"], "http": list(http)},
    }
    parse_resource(doc)  # what the controller accepts
    return doc


async def _h11_echo(stream: trio.abc.Stream, name: str, seen: list) -> None:
    """An HTTP/1.1 endpoint answering each request with JSON of what it received; it sends
    `x-backend` and `x-drop` response headers (for response header operations)."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = await _next(conn, stream)
            if not isinstance(event, h11.Request):
                return
            body = b""
            while isinstance(part := await _next(conn, stream), h11.Data):
                body += part.data
            got = {
                "backend": name,
                "method": event.method.decode(),
                "target": event.target.decode(),
                "headers": [[n.decode(), v.decode()] for n, v in event.headers],
                "body": body.decode(),
            }
            seen.append(got)
            data = json.dumps(got).encode()
            headers = [
                (b"content-length", str(len(data)).encode()),
                (b"x-backend", name.encode()),
                (b"x-drop", b"secret"),
            ]
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        return


async def _next(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Event:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await stream.receive_some(65536))
    return event


class _Http1Mesh:
    """proxy_http1 in front of echo endpoints, over memory streams."""

    def __init__(self, nursery: trio.Nursery, pool, table) -> None:
        self.nursery = nursery
        self.seen: list[dict] = []
        self.records: list[RequestRecord] = []
        clusters = Clusters(rng=random.Random(1))
        clusters.sync(table)
        self.ctx = HttpContext(
            routes=lambda: table.http_routes(HOST, PORT),
            clusters=clusters,
            pool=pool,
            connect=self._connect,
            on_request_done=self.records.append,
            peer="10.0.0.9:1",
        )

    async def _connect(self, endpoint: Endpoint, port: int, _spec=None):
        near, far = memory_stream_pair()
        name = next(n for n, ip in IPS.items() if ip == endpoint.ip)
        self.nursery.start_soon(_h11_echo, far, name, self.seen)
        return near

    async def request(
        self, target: str, headers=(), body: bytes = b"", method: str | None = None
    ) -> tuple[h11.Response, bytes]:
        client, proxy_end = memory_stream_pair()
        self.nursery.start_soon(proxy_http1, proxy_end, self.ctx)
        conn = h11.Connection(h11.CLIENT)
        head = [(b"host", f"reviews:{PORT}".encode()), *headers]
        if body:
            head.append((b"content-length", str(len(body)).encode()))
        method = method or ("POST" if body else "GET")
        data = conn.send(h11.Request(method=method, target=target, headers=head))
        data += conn.send(h11.Data(data=body)) if body else b""
        await client.send_all(data + conn.send(h11.EndOfMessage()))
        response = await _next(conn, client)
        out = b""
        while isinstance(part := await _next(conn, client), h11.Data):
            out += part.data
        await client.aclose()
        return response, out


@pytest.fixture
async def http1(nursery):
    async def make(*resources: dict) -> _Http1Mesh:
        table = compile_routes(_snapshot(*resources))
        assert not table.problems, table.problems
        pool = await nursery.start(_pool)
        return _Http1Mesh(nursery, pool, table)

    return make


async def _pool(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with open_connection_pool() as pool:
        task_status.started(pool)
        await trio.sleep_forever()


def _headers(seen: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in seen["headers"]:
        out.setdefault(name, []).append(value)
    return out


HEADERS_RULE = {
    "headers": {
        "request": {"set": {"x-set": "rule"}, "add": {"x-add": "rule"}, "remove": ["x-gone"]},
        "response": {"set": {"x-resp": "rule"}, "remove": ["x-drop"]},
    },
    "route": [
        {
            "destination": {"host": "reviews"},
            "headers": {
                "request": {"set": {"x-set": "destination", "x-dest": "1"}},
                "response": {"add": {"x-resp-dest": "1"}},
            },
        }
    ],
}


async def test_http1_header_operations_reach_server_and_client(http1) -> None:
    mesh = await http1(_vs(HEADERS_RULE))
    response, body = await mesh.request("/p", [(b"x-gone", b"1"), (b"x-add", b"client")])
    seen = _headers(json.loads(body))
    assert seen["x-set"] == ["rule"]  # the rule's set runs after the destination's
    assert seen["x-dest"] == ["1"]
    assert seen["x-add"] == ["client", "rule"]
    assert "x-gone" not in seen
    got = dict(response.headers)
    assert got[b"x-resp"] == b"rule" and got[b"x-resp-dest"] == b"1"
    assert b"x-drop" not in got and got[b"x-backend"] == b"reviews"


async def test_http1_prefix_rewrite_per_matched_entry_and_authority(http1) -> None:
    rule = {
        "match": [{"uri": {"prefix": "/wpcatalog"}}, {"uri": {"exact": "/consumercatalog"}}],
        "rewrite": {"uri": "/newcatalog", "authority": "catalog.internal"},
        "route": [{"destination": {"host": "reviews"}}],
    }
    mesh = await http1(_vs(rule))
    _, body = await mesh.request("/wpcatalog/item?id=7")
    seen = json.loads(body)
    assert seen["target"] == "/newcatalog/item?id=7"
    assert _headers(seen)["host"] == ["catalog.internal"]
    _, body = await mesh.request("/consumercatalog?x=1")
    assert json.loads(body)["target"] == "/newcatalog?x=1"
    assert mesh.records[-1].target == "/consumercatalog?x=1"  # the log keeps what was asked


async def test_http1_regex_rewrite(http1) -> None:
    rule = {
        "rewrite": {
            "uriRegexRewrite": {"match": "^/service/([^/]+)(/.*)$", "rewrite": "\\2/instance/\\1"}
        },
        "route": [{"destination": {"host": "reviews"}}],
    }
    mesh = await http1(_vs(rule))
    _, body = await mesh.request("/service/foo/v1/api?q=1")
    assert json.loads(body)["target"] == "/v1/api/instance/foo?q=1"


async def test_http1_redirect_is_answered_by_the_proxy(http1) -> None:
    rule = {
        "match": [{"uri": {"exact": "/v1/getProductRatings"}}],
        "redirect": {"uri": "/v1/bookRatings", "authority": "newratings.default.svc.cluster.local"},
    }
    mesh = await http1(_vs(rule))
    response, _ = await mesh.request("/v1/getProductRatings?a=1")
    assert response.status_code == 301
    location = dict(response.headers)[b"location"]
    assert location == b"http://newratings.default.svc.cluster.local/v1/bookRatings?a=1"
    assert mesh.seen == []  # no endpoint was asked


async def test_http1_mirror_copies_the_request_and_the_client_gets_the_primary(http1) -> None:
    rule = {
        "route": [{"destination": {"host": "reviews"}}],
        "mirror": {"host": "mirror"},
        "mirrorPercentage": {"value": 100.0},
    }
    mesh = await http1(_vs(rule))
    response, body = await mesh.request("/m?x=1", body=b"payload")
    assert dict(response.headers)[b"x-backend"] == b"reviews"
    assert json.loads(body)["backend"] == "reviews"
    copy = await await_until(
        lambda: [s for s in mesh.seen if s["backend"] == "mirror"], what="the mirror's copy"
    )
    assert copy[0]["target"] == "/m?x=1" and copy[0]["body"] == "payload"
    assert _headers(copy[0])["host"] == [f"reviews-shadow:{PORT}"]


async def test_http1_mirror_percentage_zero_sends_no_copy(http1) -> None:
    rule = {
        "route": [{"destination": {"host": "reviews"}}],
        "mirrors": [{"destination": {"host": "mirror"}, "percentage": {"value": 0}}],
    }
    mesh = await http1(_vs(rule))
    for _ in range(5):
        await mesh.request("/m")
    await trio.testing.wait_all_tasks_blocked()
    assert [s["backend"] for s in mesh.seen] == ["reviews"] * 5


# The HTTP/2 engine, with the h2c endpoints of test_h2_proxy (they echo the request's headers).


async def _h2_call(*resources: dict, path: str, body: bytes = b"", headers=(), hang_up=False):
    """One call through the HTTP/2 engine; `hang_up`: the client closes its connection as
    soon as it has the response."""
    table = compile_routes(_snapshot(*resources))
    assert not table.problems, table.problems
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, table.http_routes(HOST, PORT))
        lab.ctx.clusters.sync(table)
        response, data, _ = await lab.call(path, body, headers)
        if hang_up:
            await trio.aclose_forcefully(lab.client.stream)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return lab, response, data


def _ip(name: str) -> str:
    return IPS[name]


async def test_http2_header_operations_and_rewrite() -> None:
    rule = dict(HEADERS_RULE, rewrite={"uri": "/v2/", "authority": "catalog.internal"})
    lab, response, _ = await _h2_call(
        _vs(rule), path="/p?q=1", headers=[(b"x-gone", b"1"), (b"x-add", b"client")]
    )
    ((server, seen),) = lab.seen
    assert server == _ip("reviews")
    assert seen[b":path"] == b"/v2/p?q=1"  # no uri match: Envoy's "/" prefix is replaced
    assert seen[b":authority"] == b"catalog.internal"
    assert seen[b"x-set"] == b"rule" and seen[b"x-dest"] == b"1" and b"x-gone" not in seen
    assert response[b"x-resp"] == b"rule" and response[b"x-resp-dest"] == b"1"


async def test_http2_redirect() -> None:
    rule = {"redirect": {"scheme": "https", "derivePort": "FROM_REQUEST_PORT"}}
    lab, response, _ = await _h2_call(_vs(rule), path="/r?x")
    assert response[b":status"] == b"301"
    assert response[b"location"] == f"https://{H2_AUTHORITY}:{PORT}/r?x".encode()
    assert lab.seen == []


async def test_http2_mirror() -> None:
    rule = {"route": [{"destination": {"host": "reviews"}}], "mirror": {"host": "mirror"}}
    # the client hangs up at once: the copy still goes (fire and forget, not cancelled)
    lab, response, data = await _h2_call(_vs(rule), path="/m", body=b"payload", hang_up=True)
    assert response[b"x-server"] == _ip("reviews").encode() and data == b"payload"
    servers = {server: seen for server, seen in lab.seen}
    assert set(servers) == {_ip("reviews"), _ip("mirror")}
    assert servers[_ip("mirror")][b":authority"] == f"{H2_AUTHORITY}-shadow".encode()
    assert servers[_ip("mirror")][b":path"] == b"/m"


def test_a_mirror_to_a_host_that_is_not_a_service_is_warned() -> None:
    from meshagent.common.istio.support import warnings

    rule = {
        "route": [{"destination": {"host": "reviews"}}],
        "mirrors": [
            {"destination": {"host": "mirror"}},
            {"destination": {"host": "copies.example.com"}},
        ],
    }
    res = parse_resource(_vs(rule))
    assert [p for p, _ in warnings(res)] == ["spec.http[0].mirrors[1].destination.host"]


CORS_RULE = {
    "corsPolicy": {
        "allowOrigins": [{"exact": "https://example.com"}, {"regex": "https://.*\\.shop\\.io"}],
        "allowMethods": ["POST", "GET"],
        "allowHeaders": ["X-Foo-Bar", "content-type"],
        "exposeHeaders": ["x-backend"],
        "maxAge": "24h",
        "allowCredentials": True,
    },
    "route": [{"destination": {"host": "reviews"}}],
}
PREFLIGHT = [(b"access-control-request-method", b"POST")]


async def _options(mesh: _Http1Mesh, origin: bytes, extra=()) -> tuple[h11.Response, bytes]:
    """A preflight (OPTIONS with Access-Control-Request-Method) from `origin`."""
    return await mesh.request("/cors", [(b"origin", origin), *extra], method="OPTIONS")


async def test_cors_preflight_from_an_allowed_origin_is_answered_by_the_proxy(http1) -> None:
    mesh = await http1(_vs(CORS_RULE))
    response, _ = await _options(mesh, b"https://a.shop.io", PREFLIGHT)
    got = dict(response.headers)
    assert response.status_code == 200
    assert got[b"access-control-allow-origin"] == b"https://a.shop.io"
    assert got[b"access-control-allow-methods"] == b"POST,GET"
    assert got[b"access-control-allow-headers"] == b"x-foo-bar,content-type"
    assert got[b"access-control-max-age"] == b"86400"
    assert got[b"access-control-allow-credentials"] == b"true"
    assert mesh.seen == []  # the endpoint was not asked


async def test_cors_actual_request_gets_allow_and_expose_headers(http1) -> None:
    mesh = await http1(_vs(CORS_RULE))
    response, _ = await mesh.request("/cors", [(b"origin", b"https://example.com")])
    got = dict(response.headers)
    assert got[b"access-control-allow-origin"] == b"https://example.com"
    assert got[b"access-control-expose-headers"] == b"x-backend"
    assert got[b"access-control-allow-credentials"] == b"true"
    assert b"access-control-allow-methods" not in got  # a preflight's only


async def test_cors_other_origins_and_no_origin_get_no_cors_headers(http1) -> None:
    mesh = await http1(_vs(CORS_RULE))
    for headers in ([(b"origin", b"https://evil.example")], []):
        response, _ = await mesh.request("/cors", headers)
        assert not any(n.startswith(b"access-control-") for n, _ in response.headers)
    # a preflight from another origin is forwarded (unmatchedPreflights FORWARD, the default)
    response, _ = await _options(mesh, b"https://evil.example", PREFLIGHT)
    assert dict(response.headers)[b"x-backend"] == b"reviews"
    assert [s["method"] for s in mesh.seen] == ["GET", "GET", "OPTIONS"]


async def test_cors_unmatched_preflights_ignore_answers_without_cors_headers(http1) -> None:
    rule = dict(CORS_RULE, corsPolicy=dict(CORS_RULE["corsPolicy"], unmatchedPreflights="IGNORE"))
    mesh = await http1(_vs(rule))
    response, _ = await _options(mesh, b"https://evil.example", PREFLIGHT)
    assert response.status_code == 200
    assert not any(n.startswith(b"access-control-") for n, _ in response.headers)
    assert mesh.seen == []


async def test_cors_an_allowed_origin_of_star_allows_every_origin(http1) -> None:
    rule = dict(CORS_RULE, corsPolicy={"allowOrigins": [{"exact": "*"}]})
    mesh = await http1(_vs(rule))
    response, _ = await mesh.request("/cors", [(b"origin", b"https://any.example")])
    assert dict(response.headers)[b"access-control-allow-origin"] == b"https://any.example"


async def test_http2_cors_response_headers() -> None:
    headers = [(b"origin", b"https://example.com"), *PREFLIGHT]
    lab, response, _ = await _h2_call(_vs(CORS_RULE), path="/cors", headers=headers)
    # _Lab's calls are POSTs: not a preflight, so forwarded with the CORS response headers
    assert response[b"access-control-allow-origin"] == b"https://example.com"
    assert len(lab.seen) == 1


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        ({"allowMethods": ["FETCH"]}, "not an HTTP method"),
        ({"allowHeaders": ["bad header"]}, "not a valid HTTP header name"),
        ({"maxAge": "1.5s"}, "whole number of seconds"),
        ({"allowOrigins": [{"regex": "(?=x)"}]}, "RE2"),
    ],
)
def test_cors_policy_refusals(policy, fragment) -> None:
    from meshagent.common.istio.resource import ResourceError

    doc = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": NS},
        "spec": {
            "hosts": ["reviews"],
            "http": [{"corsPolicy": policy, "route": [{"destination": {"host": "reviews"}}]}],
        },
    }
    with pytest.raises(ResourceError) as caught:
        parse_resource(doc)
    assert "spec.http[0].corsPolicy" in str(caught.value) and fragment in str(caught.value)


DIRECT_RULE = {
    "match": [{"uri": {"exact": "/v1/getProductRatings"}}],
    "directResponse": {"status": 503, "body": {"string": "unknown error"}},
    "headers": {"response": {"set": {"x-direct": "1"}}},
}


async def test_http1_direct_response(http1) -> None:
    mesh = await http1(_vs(DIRECT_RULE, {"route": [{"destination": {"host": "reviews"}}]}))
    response, body = await mesh.request("/v1/getProductRatings")
    assert (response.status_code, body) == (503, b"unknown error")
    assert dict(response.headers)[b"x-direct"] == b"1"
    assert mesh.seen == []
    response, _ = await mesh.request("/other")  # the next rule forwards
    assert response.status_code == 200 and len(mesh.seen) == 1


async def test_http2_direct_response_bytes_body() -> None:
    rule = dict(DIRECT_RULE, match=[], directResponse={"status": 200, "body": {"bytes": "b2s="}})
    lab, response, data = await _h2_call(_vs(rule), path="/any")
    assert response[b":status"] == b"200" and data == b"ok" and lab.seen == []


@pytest.mark.parametrize(
    ("uri", "target", "matched"),
    [
        ({"prefix": "/ratings/v2/"}, "/RATINGS/v2/x", True),
        ({"prefix": "/ratings/v2/"}, "/Ratings/v3/x", False),
        ({"exact": "/Login"}, "/login?next=/", True),
        ({"exact": "/Login"}, "/login/", False),
        # Istio: the case is ignored only for exact and prefix matches, not for a regex
        ({"regex": "/login"}, "/LOGIN", False),
        ({"regex": "/login"}, "/login", True),
        # ASCII only: a non-ASCII letter is compared as is
        ({"exact": "/é"}, "/É", False),
    ],
)
def test_ignore_uri_case(uri, target, matched) -> None:
    rule = {
        "match": [{"uri": uri, "ignoreUriCase": True}],
        "route": [{"destination": {"host": "reviews"}}],
    }
    routes = compile_routes(_snapshot(_vs(rule))).http_routes(HOST, PORT)
    assert (routes.match("GET", target, {}) is not None) is matched
