"""The HTTP/2 engine without sockets: a client, the engine and two h2c endpoints talk over
in-memory streams. Reads as transcripts: what the client sent, what each endpoint saw, what
came back (status, body, trailers, gRPC status) and what the engine reported."""

from __future__ import annotations

import math
import sys

import h2.events
import hyperframe.frame
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from meshagent.agent.proxy.drain import Drain
from meshagent.agent.proxy.http import h2proxy, h2wire, pool
from meshagent.agent.proxy.http.grpcframes import MessageCounter
from meshagent.agent.proxy.http.h2proxy import (
    H2Events,
    H2Peer,
    H2Upstreams,
    proxy_http2,
    serve_detected,
)
from meshagent.agent.proxy.http.memstream import BUFFER_LIMIT, memory_stream_pair
from meshagent.agent.proxy.http.types import Connect, HttpContext, LocalResponse, RequestRecord
from meshagent.agent.proxy.lb import Clusters, ClusterState, EndpointState
from meshagent.agent.proxy.routing import (
    ClusterKey,
    ClusterSpec,
    FaultPolicy,
    HttpRoute,
    HttpRoutes,
    RetryPolicy,
    TrafficPolicy,
    UpstreamEndpoint,
    WeightedClusters,
)
from meshagent.agent.workers import launch
from meshagent.common.snapshot import Endpoint

HOST = "echo.lab.svc.cluster.local"
GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


def _routes(*ips: str, retry: RetryPolicy | None = None, fault: FaultPolicy | None = None):
    endpoints = tuple(
        UpstreamEndpoint(Endpoint(ip=ip, node="n", workload_uid=ip, ports={80: 80}), 80)
        for ip in ips
    )
    spec = ClusterSpec(ClusterKey(HOST, 80, ""), endpoints, TrafficPolicy(lb="ROUND_ROBIN"))
    route = HttpRoute("default", (), WeightedClusters.of([(spec, 1)]), retry=retry, fault=fault)
    return HttpRoutes(HOST, 80, (route,))


def _one_endpoint(policy: TrafficPolicy) -> tuple[ClusterSpec, HttpRoutes]:
    """Routes to one cluster of one endpoint (10.3.0.1) under `policy`."""
    endpoint = UpstreamEndpoint(
        Endpoint(ip="10.3.0.1", node="n", workload_uid="w", ports={80: 80}), 80
    )
    spec = ClusterSpec(ClusterKey(HOST, 80, ""), (endpoint,), policy)
    return spec, HttpRoutes(HOST, 80, (HttpRoute("default", (), WeightedClusters.of([(spec, 1)])),))


def _memory_upstream() -> tuple[ClusterState, EndpointState, list, Connect]:
    """A cluster of one endpoint and a connect that opens in-memory streams to it; each
    stream's far end is appended to the list, for the test to play the server."""
    spec, _ = _one_endpoint(TrafficPolicy(lb="ROUND_ROBIN"))
    cluster = Clusters().get(spec)
    endpoint = cluster.pick([])
    assert endpoint is not None
    far_ends: list = []

    async def connect(_endpoint, _port, _spec=None):
        near, far = memory_stream_pair()
        far_ends.append(far)
        return near

    return cluster, endpoint, far_ends, connect


async def _echo_server(stream, name: str, seen: list) -> None:
    """An h2c endpoint: answers each request with its name, the request body echoed (in
    chunks as it came), and gRPC trailers; one named `flaky*` answers UNAVAILABLE at once."""
    peer = H2Peer(stream, h2wire.new_connection(client_side=False))
    async with trio.open_nursery() as nursery:

        async def serve(sid: int, headers) -> None:
            inbox = peer.inboxes[sid]
            seen.append((name, dict(headers)))
            if name.startswith("flaky"):
                unavailable = [(b":status", b"200"), (b"grpc-status", b"14")]
                await peer.send_headers(sid, unavailable, end=True)
                return
            await peer.send_headers(sid, [(b":status", b"200"), (b"x-server", name.encode())])
            while True:
                event = await inbox.receive.receive()
                if isinstance(event, h2.events.DataReceived):
                    await peer.send_data(sid, event.data)
                    peer.ack(sid, event.flow_controlled_length)
                elif isinstance(event, h2.events.StreamEnded) or event is None:
                    break
            await peer.send_headers(sid, [(b"grpc-status", b"0")], end=True)

        def on_event(event) -> bool:
            if isinstance(event, h2.events.RequestReceived):
                peer.open_inbox(event.stream_id)
                nursery.start_soon(serve, event.stream_id, event.headers)
                return True
            return False

        await peer.flush()
        await peer.run(on_event)
        nursery.cancel_scope.cancel()


