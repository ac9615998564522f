"""The L4 relay over real loopback TCP: both ways, half-close, resets, byte counts; both the
in-kernel splice path (socket to socket) and the generic one (any other stream)."""

from __future__ import annotations

import os
import socket
import struct
import tracemalloc
from functools import partial

import pytest
import trio
import trio.testing
from meshagent.agent.proxy import relay as relay_mod
from meshagent.agent.proxy.relay import relay

from tests.unit.failed_reads import count_failed_reads


class _Wrapped(trio.abc.HalfCloseableStream):
    """A socket stream that is not a `trio.SocketStream` (takes the generic path)."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listeners[0].accept())

        nursery.start_soon(accept)
        near = await trio.open_tcp_stream("127.0.0.1", port)
    await listeners[0].aclose()
    return near, accepted[0]


async def _read_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while data := await stream.receive_some(65536):
        chunks.append(data)
    return b"".join(chunks)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("wrap", [False, True], ids=["splice", "generic"])
async def test_relays_both_ways_with_half_close(wrap: bool) -> None:
    app, client_side = await _tcp_pair()  # app talks to the proxy's client-side socket
    upstream_side, server = await _tcp_pair()
    client: trio.abc.Stream = _Wrapped(client_side) if wrap else client_side
    up_payload = os.urandom(3 * 1024 * 1024 + 17)
    down_payload = os.urandom(2 * 1024 * 1024 + 5)
    got: dict[str, bytes] = {}
    results = []

    async def run_relay() -> None:
        results.append(await relay(client, upstream_side))

    async def app_side() -> None:
        await app.send_all(up_payload)
        await app.send_eof()  # half-close: the answer must still arrive
        got["down"] = await _read_all(app)

    async def server_side() -> None:
        got["up"] = await _read_all(server)  # ends when the relay passes the EOF on
        await server.send_all(down_payload)
        await server.send_eof()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay)
            nursery.start_soon(app_side)
            nursery.start_soon(server_side)
    assert got["up"] == up_payload
    assert got["down"] == down_payload
    assert results[0].sent == len(up_payload)
    assert results[0].received == len(down_payload)
    for s in (app, client_side, upstream_side, server):
        await s.aclose()


async def test_reset_ends_the_relay() -> None:
    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()

    async def run_relay() -> None:
        await relay(client_side, upstream_side)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay)
            await app.send_all(b"hello")
            assert await server.receive_some(5) == b"hello"
            # RST from the server: SO_LINGER 0 then close
            server.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            await server.aclose()
            # the relay ends by itself (the nursery would hang otherwise)
    for s in (app, client_side, upstream_side):
        await s.aclose()


def _reset(stream: trio.SocketStream) -> None:
    """Make the next close send a RST (SO_LINGER 0), as a client that aborts does."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("wrap", [False, True], ids=["splice", "generic"])
async def test_a_relay_ended_by_a_reset_reports_every_byte_it_moved(wrap: bool) -> None:
    """iperf3 and aborting clients end with a RST: the bytes relayed before it are counted
    (they used to be lost with the direction tasks, and reported as 0)."""
    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()
    client: trio.abc.Stream = _Wrapped(client_side) if wrap else client_side
    up, down = 3 * 1024 * 1024 + 7, 1024 * 1024 + 3
    results = []

    async def run_relay() -> None:
        results.append(await relay(client, upstream_side))

    async def read_exactly(stream: trio.abc.ReceiveStream, size: int) -> None:
        left = size
        while left:
            left -= len(await stream.receive_some(min(left, 65536)))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay)
            async with trio.open_nursery() as both:
                both.start_soon(app.send_all, b"u" * up)
                both.start_soon(read_exactly, server, up)
            async with trio.open_nursery() as both:
                both.start_soon(server.send_all, b"d" * down)
                both.start_soon(read_exactly, app, down)
            _reset(app)
            await app.aclose()  # the relay ends by itself
    assert (results[0].sent, results[0].received) == (up, down)
    for s in (client_side, upstream_side, server):
        await s.aclose()


