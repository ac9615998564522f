"""HBONE end to end in one process: real mutual TLS on 127.0.0.1, the pool and the server.

Each test starts `serve_hbone` on an ephemeral port with a handler written for it, opens
tunnels through `open_tunnel_pool`, and checks what the proxy on either side would see:
bytes, half-closes, statuses, errors, pool occupancy and the `meshagent_hbone_*` counters.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import h2.connection
import h2.events
import pytest
import trio
import trio.testing
from meshagent.agent.hbone import (
    InboundTunnel,
    PoolKey,
    PoolKeyStats,
    SecureNamingError,
    TunnelFailed,
    TunnelPool,
    TunnelRefused,
    client_context,
    open_tunnel_pool,
    serve_hbone,
    server_context_selector,
)
from meshagent.agent.hbone.protocol import STREAM_WINDOW
from meshagent.common.spiffe import Identity, sni_for
from prometheus_client import REGISTRY

from tests.certs import Leaf, TestCA

TD = "cluster.local"
FRONTEND = Identity(TD, "shop", "frontend")
REVIEWS = Identity(TD, "shop", "reviews")
RATINGS = Identity(TD, "shop", "ratings")
MIB = 1024 * 1024
POD = "10.44.1.7"

Handler = Callable[[InboundTunnel], "object"]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def leaves(ca) -> dict[Identity, Leaf]:
    return {identity: ca.issue(identity.uri) for identity in (FRONTEND, REVIEWS, RATINGS)}


@asynccontextmanager
async def hbone_node(
    ca: TestCA,
    leaves: dict[Identity, Leaf],
    handler: Handler,
    *,
    present: Identity | None = None,
    **options: float,
) -> AsyncIterator[tuple[str, int]]:
    """A node proxy's HBONE listener; it presents the identity asked for in SNI (or always
    ``present``, to play a node that lies about who it serves); `options` go to
    `serve_hbone` (e.g. ``idle_timeout``)."""

    def lookup(server_name: str | None) -> tuple[bytes, bytes] | None:
        for identity, leaf in leaves.items():
            if present == identity or (present is None and server_name == sni_for(identity)):
                return leaf.chain_pem, leaf.key_pem
        return None

    selector = server_context_selector(lookup, ca.pem)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(
                serve_hbone, ("127.0.0.1", 0), ssl_selector=selector, handler=handler, **options
            )
        )
        yield listeners[0].socket.getsockname()[:2]
        nursery.cancel_scope.cancel()


def contexts_for(ca: TestCA, leaves: dict[Identity, Leaf]) -> Callable[[Identity], ssl.SSLContext]:
    contexts = {
        identity: client_context(leaf.chain_pem, leaf.key_pem, ca.pem)
        for identity, leaf in leaves.items()
    }
    return contexts.__getitem__


async def open_to(
    pool: TunnelPool, node: tuple[str, int], port: int = 80, destination: Identity = REVIEWS
) -> trio.abc.HalfCloseableStream:
    return await pool.open_stream(
        source=FRONTEND,
        destination=destination,
        node_addr=node,
        authority=f"{POD}:{port}",
        forwarded_for="10.44.0.3",
        baggage="k8s.deployment.name=frontend",
    )


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while chunk := await stream.receive_some():
        chunks.append(chunk)
    return b"".join(chunks)


async def echo_after_eof(tunnel: InboundTunnel) -> None:
    """Read the whole request, then answer with it and with what the server saw."""
    stream = await tunnel.accept()
    request = await read_all(stream)
    seen = (
        f"{tunnel.peer_identity} asked {tunnel.local_identity} for {tunnel.authority}"
        f" for {tunnel.forwarded_for} with {tunnel.baggage}: "
    )
    await stream.send_all(seen.encode() + request)
    await stream.send_eof()


async def test_round_trip_with_half_close_in_both_orders(ca, leaves):
    async def server_speaks_first(tunnel: InboundTunnel) -> None:
        stream = await tunnel.accept()
        await stream.send_all(b"hello; I am done talking")
        await stream.send_eof()
        request = await read_all(stream)  # the client keeps sending after our EOF
        assert request == b"and I still have more to say"

    handlers = {80: echo_after_eof, 81: server_speaks_first}

    async def route(tunnel: InboundTunnel) -> None:
        await handlers[tunnel.target[1]](tunnel)

    async with (
        hbone_node(ca, leaves, route) as node,
        open_tunnel_pool(contexts_for(ca, leaves)) as pool,
    ):
        tunnel = await open_to(pool, node, 80)
        await tunnel.send_all(b"GET / HTTP/1.0\r\n\r\n")
        await tunnel.send_eof()
        answer = await read_all(tunnel)  # the server answers after our EOF
        assert (
            answer
            == (
                f"{FRONTEND} asked {REVIEWS} for {POD}:80 for 10.44.0.3 with"
                " k8s.deployment.name=frontend: GET / HTTP/1.0\r\n\r\n"
            ).encode()
        )
        await tunnel.aclose()

        tunnel = await open_to(pool, node, 81)
        assert await read_all(tunnel) == b"hello; I am done talking"
        await tunnel.send_all(b"and I still have more to say")
        await tunnel.send_eof()
        await tunnel.aclose()


async def test_200_concurrent_streams_ride_two_tls_connections(ca, leaves):
    async def hold_until_eof(tunnel: InboundTunnel) -> None:
        stream = await tunnel.accept()
        await read_all(stream)
        await stream.send_eof()

    accepted_before = metric("meshagent_hbone_inbound_connections_total")
    async with (
        hbone_node(ca, leaves, hold_until_eof) as node,
        open_tunnel_pool(contexts_for(ca, leaves)) as pool,
    ):
        tunnels: list[trio.abc.HalfCloseableStream] = []

        async def open_one() -> None:
            tunnels.append(await open_to(pool, node))

        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(open_one)
        key = PoolKey(FRONTEND, REVIEWS, node)
        assert pool.stats() == {key: PoolKeyStats(connections=2, streams=200)}
        assert metric("meshagent_hbone_inbound_connections_total") - accepted_before == 2

        async with trio.open_nursery() as nursery:
            for tunnel in tunnels:
                nursery.start_soon(tunnel.send_eof)
        for tunnel in tunnels:
            assert await tunnel.receive_some() == b""
        assert pool.stats() == {key: PoolKeyStats(connections=2, streams=0)}


async def test_a_node_presenting_another_identity_fails_secure_naming(ca, leaves):
    called = []

    async def handler(tunnel: InboundTunnel) -> None:
        called.append(tunnel)

    failures_before = metric(
        "meshagent_hbone_outbound_connect_failures_total", stage="secure_naming"
    )
    async with (
        hbone_node(ca, leaves, handler, present=RATINGS) as node,
        open_tunnel_pool(contexts_for(ca, leaves)) as pool,
    ):
        with pytest.raises(SecureNamingError) as caught:
            await open_to(pool, node, destination=REVIEWS)
        assert caught.value.expected == REVIEWS
        assert caught.value.actual == RATINGS
        assert pool.stats() == {}
    assert called == []
    assert (
        metric("meshagent_hbone_outbound_connect_failures_total", stage="secure_naming")
        == failures_before + 1
    )


def _bare_client_context(ca: TestCA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca.pem.decode())
    ctx.set_alpn_protocols(["h2"])
    return ctx


@pytest.mark.parametrize("fault", ["other-ca", "expired", "no-certificate"])
async def test_bad_client_certificates_are_refused_counted_and_others_still_served(
    ca, leaves, fault
):
    if fault == "other-ca":
        rogue = TestCA("rogue").issue(FRONTEND.uri)
        bad = client_context(rogue.chain_pem, rogue.key_pem, ca.pem)
    elif fault == "expired":
        old = ca.issue_expired(FRONTEND.uri)
        bad = client_context(old.chain_pem, old.key_pem, ca.pem)
    else:
        bad = _bare_client_context(ca)

    failures_before = metric("meshagent_hbone_inbound_handshake_failures_total")
    async with hbone_node(ca, leaves, echo_after_eof) as node:
        async with open_tunnel_pool(lambda source: bad) as pool:
            with pytest.raises(TunnelFailed):
                await open_to(pool, node)
        assert metric("meshagent_hbone_inbound_handshake_failures_total") == failures_before + 1

        async with open_tunnel_pool(contexts_for(ca, leaves)) as pool:
            tunnel = await open_to(pool, node)
            await tunnel.send_eof()
            assert (await read_all(tunnel)).startswith(str(FRONTEND).encode())


async def test_denied_and_unreachable_reach_the_client_as_tunnel_refused(ca, leaves):
    async def decide(tunnel: InboundTunnel) -> None:
        port = tunnel.target[1]
        if port in (401, 503):
            await tunnel.reject(port)
        else:
            await echo_after_eof(tunnel)

    before = {s: metric("meshagent_hbone_inbound_streams_total", status=s) for s in ("401", "503")}
    sent = {s: metric("meshagent_hbone_outbound_streams_total", status=s) for s in ("401", "503")}
    accepted = metric("meshagent_hbone_inbound_streams_total", status="200")
    async with (
        hbone_node(ca, leaves, decide) as node,
        open_tunnel_pool(contexts_for(ca, leaves)) as pool,
    ):
        for status in (401, 503):
            with pytest.raises(TunnelRefused) as caught:
                await open_to(pool, node, port=status)
            assert caught.value.status == status
            counted = metric("meshagent_hbone_inbound_streams_total", status=str(status))
            assert counted == before[str(status)] + 1
            told = metric("meshagent_hbone_outbound_streams_total", status=str(status))
            assert told == sent[str(status)] + 1  # the client counts the answer it got
        # Refusals end the stream, not the connection: the next tunnel reuses it.
        tunnel = await open_to(pool, node)
        await tunnel.send_eof()
        assert await read_all(tunnel)
        assert metric("meshagent_hbone_inbound_streams_total", status="200") == accepted + 1
        assert pool.stats()[PoolKey(FRONTEND, REVIEWS, node)].connections == 1


async def test_a_crashing_handler_answers_500_and_the_connection_lives_on(ca, leaves):
    async def crash_on_666(tunnel: InboundTunnel) -> None:
        if tunnel.target[1] == 666:
            raise RuntimeError("handler bug")
        await echo_after_eof(tunnel)

    async with (
        hbone_node(ca, leaves, crash_on_666) as node,
        open_tunnel_pool(contexts_for(ca, leaves)) as pool,
    ):
        with pytest.raises(TunnelRefused) as caught:
            await open_to(pool, node, port=666)
        assert caught.value.status == 500
        tunnel = await open_to(pool, node)
        await tunnel.send_eof()
        assert await read_all(tunnel)


async def _tls_to(node: tuple[str, int], ctx: ssl.SSLContext) -> trio.SSLStream:
    tls = trio.SSLStream(await trio.open_tcp_stream(*node), ctx, server_hostname=sni_for(REVIEWS))
    await tls.do_handshake()
    return tls


async def _read_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    received = b""
    with trio.fail_after(5):
        try:
            while chunk := await stream.receive_some():
                received += chunk
        except trio.BrokenResourceError:
            pass
    return received


async def test_a_non_connect_request_is_answered_400_without_the_handler(ca, leaves):
    called = []

    async def handler(tunnel: InboundTunnel) -> None:
        called.append(tunnel)

    async with hbone_node(ca, leaves, handler) as node:
        tls = await _tls_to(node, contexts_for(ca, leaves)(FRONTEND))
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        conn.send_headers(
            1,
            [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x")],
            end_stream=True,
        )
        await tls.send_all(conn.data_to_send())
        status = None
        with trio.fail_after(5):
            while status is None:
                for event in conn.receive_data(await tls.receive_some()):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = dict(event.headers)[b":status"]
                await tls.send_all(conn.data_to_send())
        assert status == b"400"
        await tls.aclose()
    assert called == []


async def test_garbage_truncated_tls_and_bad_http2_close_only_their_connection(ca, leaves):
    async with (
        hbone_node(ca, leaves, echo_after_eof) as node,
        open_tunnel_pool(contexts_for(ca, leaves)) as pool,
    ):

        async def tunnel_works() -> None:
            tunnel = await open_to(pool, node)
            await tunnel.send_all(b"still here")
            await tunnel.send_eof()
            assert (await read_all(tunnel)).endswith(b"still here")

        survivor = await open_to(pool, node)  # open across all the abuse below
        handshake_failures = metric("meshagent_hbone_inbound_handshake_failures_total")
        protocol_errors = metric("meshagent_hbone_inbound_protocol_errors_total")

        # 1. Not TLS at all.
        raw = await trio.open_tcp_stream(*node)
        await raw.send_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n" + bytes(range(256)))
        await _read_until_closed(raw)
        await raw.aclose()
        assert metric("meshagent_hbone_inbound_handshake_failures_total") == handshake_failures + 1
        await tunnel_works()

        # 2. A real ClientHello cut in half, then the connection ends.
        hello_out = ssl.MemoryBIO()
        hello = contexts_for(ca, leaves)(FRONTEND).wrap_bio(
            ssl.MemoryBIO(), hello_out, server_hostname=sni_for(REVIEWS)
        )
        with pytest.raises(ssl.SSLWantReadError):
            hello.do_handshake()
        client_hello = hello_out.read()
        raw = await trio.open_tcp_stream(*node)
        await raw.send_all(client_hello[: len(client_hello) // 2])
        await raw.send_eof()
        await _read_until_closed(raw)
        await raw.aclose()
        assert metric("meshagent_hbone_inbound_handshake_failures_total") == handshake_failures + 2
        await tunnel_works()

        # 3. A good handshake, then an HTTP/2 frame that breaks the protocol (DATA on
        # stream 0). The server answers GOAWAY and closes that connection.
        tls = await _tls_to(node, contexts_for(ca, leaves)(FRONTEND))
        bad_frame = b"\x00\x00\x04\x00\x00\x00\x00\x00\x00" + b"oops"
        await tls.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        await tls.send_all(bad_frame)
        reply = await _read_until_closed(tls)
        observer = h2.connection.H2Connection()
        observer.initiate_connection()
        events = observer.receive_data(reply)
        assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
        await trio.aclose_forcefully(tls)
        assert metric("meshagent_hbone_inbound_protocol_errors_total") == protocol_errors + 1
        await tunnel_works()

        # 4. A good handshake, then bytes that are not a valid TLS record (a forged
        # application-data record): TLS, not h2, refuses them; counted the same way.
        tls = await _tls_to(node, contexts_for(ca, leaves)(FRONTEND))
        await tls.transport_stream.send_all(b"\x17\x03\x03\x00\x20" + bytes(32))
        await _read_until_closed(tls)
        await trio.aclose_forcefully(tls)
        assert metric("meshagent_hbone_inbound_protocol_errors_total") == protocol_errors + 2
        await tunnel_works()

        # 5. A good handshake, then half a record and the connection drops.
        tls = await _tls_to(node, contexts_for(ca, leaves)(FRONTEND))
        await tls.transport_stream.send_all(b"\x17\x03\x03\x01\x00" + bytes(100))
        await tls.transport_stream.send_eof()
        await _read_until_closed(tls)
        await trio.aclose_forcefully(tls)
        await tunnel_works()

        # The tunnel opened before all this never noticed.
        await survivor.send_all(b"survived")
        await survivor.send_eof()
        assert (await read_all(survivor)).endswith(b"survived")


async def test_a_slow_reader_holds_a_20_mib_sender_to_the_window(ca, leaves):
    total = 20 * MIB
    progress = {"consumed": 0, "max_buffered": 0}

    async def slow_reader(tunnel: InboundTunnel) -> None:
        stream = await tunnel.accept()
        while True:
            progress["max_buffered"] = max(progress["max_buffered"], stream.buffered_bytes)
            chunk = await stream.receive_some(64 * 1024)
            if not chunk:
                break
            progress["consumed"] += len(chunk)
            await trio.sleep(0.001)
        await stream.send_all(str(progress["consumed"]).encode())
        await stream.send_eof()

    async with (
        hbone_node(ca, leaves, slow_reader) as node,
        open_tunnel_pool(contexts_for(ca, leaves)) as pool,
    ):
        tunnel = await open_to(pool, node)
        chunk = b"\xab" * (256 * 1024)
        sent = 0
        most_ahead = 0
        with trio.fail_after(60):
            while sent < total:
                await tunnel.send_all(chunk)
                sent += len(chunk)
                ahead = sent - progress["consumed"]
                most_ahead = max(most_ahead, ahead)
                # Everything send_all accepted went into frames the peer allowed: never
                # more than one stream window beyond what the slow reader consumed.
                assert ahead <= STREAM_WINDOW
            await tunnel.send_eof()
            assert await read_all(tunnel) == str(total).encode()
    assert progress["max_buffered"] <= STREAM_WINDOW
    assert most_ahead > STREAM_WINDOW // 2  # the sender really was held back, not idle


async def test_idle_connections_are_closed_after_the_idle_timeout(ca, leaves):
    async with (
        hbone_node(ca, leaves, echo_after_eof) as node,
        open_tunnel_pool(contexts_for(ca, leaves), idle_timeout=0.5) as pool,
    ):
        key = PoolKey(FRONTEND, REVIEWS, node)
        opened = metric("meshagent_hbone_outbound_connections_total")

        async def one_exchange() -> None:
            tunnel = await open_to(pool, node)
            await tunnel.send_eof()
            await read_all(tunnel)
            await tunnel.aclose()

        await one_exchange()
        await trio.sleep(0.25)
        await one_exchange()  # reused: being busy restarted the idle clock
        await trio.sleep(0.25)
        assert pool.stats() == {key: PoolKeyStats(connections=1, streams=0)}
        assert metric("meshagent_hbone_outbound_connections_total") == opened + 1

        await trio.sleep(0.5)
        assert pool.stats() == {}
        await one_exchange()  # a fresh connection
        assert metric("meshagent_hbone_outbound_connections_total") == opened + 2


async def test_an_unreachable_node_fails_with_tunnel_failed(ca, leaves):
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[:2]  # bound but not listening: connection refused
        async with open_tunnel_pool(contexts_for(ca, leaves)) as pool:
            with pytest.raises(TunnelFailed, match="connect"):
                await open_to(pool, free)
            assert pool.stats() == {}


async def test_bad_arguments_fail_before_dialling(ca, leaves):
    async with open_tunnel_pool(contexts_for(ca, leaves)) as pool:
        with pytest.raises(ValueError, match="not an IP"):
            await pool.open_stream(
                source=FRONTEND,
                destination=REVIEWS,
                node_addr=("127.0.0.1", 1),
                authority="reviews.shop:9080",
                forwarded_for="10.0.0.1",
            )
        assert pool.stats() == {}


async def test_a_caller_giving_up_does_not_break_the_dial_others_wait_for(ca, leaves):
    may_connect = trio.Event()

    async def slow_connect(addr: tuple[str, int]) -> trio.abc.Stream:
        await may_connect.wait()
        return await trio.open_tcp_stream(*addr)

    async with (
        hbone_node(ca, leaves, echo_after_eof) as node,
        open_tunnel_pool(contexts_for(ca, leaves), connect=slow_connect) as pool,
    ):
        key = PoolKey(FRONTEND, REVIEWS, node)
        with trio.move_on_after(0.05) as impatient:
            await open_to(pool, node)
        assert impatient.cancelled_caught
        assert pool.stats() == {key: PoolKeyStats(connections=1, streams=0)}  # still dialling

        async def patient() -> None:
            tunnel = await open_to(pool, node)
            await tunnel.send_eof()
            assert await read_all(tunnel)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(patient)
            await trio.testing.wait_all_tasks_blocked()
            may_connect.set()
        assert pool.stats() == {key: PoolKeyStats(connections=1, streams=0)}
