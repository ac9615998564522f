"""One HBONE connection: HTTP/2 over an established TLS stream, carrying tunnel streams.

Bytes read from the transport go into `h2` (one reader task); the events it returns are
routed to the `TunnelStream` they belong to. Data waits in the stream's inbox until the
application reads it, and only then is its flow-control window handed back to the peer, so
a slow reader stops the sender after one window instead of making anyone buffer more.

Frames that any task queues in `h2` (data, headers, window updates, acks) are written by one
writer task. The reader never waits on a write: two proxies pushing bulk data at each other
through full TCP buffers therefore keep draining each other and cannot deadlock.

Used by both sides: the client pool opens streams with `start_request`; the server gets
each new request through ``on_request`` and answers it on the stream.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import operator
import ssl
from collections.abc import Callable

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio
from meshagent.agent.hbone.errors import TunnelFailed
from meshagent.agent.hbone.protocol import new_h2_connection, response_status
from meshagent.agent.hbone.tlsstream import TlsStream
from meshagent.common.h2guard import Abuse, FloodGuard

__all__ = ["CloseReason", "ConnectionUnavailable", "HboneConnection", "TunnelStream"]

log = logging.getLogger(__name__)

# Large transport reads keep per-read overhead (a trio checkpoint, an h2 call) off the hot path.
RECEIVE_SIZE = 256 * 1024
# What `receive_some()` without a size returns at most, unless one received frame is bigger
# (a whole frame is returned without copying).
DEFAULT_READ_SIZE = 256 * 1024
# How much a stream's `send_all` may leave queued for the writer before it waits (like a
# socket's send buffer): the relay reads its next chunk while the writer encrypts and sends
# the last, and the writer takes several chunks in one go, instead of the two tasks taking
# turns once per chunk.
SEND_BUFFER = 512 * 1024
# How long a closing connection may spend pushing out its last frames (GOAWAY, TLS close).
CLOSE_TIMEOUT = 2.0

RequestCallback = Callable[["TunnelStream", list[tuple[bytes, bytes]]], None]


class CloseReason(enum.Enum):
    """Why a connection ended."""

    EOF = "peer closed the connection"
    GOAWAY = "peer sent GOAWAY"
    PROTOCOL_ERROR = "TLS or HTTP/2 protocol error"
    ABUSE = "peer exceeded a limit (GOAWAY ENHANCE_YOUR_CALM)"
    TRANSPORT_ERROR = "transport failed"
    LOCAL = "closed locally"


class ConnectionUnavailable(Exception):
    """This connection cannot take another stream now (closing, full, or out of stream IDs)."""


def _is_protocol_error(exc: BaseException) -> bool:
    """A TLS error that is the peer's fault (bad record), not just the connection ending."""
    cause = exc.__cause__
    if not isinstance(cause, ssl.SSLError) or isinstance(cause, ssl.SSLEOFError):
        return False
    return "UNEXPECTED_EOF" not in str(cause)