async def test_a_cancelled_relay_leaves_its_counts_in_the_callers_result() -> None:
    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()
    result = relay_mod.RelayResult()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, client_side, upstream_side, result)
            await app.send_all(b"x" * 1000)
            got = 0
            while got < 1000:
                got += len(await server.receive_some(1000))
            nursery.cancel_scope.cancel()  # e.g. a policy that now denies the connection
    assert (result.sent, result.received) == (1000, 0)
    for s in (app, client_side, upstream_side, server):
        await s.aclose()


async def test_idle_splice_relay_holds_no_pipe_and_no_task() -> None:
    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()
    assert relay_mod._can_splice(client_side, upstream_side)
    relay_mod._watcher()  # the run's one epoll set for idle relays, made on first use
    before = _fds()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, client_side, upstream_side)
            await trio.testing.wait_all_tasks_blocked()  # the relay is up and idle
            (relay_task,) = nursery.child_tasks
            assert relay_task.child_nurseries == []  # no task per direction yet
            assert _fds() == before  # idle: no pipe, no descriptor of its own
            await app.send_all(b"x")
            assert await server.receive_some(1) == b"x"
            assert _fds() == before + 2  # bytes moved one way: that direction's pipe
            await app.send_eof()
            await server.send_eof()
    assert _fds() == before  # pipes closed with the relay
    for s in (app, client_side, upstream_side, server):
        await s.aclose()


@pytest.mark.parametrize("first", ["tunnel", "socket", "tunnel-reset"])
async def test_idle_tunnel_relay_wakes_on_either_side(first: str) -> None:
    """Tunnel to socket (the HBONE inbound relay): idle, it waits in one task; data from
    either side, or a reset of the tunnel, starts it (or ends it)."""
    from tests.unit.test_hbone_stream import Pair

    app, pod_side = await _tcp_pair()
    results = []
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            pair = Pair(outer)
            near, far = await pair.open()

            async def run_relay() -> None:
                results.append(await relay(far, pod_side))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_relay)
                await trio.testing.wait_all_tasks_blocked()
                (relay_task,) = nursery.child_tasks
                assert relay_task.child_nurseries == []  # idle: no task per direction
                if first == "tunnel":
                    await near.send_all(b"ping")
                    assert await app.receive_some(4) == b"ping"
                    await app.send_all(b"pong")
                    assert await near.receive_some(4) == b"pong"
                elif first == "socket":
                    await app.send_all(b"pong")
                    assert await near.receive_some(4) == b"pong"
                    await near.send_all(b"ping")
                    assert await app.receive_some(4) == b"ping"
                else:
                    await trio.aclose_forcefully(near)  # a reset: the relay must end
                if first != "tunnel-reset":
                    await near.send_eof()
                    await app.send_eof()
            outer.cancel_scope.cancel()
    if first != "tunnel-reset":
        assert (results[0].sent, results[0].received) == (4, 4)
    for s in (app, pod_side):
        await s.aclose()


async def test_a_cancelled_idle_relay_leaves_nothing_in_the_watcher() -> None:
    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()
    watcher = relay_mod._watcher()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, client_side, upstream_side)
            await trio.testing.wait_all_tasks_blocked()
            assert set(watcher.waits) == {
                client_side.socket.fileno(),
                upstream_side.socket.fileno(),
            }
            nursery.cancel_scope.cancel()
    assert watcher.waits == {}
    # the sockets are still usable, and a new relay over them works
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, client_side, upstream_side)
            await app.send_all(b"again")
            assert await server.receive_some(5) == b"again"
            await app.send_eof()
            await server.send_eof()
    assert watcher.waits == {}
    for s in (app, client_side, upstream_side, server):
        await s.aclose()


