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


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_connect_dials_an_address_of_either_family_as_a_stream_with_nodelay(host):
    import socket

    listener = (await trio.open_tcp_listeners(0, host=host))[0]
    port = listener.socket.getsockname()[1]
    stream = await sockio.connect(host, port)
    server = await listener.accept()
    assert stream.socket.family == (socket.AF_INET6 if ":" in host else socket.AF_INET)
    assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    await sockio.send_all(stream, b"ping")
    assert await server.receive_some(10) == b"ping"
    await sockio.close(stream)
    assert stream.socket.fileno() == -1
    assert await server.receive_some(10) == b""  # the peer sees the close
    await server.aclose()
    await listener.aclose()


async def test_connect_to_a_closed_port_raises_oserror_and_leaves_no_socket(monkeypatch):
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens there now
    made = []
    real = trio.socket.socket
    monkeypatch.setattr(trio.socket, "socket", lambda *a: made.append(real(*a)) or made[-1])
    with pytest.raises(OSError):
        await sockio.connect("127.0.0.1", port)
    assert len(made) == 1 and made[0].fileno() == -1


async def test_a_cancelled_connect_closes_its_socket(monkeypatch):
    import socket

    # A loopback listener whose accept queue is full drops further SYNs: a connect waits.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        queued.append(s)
    made = []
    real = trio.socket.socket
    monkeypatch.setattr(trio.socket, "socket", lambda *a: made.append(real(*a)) or made[-1])
    try:
        with trio.move_on_after(0.5) as scope:
            await sockio.connect("127.0.0.1", port)
        assert scope.cancelled_caught
        assert len(made) == 1 and made[0].fileno() == -1
    finally:
        for s in [*queued, listener]:
            s.close()
