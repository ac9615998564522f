"""Tunnel streams over an in-memory transport: trio's stream contract, flow control, resets.

No TLS and no sockets: two `HboneConnection`s (client and server) talk over
`trio.testing.memory_stream_pair`, so these tests are exact and fast.
"""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from meshagent.agent.hbone.connection import CloseReason, HboneConnection, TunnelStream
from meshagent.agent.hbone.protocol import STREAM_WINDOW, connect_request_headers

MIB = 1024 * 1024


class Pair:
    """A client and a server connection over ``transports`` (default: joined in memory);
    `open` makes tunnel pairs."""

    def __init__(
        self,
        nursery: trio.Nursery,
        transports: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
    ) -> None:
        a, b = transports or trio.testing.memory_stream_pair()
        self._nursery = nursery
        self._accepted_send, self._accepted = trio.open_memory_channel[TunnelStream](100)
        self.client = HboneConnection(a, client_side=True)
        self.server = HboneConnection(b, client_side=False, on_request=self._on_request)
        nursery.start_soon(self.client.run)
        nursery.start_soon(self.server.run)

    def _on_request(self, stream: TunnelStream, headers: list[tuple[bytes, bytes]]) -> None:
        async def accept() -> None:
            await stream.respond(200)
            await self._accepted_send.send(stream)

        self._nursery.start_soon(accept)

    async def open(self) -> tuple[TunnelStream, TunnelStream]:
        client = self.client.start_request(connect_request_headers("10.0.0.1:80", "10.0.0.2"))
        assert await client.wait_response() == 200
        return client, await self._accepted.receive()


async def test_tunnel_streams_meet_trios_half_closeable_stream_contract():
    async with trio.open_nursery() as nursery:
        pair = Pair(nursery)

        async def clogged() -> tuple[TunnelStream, TunnelStream]:
            # Fill both windows so that neither side can send until the other reads (on a
            # fresh connection, whose connection window is whole).
            a, b = await Pair(nursery).open()
            await a.send_all(b"\0" * STREAM_WINDOW)
            await b.send_all(b"\0" * STREAM_WINDOW)
            return a, b

        await trio.testing.check_half_closeable_stream(pair.open, clogged)
        nursery.cancel_scope.cancel()


async def test_a_reader_that_stops_stops_the_sender_after_one_window():
    async with trio.open_nursery() as nursery:
        pair = Pair(nursery)
        sender, receiver = await pair.open()
        sent = 0

        async def send_forever() -> None:
            nonlocal sent
            while True:
                await sender.send_all(b"x" * MIB)
                sent += MIB

        nursery.start_soon(send_forever)
        await trio.testing.wait_all_tasks_blocked()
        assert sent == STREAM_WINDOW
        assert receiver.buffered_bytes == STREAM_WINDOW

        # Reading hands window back (h2 batches updates to half a window), so the sender
        # moves on, but never more than one window past what was read.
        consumed = 0
        while consumed < STREAM_WINDOW:
            consumed += len(await receiver.receive_some(256 * 1024))
            await trio.testing.wait_all_tasks_blocked()
            assert sent <= consumed + STREAM_WINDOW
            assert receiver.buffered_bytes <= STREAM_WINDOW
        assert sent > STREAM_WINDOW
        nursery.cancel_scope.cancel()


async def test_a_buffer_reused_after_send_all_does_not_change_what_was_sent():
    """send_all may return before the writer sent the bytes (a send buffer): a caller's
    mutable buffer must not be referred to after it returns."""
    async with trio.open_nursery() as nursery:
        pair = Pair(nursery)
        sender, receiver = await pair.open()
        buffer = bytearray(b"a" * 300_000)
        await sender.send_all(buffer)
        buffer[:] = b"b" * len(buffer)
        await sender.send_all(memoryview(buffer)[:10])
        await sender.send_eof()
        got = bytearray()
        while data := await receiver.receive_some():
            got += data
        assert got == b"a" * 300_000 + b"b" * 10
        nursery.cancel_scope.cancel()


