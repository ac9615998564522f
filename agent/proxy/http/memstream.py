"""An in-process byte stream pair: the same-node hop between the outbound and inbound engines.

What flows through: the bytes one engine writes as an upstream connection, read by the other as
its downstream client, and back. It replaces a kernel socket pair (agent/proxy/inbound.py,
`open_local_http`): with one, every request paid two more send and three more receive system
calls, an epoll registration and a readiness poll. Semantics are a socket's, as trio streams
have them: `send_all` waits while the peer has `BUFFER_LIMIT` bytes unread (back-pressure, as
a socket buffer gives), `send_eof` half-closes, `aclose` makes the peer's sends fail
(BrokenResourceError) and its receives end (b""), every method is a checkpoint, and a
cancelled `receive_some` loses no data (the pool's idle watch relies on it).
"""

from __future__ import annotations

import operator

import trio

BUFFER_LIMIT = 256 * 1024  # unread bytes a sender may leave before it waits (a socket's order)


class _Pipe:
    """One direction: bytes written and not yet read, and how it ended."""

    __slots__ = ("buffer", "eof", "reader_gone", "readers", "writers")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False  # the writer half-closed or closed
        self.reader_gone = False  # the reader closed: writes fail
        self.readers = trio.lowlevel.ParkingLot()
        self.writers = trio.lowlevel.ParkingLot()


class MemoryStream(trio.abc.HalfCloseableStream):
    """One end of a `memory_stream_pair`."""

    def __init__(self, inbox: _Pipe, outbox: _Pipe) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self._closed = False
        self._sending = False
        self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            out = self._outbox
            view = memoryview(data)
            parked = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                if out.reader_gone:
                    raise trio.BrokenResourceError("the other end was closed")
                if out.eof:
                    raise trio.ClosedResourceError("send_eof was called on this stream")
                if not view:
                    break
                room = BUFFER_LIMIT - len(out.buffer)
                if room > 0:
                    out.buffer += view[:room]
                    view = view[room:]
                    out.readers.unpark_all()
                    continue
                parked = True
                await out.writers.park()
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            out = self._outbox
            parked = False
            while (
                len(out.buffer) >= BUFFER_LIMIT
                and not out.reader_gone
                and not out.eof
                and not self._closed
            ):
                parked = True
                await out.writers.park()
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        self._outbox.eof = True
        self._outbox.readers.unpark_all()

    def readable_now(self) -> bool:
        """Whether `receive_some` would return (or raise) without waiting: the pool tells a
        pooled connection the other end closed from this, before reusing it."""
        return bool(self._inbox.buffer) or self._inbox.eof or self._closed

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            inbox = self._inbox
            parked = False
            while not inbox.buffer and not inbox.eof and not self._closed:
                parked = True
                await inbox.readers.park()  # cancelled here: nothing was taken
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
            buffer = inbox.buffer
            if not buffer:
                return b""
            if max_bytes is None or len(buffer) <= max_bytes:
                data = bytes(buffer)
                buffer.clear()
            else:
                data = bytes(buffer[:max_bytes])
                del buffer[:max_bytes]
            inbox.writers.unpark_all()
            return data
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close now (no checkpoint): the peer's receives end, its sends fail."""
        if self._closed:
            return
        self._closed = True
        self._outbox.eof = True
        self._outbox.readers.unpark_all()
        self._inbox.reader_gone = True
        self._inbox.buffer.clear()
        self._inbox.writers.unpark_all()
        self._inbox.readers.unpark_all()  # our own receiver and sender, if any, see the close
        self._outbox.writers.unpark_all()


def memory_stream_pair() -> tuple[MemoryStream, MemoryStream]:
    """Two connected ends: what one sends the other receives."""
    a_to_b, b_to_a = _Pipe(), _Pipe()
    return MemoryStream(b_to_a, a_to_b), MemoryStream(a_to_b, b_to_a)
