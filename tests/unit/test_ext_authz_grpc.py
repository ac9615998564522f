"""Envoy's gRPC check API (common/extauthz_grpc.py): the CheckRequest a provider gets, what
its CheckResponse means, and one unary call over HTTP/2 against a server made with the h2
library (the e2e test asks Debian's grpcio)."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trio.testing
from meshagent.common import extauthzproto as proto
from meshagent.common.extauthz_grpc import CallFailed, call, check_request, verdict


def test_the_check_request_carries_the_request_and_both_peers():
    sent = check_request(
        "POST",
        "/a/b?q=1",
        "echo.shop:8080",
        [(b"X-Ext-Authz", b"allow"), (b"cookie", b"a=1"), (b"cookie", b"b=2"),
         (b"x-request-id", b"r-1")],
        protocol="HTTP/2",
        source=("10.0.1.5", 0, "cluster.local/ns/shop/sa/client"),
        destination=("10.0.2.7", 8080, "cluster.local/ns/shop/sa/echo"),
    )  # fmt: skip
    attributes = proto.CheckRequest.FromString(sent).attributes
    http = attributes.request.http
    assert (http.method, http.path, http.host, http.protocol) == (
        "POST", "/a/b?q=1", "echo.shop:8080", "HTTP/2",
    )  # fmt: skip
    headers = {h.key: h.value for h in http.headers}
    assert headers["x-ext-authz"] == "allow" and headers["cookie"] == "a=1,b=2"
    assert headers[":authority"] == "echo.shop:8080" and http.id == "r-1"
    assert attributes.source.principal == "spiffe://cluster.local/ns/shop/sa/client"
    assert attributes.source.address.socket_address.address == "10.0.1.5"
    assert attributes.destination.address.socket_address.port_value == 8080


def _response(code: int, **parts) -> bytes:
    response = proto.CheckResponse()
    response.status.code = code
    for key, value, append in parts.get("ok", ()):
        option = response.ok_response.headers.add()
        option.header.key, option.header.value = key, value
        if append:
            option.append.value = True
    response.ok_response.headers_to_remove.extend(parts.get("remove", ()))
    if "denied" in parts:
        status, body = parts["denied"]
        if status:
            response.denied_response.status.code = status
        response.denied_response.body = body
        option = response.denied_response.headers.add()
        option.header.key, option.header.value = "X-Why", "policy"
    return response.SerializeToString()


def test_ok_sets_appends_and_removes_headers():
    answer = verdict(
        _response(0, ok=[("X-User", "ann", False), ("x-tag", "t", True)], remove=["X-Secret"]),
    )
    assert answer.allowed
    assert answer.upstream_headers == ((b"x-user", b"ann"),)
    assert answer.appended_headers == ((b"x-tag", b"t"),)
    assert answer.removed_headers == (b"x-secret",)


@pytest.mark.parametrize(("status", "want"), [(401, 401), (0, 403), (99, 403)])
def test_a_denial_answers_with_its_status_headers_and_body(status, want):
    answer = verdict(_response(7, denied=(status, "no entry")))
    assert not answer.allowed
    assert (answer.status, answer.body) == (want, b"no entry")
    assert answer.headers == ((b"x-why", b"policy"),)


def test_bytes_that_are_no_check_response_are_the_provider_failing():
    with pytest.raises(CallFailed, match="does not parse"):
        verdict(b"\xff\xff\xff")


async def _serve_once(stream, grpc_status: int, message: bytes) -> list:
    """An h2 server answering one call; returns the request's headers."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    got: list = []
    while True:
        data = await stream.receive_some(65536)
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                got = event.headers
            elif isinstance(event, h2.events.StreamEnded):
                sid = event.stream_id
                conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
                if message:
                    conn.send_data(sid, struct.pack(">BI", 0, len(message)) + message)
                conn.send_headers(sid, [("grpc-status", str(grpc_status))], end_stream=True)
                await stream.send_all(conn.data_to_send())
                return got
        await stream.send_all(conn.data_to_send())


@pytest.mark.parametrize("status", [0, 14])
async def test_one_unary_call_over_http2(status):
    client, server = trio.testing.memory_stream_pair()
    answer = _response(0, ok=[("x-user", "ann", False)])
    async with trio.open_nursery() as nursery:
        seen: list = []

        async def serve() -> None:
            seen.extend(await _serve_once(server, status, answer))

        nursery.start_soon(serve)
        request = check_request("GET", "/", "echo", [])
        if status == 0:
            got = await call(client, "authz:9000", request, 2.0)
            assert verdict(got).upstream_headers == ((b"x-user", b"ann"),)
        else:
            with pytest.raises(CallFailed, match="gRPC status 14"):
                await call(client, "authz:9000", request, 2.0)
    headers = dict(seen)
    assert headers[b":path"] == b"/envoy.service.auth.v3.Authorization/Check"
    assert headers[b"content-type"] == b"application/grpc" and headers[b"te"] == b"trailers"
    assert headers[b"grpc-timeout"] == b"2000m"
