"""An outbound connection's frame (agent/proxy/outbound.py `_Serving`): a bug met on one
connection ends it alone, counted and logged with its traceback; a cancellation goes on up; the
client is closed and the open count goes down either way."""

from __future__ import annotations

import logging

import pytest
import trio
from meshagent.agent.proxy.outbound import ProxyStats, _Serving


async def _serve(body) -> tuple[ProxyStats, trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    client, peer = trio.SocketStream(a), trio.SocketStream(b)
    stats = ProxyStats()
    async with _Serving(stats, client, "outbound connection"):
        await body()
    return stats, client, peer


async def test_a_bug_on_one_connection_is_counted_logged_and_closes_it_alone(caplog):
    async def bug() -> None:
        raise KeyError("no such thing")

    with caplog.at_level(logging.ERROR):
        stats, client, peer = await _serve(bug)
    assert stats.internal_errors == 1 and stats.active == 0
    assert client.socket.fileno() == -1
    assert await peer.receive_some(10) == b""  # the client sees the close
    (record,) = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert record.getMessage() == "outbound connection closed on an internal error"
    assert record.exc_info is not None and record.exc_info[0] is KeyError


async def test_a_cancelled_connection_is_closed_and_the_cancellation_goes_on():
    async def wait() -> None:
        await trio.sleep_forever()

    with trio.move_on_after(0.05) as scope:
        a, b = trio.socket.socketpair()
        client = trio.SocketStream(a)
        stats = ProxyStats()
        async with _Serving(stats, client, "outbound connection"):
            await wait()
    assert scope.cancelled_caught
    assert stats.internal_errors == 0 and stats.active == 0
    assert client.socket.fileno() == -1
    b.close()


async def test_a_connection_that_ends_well_is_closed_and_not_counted_as_an_error():
    async def fine() -> None:
        await trio.lowlevel.checkpoint()

    stats, client, peer = await _serve(fine)
    assert stats.internal_errors == 0 and stats.active == 0
    assert client.socket.fileno() == -1
    await peer.aclose()


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
async def test_what_is_not_a_bug_is_not_swallowed(error):
    async def stop() -> None:
        raise error

    with pytest.raises(error):
        await _serve(stop)
