"""A draining HBONE server (the old agent in a surge upgrade) keeps its open tunnels, refuses
new streams on its connections, and the client pool opens them over a new connection, which
the successor accepts on the shared port. Real mutual TLS on 127.0.0.1."""

from __future__ import annotations

from functools import partial

import pytest
import trio
from meshagent.agent.hbone import InboundTunnel, open_tunnel_pool, serve_hbone
from meshagent.agent.hbone import server_context_selector as selector_for
from meshagent.common.listeners import PausableListener
from meshagent.common.spiffe import sni_for

from tests.certs import TestCA
from tests.unit.test_hbone_tunnel import FRONTEND, REVIEWS, contexts_for, open_to


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