class _Lab:
    def __init__(self, nursery, routes, request_filter=None) -> None:
        self.nursery = nursery
        self.seen: list = []
        self.records: list[RequestRecord] = []
        self.connections = 0
        client_end, proxy_end = memory_stream_pair()
        self.ctx = HttpContext(
            routes=lambda: routes,
            clusters=Clusters(),
            pool=None,  # the HTTP/1.1 pool: unused by the HTTP/2 engine
            connect=self._connect,
            request_filter=request_filter,
            on_request_done=self.records.append,
            peer="10.0.0.9",
        )
        nursery.start_soon(proxy_http2, proxy_end, self.ctx)
        self.client = H2Peer(client_end, h2wire.new_connection(client_side=True))
        nursery.start_soon(self.client.run, lambda event: False)

    async def _connect(self, endpoint: Endpoint, port: int, _spec=None):
        self.connections += 1
        near, far = memory_stream_pair()
        self.nursery.start_soon(_echo_server, far, endpoint.ip, self.seen)
        return near

    async def call(self, path: str, body: bytes = b"", headers=(), chunks: int = 1):
        """One request; returns (response headers, body, trailers)."""
        client = self.client
        sid = client.conn.get_next_available_stream_id()
        inbox = client.open_inbox(sid)
        head = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode())]
        head += [(b":authority", HOST.encode()), *headers]
        await client.send_headers(sid, head, end=not body)
        if body:
            step = max(1, len(body) // chunks)
            for i in range(0, len(body), step):
                await client.send_data(sid, body[i : i + step])
            await client.end(sid)
        response, data, trailers = None, bytearray(), None
        while True:
            event = await inbox.receive.receive()
            if isinstance(event, h2.events.ResponseReceived):
                response = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                data += event.data
                client.ack(sid, event.flow_controlled_length)
                await client.flush()
            elif isinstance(event, h2.events.TrailersReceived):
                trailers = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        client.close_inbox(sid)
        await trio.testing.wait_all_tasks_blocked()  # the engine has written its record
        return response, bytes(data), trailers


async def test_streams_of_one_connection_are_balanced_per_request():
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("10.1.0.1", "10.2.0.1"))
        answers = [await lab.call("/echo.Echo/Say", b"hi", GRPC) for _ in range(10)]
        servers = [headers[b"x-server"] for headers, _, _ in answers]
        assert servers.count(b"10.1.0.1") == 5 and servers.count(b"10.2.0.1") == 5
        assert lab.connections == 2  # one upstream connection per endpoint, reused
        assert all(
            body == b"hi" and trailers == {b"grpc-status": b"0"} for _, body, trailers in answers
        )
        record = lab.records[-1]
        assert record.grpc and record.grpc_status == 0 and record.status == 200
        assert record.bytes_received == 2 and record.bytes_sent == 2
        nursery.cancel_scope.cancel()


async def test_a_big_body_streams_both_ways_under_flow_control():
    body = bytes(range(256)) * (3 * 4096 + 17)  # 3 MiB and a bit: past every window
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("10.1.0.1"))
        headers, echoed, trailers = await lab.call("/big", body, GRPC, chunks=50)
        assert headers[b":status"] == b"200"
        assert echoed == body and trailers == {b"grpc-status": b"0"}
        nursery.cancel_scope.cancel()


async def test_a_denied_grpc_call_is_trailers_only_permission_denied_and_others_pass():
    async def deny_say(info):
        if info.path == "/echo.Echo/Say":
            return LocalResponse(403, b"RBAC: access denied", flags=("RBAC",))
        return None

    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("10.1.0.1"), request_filter=deny_say)
        headers, body, trailers = await lab.call("/echo.Echo/Say", b"x", GRPC)
        assert headers[b":status"] == b"200" and headers[b"grpc-status"] == b"7"
        assert headers[b"grpc-message"] == b"RBAC: access denied"
        assert body == b"" and trailers is None
        headers, body, _ = await lab.call("/echo.Echo/Other", b"x", GRPC)
        assert headers[b"x-server"] == b"10.1.0.1" and body == b"x"
        # a plain HTTP/2 request gets the 403 itself
        headers, body, _ = await lab.call("/echo.Echo/Say")
        assert headers[b":status"] == b"403" and body == b"RBAC: access denied"
        denied = lab.records[0]
        assert (denied.status, denied.grpc_status, denied.flags) == (200, 7, ["RBAC"])
        assert [name for name, _ in lab.seen] == ["10.1.0.1"]  # denied calls never left
        nursery.cancel_scope.cancel()


async def test_metadata_reaches_the_endpoint_and_no_route_is_grpc_unimplemented():
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("10.1.0.1"))
        await lab.call("/a.B/C", b"x", [*GRPC, (b"x-user", b"v2")])
        _, seen = lab.seen[0]
        assert seen[b"x-user"] == b"v2" and seen[b":path"] == b"/a.B/C"
        assert seen[b":authority"] == HOST.encode()
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, HttpRoutes(HOST, 80, ()))
        headers, _, _ = await lab.call("/a.B/C", b"x", GRPC)
        assert headers[b"grpc-status"] == b"12"
        assert lab.records[0].flags == ["NR"]
        nursery.cancel_scope.cancel()