async def test_bytes_in_flight_are_reported_at_most_every_interval_and_the_rest_at_the_end(
    autojump_clock,
) -> None:
    """A long transfer shows in the byte counters as it goes; the close adds only the rest."""
    told: list[tuple[int, int]] = []
    result = relay_mod.RelayResult(on_progress=lambda sent, received: told.append((sent, received)))
    result.add_sent(100)  # the first batch starts the interval
    result.add_received(7)
    assert told == []
    await trio.sleep(relay_mod.PROGRESS_INTERVAL)
    result.add_sent(50)
    assert told == [(150, 7)]
    result.add_received(3)  # within the next interval: kept for later
    await trio.sleep(relay_mod.PROGRESS_INTERVAL / 2)
    result.add_sent(1)
    assert told == [(150, 7)]
    assert result.unreported() == (1, 3)  # what the close reports
    assert (result.sent, result.received) == (151, 10)  # the totals (access log) stay whole


@pytest.mark.parametrize("wrap", [False, True], ids=["splice", "generic"])
async def test_a_relay_idle_for_its_idle_timeout_ends_and_says_so(wrap: bool) -> None:
    """Nothing moved for 0.3 s (before the first byte, and after bytes moved): ended,
    `idle_timed_out`; bytes every 0.1 s for longer than the timeout keep it open."""
    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()
    client = _Wrapped(client_side) if wrap else client_side
    with trio.fail_after(10):
        result = await relay(client, upstream_side, idle_timeout=0.3)  # never a byte
    assert result.idle_timed_out and (result.sent, result.received) == (0, 0)

    result = relay_mod.RelayResult()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: relay(client, upstream_side, result, idle_timeout=0.3))
            for _ in range(10):  # 1 s of a byte every 0.1 s: busy, not idle
                await app.send_all(b"x")
                assert await server.receive_some(1) == b"x"
                await trio.sleep(0.1)
            assert not result.idle_timed_out and result.sent == 10
    assert result.idle_timed_out  # then idle: ended
    for s in (app, client_side, upstream_side, server):
        await s.aclose()


async def test_a_relay_ending_otherwise_is_not_an_idle_timeout() -> None:
    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app.send_eof)
            nursery.start_soon(server.send_eof)
            result = await relay(client_side, upstream_side, idle_timeout=5.0)
    assert not result.idle_timed_out
    for s in (app, client_side, upstream_side, server):
        await s.aclose()


class _Tap:
    """Records what a tapped relay showed it (the `observe` level's parser's seat)."""

    def __init__(self) -> None:
        self.request = bytearray()
        self.response = bytearray()
        self.ended: list[str] = []

    def request_data(self, data: bytes) -> None:
        self.request += data

    def response_data(self, data: bytes) -> None:
        self.response += data

    def request_eof(self) -> None:
        self.ended.append("request")

    def response_eof(self) -> None:
        self.ended.append("response")


async def test_a_tap_sees_every_byte_both_ways_and_the_relay_moves_them_unchanged():
    """Socket to socket too (where the untapped relay splices): the tap must see the bytes."""
    up = os.urandom(300_000)
    down = os.urandom(200_000)
    client_app, client_side = await _tcp_pair()
    upstream_side, server_app = await _tcp_pair()
    tap = _Tap()
    got: dict[str, bytes] = {}

    async def server() -> None:
        got["server"] = await _read_all(server_app)
        await server_app.send_all(down)
        await server_app.send_eof()

    async def client() -> None:
        await client_app.send_all(up)
        await client_app.send_eof()
        got["client"] = await _read_all(client_app)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            nursery.start_soon(client)
            result = await relay(client_side, upstream_side, tap=tap)
    assert got == {"server": up, "client": down}
    assert (bytes(tap.request), bytes(tap.response)) == (up, down)
    assert sorted(tap.ended) == ["request", "response"]
    assert (result.sent, result.received) == (len(up), len(down))
    for stream in (client_app, client_side, upstream_side, server_app):
        await stream.aclose()