class HboneConnection:
    """The multiplexed HTTP/2 layer of one HBONE connection; `run` drives it."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        client_side: bool,
        on_request: RequestCallback | None = None,
        close_timeout: float = CLOSE_TIMEOUT,
        guard: FloodGuard | None = None,
    ) -> None:
        self.transport = transport
        self.h2 = new_h2_connection(client_side=client_side)
        self.streams: dict[int, TunnelStream] = {}
        self.close_reason: CloseReason | None = None
        # the peer's SETTINGS came: it took the connection (TLS and HTTP/2 both accepted)
        self.peer_settings_seen = False
        self._on_request = on_request
        self._close_timeout = close_timeout
        self._error: BaseException | None = None
        self._guard = guard  # server side: the peer's bounds (common/h2guard.py)
        self.abuse: Abuse | None = None  # why the connection was ended for abuse
        # Writer bookkeeping: every `_kick` bumps `_queued` (by the payload bytes queued, or 1);
        # `_written` is the last value whose frames have all been handed to the transport, so
        # `_queued - _written` is roughly what waits to be written.
        self._queued = 0
        self._written = 0
        self._outgoing: list[bytes] = []
        self._writer_alive = True
        self._writer_parked = False  # the writer waits for frames (nothing of ours in flight)
        # Frames of a stream's send_all go straight to the socket when the writer is idle
        # (`_push`): only over our TLS stream on a socket (tests use other transports).
        self._direct = transport if isinstance(transport, TlsStream) else None
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._flushed_lot = trio.lowlevel.ParkingLot()
        self._window_lot = trio.lowlevel.ParkingLot()
        self._run_scope: trio.CancelScope | None = None
        self._finished = trio.Event()

    # --- state -------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.close_reason is None

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    @property
    def max_outbound_streams(self) -> int:
        """How many concurrent streams the peer allows us (its SETTINGS)."""
        return self.h2.remote_settings.max_concurrent_streams

    def _broken_error(self) -> trio.BrokenResourceError:
        reason = self.close_reason.value if self.close_reason else "connection closed"
        detail = f": {self._error}" if self._error else ""
        return trio.BrokenResourceError(f"HBONE connection {reason}{detail}")

    # --- writing -----------------------------------------------------------------------

    def _kick(self, weight: int = 1) -> None:
        """Note that h2 holds frames to send (``weight``: their payload bytes) and wake the
        writer."""
        self._queued += weight
        self._writer_lot.unpark_all()

    def _push(self, weight: int) -> None:
        """Send what h2 holds (``weight``: its payload bytes) now, in this task, if the writer
        is idle; else leave it to the writer (`_kick`).

        Why: a small message (a request, a response) would otherwise wake the writer task
        for one send, a scheduler round with its checkpoints on top of the sender's own; on
        the tunnel's per-request path that was a fifth of the proxy's busy time. Frames go
        out in order either way: this runs only while the writer is parked with nothing of
        its own queued, and it takes every frame h2 holds. What the socket does not take
        (a full send buffer) the writer sends after it, waiting for the socket as usual.
        A stream's own frames (its request or response HEADERS, END_STREAM, RST_STREAM) go
        the same way: a new connection through the tunnel then wakes the writer for none.
        """
        tls = self._direct
        if (
            tls is None
            or not self._writer_parked
            or self._outgoing
            or self.close_reason is not None
            or not tls.can_send_now
        ):
            self._kick(weight)
            return
        self._queued += weight
        data = self.h2.data_to_send()
        try:
            complete = not data or tls.send_now(data)
        except trio.BrokenResourceError:
            complete = False  # the writer meets the broken stream and ends the connection
        if complete:
            self._written = self._queued
            if self._flushed_lot:
                self._flushed_lot.unpark_all()
        else:
            self._writer_lot.unpark_all()  # sends the rest (TlsStream.send_all(b""))

    def _collect(self) -> None:
        """Hand h2's pending output (if any) to the writer, waking it only when there is some.

        For calls that usually queue nothing (reading, acknowledging received data), this is
        cheaper than waking the writer every time.
        """
        data = self.h2.data_to_send()
        if data:
            self._outgoing.append(data)
            self._kick()

    async def _flush(self) -> None:
        """Wait until everything queued so far is written; raise if it never will be."""
        target = self._queued
        while self._written < target:
            if not self._writer_alive or self.close_reason is not None:
                raise self._broken_error()
            await self._flushed_lot.park()

    async def _write_loop(self) -> None:
        try:
            while True:
                target = self._queued
                data = self.h2.data_to_send()
                if self._outgoing:  # collected earlier, so it goes first
                    chunks, self._outgoing = self._outgoing, []
                    if data:
                        chunks.append(data)
                    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                if not data and (self._direct is None or not self._direct.unsent):
                    self._written = target
                    self._flushed_lot.unpark_all()
                    self._writer_parked = True
                    try:
                        await self._writer_lot.park()
                    finally:
                        self._writer_parked = False
                    continue
                # (empty data: what `_push` left in the TLS stream goes out)
                await self.transport.send_all(data)
                self._written = target
                self._flushed_lot.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._close(CloseReason.TRANSPORT_ERROR, exc)
            if self._run_scope is not None:
                self._run_scope.cancel()
        finally:
            self._writer_alive = False
            self._flushed_lot.unpark_all()

    async def _wait_backlog(self, limit: int) -> bool:
        """Wait until at most ``limit`` queued bytes remain unwritten; whether it waited."""
        waited = False
        while self._queued - self._written > limit:
            if not self._writer_alive or self.close_reason is not None:
                raise self._broken_error()
            waited = True
            await self._flushed_lot.park()
        return waited

    async def _drain(self) -> None:
        """Let the writer push out whatever is queued (used while closing)."""
        target = self._queued
        while self._writer_alive and self._written < target:
            await self._flushed_lot.park()

    # --- reading -----------------------------------------------------------------------

    async def _read_loop(self) -> CloseReason:
        while True:
            try:
                data = await self.transport.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if _is_protocol_error(exc):
                    return self._close(CloseReason.PROTOCOL_ERROR, exc.__cause__ or exc)
                return self._close(CloseReason.TRANSPORT_ERROR, exc.__cause__ or exc)
            if not data:
                return self._close(CloseReason.EOF)
            if self._guard is not None:
                abuse = self._guard.feed(data)
                if abuse is not None:
                    return self.end_for_abuse(abuse)
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self._kick()  # h2 queued a GOAWAY naming the error
                return self._close(CloseReason.PROTOCOL_ERROR, exc)
            except Exception as exc:  # h2 must not take the process down on odd input
                log.exception("h2 failed on received data")
                return self._close(CloseReason.PROTOCOL_ERROR, exc)
            reason = self._dispatch(events)
            self._collect()
            if reason is not None:
                return reason

    def _dispatch(self, events: list[h2.events.Event]) -> CloseReason | None:
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                padding = event.flow_controlled_length - len(event.data)
                if stream is None or not stream._accepts_data:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                else:
                    if padding:
                        self.h2.acknowledge_received_data(padding, event.stream_id)
                    stream._feed(event.data)
            elif isinstance(event, h2.events.WindowUpdated):
                self._window_lot.unpark_all()
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.peer_settings_seen = True
                self._window_lot.unpark_all()
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._on_eof()
            elif isinstance(event, h2.events.StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None and self._guard is not None and stream.opened_at:
                    abuse = self._guard.stream_reset(self._guard.clock() - stream.opened_at)
                    if abuse is not None:
                        return self.end_for_abuse(abuse)
                if stream is not None:
                    code = getattr(event.error_code, "name", event.error_code)
                    # REFUSED_STREAM: not processed at all, safe to retry elsewhere (RFC 9113
                    # 8.7); a draining peer answers new streams so.
                    stream.refused = event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                    stream._on_reset(f"stream reset by peer ({code})")
            elif isinstance(event, h2.events.ResponseReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._on_response(response_status(event.headers))
            elif isinstance(event, h2.events.RequestReceived):
                self._on_request_received(event)
                if self.close_reason is not None:  # the callback ended the connection
                    return self.close_reason
            elif isinstance(event, h2.events.ConnectionTerminated):
                return self._close(
                    CloseReason.GOAWAY,
                    TunnelFailed(f"GOAWAY {getattr(event.error_code, 'name', event.error_code)}"),
                )
            # Settings acks, pings (h2 answers them), priorities, trailers: nothing to do.
        return None

    def _on_request_received(self, event: h2.events.RequestReceived) -> None:
        stream = TunnelStream(self, event.stream_id)
        self.streams[event.stream_id] = stream
        if self._guard is not None:
            stream.opened_at = self._guard.clock()
        if self._on_request is None:
            stream._abort(h2.errors.ErrorCodes.REFUSED_STREAM)
        else:
            self._on_request(stream, event.headers)

    # --- lifecycle ---------------------------------------------------------------------

    def end_for_abuse(self, abuse: Abuse) -> CloseReason:
        """End the connection because the peer overdid something: GOAWAY ENHANCE_YOUR_CALM
        with the reason as debug data, every stream broken; `run` then sends what is queued
        (the GOAWAY) and closes the transport. Nothing more the peer sent is processed."""
        if self.close_reason is None:
            self.abuse = abuse
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection(
                    error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                    additional_data=abuse.reason.encode("ascii", "replace")[:200],
                )
            self._kick()
        return self._close(CloseReason.ABUSE, TunnelFailed(f"peer abuse: {abuse}"))

    def _close(self, reason: CloseReason, error: BaseException | None = None) -> CloseReason:
        """Record why the connection ends (first reason wins) and fail every stream."""
        if self.close_reason is None:
            self.close_reason = reason
            self._error = error
            broken = self._broken_error()
            for stream in list(self.streams.values()):
                stream._on_connection_lost(broken)
            self._window_lot.unpark_all()
            self._flushed_lot.unpark_all()
        return self.close_reason

    async def run(self) -> CloseReason:
        """Serve the connection until it ends; return why. Closes the transport on exit."""
        try:
            async with trio.open_nursery() as nursery:
                self._run_scope = nursery.cancel_scope
                nursery.start_soon(self._write_loop)
                await self._read_loop()
                with trio.move_on_after(self._close_timeout):
                    await self._drain()
                nursery.cancel_scope.cancel()
        finally:
            self._close(CloseReason.LOCAL)
            with trio.CancelScope(shield=True), trio.move_on_after(self._close_timeout) as cs:
                await self.transport.aclose()
            if cs.cancelled_caught:
                await trio.aclose_forcefully(self.transport)
            self._finished.set()
        assert self.close_reason is not None
        return self.close_reason

    async def aclose(self) -> None:
        """Close gracefully: GOAWAY, then the transport; streams still open are broken."""
        if self.close_reason is None:
            try:
                self.h2.close_connection()
                self._kick()
            except h2.exceptions.ProtocolError:
                pass
            self._close(CloseReason.LOCAL)
            with trio.move_on_after(self._close_timeout):
                await self._drain()
        if self._run_scope is not None:
            self._run_scope.cancel()
            await self._finished.wait()
        else:
            await trio.aclose_forcefully(self.transport)

    # --- client side -------------------------------------------------------------------

    def start_request(self, headers: list[tuple[bytes, bytes]]) -> TunnelStream:
        """Send a request's HEADERS on a new stream (no END_STREAM) and return the stream.

        Raises `ConnectionUnavailable` if this connection cannot take another stream but
        another one may (full, out of stream IDs, closing gracefully), and `TunnelFailed`
        if it failed (e.g. the server refused our certificate just after the handshake).
        """
        if self.close_reason in (CloseReason.LOCAL, CloseReason.GOAWAY):
            raise ConnectionUnavailable("connection is closing")
        if self.close_reason is not None:
            raise TunnelFailed(str(self._broken_error()))
        try:
            stream_id = self.h2.get_next_available_stream_id()
            stream = TunnelStream(self, stream_id)
            self.h2.send_headers(stream_id, headers)
        except (h2.exceptions.NoAvailableStreamIDError, h2.exceptions.TooManyStreamsError) as e:
            raise ConnectionUnavailable(str(e)) from e
        self.streams[stream_id] = stream
        self._push(1)
        return stream


class TunnelStream(trio.abc.HalfCloseableStream):
    """One tunnel: a bidirectional byte stream over an HTTP/2 stream.

    Closing follows TCP's model. ``send_eof`` sends END_STREAM (half-close); receiving
    END_STREAM makes `receive_some` return ``b""``. `aclose` is graceful: it ends our side
    and tells the peer to stop sending (RST_STREAM NO_ERROR) while everything we sent stays
    readable there, like a TCP FIN. An aborted close (`trio.aclose_forcefully`, or `aclose`
    in a cancelled scope) resets the stream (CANCEL) and the peer sees
    `trio.BrokenResourceError` both ways, like a TCP RST; so does a peer's reset here.
    """

    def __init__(self, conn: HboneConnection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.refused = False  # the peer reset it with REFUSED_STREAM (client side)
        self.opened_at = 0.0  # when the peer opened it (server side, with a guard)
        self.status: int | None = None  # the response status (client side)
        # A list, not a deque: it rarely holds more than a few frames, and an empty deque
        # costs about 600 bytes on every idle tunnel.
        self._inbox: list[bytes] = []
        self._inbox_bytes = 0
        self._head_offset = 0  # bytes of _inbox[0] already returned
        self._eof_received = False
        self._eof_sent = False
        self._recv_error: trio.BrokenResourceError | None = None
        self._send_error: trio.BrokenResourceError | None = None
        self._closed = False  # aclose() called
        self._done = False  # both directions finished: no longer counts on the connection
        self._on_done: Callable[[], None] | None = None
        self._receiving = False
        self._sending = False
        self._lot = trio.lowlevel.ParkingLot()  # receivers and response waiters
        # Called (with no argument) whenever `receive_some` would stop waiting: data, EOF,
        # reset, connection lost. The relay's idle wait uses it in place of a reader task.
        self.on_readable: Callable[[], None] | None = None
        # Takes received bytes directly while this stream's reader waits for them, and says
        # how many it took (the relay: written to its socket at once, `_feed`).
        self.sink: Callable[[bytes], int] | None = None

    @property
    def finished(self) -> bool:
        """Both directions are over (ended, reset by either side, or the connection lost)."""
        return self._done

    @property
    def buffered_bytes(self) -> int:
        """Received bytes not yet read; never more than the stream's window."""
        return self._inbox_bytes - self._head_offset

    @property
    def _accepts_data(self) -> bool:
        return self._recv_error is None and not self._closed

    def set_on_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when the stream stops counting against its connection."""
        if self._done:
            callback()
        else:
            self._on_done = callback

    # --- events from the connection ----------------------------------------------------

    def _wake_readers(self) -> None:
        self._lot.unpark_all()
        if self.on_readable is not None:
            self.on_readable()

    def _feed(self, data: bytes) -> None:
        if data and self.sink is not None and self._receiving and self._lot:
            # The reader is parked for data (not cancelled: a cancel takes it out of the lot
            # at once) and holds none: what the sink takes now is what the reader would have
            # been woken for, without the wake. Its window goes back as a read's would.
            taken = self.sink(data)
            if taken:
                self._conn.h2.acknowledge_received_data(taken, self.stream_id)
                if taken == len(data):
                    return
                data = data[taken:]
        if data:
            self._inbox.append(data)
            self._inbox_bytes += len(data)
            self._wake_readers()

    def _on_eof(self) -> None:
        self._eof_received = True
        self._wake_readers()
        self._maybe_done()

    def _on_response(self, status: int) -> None:
        self.status = status
        self._lot.unpark_all()

    def _on_reset(self, message: str) -> None:
        self._break(trio.BrokenResourceError(message))

    def _on_connection_lost(self, error: trio.BrokenResourceError) -> None:
        self._break(error)

    def _break(self, error: trio.BrokenResourceError) -> None:
        """The stream was reset or its connection lost: whatever had not finished fails.

        Data the peer finished sending (END_STREAM came first) stays readable, as after a
        TCP FIN followed by a RST.
        """
        if self._send_error is None and not self._eof_sent:
            self._send_error = error
        if self._recv_error is None and not self._eof_received:
            self._recv_error = error
            self._discard_inbox()
        self._wake_all()
        self._mark_done()

    def _wake_all(self) -> None:
        self._wake_readers()
        self._conn._window_lot.unpark_all()

    def _discard_inbox(self) -> None:
        """Drop unread data but return its window, so the connection window does not leak."""
        unread = self.buffered_bytes
        self._inbox.clear()
        self._inbox_bytes = self._head_offset = 0
        if unread and self._conn.is_open:
            self._conn.h2.acknowledge_received_data(unread, self.stream_id)
            self._conn._collect()

    def _maybe_done(self) -> None:
        receive_over = self._eof_received or self._recv_error is not None
        send_over = self._eof_sent or self._send_error is not None
        if receive_over and send_over:
            self._mark_done()

    def _mark_done(self) -> None:
        if not self._done:
            self._done = True
            self._conn.streams.pop(self.stream_id, None)
            callback, self._on_done = self._on_done, None
            if callback is not None:
                callback()

    def _reset(self, code: h2.errors.ErrorCodes) -> None:
        if not self._done and self._conn.is_open:
            try:
                self._conn.h2.reset_stream(self.stream_id, code)
                self._conn._push(1)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass

    def _abort(self, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.CANCEL) -> None:
        """Reset the stream now unless it already finished cleanly (no checkpoint)."""
        self._reset(code)
        error = trio.BrokenResourceError("tunnel stream was reset locally")
        self._send_error = self._send_error or error
        self._recv_error = self._recv_error or error
        self._discard_inbox()
        self._wake_all()
        self._mark_done()

    def _check_receive(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("tunnel stream was closed")
        if self._recv_error is not None:
            raise trio.BrokenResourceError(str(self._recv_error)) from self._recv_error

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("tunnel stream was closed")
        if self._send_error is not None:
            raise trio.BrokenResourceError(str(self._send_error)) from self._send_error
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was already called")

    # --- request/response --------------------------------------------------------------

    async def wait_response(self) -> int:
        """Wait for the response status (client side); raise `TunnelFailed` if none comes."""
        while self.status is None:
            error = self._recv_error or self._send_error
            if error is not None:
                raise TunnelFailed(f"no response to CONNECT: {error}") from error
            await self._lot.park()
        return self.status

    async def respond(self, status: int) -> None:
        """Answer the request (server side). A non-200 answer also ends the stream.

        After a refusal the stream is reset with NO_ERROR as RFC 9113 section 8.1 allows, so
        the client need not send the rest of its request.
        """
        self._check_send()
        h2conn = self._conn.h2
        try:
            if status == 200:
                h2conn.send_headers(self.stream_id, [(b":status", b"200")])
            else:
                h2conn.send_headers(
                    self.stream_id, [(b":status", str(status).encode())], end_stream=True
                )
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            raise trio.BrokenResourceError(f"cannot answer stream: {exc}") from exc
        self._conn._push(1)
        if status != 200:
            self._abort(h2.errors.ErrorCodes.NO_ERROR)
        await self._conn._flush()

    # --- trio stream API ---------------------------------------------------------------

    def readable_now(self) -> bool:
        """Whether `receive_some` would return (or raise) without waiting."""
        return (
            bool(self._inbox) or self._eof_received or self._recv_error is not None or self._closed
        )

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is reading this tunnel stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            parked = False
            while not self._inbox and not self._eof_received:
                self._check_receive()
                parked = True
                await self._lot.park()
            self._check_receive()
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
            if not self._inbox:
                return b""
            data = self._take(max_bytes)
            if self._conn.is_open:
                self._conn.h2.acknowledge_received_data(len(data), self.stream_id)
                self._conn._collect()
            return data
        finally:
            self._receiving = False

    def _take(self, max_bytes: int | None) -> bytes:
        head = self._inbox[0]
        offset = self._head_offset
        available = len(head) - offset
        # Without a size, a whole frame goes out as is (no copy); small ones are joined.
        if (
            max_bytes is None
            and offset == 0
            and (available >= DEFAULT_READ_SIZE or len(self._inbox) == 1)
        ):
            self._inbox.pop(0)
            self._inbox_bytes -= available
            return head
        limit = max_bytes if max_bytes is not None else DEFAULT_READ_SIZE
        if available > limit:
            self._head_offset += limit
            return bytes(memoryview(head)[offset : offset + limit])
        pieces: list[bytes | memoryview] = [memoryview(head)[offset:] if offset else head]
        taken = available
        self._inbox.pop(0)
        self._inbox_bytes -= len(head)
        self._head_offset = 0
        while self._inbox and taken + len(self._inbox[0]) <= limit:
            chunk = self._inbox.pop(0)
            self._inbox_bytes -= len(chunk)
            pieces.append(chunk)
            taken += len(chunk)
        if len(pieces) == 1 and not offset:
            return head
        return b"".join(pieces)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is writing this tunnel stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_send()
            if type(data) is not bytes:
                # Queued frames keep referring to the payload until the writer sends them,
                # after this returns: a caller's mutable buffer is copied first.
                data = bytes(data)
            view = memoryview(data)
            total = len(view)
            offset = queued = 0
            h2conn = self._conn.h2
            while offset < total:
                self._check_send()
                try:
                    window = h2conn.local_flow_control_window(self.stream_id)
                except h2.exceptions.StreamClosedError as exc:
                    raise trio.BrokenResourceError("tunnel stream is closed") from exc
                if window <= 0:
                    if queued:  # what fitted goes out while we wait for window
                        self._conn._push(queued)
                        queued = 0
                    await self._conn._window_lot.park()
                    continue
                size = min(window, h2conn.max_outbound_frame_size, total - offset)
                chunk = data if size == total else view[offset : offset + size]
                h2conn.send_data(self.stream_id, chunk)
                offset += size
                queued += size
            if queued:
                self._conn._push(queued)
            # Return once the backlog fits the send buffer (the writer sends the rest).
            if not total or not await self._conn._wait_backlog(SEND_BUFFER):
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is writing this tunnel stream")
        self._sending = True
        try:
            while True:
                self._check_send()
                try:
                    if self._conn.h2.local_flow_control_window(self.stream_id) > 0:
                        break
                except h2.exceptions.StreamClosedError as exc:
                    raise trio.BrokenResourceError("tunnel stream is closed") from exc
                await self._conn._window_lot.park()
            await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is writing this tunnel stream")
        if self._eof_sent and not self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._check_send()
        try:
            self._conn.h2.end_stream(self.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            raise trio.BrokenResourceError(f"cannot end stream: {exc}") from exc
        self._eof_sent = True
        self._conn._push(1)
        self._maybe_done()
        await self._conn._flush()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except trio.Cancelled:
            self._abort()  # aclose_forcefully: reset
            raise
        if not self._done:
            if not self._eof_sent and self._send_error is None:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._conn.h2.end_stream(self.stream_id)
                    self._eof_sent = True
                    self._conn._kick()
            if not self._eof_received and self._recv_error is None:
                self._reset(h2.errors.ErrorCodes.NO_ERROR)  # stop sending; we won't read it
        self._discard_inbox()
        self._wake_all()
        self._mark_done()
        await trio.lowlevel.cancel_shielded_checkpoint()