async def test_half_close_each_way_keeps_the_other_direction_flowing():
    async with trio.open_nursery() as nursery:
        pair = Pair(nursery)
        client, server = await pair.open()
        await client.send_all(b"request")
        await client.send_eof()
        assert await server.receive_some() == b"request"
        assert await server.receive_some() == b""
        await server.send_all(b"response after the client's EOF")
        await server.send_eof()
        assert await client.receive_some() == b"response after the client's EOF"
        assert await client.receive_some() == b""
        assert pair.client.active_streams == 0
        assert pair.server.active_streams == 0
        nursery.cancel_scope.cancel()


async def test_an_aborted_close_resets_the_peer_both_ways():
    async with trio.open_nursery() as nursery:
        pair = Pair(nursery)
        client, server = await pair.open()
        await server.send_all(b"unread")
        await trio.aclose_forcefully(client)
        await trio.testing.wait_all_tasks_blocked()
        try:
            await server.receive_some()
        except trio.BrokenResourceError as exc:
            assert "CANCEL" in str(exc)
        else:
            raise AssertionError("the reset did not reach the server's reader")
        try:
            await server.send_all(b"more")
        except trio.BrokenResourceError:
            pass
        else:
            raise AssertionError("the reset did not reach the server's writer")
        nursery.cancel_scope.cancel()


async def test_a_graceful_close_still_delivers_what_was_sent():
    async with trio.open_nursery() as nursery:
        pair = Pair(nursery)
        client, server = await pair.open()
        await client.send_all(b"last words")
        await client.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert await server.receive_some() == b"last words"
        assert await server.receive_some() == b""
        nursery.cancel_scope.cancel()


async def test_closing_with_unread_data_returns_the_connection_window():
    async with trio.open_nursery() as nursery:
        pair = Pair(nursery)
        first_client, first_server = await pair.open()
        await first_client.send_all(b"y" * STREAM_WINDOW)  # fills the connection window too
        await first_server.aclose()  # never reads it
        second_client, second_server = await pair.open()
        with trio.fail_after(5):
            async with trio.open_nursery() as inner:
                inner.start_soon(second_client.send_all, b"z" * STREAM_WINDOW)
                received = 0
                while received < STREAM_WINDOW:
                    received += len(await second_server.receive_some())
        nursery.cancel_scope.cancel()


async def test_losing_the_connection_breaks_every_open_stream():
    async with trio.open_nursery() as nursery:
        pair = Pair(nursery)
        streams = [await pair.open() for _ in range(3)]
        await pair.server.aclose()
        for client, _ in streams:
            try:
                await client.receive_some()
            except trio.BrokenResourceError:
                pass
            else:
                raise AssertionError("stream survived its connection")
        assert pair.client.close_reason is not None
        nursery.cancel_scope.cancel()


async def test_each_stream_reports_done_once_when_both_directions_end():
    async with trio.open_nursery() as nursery:
        pair = Pair(nursery)
        client, server = await pair.open()
        calls = []
        client.set_on_done(lambda: calls.append("done"))
        await client.send_eof()
        assert calls == []
        await server.send_eof()
        assert await client.receive_some() == b""
        await client.aclose()
        assert calls == ["done"]
        nursery.cancel_scope.cancel()


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _frame(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    header = len(payload).to_bytes(3, "big") + bytes([frame_type, flags])
    return header + stream_id.to_bytes(4, "big") + payload


frames = st.builds(
    _frame,
    st.integers(0, 10),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1]),
    st.binary(max_size=64),
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.lists(frames, max_size=8).map(b"".join)))
async def test_whatever_a_peer_sends_the_server_connection_ends_with_a_reason(junk):
    """Malformed HTTP/2 must end one connection with a reason, never raise out of `run`."""
    client_end, server_end = trio.testing.memory_stream_pair()

    def refuse(stream: TunnelStream, headers: list[tuple[bytes, bytes]]) -> None:
        stream._abort()

    server = HboneConnection(server_end, client_side=False, on_request=refuse, close_timeout=0.1)
    await client_end.send_all(PREFACE + junk)
    await client_end.send_stream.aclose()  # EOF after the junk
    with trio.fail_after(5):
        reason = await server.run()
    assert reason in (CloseReason.EOF, CloseReason.PROTOCOL_ERROR, CloseReason.GOAWAY)