async def test_small_messages_through_the_generic_path_are_read_without_256_kib_buffers():
    # A socket read allocates what it asks for (a map and unmap per call at 64 KiB and more
    # under the workers' allocator): small messages must not be read with CHUNK.
    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()
    peaks = []

    async def exchange() -> None:
        for i in range(20):
            message = b"ping %d " % i + b"x" * 90
            tracemalloc.start()
            try:
                await app.send_all(message)
                got = b""
                while len(got) < len(message):
                    got += await server.receive_some(1024)
                await server.send_all(got.upper())
                back = b""
                while len(back) < len(message):
                    back += await app.receive_some(1024)
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
            assert back == message.upper()
        await app.send_eof()
        await server.send_eof()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, _Wrapped(client_side), upstream_side)
            await exchange()
    assert max(peaks[1:]) < relay_mod.CHUNK // 4, peaks
    for s in (app, client_side, upstream_side, server):
        await s.aclose()


async def test_small_messages_wait_for_the_socket_instead_of_failing_reads(monkeypatch):
    # A read that finds nothing is an exception and a wasted system call; after a short read
    # (the socket drained) the relay waits for readiness first. Tapped, so socket to socket
    # goes through Python too.
    failed = count_failed_reads(monkeypatch)
    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()

    async def exchange() -> None:
        for i in range(100):
            message = b"GET /%d HTTP/1.1\r\n\r\n" % i
            await app.send_all(message)
            got = b""
            while len(got) < len(message):
                got += await server.receive_some(1024)
            await server.send_all(got.lower())
            back = b""
            while len(back) < len(message):
                back += await app.receive_some(1024)
            assert back == message.lower()
        await app.send_eof()
        await server.send_eof()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(relay, client_side, upstream_side, tap=_Tap()))
            await exchange()
    assert failed.count <= 4, f"{failed.count} reads found nothing for 100 exchanges"
    for s in (app, client_side, upstream_side, server):
        await s.aclose()


async def test_a_busy_direction_through_python_lets_other_tasks_run():
    # Reads that find bytes and writes the socket takes are not trio calls: the relay yields
    # once per batch itself, so a bulk transfer does not starve the rest of the proxy.
    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()
    ticks = 0
    payload = b"z" * (8 * 1024 * 1024)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    async def server_reads() -> None:
        assert len(await _read_all(server)) == len(payload)
        await server.send_eof()

    async def client() -> None:
        await app.send_all(payload)
        await app.send_eof()
        await _read_all(app)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            nursery.start_soon(server_reads)
            nursery.start_soon(client)
            result = await relay(client_side, upstream_side, tap=_Tap())
            nursery.cancel_scope.cancel()
    assert result.sent == len(payload)
    assert ticks > 20
    for s in (app, client_side, upstream_side, server):
        await s.aclose()


async def test_tunnel_bytes_reach_the_socket_from_the_tunnels_reader_in_order(monkeypatch):
    """Tunnel to socket: while the relay waits, the connection's reader writes arriving bytes
    to the socket itself (`_Sink`); a socket that does not take them whole leaves the rest
    to the relay. Every byte arrives once and in order, counted and shown to the tap."""
    import hashlib

    from tests.unit.test_hbone_stream import Pair

    taken_inline = 0
    real_call = relay_mod._Sink.__call__

    def counting_call(self, data: bytes) -> int:
        nonlocal taken_inline
        taken = real_call(self, data)
        taken_inline += taken
        return taken

    monkeypatch.setattr(relay_mod._Sink, "__call__", counting_call)
    app, pod_side = await _tcp_pair()
    tap = _Tap()
    messages = [os.urandom(n) for n in [50] * 40 + [200_000] * 20 + [70] * 20]
    expected = b"".join(messages)
    with trio.fail_after(20):
        async with trio.open_nursery() as outer:
            pair = Pair(outer)
            near, far = await pair.open()
            result = relay_mod.RelayResult()
            finished = trio.Event()

            async def run() -> None:
                await relay(far, pod_side, result, tap=tap)
                finished.set()

            outer.start_soon(run)
            got = hashlib.sha256()
            for i, message in enumerate(messages):
                await near.send_all(message)
                if i < 40 or i >= 60:  # small ones: one at a time, as requests go
                    data = b""
                    while len(data) < len(message):
                        data += await app.receive_some(65536)
                    assert data == message
                    got.update(data)
                elif i == 59:  # big ones piled up in the socket: read them all now
                    want = sum(len(m) for m in messages[40:60])
                    read = 0
                    while read < want:
                        chunk = await app.receive_some(65536)
                        got.update(chunk)
                        read += len(chunk)
            assert got.hexdigest() == hashlib.sha256(expected).hexdigest()
            await near.send_eof()
            assert await app.receive_some(10) == b""
            await app.send_eof()
            await finished.wait()
            outer.cancel_scope.cancel()
    assert result.sent == len(expected) and result.received == 0
    assert bytes(tap.request) == expected
    assert taken_inline >= 40 * 50, "small messages did not go out from the tunnel's reader"
    for s in (app, pod_side):
        await s.aclose()


