"""HBONE connections over TLS over real sockets: frames a stream sends while the writer is idle
go straight to the socket (`HboneConnection._push`), and whatever the order of direct and
queued writes, every stream's bytes arrive whole and in order."""

from __future__ import annotations

import hashlib
import random

import trio
from meshagent.agent.hbone.connection import TunnelStream

from tests.unit.test_hbone_stream import Pair
from tests.unit.test_hbone_tls import _socket_pair, _tls_pair, ca, leaves  # noqa: F401


async def test_a_small_message_goes_out_without_waking_the_writer(ca, leaves):  # noqa: F811
    client_tls, server_tls = await _tls_pair(ca, leaves, _socket_pair)
    async with trio.open_nursery() as nursery:
        pair = Pair(nursery, (client_tls, server_tls))
        a, b = await pair.open()
        await trio.testing.wait_all_tasks_blocked()
        kicks = 0
        kick = pair.client._kick

        def counting_kick(weight: int = 1) -> None:
            nonlocal kicks
            kicks += 1
            kick(weight)

        pair.client._kick = counting_kick
        for i in range(20):
            await a.send_all(b"GET /%d HTTP/1.1\r\n\r\n" % i)
            got = await b.receive_some()
            assert got == b"GET /%d HTTP/1.1\r\n\r\n" % i
            await trio.testing.wait_all_tasks_blocked()
        assert kicks == 0, "small sends woke the writer task"
        nursery.cancel_scope.cancel()


async def test_streams_sending_at_once_each_arrive_whole_and_in_order(ca, leaves):  # noqa: F811
    client_tls, server_tls = await _tls_pair(ca, leaves, _socket_pair)
    rng = random.Random(7)
    plans = [[rng.choice((1, 90, 5_000, 70_000, 300_000)) for _ in range(40)] for _ in range(6)]
    async with trio.open_nursery() as nursery:
        pair = Pair(nursery, (client_tls, server_tls))
        pairs = [await pair.open() for _ in plans]
        sent: list[str] = [""] * len(plans)
        got: list[str] = [""] * len(plans)

        async def send(i: int, stream: TunnelStream) -> None:
            digest = hashlib.sha256()
            for n, size in enumerate(plans[i]):
                chunk = bytes([(i * 31 + n) % 251]) * size
                digest.update(chunk)
                await stream.send_all(chunk)
            await stream.send_eof()
            sent[i] = digest.hexdigest()

        async def receive(i: int, stream: TunnelStream) -> None:
            digest = hashlib.sha256()
            while data := await stream.receive_some():
                digest.update(data)
                if len(data) > 50_000:
                    await trio.sleep(0.001)  # a slow reader now and then: windows fill
            got[i] = digest.hexdigest()

        with trio.fail_after(60):
            async with trio.open_nursery() as inner:
                for i, (a, b) in enumerate(pairs):
                    inner.start_soon(send, i, a)
                    inner.start_soon(receive, i, b)
        assert got == sent
        nursery.cancel_scope.cancel()
