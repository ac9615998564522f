"""sockio over real loopback TCP: the same bytes and errors as trio's socket stream calls,
with a read that expects to wait waiting first (no failed read) and a write the socket takes
whole done at once."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from meshagent.agent import sockio

from tests.unit.failed_reads import count_failed_reads
from tests.unit.test_relay import _tcp_pair


async def test_a_read_that_waits_first_finds_the_bytes_without_a_failed_read(monkeypatch):
    failed = count_failed_reads(monkeypatch)
    a, b = await _tcp_pair()
    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(a.send_all, b"m%d" % i)
            assert await sockio.receive_some(b, 1024, True) == b"m%d" % i
    assert failed.count == 0
    # Not waiting first on an empty socket: one failed read, then the wait.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, b"late")
        assert await sockio.receive_some(b, 1024, False) == b"late"
    assert failed.count <= 1
    await a.send_eof()
    assert await sockio.receive_some(b, 1024, True) == b""  # EOF
    await a.aclose()
    await b.aclose()


async def test_a_write_the_socket_cannot_take_whole_finishes_once_the_peer_reads():
    a, b = await _tcp_pair()
    payload = os.urandom(16 * 1024 * 1024)  # more than both socket buffers
    received = bytearray()

    async def read() -> None:
        while len(received) < len(payload):
            received.extend(await sockio.receive_some(b, 65536, False))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sockio.send_all, a, payload)
            await trio.testing.wait_all_tasks_blocked()  # the writer waits for room
            nursery.start_soon(read)
    assert received == payload
    await a.aclose()
    await b.aclose()


async def test_socket_errors_are_trios_stream_errors():
    a, b = await _tcp_pair()
    await b.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await sockio.receive_some(b, 10, False)
    with pytest.raises(trio.ClosedResourceError):
        await sockio.send_all(b, b"x")
    # the peer is gone: writing soon fails as a broken stream
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):
            await sockio.send_all(a, b"x" * 65536)
            await trio.sleep(0.01)
    await a.aclose()


async def test_other_streams_take_their_own_calls():
    a, b = trio.testing.memory_stream_pair()
    await sockio.send_all(a, b"hello")
    assert await sockio.receive_some(b, 10, True) == b"hello"