async def test_a_retry_on_unavailable_turns_a_failed_call_into_success():
    retry = RetryPolicy(attempts=2, grpc_codes=frozenset({14}))
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("flaky", "10.2.0.1", retry=retry))
        for _ in range(4):
            headers, body, trailers = await lab.call("/a.B/C", b"x", GRPC)
            assert headers[b"x-server"] == b"10.2.0.1" and body == b"x"
            assert trailers == {b"grpc-status": b"0"}
        await trio.testing.wait_all_tasks_blocked()  # the last record is written
        assert sorted(r.attempts for r in lab.records) == [1, 1, 2, 2]  # flaky half the time
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:  # without the policy the status goes through
        lab = _Lab(nursery, _routes("flaky"))
        headers, _, _ = await lab.call("/a.B/C", b"x", GRPC)
        await trio.testing.wait_all_tasks_blocked()
        assert headers[b"grpc-status"] == b"14" and lab.records[0].grpc_status == 14
        nursery.cancel_scope.cancel()


async def test_a_grpc_fault_abort_is_trailers_only_with_its_status():
    fault = FaultPolicy(abort_status=200, abort_percent=100.0, abort_grpc_status=8)
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("10.1.0.1", fault=fault))
        headers, _, _ = await lab.call("/a.B/C", b"x", GRPC)
        assert headers[b"grpc-status"] == b"8" and lab.records[0].flags == ["FI"]
        assert lab.seen == []
        nursery.cancel_scope.cancel()


async def test_a_failed_connect_is_unavailable_for_grpc():
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("10.1.0.1"))

        async def refuse(endpoint, port, _spec=None):
            raise OSError("connection refused")

        object.__setattr__(lab.ctx, "connect", refuse)
        headers, _, _ = await lab.call("/a.B/C", b"x", GRPC)
        assert headers[b"grpc-status"] == b"14"
        assert lab.records[0].flags == ["UF"]
        nursery.cancel_scope.cancel()


async def test_an_http1_port_serves_a_client_that_opens_with_the_h2_preface():
    client_end, proxy_end = memory_stream_pair()
    ctx = HttpContext(routes=lambda: HttpRoutes(HOST, 80, ()), clusters=Clusters(), pool=None)
    served = ["http1"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_detected, proxy_end, ctx, "http1", served)
        client = H2Peer(client_end, h2wire.new_connection(client_side=True))
        nursery.start_soon(client.run, lambda event: False)
        sid = client.conn.get_next_available_stream_id()
        inbox = client.open_inbox(sid)
        head = [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"a"),
        ]
        await client.send_headers(sid, head, end=True)
        event = await inbox.receive.receive()
        assert isinstance(event, h2.events.ResponseReceived)
        assert dict(event.headers)[b":status"] == b"404"
        assert served == ["http2"]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"", None),
        (b"PRI * HTTP/2", None),
        (h2wire.H2_PREFACE, True),
        (h2wire.H2_PREFACE + b"\x00\x00", True),
        (b"GET / HTTP/1.1\r\n", False),
        (b"PRI * HTTP/1.1", False),
    ],
)
def test_preface_detection(data, verdict):
    assert h2wire.is_preface(data) is verdict


def test_request_head_drops_connection_headers_and_keeps_metadata():
    head = h2wire.parse_request(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/pkg.Svc/Method"),
            (b":authority", b"svc:80"),
            (b"content-type", b"application/grpc+proto"),
            (b"x-user", b"v2"),
        ]
    )
    assert head.grpc and head.path == "/pkg.Svc/Method" and head.authority == "svc:80"
    assert dict(h2wire.upstream_request(head, "default:1"))[b"x-user"] == b"v2"
    with pytest.raises(h2wire.BadRequest):
        h2wire.parse_request([(b":method", b"CONNECT"), (b":authority", b"a:1")])


@pytest.mark.parametrize(("status", "code"), [(403, 7), (404, 12), (503, 14), (400, 13), (418, 2)])
def test_local_replies_to_grpc_calls_carry_the_grpc_code(status, code):
    headers, body = h2wire.local_reply(LocalResponse(status, b"why \xe9%"), grpc=True)
    assert dict(headers)[b"grpc-status"] == str(code).encode()
    assert dict(headers)[b"grpc-message"] == b"why %C3%A9%25"
    assert body == b""


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"10S", 10.0),
        (b"250m", 0.25),
        (b"1H", 3600.0),
        (b"5", None),
        (b"123456789S", None),
        (b"1x", None),
    ],
)
def test_grpc_timeout_values(value, seconds):
    assert h2wire.grpc_timeout(value) == seconds


def test_the_request_timeout_is_the_shorter_of_route_and_grpc_timeout():
    assert h2wire.request_timeout(None, []) is None
    assert h2wire.request_timeout(2.0, [(b"grpc-timeout", b"500m")]) == 0.5
    assert h2wire.request_timeout(None, [(b"grpc-timeout", b"3S")]) == 3.0
    assert h2wire.request_timeout(1.0, [(b"grpc-timeout", b"3S")]) == 1.0


async def test_a_call_past_its_grpc_timeout_is_deadline_exceeded():
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("10.1.0.1"))

        async def hang(endpoint, port, _spec=None):
            await trio.sleep_forever()

        object.__setattr__(lab.ctx, "connect", hang)
        headers, _, _ = await lab.call("/a.B/C", b"x", [*GRPC, (b"grpc-timeout", b"50m")])
        assert headers[b"grpc-status"] == b"4"
        assert lab.records[0].flags == ["UT"]
        nursery.cancel_scope.cancel()


_GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]


