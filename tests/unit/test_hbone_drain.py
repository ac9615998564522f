"""A draining HBONE server (the old agent in a surge upgrade) keeps its open tunnels, refuses
new streams on its connections, and the client pool opens them over a new connection, which
the successor accepts on the shared port; what a drain must wait for before the process may
exit; a tunnel request whose connection ended unanswered is asked again. Real mutual TLS on
127.0.0.1."""

from __future__ import annotations

from functools import partial

import pytest
import trio
from meshagent.agent.hbone import InboundTunnel, open_tunnel_pool, serve_hbone
from meshagent.agent.hbone import server_context_selector as selector_for
from meshagent.common.listeners import InFlight, PausableListener
from meshagent.common.spiffe import sni_for

from tests.certs import TestCA
from tests.unit.test_hbone_tunnel import FRONTEND, REVIEWS, contexts_for, hbone_node, open_to


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def leaves(ca):
    return {identity: ca.issue(identity.uri) for identity in (FRONTEND, REVIEWS)}


def _node(ca, leaves, name: str, served: list[str]):
    def lookup(server_name: str | None):
        for identity, leaf in leaves.items():
            if server_name == sni_for(identity):
                return leaf.chain_pem, leaf.key_pem
        return None

    async def handler(tunnel: InboundTunnel) -> None:
        served.append(name)
        stream = await tunnel.accept()
        while data := await stream.receive_some():
            await stream.send_all(name.encode() + b":" + data)
        await stream.send_eof()

    return selector_for(lookup, ca.pem), handler


async def test_a_draining_node_keeps_its_tunnels_and_new_ones_go_to_its_successor(ca, leaves):
    served: list[str] = []
    draining = False
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            old_listener = PausableListener("127.0.0.1", 0)
            port = old_listener.address[1]
            selector, handler = _node(ca, leaves, "old", served)
            await nursery.start(
                partial(
                    serve_hbone,
                    [old_listener],
                    ssl_selector=selector,
                    handler=handler,
                    refuse_new=lambda: draining,
                )
            )
            async with open_tunnel_pool(contexts_for(ca, leaves)) as pool:
                kept = await open_to(pool, ("127.0.0.1", port))
                await kept.send_all(b"one")
                assert await kept.receive_some() == b"old:one"

                # the successor binds the same port; the old one stops accepting and drains
                new_listener = PausableListener("127.0.0.1", port)
                selector, handler = _node(ca, leaves, "new", served)
                await nursery.start(
                    partial(serve_hbone, [new_listener], ssl_selector=selector, handler=handler)
                )
                old_listener.pause()
                draining = True

                fresh = await open_to(pool, ("127.0.0.1", port))
                await fresh.send_all(b"two")
                assert await fresh.receive_some() == b"new:two"
                # the tunnel opened before the drain goes on over the old connection
                await kept.send_all(b"three")
                assert await kept.receive_some() == b"old:three"
                assert served == ["old", "new"]
                await kept.aclose()
                await fresh.aclose()
            nursery.cancel_scope.cancel()


async def _until(check, what: str) -> None:
    with trio.fail_after(5):
        while not check():
            await trio.sleep(0.01)


async def test_a_handshake_under_way_and_a_tunnel_before_its_relay_are_in_flight(ca, leaves):
    """A replaced worker once saw nothing open and exited while a connection it had just
    accepted was in its handshake or its first tunnel's handler was dialling the pod; the
    source's requests on it failed. The drain waits while `in_flight` counts them."""
    in_flight = InFlight()
    dialling, dialled = trio.Event(), trio.Event()

    async def handler(tunnel: InboundTunnel) -> None:
        dialling.set()
        await dialled.wait()  # the pod dial, before the handler counts the tunnel as open
        stream = await tunnel.accept()
        await stream.send_all(b"hello")
        await stream.send_eof()

    with trio.fail_after(10):
        async with hbone_node(ca, leaves, handler, in_flight=in_flight) as node:
            await _until(lambda: in_flight.count == 0, "the server idle")
            raw = await trio.open_tcp_stream(*node)  # a client that has not said hello yet
            await _until(lambda: in_flight.count == 1, "the handshake counted")
            await raw.aclose()
            await _until(lambda: in_flight.count == 0, "the failed handshake not counted")

            async with open_tunnel_pool(contexts_for(ca, leaves)) as pool, trio.open_nursery() as n:
                opened: list[trio.abc.HalfCloseableStream] = []

                async def open_one() -> None:
                    opened.append(await open_to(pool, node))

                n.start_soon(open_one)
                await dialling.wait()
                assert in_flight.count == 1  # the tunnel's handler, not yet relaying
                dialled.set()
            assert await opened[0].receive_some() == b"hello"
            await opened[0].aclose()
            await _until(lambda: in_flight.count == 0, "the tunnel's handler done")


async def test_a_tunnel_request_whose_connection_ended_unanswered_is_asked_again(ca, leaves):
    """A connection that ends before the server answered a CONNECT (a worker exiting as the
    request arrived) took nothing through that tunnel: the pool asks again over a new
    connection instead of failing the request."""
    answered: list[int] = []

    async def handler(tunnel: InboundTunnel) -> None:
        if not answered:  # the first request: its connection goes away unanswered
            answered.append(0)
            await trio.aclose_forcefully(tunnel._stream._conn.transport)
            return
        answered.append(200)
        stream = await tunnel.accept()
        await stream.send_all(b"second try")
        await stream.send_eof()

    with trio.fail_after(10):
        async with (
            hbone_node(ca, leaves, handler) as node,
            open_tunnel_pool(contexts_for(ca, leaves)) as pool,
        ):
            stream = await open_to(pool, node)
            assert await stream.receive_some() == b"second try"
            assert answered == [0, 200]
            await stream.aclose()
