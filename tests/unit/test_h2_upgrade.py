"""DestinationRule `h2UpgradePolicy: UPGRADE` in the HTTP/1.1 engine, without sockets: an
HTTP/1.1 client, the engine, and an h2c endpoint (test_h2_proxy's echo server) or an HTTP/1.1
one, over in-memory streams. What the endpoint saw, what the client got back, which connector
the engine used; and the heads translated each way (h2upgrade)."""

from __future__ import annotations

import h11
import pytest
import trio
import trio.testing
from meshagent.agent.proxy.http import h2upgrade, open_connection_pool, wire
from meshagent.agent.proxy.http.memstream import memory_stream_pair
from meshagent.agent.proxy.http.proxy import proxy_http1
from meshagent.agent.proxy.http.types import HttpContext, RequestRecord
from meshagent.agent.proxy.lb import Clusters
from meshagent.agent.proxy.routing import TrafficPolicy
from meshagent.common.istio import parse_resource
from meshagent.common.snapshot import Endpoint
from meshagent.controller.describe import describe

from tests.unit.test_h2_proxy import HOST, _echo_server, _one_endpoint

H1_BODY = b"spoken as HTTP/1.1"


async def _http1_server(stream: trio.abc.Stream, seen: list) -> None:
    """An HTTP/1.1 endpoint: notes each request head, answers H1_BODY."""
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
            seen.append(("http/1.1", dict(event.headers)))
        elif isinstance(event, h11.EndOfMessage):
            headers = [(b"content-length", str(len(H1_BODY)).encode())]
            out = conn.send(h11.Response(status_code=200, headers=headers))
            out += conn.send(h11.Data(data=H1_BODY)) + conn.send(h11.EndOfMessage())
            await stream.send_all(out)
            conn.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed):
            return


class _Lab:
    """The engine on one client connection; `connects` counts each connector's opens."""

    def __init__(self, nursery: trio.Nursery, pool, policy: TrafficPolicy) -> None:
        self.nursery = nursery
        self.seen: list = []
        self.records: list[RequestRecord] = []
        self.connects = {"http1": 0, "http2": 0}
        _, routes = _one_endpoint(policy)
        client_end, proxy_end = memory_stream_pair()
        self.ctx = HttpContext(
            routes=lambda: routes,
            clusters=Clusters(),
            pool=pool,
            connect=self._connect,
            connect_h2=self._connect_h2,
            on_request_done=self.records.append,
            peer="10.0.0.9",
        )
        nursery.start_soon(proxy_http1, proxy_end, self.ctx)
        self.client = client_end
        self.conn = h11.Connection(h11.CLIENT)

    async def _connect(self, endpoint: Endpoint, port: int, _spec=None):
        self.connects["http1"] += 1
        near, far = memory_stream_pair()
        self.nursery.start_soon(_http1_server, far, self.seen)
        return near

    async def _connect_h2(self, endpoint: Endpoint, port: int, _spec=None):
        self.connects["http2"] += 1
        near, far = memory_stream_pair()
        self.nursery.start_soon(_echo_server, far, "h2", self.seen)
        return near

    async def request(self, method: str = "POST", body: bytes = b"", headers=()):
        """One HTTP/1.1 request on the kept-alive connection: (status, headers, body)."""
        head = [("host", HOST), *headers]
        if body:
            head.append(("content-length", str(len(body))))
        out = self.conn.send(h11.Request(method=method, target="/echo", headers=head))
        out += (self.conn.send(h11.Data(data=body)) if body else b"") + self.conn.send(
            h11.EndOfMessage()
        )
        await self.client.send_all(out)
        status, got, data = 0, {}, bytearray()
        with trio.fail_after(5):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.client.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status, got = event.status_code, dict(event.headers)
                elif isinstance(event, h11.Data):
                    data += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
        self.conn.start_next_cycle()
        return status, got, bytes(data)


async def _with_lab(policy: TrafficPolicy, test) -> None:
    async with trio.open_nursery() as nursery, open_connection_pool() as pool:
        await test(_Lab(nursery, pool, policy))
        nursery.cancel_scope.cancel()