class _DrainLab:
    """The engine serving one client over memory streams, with a drain to start and a request
    filter that holds every request until `release` is set; the client's reader runs only
    once `read` is called (until then it has not seen what the engine sent)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.drain = Drain()
        self.release = trio.Event()
        self.done = trio.Event()
        self.goaway: list[tuple[int, int]] = []
        self.pings = 0
        client_end, proxy_end = memory_stream_pair()
        routes = HttpRoutes(HOST, 80, ())

        async def held(info):
            await self.release.wait()

        ctx = HttpContext(
            routes=lambda: routes,
            clusters=Clusters(),
            pool=None,
            request_filter=held,
            drain=self.drain,
        )

        async def serve():
            await proxy_http2(proxy_end, ctx)
            self.done.set()

        nursery.start_soon(serve)
        self.client = H2Peer(client_end, h2wire.new_connection(client_side=True))

    def read(self) -> None:
        def on_event(event):
            if isinstance(event, h2.events.ConnectionTerminated):
                self.goaway.append((event.error_code, event.last_stream_id))
            elif isinstance(event, h2.events.PingReceived):
                self.pings += 1
            return False

        self.nursery.start_soon(self.client.run, on_event)

    async def get(self):
        sid = self.client.conn.get_next_available_stream_id()
        inbox = self.client.open_inbox(sid)
        await self.client.send_headers(sid, _GET, end=True)
        return sid, inbox


async def test_a_drain_announces_goaway_then_names_the_last_stream_once_the_client_saw_it():
    """RFC 9113's graceful shutdown: a GOAWAY with the highest stream id and a PING; once the
    client answered the PING, the final GOAWAY names the last stream it opened, and the
    stream in flight is still answered before the connection ends."""
    async with trio.open_nursery() as nursery:
        lab = _DrainLab(nursery)
        lab.read()
        sid, inbox = await lab.get()
        await trio.testing.wait_all_tasks_blocked()
        lab.drain.start()
        with trio.fail_after(2):
            while len(lab.goaway) < 2:
                await trio.sleep(0.01)
        assert lab.goaway == [(h2wire.NO_ERROR, 2**31 - 1), (h2wire.NO_ERROR, sid)]
        assert lab.pings == 1 and not lab.done.is_set()
        lab.release.set()  # the stream in flight is answered, then the connection ends
        event = await inbox.receive.receive()
        assert dict(event.headers)[b":status"] == b"404"
        await lab.client.stream.aclose()  # a client closes once its last stream is answered
        with trio.fail_after(5):
            await lab.done.wait()
        nursery.cancel_scope.cancel()


async def test_a_drain_serves_streams_a_client_opened_before_it_read_the_goaway(
    autojump_clock,
):
    """A client that reads the GOAWAY late (a loaded machine: 5 s here) still opens streams
    meanwhile: they are served, not refused or cut by the connection's close (a fixed 1 s
    grace once cut 4 gRPC calls so); the final GOAWAY names the last of them."""
    async with trio.open_nursery() as nursery:
        lab = _DrainLab(nursery)
        lab.release.set()
        lab.drain.start()
        await trio.sleep(5)  # the GOAWAY and PING wait, unread, in the client's stream
        sid, inbox = await lab.get()
        lab.read()
        event = await inbox.receive.receive()
        assert dict(event.headers)[b":status"] == b"404"
        with trio.fail_after(2):
            while len(lab.goaway) < 2:
                await trio.sleep(0.01)
        assert lab.goaway == [(h2wire.NO_ERROR, 2**31 - 1), (h2wire.NO_ERROR, sid)]
        await trio.sleep(0.5)
        later = lab.client.conn.get_next_available_stream_id()  # a client breaking the rules
        late = lab.client.open_inbox(later)
        await lab.client.send_headers(later, _GET, end=True)
        event = await late.receive.receive()
        assert isinstance(event, h2.events.StreamReset)
        assert event.error_code == h2wire.REFUSED_STREAM
        with trio.fail_after(5):
            await lab.done.wait()  # CLOSE_TIMEOUT after its last stream, the client silent
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("last", [2**31 - 1, 1])
def test_a_graceful_goaway_ends_the_connection_for_new_streams_only(last):
    """A GOAWAY (NO_ERROR) followed, in the same read, by the answer to a stream it covers:
    the answer arrives and the request body queued to send stays queued (h2 itself closes the
    connection on any GOAWAY: the answer is a protocol error and the body is dropped)."""
    client = h2wire.new_connection(client_side=True)
    server = h2wire.new_connection(client_side=False)
    head = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
    client.send_headers(1, head)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())  # the server's preface and SETTINGS
    client.data_to_send()
    client.send_data(1, b"body", end_stream=True)  # queued, not sent yet
    goaway = hyperframe.frame.GoAwayFrame(0, last_stream_id=last, error_code=0).serialize()
    server.send_headers(1, [(b":status", b"200")], end_stream=True)
    events = client.receive_data(goaway + server.data_to_send())
    kinds = [type(e) for e in events]
    assert kinds[0] is h2.events.ConnectionTerminated and events[0].last_stream_id == last
    assert h2.events.ResponseReceived in kinds
    server_events = server.receive_data(client.data_to_send())
    assert [e.data for e in server_events if isinstance(e, h2.events.DataReceived)] == [b"body"]


def _grpc_messages(*sizes: int) -> bytes:
    return b"".join(b"\0" + n.to_bytes(4, "big") + b"m" * n for n in sizes)


@given(st.lists(st.integers(0, 300), max_size=8), st.lists(st.integers(1, 50), max_size=20))
def test_grpc_messages_are_counted_however_data_is_split(sizes, cuts):
    data = _grpc_messages(*sizes)
    counter = MessageCounter()
    at = 0
    for cut in cuts:
        counter.feed(data[at : at + cut])
        at += cut
    counter.feed(data[at:])
    assert counter.count == len(sizes)


async def test_a_grpc_call_counts_its_messages_each_way():
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("10.1.0.1"))
        await lab.call("/echo.Echo/Say", _grpc_messages(3, 0, 70_000), GRPC, chunks=7)
        await lab.call("/plain", b"not grpc")  # not gRPC: nothing counted
        grpc, plain = lab.records
        assert (grpc.request_messages.count, grpc.response_messages.count) == (3, 3)
        assert plain.request_messages is None and plain.response_messages is None
        nursery.cancel_scope.cancel()


async def test_per_try_timeout_retries_a_silent_endpoint_then_answers_504_ut():
    """Issue #21: the route's perTryTimeout bounds each attempt until the response head on
    HTTP/2 too (it was applied by the HTTP/1.1 engine only)."""
    retry = RetryPolicy(attempts=1, per_try_timeout=0.05, on_5xx=True)

    async def silent_then_echo(lab, silent: set[str]):
        async def connect(endpoint, port, _spec=None):
            lab.connections += 1
            near, far = memory_stream_pair()
            if endpoint.ip in silent:  # accepts, never answers
                lab.nursery.start_soon(_silent_server, far)
            else:
                lab.nursery.start_soon(_echo_server, far, endpoint.ip, lab.seen)
            return near

        object.__setattr__(lab.ctx, "connect", connect)

    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("silent", "10.2.0.1", retry=retry))
        await silent_then_echo(lab, {"silent"})
        for _ in range(2):
            with trio.fail_after(2):
                headers, body, _ = await lab.call("/a.B/C", b"x", GRPC)
            assert headers[b"x-server"] == b"10.2.0.1" and body == b"x"
        assert sorted(r.attempts for r in lab.records) == [1, 2]
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:  # every attempt silent: 504 UT, not a hang
        lab = _Lab(nursery, _routes("silent", retry=retry))
        await silent_then_echo(lab, {"silent"})
        with trio.fail_after(2):
            headers, _, _ = await lab.call("/a.B/C", b"x", [])
        assert headers[b":status"] == b"504"
        assert lab.records[0].flags == ["UT"] and lab.records[0].attempts == 2
        nursery.cancel_scope.cancel()


async def _silent_server(stream) -> None:
    peer = H2Peer(stream, h2wire.new_connection(client_side=False))
    await peer.flush()
    await peer.run(lambda event: isinstance(event, h2.events.RequestReceived))


async def _refusing_server(stream) -> None:
    """Refuses every stream with REFUSED_STREAM (as a server at its stream limit does)."""
    peer = H2Peer(stream, h2wire.new_connection(client_side=False))
    async with trio.open_nursery() as nursery:

        async def refuse(stream_id: int) -> None:
            peer.reset(stream_id, h2wire.REFUSED_STREAM)
            await peer.flush()

        def on_event(event) -> bool:
            if isinstance(event, h2.events.RequestReceived):
                nursery.start_soon(refuse, event.stream_id)
                return True
            return False

        await peer.flush()
        await peer.run(on_event)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("refused_stream", "answered"), [(True, b"200"), (False, b"503")])
async def test_retry_on_refused_stream(refused_stream: bool, answered: bytes):
    """Issue #21: `retryOn: refused-stream` (and Istio's default policy) retries a request an
    HTTP/2 upstream refused with REFUSED_STREAM; without it the refusal is a 503 UC."""
    retry = RetryPolicy(
        attempts=1,
        on_connect_failure=False,
        on_refused_stream=refused_stream,
        status_codes=frozenset(),
    )
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("refuser", "10.2.0.1", retry=retry))

        async def connect(endpoint, port, _spec=None):
            near, far = memory_stream_pair()
            if endpoint.ip == "refuser":
                nursery.start_soon(_refusing_server, far)
            else:
                nursery.start_soon(_echo_server, far, endpoint.ip, lab.seen)
            return near

        object.__setattr__(lab.ctx, "connect", connect)
        statuses = set()
        for _ in range(2):  # round robin: one of the two calls starts on the refuser
            with trio.fail_after(2):
                headers, _, _ = await lab.call("/x", b"", [])
            statuses.add(headers[b":status"])
        assert statuses == {b"200", answered}
        nursery.cancel_scope.cancel()


def test_retry_on_refused_stream_comes_from_retry_on_or_istios_default():
    from meshagent.agent.proxy.routing import DEFAULT_RETRY, _retry_policy
    from meshagent.common.istio.networking import HTTPRetry

    assert DEFAULT_RETRY.on_refused_stream  # no `retries`: Istio's default policy
    assert _retry_policy(HTTPRetry(attempts=1)).on_refused_stream  # attempts only: default on
    assert _retry_policy(HTTPRetry(attempts=1, retry_on="refused-stream")).on_refused_stream
    assert not _retry_policy(HTTPRetry(attempts=1, retry_on="5xx")).on_refused_stream


@pytest.mark.parametrize(("limit", "connections"), [(None, 1), (1, 3), (2, 2)])
async def test_max_requests_per_connection_holds_for_http2_upstreams(limit, connections):
    """Issue #21: connectionPool.http.maxRequestsPerConnection retires an HTTP/2 upstream
    connection after that many streams (it was applied by the HTTP/1.1 pool only)."""
    _, routes = _one_endpoint(TrafficPolicy(lb="ROUND_ROBIN", max_requests_per_connection=limit))
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, routes)
        for _ in range(3):
            with trio.fail_after(2):
                headers, body, _ = await lab.call("/x", b"y", [])
            assert headers[b":status"] == b"200" and body == b"y"
        assert lab.connections == connections
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("limit", "connections"), [(None, 1), (1, 4), (2, 2)])
async def test_max_requests_per_connection_counts_concurrent_streams(limit, connections):
    """Streams given out together count too: a connection reserved by one request is not
    handed to another past the limit, nor closed under it."""
    _, routes = _one_endpoint(TrafficPolicy(lb="ROUND_ROBIN", max_requests_per_connection=limit))
    statuses: list[bytes] = []
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, routes)

        async def one() -> None:
            headers, body, _ = await lab.call("/x", b"y", [])
            statuses.append(headers[b":status"] + body)

        with trio.fail_after(2):
            async with trio.open_nursery() as calls:
                for _ in range(4):
                    calls.start_soon(one)
        assert statuses == [b"200y"] * 4
        assert lab.connections == connections
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("idle", "connections"), [(None, 1), (2.0, 2), (math.inf, 1)])
async def test_http_idle_timeout_closes_an_idle_http2_upstream(autojump_clock, idle, connections):
    """Issue #21: connectionPool.http.idleTimeout closes an HTTP/2 upstream connection that
    carried no request that long (math.inf: `0s`, never); the next request opens a new one."""
    _, routes = _one_endpoint(TrafficPolicy(lb="ROUND_ROBIN", http_idle_timeout=idle))
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, routes)
        for _ in range(2):
            with trio.fail_after(2):
                headers, body, _ = await lab.call("/x", b"y", [])
            assert headers[b":status"] == b"200" and body == b"y"
            await trio.sleep(10)  # idle, longer than 2 s
        assert lab.connections == connections
        nursery.cancel_scope.cancel()


async def test_http2_max_requests_overflows_the_next_request_with_503_uo():
    """Issue #21: connectionPool.http.http2MaxRequests: with one request in flight (a silent
    upstream) and a limit of 1, the next request is refused at once: 503 UO."""
    spec, routes = _one_endpoint(TrafficPolicy(lb="ROUND_ROBIN", max_requests=1))
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, routes)

        async def silent(endpoint, port, _spec=None):
            near, far = memory_stream_pair()
            nursery.start_soon(_silent_server, far)
            return near

        object.__setattr__(lab.ctx, "connect", silent)
        nursery.start_soon(lab.call, "/held", b"", [])
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(2):
            headers, _, _ = await lab.call("/x", b"", [])
        assert headers[b":status"] == b"503"
        assert [r.flags for r in lab.records] == [["UO"]]
        assert lab.ctx.clusters.get(spec).requests == 1  # the held one only
        nursery.cancel_scope.cancel()


async def _read_exactly(stream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, f"the stream ended after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def test_frames_a_cancelled_flush_took_still_reach_the_peer():
    """Issue #17: whoever flushes a connection sends every stream's queued frames. A flush
    whose task was cancelled while its send waited for the reader (a request pump, cancelled
    once its call's response ended) dropped them all: another call's trailers were lost and
    grpcio waited for them until its deadline (1 in ~10,000 cross-node calls)."""
    near, far = memory_stream_pair()
    peer = H2Peer(near, h2wire.new_connection(client_side=True))
    behind = b"x" * BUFFER_LIMIT
    await near.send_all(behind)  # the reader is behind: the next send waits for it
    request = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")]
    peer.conn.send_headers(1, [*request, (b":authority", b"a")], end_stream=True)
    flushing = trio.CancelScope()

    async def flush() -> None:
        with flushing:
            await peer.flush()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush)
            await trio.testing.wait_all_tasks_blocked()
            flushing.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert await _read_exactly(far, len(behind)) == behind  # the reader catches up
        await near.aclose()
        rest = bytearray()
        while chunk := await far.receive_some():
            rest += chunk
    server = h2wire.new_connection(client_side=False)
    events = server.receive_data(bytes(rest))
    assert [e.stream_id for e in events if isinstance(e, h2.events.RequestReceived)] == [1]
    assert not peer.closed


async def test_a_connection_closing_with_goaway_takes_no_new_stream_meanwhile():
    """While the GOAWAY of an upstream connection being closed waits to be written, the
    connection is already closed to new streams: the next request opens another (one was put
    on the closing one: h2 refused it, 503 UO)."""
    cluster, endpoint, servers, connect = _memory_upstream()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            upstreams = H2Upstreams(connect, nursery)
            first = await upstreams.acquire(cluster, endpoint)
            upstreams.done(first, cluster)
            assert await servers[0].receive_some()  # the preface; from now on the server
            await first.stream.send_all(b"x" * BUFFER_LIMIT)  # reads slowly
            nursery.start_soon(first.goaway_and_close, h2wire.NO_ERROR)
            await trio.testing.wait_all_tasks_blocked()
            second = await upstreams.acquire(cluster, endpoint)
            assert second is not first
            assert len(servers) == 2
            upstreams.done(second, cluster)
            nursery.cancel_scope.cancel()


async def test_a_stream_on_an_open_upstream_connection_costs_no_scheduler_round_trip():
    """Taking a stream on an upstream connection that has room is plain bookkeeping: no
    checkpoint (the lock that serializes connects per endpoint, a scheduler round trip per
    request, is taken only to open one); a connect still happens once per endpoint."""
    cluster, endpoint, connects, connect = _memory_upstream()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            upstreams = H2Upstreams(connect, nursery)
            first, second = await upstreams.acquire(cluster, endpoint), None
            with trio.testing.assert_no_checkpoints():
                second = await upstreams.acquire(cluster, endpoint)
            assert second is first and len(connects) == 1 and first.active == 2
            upstreams.done(first, cluster)
            upstreams.done(second, cluster)
            nursery.cancel_scope.cancel()


class _Writes(trio.abc.Stream):
    """A stream that keeps the bytes of each `send_all` on it: the engine's writes, one by one."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def send_all(self, data) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _one_write_server(stream) -> None:
    """An h2c endpoint that writes each whole response (HEADERS, then DATA with END_STREAM)
    in one send, as a server answering a small request does."""
    conn = h2wire.new_connection(client_side=False)
    await stream.send_all(conn.data_to_send())
    while data := await stream.receive_some(65536):
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                conn.send_headers(event.stream_id, [(b":status", b"200")])
                conn.send_data(event.stream_id, b"hello", end_stream=True)
        await stream.send_all(conn.data_to_send())


def _frames(data: bytes) -> list[tuple[str, list[str]]]:
    """The frames in `data`: (type, flags)."""
    frames = []
    while data:
        frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append((type(frame).__name__, sorted(frame.flags)))
        data = data[9 + length :]
    return frames


async def test_a_response_that_came_in_one_read_goes_to_the_client_in_one_write():
    """The engine relays what one upstream read brought in one write to the client (a send
    per frame cost a syscall and a scheduler round trip each), the end of the stream on the
    last DATA frame rather than in an empty one of its own."""
    async with trio.open_nursery() as nursery:

        async def connect(endpoint, port, _spec=None):
            near, far = memory_stream_pair()
            nursery.start_soon(_one_write_server, far)
            return near

        client_end, proxy_end = memory_stream_pair()
        engine_side = _Writes(proxy_end)
        records: list[RequestRecord] = []
        ctx = HttpContext(
            routes=lambda: _routes("10.1.0.1"),
            clusters=Clusters(),
            pool=None,
            connect=connect,
            on_request_done=records.append,
            peer="10.0.0.9",
        )
        nursery.start_soon(proxy_http2, engine_side, ctx)
        client = H2Peer(client_end, h2wire.new_connection(client_side=True))
        nursery.start_soon(client.run, lambda event: False)
        head = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
        head.append((b":authority", HOST.encode()))
        for attempt in range(2):  # the first one also opens the upstream connection
            await trio.testing.wait_all_tasks_blocked()
            before = len(engine_side.writes)
            sid = client.conn.get_next_available_stream_id()
            inbox = client.open_inbox(sid)
            await client.send_headers(sid, head, end=True)
            events = []
            while not isinstance(event := await inbox.receive.receive(), h2.events.StreamEnded):
                events.append(event)
            assert [type(e).__name__ for e in events] == ["ResponseReceived", "DataReceived"]
            assert events[1].data == b"hello"
            await trio.testing.wait_all_tasks_blocked()
            writes = engine_side.writes[before:]
            assert [_frames(w) for w in writes] == [
                [("HeadersFrame", ["END_HEADERS"]), ("DataFrame", ["END_STREAM"])]
            ], attempt
        assert [(r.status, r.bytes_sent) for r in records] == [(200, 5), (200, 5)]
        nursery.cancel_scope.cancel()


class _Spawned(trio.abc.Instrument):
    """The names of the tasks spawned while it is in place."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def task_spawned(self, task) -> None:
        self.names.append(task.name)


async def test_a_call_that_came_whole_goes_upstream_in_one_write():
    """A unary call whose HEADERS, message and end came in one read goes upstream in one
    write: HEADERS, then the message's DATA carrying END_STREAM (no empty DATA frame of its
    own) from the stream's task: no task of its own pumps the body (a task per call was a
    share of the engine's cost per call). The message is counted."""
    spawned = _Spawned()
    trio.lowlevel.add_instrument(spawned)
    async with trio.open_nursery() as nursery:
        upstream: list[_Writes] = []

        async def connect(endpoint, port, _spec=None):
            near, far = memory_stream_pair()
            nursery.start_soon(_one_write_server, far)
            upstream.append(_Writes(near))
            return upstream[-1]

        client_end, proxy_end = memory_stream_pair()
        records: list[RequestRecord] = []
        ctx = HttpContext(
            routes=lambda: _routes("10.1.0.1"),
            clusters=Clusters(),
            pool=None,
            connect=connect,
            on_request_done=records.append,
            peer="10.0.0.9",
        )
        nursery.start_soon(proxy_http2, proxy_end, ctx)
        client = H2Peer(client_end, h2wire.new_connection(client_side=True))
        nursery.start_soon(client.run, lambda event: False)
        head = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/echo.Echo/Say")]
        head += [(b":authority", HOST.encode()), *GRPC]
        message = b"\x00\x00\x00\x00\x02hi"
        for attempt in range(2):  # the first one also opens the upstream connection
            await trio.testing.wait_all_tasks_blocked()
            before = len(upstream[0].writes) if upstream else 0
            spawned.names.clear()
            sid = client.conn.get_next_available_stream_id()
            inbox = client.open_inbox(sid)
            client.queue_headers(sid, head)
            await client.send_data(sid, message, end=True)  # one write: HEADERS, DATA, end
            while not isinstance(await inbox.receive.receive(), h2.events.StreamEnded):
                pass
            await trio.testing.wait_all_tasks_blocked()
            writes = [
                w
                for w in upstream[0].writes[before:]
                if not w.startswith(h2wire.H2_PREFACE)
                and "HeadersFrame" in [name for name, _ in _frames(w)]
            ]
            call = [
                [f for f in _frames(w) if f[0] in ("HeadersFrame", "DataFrame")] for w in writes
            ]
            assert call == [[("HeadersFrame", ["END_HEADERS"]), ("DataFrame", ["END_STREAM"])]]
            engine = [n for n in spawned.names if "h2proxy" in n]
            assert [n.rpartition(".")[2] for n in engine] == (
                ["_serve_stream"] if attempt else ["_serve_stream", "_run_upstream"]
            )
        assert [(r.status, r.bytes_received) for r in records] == [(200, 7), (200, 7)]
        assert records[-1].request_messages.count == 1
        nursery.cancel_scope.cancel()
    trio.lowlevel.remove_instrument(spawned)


