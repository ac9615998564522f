"""The in-process stream pair of the same-node HTTP hop behaves as trio's streams must."""

from __future__ import annotations

import trio
import trio.testing
from meshagent.agent.proxy.http.memstream import BUFFER_LIMIT, memory_stream_pair


async def test_passes_trios_half_closeable_stream_checks():
    async def maker():
        return memory_stream_pair()

    async def clogged():
        a, b = memory_stream_pair()
        await a.send_all(b"x" * BUFFER_LIMIT)  # a's buffer toward b is full: a's sends wait
        await b.send_all(b"x" * BUFFER_LIMIT)
        return a, b

    with trio.fail_after(20):
        await trio.testing.check_half_closeable_stream(maker, clogged)


async def test_back_pressure_and_no_data_lost_to_a_cancelled_receive():
    a, b = memory_stream_pair()
    with trio.move_on_after(0.05) as scope:
        await b.receive_some(10)  # cancelled while waiting
    assert scope.cancelled_caught
    done = trio.Event()

    async def big_send() -> None:
        await a.send_all(b"y" * (BUFFER_LIMIT + 10))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(big_send)
        await trio.sleep(0.01)
        assert not done.is_set()  # waits until the reader makes room
        got = 0
        while got < BUFFER_LIMIT + 10:
            got += len(await b.receive_some(65536))
    assert done.is_set()
    await a.aclose()
    assert await b.receive_some(1) == b""