async def test_upgrade_sends_http1_requests_as_http2_streams_on_one_connection():
    async def test(lab: _Lab) -> None:
        for body in (b"hello", b"again"):
            status, headers, data = await lab.request(body=body, headers=[("x-user", "ada")])
            assert (status, data) == (200, body)  # the h2c endpoint echoed it
            assert headers[b"x-server"] == b"h2"
            assert b"grpc-status" not in headers  # trailers dropped toward HTTP/1.1
        assert lab.connects == {"http1": 0, "http2": 1}  # one HTTP/2 connection, reused
        _, seen = lab.seen[0]
        assert seen[b":method"] == b"POST" and seen[b":authority"] == HOST.encode()
        assert seen[b":path"] == b"/echo" and seen[b"x-user"] == b"ada"
        assert not {b"host", b"connection", b"transfer-encoding"} & set(seen)
        await trio.testing.wait_all_tasks_blocked()  # the engine reports after its reply
        assert [r.status for r in lab.records] == [200, 200]
        assert lab.records[0].bytes_sent == len(b"hello")

    await _with_lab(TrafficPolicy(h2_upgrade=True), test)


async def test_without_upgrade_requests_stay_http1():
    async def test(lab: _Lab) -> None:
        status, _, data = await lab.request(method="GET")
        assert (status, data) == (200, H1_BODY)
        assert lab.connects == {"http1": 1, "http2": 0}

    await _with_lab(TrafficPolicy(), test)


async def test_a_websocket_upgrade_request_is_not_sent_as_http2():
    async def test(lab: _Lab) -> None:
        upgrade = [("connection", "upgrade"), ("upgrade", "websocket")]
        status, _, data = await lab.request(method="GET", headers=upgrade)
        assert (status, data) == (200, H1_BODY)  # the endpoint declined; it saw HTTP/1.1
        assert lab.seen[0][1][b"upgrade"] == b"websocket"
        assert lab.connects == {"http1": 1, "http2": 0}

    await _with_lab(TrafficPolicy(h2_upgrade=True), test)


def _req(method=b"GET", headers=()) -> wire.Request:
    return wire.Request(method=method, target=b"/a?b=1", headers=[(b"host", b"h:80"), *headers])


@pytest.mark.parametrize(
    ("req", "upgrade", "expected"),
    [
        (_req(), None, True),
        (_req(b"POST"), None, True),
        (_req(), b"websocket", False),  # Envoy does not upgrade upgrades
        (_req(b"CONNECT"), None, False),
    ],
)
def test_which_requests_are_upgraded(req, upgrade, expected):
    assert h2upgrade.upgradable(req, upgrade) is expected


def test_request_head_moves_host_to_authority_and_drops_connection_headers():
    req = _req(
        b"POST",
        [
            (b"transfer-encoding", b"chunked"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"gzip, trailers"),
            (b"x-a", b"1"),
        ],
    )
    head = h2upgrade.request_head(req, "fallback:80")
    assert (head.method, head.path, head.authority, head.scheme) == (
        "POST",
        "/a?b=1",
        "h:80",
        "http",
    )
    assert head.headers == [(b"te", b"trailers"), (b"x-a", b"1")]
    no_te = h2upgrade.request_head(_req(headers=[(b"te", b"gzip")]), "f")
    assert no_te.headers == []  # HTTP/2 allows TE only as `trailers`


@pytest.mark.parametrize(
    ("headers", "ended", "method", "expected"),
    [
        (
            [(b":status", b"200"), (b"content-length", b"3")],
            False,
            b"GET",
            [(b"content-length", b"3")],
        ),
        ([(b":status", b"200")], False, b"GET", []),  # the HTTP/1.1 codec chunks it
        ([(b":status", b"200")], True, b"GET", [(b"content-length", b"0")]),  # no body
        ([(b":status", b"200")], True, b"HEAD", []),
        ([(b":status", b"204")], True, b"GET", []),
    ],
)
def test_response_head(headers, ended, method, expected):
    response = h2upgrade.response_head(headers, ended, method)
    assert (response.status_code, response.headers) == (int(headers[0][1]), expected)


def _rule(http: dict):
    return parse_resource(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {"host": "reviews", "trafficPolicy": {"connectionPool": {"http": http}}},
        }
    )


def test_validate_explain_says_requests_go_as_http2():
    said = describe(_rule({"h2UpgradePolicy": "UPGRADE"}))
    assert any("HTTP/1.1 requests go to the pod as HTTP/2" in line for line in said)
    kept = describe(_rule({"h2UpgradePolicy": "UPGRADE", "useClientProtocol": True}))
    assert not any("as HTTP/2" in line for line in kept)