async def test_a_cancelled_relay_writes_nothing_more_to_its_socket():
    """A relay cancelled (a DENY on a live connection, issue 14) while it waits on the tunnel:
    bytes arriving after the cancel are not written to the pod by the tunnel's reader."""
    from tests.unit.test_hbone_stream import Pair

    app, pod_side = await _tcp_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            pair = Pair(outer)
            near, far = await pair.open()
            scope = trio.CancelScope()

            async def run() -> None:
                with scope:
                    await relay(far, pod_side)

            outer.start_soon(run)
            await near.send_all(b"before")
            assert await app.receive_some(100) == b"before"
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await near.send_all(b"after")
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(0.2):
                leaked = await app.receive_some(100)
                raise AssertionError(f"{leaked!r} reached the pod after the cancel")
            outer.cancel_scope.cancel()
    for s in (app, pod_side):
        await s.aclose()


async def test_a_tap_sees_each_batch_before_it_goes_out():
    """Once a request is out its response may come back through the other direction before
    this one runs again (the tunnel reader writes it straight to the client): the tap must
    have seen the request first, or the observer takes the response for an unmatched one."""
    log: list[str] = []

    class _Logged(_Wrapped):
        async def send_all(self, data) -> None:
            log.append(f"sent {bytes(data)!r}")
            await self.inner.send_all(data)

    class _LoggingTap(_Tap):
        def request_data(self, data: bytes) -> None:
            log.append(f"seen {data!r}")

    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(relay, client_side, _Logged(upstream_side), tap=_LoggingTap())
            )
            for message in (b"GET /a HTTP/1.1\r\n\r\n", b"GET /b HTTP/1.1\r\n\r\n"):
                await app.send_all(message)
                assert await server.receive_some(100) == message
            await app.send_eof()
            await server.send_eof()
    assert log == [
        "seen b'GET /a HTTP/1.1\\r\\n\\r\\n'",
        "sent b'GET /a HTTP/1.1\\r\\n\\r\\n'",
        "seen b'GET /b HTTP/1.1\\r\\n\\r\\n'",
        "sent b'GET /b HTTP/1.1\\r\\n\\r\\n'",
    ]
    for s in (app, client_side, upstream_side, server):
        await s.aclose()


async def test_a_failing_tap_in_the_tunnels_reader_ends_no_other_stream(caplog):
    """The sink runs in the tunnel connection's reader, which carries every stream of the
    connection: a tap that raises there is logged; the bytes still reach the socket and the
    connection's other streams go on."""
    from tests.unit.test_hbone_stream import Pair

    class _Broken(_Tap):
        def request_data(self, data: bytes) -> None:
            if self.request:  # the first batch goes through the relay's task: later ones
                raise RuntimeError("tap bug")  # come while it waits, through the sink
            self.request += data

    app, pod_side = await _tcp_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            pair = Pair(outer)
            near, far = await pair.open()
            other_near, other_far = await pair.open()
            outer.start_soon(partial(relay, far, pod_side, tap=_Broken()))
            for i in range(5):
                await near.send_all(b"msg %d" % i)
                assert await app.receive_some(100) == b"msg %d" % i
            await other_near.send_all(b"still here")
            assert await other_far.receive_some(100) == b"still here"
            assert pair.client.is_open and pair.server.is_open
            outer.cancel_scope.cancel()
    assert "counting or tapping relayed bytes failed" in caplog.text
    for s in (app, pod_side):
        await s.aclose()