@pytest.mark.parametrize("size", [h2proxy.RECEIVE_SIZE, pool.RECEIVE_SIZE])
def test_the_engines_reads_stay_below_the_workers_mmap_threshold(size):
    """A socket read allocates what it asks for; at the workers' allocator's mmap threshold or
    above (launch.WORKER_ALLOCATOR) each read of a small message was an mmap, an mremap and an
    munmap (strace, same-node `full`: 1.4 of each per request)."""
    threshold = int(launch.WORKER_ALLOCATOR["MALLOC_MMAP_THRESHOLD_"])
    assert size + sys.getsizeof(b"") < threshold


async def test_a_streams_events_come_in_order_to_its_one_task_as_from_a_memory_channel():
    """H2Events (a stream's inbox, in place of an unbounded trio memory channel): events in
    the order sent, receive_nowait WouldBlock when empty, a parked receive woken by the next
    event, a cancelled one leaves nothing behind, each receive a checkpoint; one receiver."""
    events = H2Events()
    with pytest.raises(trio.WouldBlock):
        events.receive_nowait()
    events.send_nowait("a")
    events.send_nowait(None)
    with trio.testing.assert_checkpoints():
        assert await events.receive() == "a"
    assert events.receive_nowait() is None
    got = []
    async with trio.open_nursery() as nursery:

        async def take() -> None:
            got.append(await events.receive())

        nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await events.receive()
        events.send_nowait("b")
    assert got == ["b"]
    with trio.move_on_after(0.01) as waited:
        await events.receive()
    assert waited.cancelled_caught and events.waiter is None
    events.send_nowait("c")
    assert await events.receive() == "c"


async def test_an_upstream_connection_that_got_goaway_is_closed_once_its_streams_are_done():
    """A server's graceful GOAWAY (a draining proxy): the stream in flight keeps its
    connection; once it is done the engine closes the connection itself, so the server's
    drain ends then and not at its close timeout."""
    cluster, endpoint, server_ends, connect = _memory_upstream()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            upstreams = H2Upstreams(connect, nursery)
            peer = await upstreams.acquire(cluster, endpoint)
            server = H2Peer(server_ends[0], h2wire.new_connection(client_side=False))
            ended = trio.Event()

            async def serve() -> None:
                await server.run(lambda event: False)
                ended.set()

            nursery.start_soon(serve)
            await server.flush()
            await server.announce_shutdown(b"drain-01")
            await trio.testing.wait_all_tasks_blocked()
            assert peer.goaway and not ended.is_set()  # a stream is still given out on it
            upstreams.done(peer, cluster)
            await ended.wait()  # the engine closed the connection: the server read its end
            await trio.testing.wait_all_tasks_blocked()
            assert not upstreams.upstreams.get(endpoint.address)  # and forgot it
            nursery.cancel_scope.cancel()
