"""The HTTP/2 engine: one downstream h2c connection in, each stream routed and balanced alone.

What flows through, per stream (a request; a gRPC call): HEADERS -> request head
(`h2wire.parse_request`) -> path normalization -> the shared decisions (`decide.py`: request
filter = authorization, route match, faults, weighted cluster) -> endpoint (lb, per request)
-> a stream on an upstream HTTP/2 connection to that endpoint (h2c to a pod, or over an HBONE
tunnel, whatever `HttpContext.connect` gives) -> request DATA and trailers relayed one way,
response HEADERS, DATA and trailers the other -> a RequestRecord to `on_request_done`.

Flow control is end to end: DATA received on one side is acknowledged (WINDOW_UPDATE) only
once it was sent on the other, so a slow reader slows its writer and the proxy holds at most
a connection window per connection. Upstream connections belong to the downstream connection
that opened them (one per endpoint while it has room for another stream): per-request balancing
spreads one client connection's streams over all endpoints. One that carried the cluster's
`maxRequestsPerConnection` streams takes no more and is closed once they are done.

Failures before a response: connect 503 UF, reset 503 UC (a REFUSED_STREAM reset too, which
`retryOn: refused-stream` retries), no healthy endpoint 503 UH, no response head within the
route's `perTryTimeout` 504 UT; the retry policy (Envoy's semantics, `retry.py`, plus gRPC codes
in trailers-only responses) tries another endpoint first, replaying the body kept up to the
retry buffer. The route timeout, shortened by
a call's `grpc-timeout`, runs from the request's head to the response's end: 504 UT (gRPC:
DEADLINE_EXCEEDED) before the response head, a reset stream after it. After the response
began, any failure resets the downstream stream. Replies the proxy makes itself to gRPC calls
are trailers-only with a gRPC code (`h2wire.local_reply`). Limits on the downstream side
(`h2wire.H2Limits`) and the frame guard shared with the HBONE server (`common/h2guard.py`):
h2 refuses a stream over the concurrency limit (GOAWAY PROTOCOL_ERROR); the guard reads the
frame headers of what the client sends before h2 buffers it, and a header block over the
header list limit, in more than 16 CONTINUATION frames or not complete within the request
header timeout (`http_request_headers_timeout_s`: a slowloris head; the stream cannot be reset
alone mid-block), a rapid-reset, PING or SETTINGS flood end the connection with GOAWAY
ENHANCE_YOUR_CALM, the reason in its debug data (counted
in `meshagent_http2_abuse_total{listener}`, the context's: "pod" on 15001, "hbone" inside a
15008 tunnel; logged at a bounded rate). A drain (SIGTERM,
a worker replaced) is RFC 9113's graceful shutdown: a first GOAWAY (NO_ERROR, last stream id
2^31-1) tells the client to open new streams elsewhere while every stream it sent meanwhile is
still served; `DRAIN_GRACE` later new streams are refused, those in flight finish, then the
final GOAWAY names the last stream served and the connection closes. (Refusing at once, as it
once did, failed a busy gRPC channel's calls: grpcio reports a REFUSED_STREAM as UNAVAILABLE.)
A source
with `Limits.max_pending_requests` streams in flight in this process gets 503 UO for another.

The h2 state machines (sans-IO) live in `H2Peer` with the reader that feeds them; all the
protocol rules are in `h2wire`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import h2.connection
import h2.events
import h2.exceptions
import hyperframe.frame
import trio
from meshagent.agent import sockio
from meshagent.agent.proxy.http import h2wire, localhop
from meshagent.agent.proxy.http.decide import RouteDecision, decide
from meshagent.agent.proxy.http.grpcframes import MessageCounter
from meshagent.agent.proxy.http.mirror import MIRROR_TIMEOUT
from meshagent.agent.proxy.http.pool import RECEIVE_SIZE  # below the workers' mmap threshold
from meshagent.agent.proxy.http.retry import (
    Outcome,
    backoff,
    retriable,
    retriable_grpc,
    retriable_status,
)
from meshagent.agent.proxy.http.types import (
    Connect,
    HttpContext,
    LocalResponse,
    RequestInfo,
    RequestRecord,
    UpstreamError,
)
from meshagent.agent.proxy.lb import (
    CONNECT_FAILURE_CODE,
    RESET_CODE,
    TIMEOUT_CODE,
    ClusterState,
    EndpointState,
    Overflow,
    RetrySlot,
)
from meshagent.agent.proxy.limits import SOURCE_PENDING_REQUESTS
from meshagent.agent.proxy.route_actions import shadow_authority
from meshagent.agent.proxy.routing import RetryPolicy
from meshagent.agent.telemetry.ratelog import RateLimitedLog
from meshagent.common.h2guard import ABUSE, Abuse, FloodGuard
from meshagent.common.pathnorm import InvalidPath, PathNormalization, normalize_target

log = logging.getLogger(__name__)

# How often an upstream connection busy with streams is looked at again for its idle timeout:
# a short timeout must not wake the proxy every millisecond through a long stream.
_BUSY_RECHECK = 1.0
abuse_log = RateLimitedLog(log)  # a flood of abusive connections must not flood the log

CLOSE_TIMEOUT = 1.0  # to send a reset or GOAWAY when a stream or connection is torn down
_DRAIN_POLL = 0.05  # how often a draining connection looks whether its streams are done
# A drain's first GOAWAY (last stream id 2^31-1) goes with a PING: once the client answers it,
# it has read the GOAWAY (frames are read in order) and opens no stream here any more. A client
# that never answers gets this long (gRPC's servers wait up to 20 s for the same PING).
DRAIN_GRACE = 10.0
_DRAIN_PING = b"meshdrn\x00"  # the PING's opaque data (8 bytes)
_MAX_STREAM_ID = 2**31 - 1
_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# A send is finished under a shield (`H2Peer._send`) but ends the connection when it takes
# longer than this: the shield must not keep a task (and a drain) waiting on a reader that
# stopped reading.
SEND_STALL_TIMEOUT = 30.0
H2_ERRORS = (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError)
_RESET_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: "
# Envoy's local replies for attempts that got no response: status, flag, body.
_FAILURES: dict[Outcome, tuple[int, str, bytes]] = {
    Outcome.CONNECT_FAILURE: (503, "UF", _RESET_BODY + b"connection failure"),
    Outcome.RESET: (503, "UC", _RESET_BODY + b"connection termination"),
    Outcome.PROTOCOL: (503, "UPE", _RESET_BODY + b"protocol error"),
    Outcome.OVERFLOW: (503, "UO", _RESET_BODY + b"overflow"),
    Outcome.TIMEOUT: (504, "UT", b"upstream request timeout"),
    Outcome.REFUSED: (503, "UC", _RESET_BODY + b"remote refused stream reset"),
}


def _same(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return headers


def _in_pods_place(hop: localhop.Hop | None, outcome: Outcome | None) -> LocalResponse | None:
    """What the destination's engine answered in a same-node pod's place when the pod reset
    the stream (or refused it) before a response: its 503 UC (a gRPC call's UNAVAILABLE), as
    through a tunnel; for the source an endpoint's answer, which its retry policy may retry."""
    if hop is None or outcome not in (Outcome.RESET, Outcome.REFUSED):
        return None
    code, flag, text = _FAILURES[Outcome.RESET]
    return LocalResponse(code, text, flags=(flag,))


class StreamGone(Exception):
    """The stream (or its whole connection) on one side cannot carry more."""


class _Retry(Exception):
    """The response is one the retry policy retries: dropped, another attempt follows."""


@dataclass(slots=True)
class _Body:
    """A request body as far as it came, kept for replays while it fits the retry buffer."""

    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    complete: bool = False
    overflow: bool = False  # grew past the retry buffer: no replay, no retry
    trailers: list[tuple[bytes, bytes]] | None = None

    def keep(self, data: bytes, limit: int) -> None:
        if self.overflow:
            return
        self.size += len(data)
        if self.size > limit:
            self.overflow = True
            self.chunks.clear()
        else:
            self.chunks.append(data)


class H2Events:
    """A stream's events in arrival order, from the connection's reader to one task: what
    the unbounded trio memory channel it replaces gave (`send_nowait`, `receive_nowait`,
    `receive`, the same checkpoints) without making a channel state and its two ends for
    every stream, nor the bookkeeping per event for several senders and receivers that one
    stream never has."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque[h2.events.Event | None] = collections.deque()
        self.waiter: trio.lowlevel.Task | None = None  # the task parked in `receive`

    def send_nowait(self, event: h2.events.Event | None) -> None:
        self.items.append(event)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            trio.lowlevel.reschedule(waiter)

    def receive_nowait(self) -> h2.events.Event | None:
        if not self.items:
            raise trio.WouldBlock
        return self.items.popleft()

    async def receive(self) -> h2.events.Event | None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.items:
            event = self.items.popleft()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return event
        if self.waiter is not None:
            raise trio.BusyResourceError("another task waits for this stream's events")
        self.waiter = trio.lowlevel.current_task()

        def abort(_raise_cancel) -> trio.lowlevel.Abort:
            self.waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        return self.items.popleft()  # send_nowait queued it before waking this task


class H2Inbox:
    """Events for one stream, in order, from the connection's reader to the stream's task."""

    __slots__ = ("ended", "held", "receive", "reset", "send")

    def __init__(self) -> None:
        self.send = self.receive = H2Events()  # two names, as a channel's two ends had
        self.reset: int | None = None  # the error code when the peer reset the stream
        self.ended = False  # the connection's end (None) was taken by `ready`
        # an event taken by `ready` and put back (`hold`): the next one `ready`/`next` give
        self.held: h2.events.Event | None = None

    def hold(self, event: h2.events.Event) -> None:
        """Put back the event `ready` gave: it comes first again."""
        self.held = event

    def ready(self) -> h2.events.Event | None:
        """The next event if one is already here, else None (`next` returns None again
        when that was the connection's end)."""
        if self.held is not None:
            event, self.held = self.held, None
            return event
        if self.ended:
            return None
        try:
            event = self.receive.receive_nowait()
        except trio.WouldBlock:
            return None
        self.ended = event is None
        return event

    async def next(self, send: H2Peer, acks: H2Peer) -> h2.events.Event | None:
        """The next event. Before waiting for one, what this stream queued goes out: `send`'s
        frames (StreamGone if they cannot), then `acks`' (the WINDOW_UPDATEs for what was
        sent, best effort): a batch of frames per read rather than a send per frame."""
        if self.held is not None:
            event, self.held = self.held, None
            return event
        if self.ended:
            return None
        try:
            return self.receive.receive_nowait()
        except trio.WouldBlock:
            pass
        await send.flush()
        with contextlib.suppress(StreamGone):
            await acks.flush()
        return await self.receive.receive()


class H2Peer:
    """One HTTP/2 connection over a byte stream: the h2 state machine, one writer at a time,
    per-stream inboxes filled by `run` (the reader), and waits for send window."""

    def __init__(self, stream: trio.abc.Stream, conn: h2.connection.H2Connection) -> None:
        self.stream = stream
        self.conn = conn
        self.lock = trio.Lock()
        self.inboxes: dict[int, H2Inbox] = {}
        self.guard: FloodGuard | None = None  # downstream: the peer's bounds (h2guard)
        self.abuse: Abuse | None = None  # why the guard ended the connection
        self.header_timeout = math.inf  # downstream: for a header block to complete (s)
        self._window = trio.Event()
        self.closed = False
        self.cut = False  # a send was cut short: the peer may have a partial frame
        self.goaway = False
        self.info: object = None  # what Connect returned with an upstream stream
        self.requests = 0  # streams given out on it (upstream: maxRequestsPerConnection)
        self.active = 0  # of those, the ones not finished yet
        self.idle_since = trio.current_time()  # upstream: when `active` last fell to 0

    def reserve(self) -> H2Peer:
        """Count one more request given this (upstream) connection; the caller ends it with
        `release`."""
        self.requests += 1
        self.active += 1
        return self

    def release(self) -> None:
        """A request given by `reserve` is done."""
        self.active -= 1
        if not self.active:
            self.idle_since = trio.current_time()

    async def flush(self) -> None:
        """Send what the state machine queued; raises StreamGone when the transport is."""
        async with self.lock:
            await trio.lowlevel.checkpoint_if_cancelled()  # cancelled: leave it queued
            data = self.conn.data_to_send()
            if data:
                await self._send(data)

    async def _send(self, data: bytes) -> None:
        """Write what h2 handed over (it no longer holds it), with the lock held. Whoever
        flushes sends every stream's queued frames, so a send cut short by a cancellation of
        the flushing task (a request pump cancelled once its response ended) would lose other
        streams' frames (a call's response DATA or trailers: grpcio waited for them until its
        deadline, issue #17). So the send is finished under a shield, bounded by the deadline
        the caller set (a close's CLOSE_TIMEOUT) and SEND_STALL_TIMEOUT: a send cut there may
        have cut a frame, and the connection is over."""
        if self.cut:
            raise StreamGone
        if type(self.stream) is trio.SocketStream:
            # what the socket takes now needs no scope, no deadline and no scheduler round
            # (agent/sockio.py); only the rest is sent under the shield below
            try:
                sent = sockio.write_now(self.stream.socket, data)
            except _TRANSPORT_ERRORS as exc:
                self.closed = True
                raise StreamGone from exc
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        now = trio.current_time()
        deadline = min(trio.current_effective_deadline(), now + SEND_STALL_TIMEOUT)
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            try:
                await self.stream.send_all(data)
            except _TRANSPORT_ERRORS as exc:
                self.closed = True
                raise StreamGone from exc
        if scope.cancelled_caught:
            self.closed = self.cut = True  # nothing more may follow a cut frame
            raise StreamGone

    async def announce_shutdown(self, ping: bytes) -> None:
        """RFC 9113 6.8's first GOAWAY of a graceful shutdown (NO_ERROR, last stream id
        2^31-1) and a PING with `ping` behind it: the peer opens no new stream here, every
        stream already on its way is still served, and its PING ACK says it has seen the
        GOAWAY. Written as a raw frame behind what h2 queued: h2's own GOAWAY would close its
        state machine, and the streams in flight with it."""
        frame = hyperframe.frame.GoAwayFrame(0, last_stream_id=_MAX_STREAM_ID, error_code=0)
        await self._send_goaway(frame, ping)

    async def refuse_after(self, last_stream_id: int) -> None:
        """The final GOAWAY of a graceful shutdown (NO_ERROR, `last_stream_id`: the last
        stream served), while the streams up to it still finish: the peer knows that any
        stream it opened after it was not processed (and may retry it elsewhere). A raw frame
        too, so h2 goes on carrying the streams in flight."""
        frame = hyperframe.frame.GoAwayFrame(0, last_stream_id=last_stream_id, error_code=0)
        await self._send_goaway(frame)

    async def _send_goaway(self, frame: hyperframe.frame.GoAwayFrame, ping: bytes = b"") -> None:
        """`frame` (and a PING with `ping`) behind every frame h2 queued before it."""
        raw = frame.serialize()
        if ping:
            raw += hyperframe.frame.PingFrame(0, opaque_data=ping).serialize()
        async with self.lock:
            await trio.lowlevel.checkpoint_if_cancelled()
            await self._send(self.conn.data_to_send() + raw)

    def wake(self) -> None:
        self._window.set()
        self._window = trio.Event()

    def open_inbox(self, stream_id: int) -> H2Inbox:
        inbox = self.inboxes[stream_id] = H2Inbox()
        return inbox

    def close_inbox(self, stream_id: int) -> None:
        """Forget a stream; DATA it left unread is acknowledged for the connection window."""
        inbox = self.inboxes.pop(stream_id, None)
        if inbox is None:
            return
        while True:
            try:
                event = inbox.receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if isinstance(event, h2.events.DataReceived):
                self.ack(stream_id, event.flow_controlled_length)

    def ack(self, stream_id: int, size: int) -> None:
        if size:
            with contextlib.suppress(*H2_ERRORS):
                self.conn.acknowledge_received_data(size, stream_id)

    def reset(self, stream_id: int, code: int = h2wire.CANCEL) -> None:
        with contextlib.suppress(*H2_ERRORS):
            self.conn.reset_stream(stream_id, code)

    def queue_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], end: bool = False
    ) -> None:
        """HEADERS into h2's queue; the caller's next `flush` sends them."""
        try:
            self.conn.send_headers(stream_id, headers, end_stream=end)
        except H2_ERRORS as exc:
            raise StreamGone from exc

    async def send_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], end: bool = False
    ) -> None:
        self.queue_headers(stream_id, headers, end)
        await self.flush()

    async def send_data(
        self,
        stream_id: int,
        data: bytes,
        end: bool = False,
        *,
        flush: bool = True,
        acks: H2Peer | None = None,
    ) -> None:
        """Send `data` as the stream's and the connection's send windows allow, END_STREAM on
        its last frame when `end`. `flush=False` leaves what fits the windows queued for the
        caller's next `flush` (a batch of a stream's frames in one send: each flush is a
        scheduler round trip and a send syscall); it still flushes before waiting for window,
        which the peer opens only for what it received, and then flushes `acks` too (the
        other side's connection: WINDOW_UPDATEs queued for what this stream relayed, which
        the other peer may be waiting for before it reads what blocks us). A body is taken in
        as many frames as the windows and the frame size allow, and sent at once."""
        if not data and end:
            await self.end(stream_id, flush=flush)
            return
        pos = 0
        while pos < len(data):
            inbox = self.inboxes.get(stream_id)
            if self.closed or (inbox is not None and inbox.reset is not None):
                raise StreamGone
            try:
                window = self.conn.local_flow_control_window(stream_id)
            except H2_ERRORS as exc:
                raise StreamGone from exc
            if window <= 0:
                opened = self._window  # taken before the flushes yield: a wake meanwhile counts
                await self.flush()
                if acks is not None:
                    with contextlib.suppress(StreamGone):
                        await acks.flush()
                await opened.wait()
                continue
            size = min(window, len(data) - pos, self.conn.max_outbound_frame_size)
            last = pos + size >= len(data)
            try:
                self.conn.send_data(stream_id, data[pos : pos + size], end_stream=end and last)
            except H2_ERRORS as exc:
                raise StreamGone from exc
            pos += size
        if flush:
            await self.flush()

    async def end(self, stream_id: int, *, flush: bool = True) -> None:
        try:
            self.conn.end_stream(stream_id)
        except H2_ERRORS as exc:
            raise StreamGone from exc
        if flush:
            await self.flush()

    def dispatch(self, event: h2.events.Event) -> None:
        """Route a received event to its stream's inbox (the events both sides share)."""
        if isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.wake()
            return
        stream_id = getattr(event, "stream_id", None)
        if not stream_id:
            return
        inbox = self.inboxes.get(stream_id)
        if inbox is None:
            if isinstance(event, h2.events.DataReceived):
                self.ack(stream_id, event.flow_controlled_length)
            return
        if isinstance(event, h2.events.StreamReset):
            inbox.reset = event.error_code
            self.wake()
        inbox.send.send_nowait(event)

    async def run(self, on_event, initial: bytes = b"") -> None:
        """Read until the connection ends; `on_event(event)` sees every event first and
        returns True when it handled it. A protocol error is answered with GOAWAY."""
        data = initial
        drained = False  # the last read came back short: wait for the socket first (sockio)
        try:
            while True:
                if not data:
                    head_deadline = self._head_deadline()
                    waiting = None  # no header block begun: no scope (one per read) needed
                    try:
                        if head_deadline == math.inf:
                            data = await sockio.receive_some(self.stream, RECEIVE_SIZE, drained)
                        else:
                            with trio.move_on_at(head_deadline) as waiting:
                                data = await sockio.receive_some(self.stream, RECEIVE_SIZE, drained)
                    except _TRANSPORT_ERRORS:
                        return
                    drained = len(data) < RECEIVE_SIZE
                    if waiting is not None and waiting.cancelled_caught:
                        # a request head trickling (slowloris)
                        self.abuse = Abuse(
                            "header_timeout",
                            f"request header block not complete within {self.header_timeout:g} s",
                        )
                        await self.goaway_and_close(h2wire.ENHANCE_YOUR_CALM, self.abuse.reason)
                        return
                    if not data:
                        return
                if self.guard is not None:
                    abuse = self.guard.feed(data)
                    if abuse is not None:  # before h2 buffers or answers any of it
                        self.abuse = abuse
                        await self.goaway_and_close(h2wire.ENHANCE_YOUR_CALM, abuse.reason)
                        return
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    code = getattr(exc, "error_code", h2wire.PROTOCOL_ERROR)
                    await self.goaway_and_close(code)
                    return
                data = b""
                for event in events:
                    if isinstance(event, h2.events.ConnectionTerminated):
                        self.goaway = True
                        last = event.last_stream_id
                        for stream_id, inbox in list(self.inboxes.items()):
                            if last is not None and stream_id > last and inbox.reset is None:
                                inbox.reset = h2wire.REFUSED_STREAM
                                inbox.send.send_nowait(None)
                    if not on_event(event):
                        self.dispatch(event)
                    if self.closed:  # on_event ended the connection (GOAWAY queued)
                        with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(StreamGone):
                            await self.flush()
                        return
                try:
                    await self.flush()
                except StreamGone:
                    return
        finally:
            self.closed = True
            for inbox in self.inboxes.values():
                if inbox.reset is None:
                    inbox.reset = h2wire.INTERNAL_ERROR
                inbox.send.send_nowait(None)
            self.wake()

    def _head_deadline(self) -> float:
        """When the header block the peer has begun must be complete (inf: none begun)."""
        since = self.guard.header_block_since if self.guard is not None else None
        return math.inf if since is None else since + self.header_timeout

    async def goaway_and_close(self, code: int, reason: str = "") -> None:
        """GOAWAY, then the connection is over. Marked closed before the GOAWAY is flushed:
        meanwhile no new stream may be put on it (`H2Upstreams` skips a closed one; h2 has
        closed its state machine already, a stream opened now would fail as 503 UO)."""
        self.closed = True
        with contextlib.suppress(*H2_ERRORS):
            debug = reason.encode("ascii", "replace")[:200] or None
            self.conn.close_connection(error_code=code, additional_data=debug)
        with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(StreamGone):
            await self.flush()


async def proxy_http2(
    client: trio.abc.Stream,
    ctx: HttpContext,
    *,
    initial: bytes = b"",
    limits: h2wire.H2Limits = h2wire.DEFAULT_LIMITS,
) -> None:
    """Serve HTTP/2 (h2c, prior knowledge) on `client` until it closes; `initial`: bytes
    already read from it (the preface a detector looked at). Never raises for anything the
    client or an upstream does; the caller still owns (and closes) `client`."""
    session = _Session(client, ctx, limits)
    try:
        await session.run(initial)
    except Exception:  # a bug here must cost one connection, not the listener
        log.exception("HTTP/2 session from %s failed", ctx.peer or "?")


async def serve_detected(
    client: trio.abc.Stream, ctx: HttpContext, protocol: str, served: list | None = None
) -> str:
    """Serve `client` with the engine for `protocol` ("http1" or "http2"); on an HTTP/1.1 port
    a client that opens with the HTTP/2 preface gets the HTTP/2 engine (as Envoy's codec
    auto-detection; its requests go upstream as HTTP/2). Returns the protocol served, also
    put in `served[0]` before serving (for a Connect that must name it)."""
    if protocol == "http2":
        await proxy_http2(client, ctx)
        return protocol
    initial = b""
    begun = math.inf
    with trio.move_on_after(ctx.settings.client_idle_timeout) as wait:
        while h2wire.is_preface(initial) is None:
            try:
                data = await client.receive_some(RECEIVE_SIZE)
            except _TRANSPORT_ERRORS:
                return protocol
            if not data:
                break
            if not initial:  # begun: the rest of the head gets the header timeout
                begun = trio.current_time()
                wait.deadline = begun + ctx.settings.request_header_timeout
            initial += data
    if h2wire.is_preface(initial):
        if served is not None:
            served[0] = "http2"
        await proxy_http2(client, ctx, initial=initial)
        return "http2"
    if initial:
        from meshagent.agent.proxy.http.proxy import proxy_http1

        await proxy_http1(client, ctx, initial=initial, begun=begun)
    return "http1"


class H2Upstreams:
    """The HTTP/2 connections a downstream connection opened to endpoints (one per endpoint
    while it has room for another stream; their reader tasks run in `nursery`), reached
    through `connect`. The HTTP/2 engine's upstream side, also used by the HTTP/1.1 engine
    for clusters whose DestinationRule says `h2UpgradePolicy: UPGRADE`."""

    def __init__(self, connect: Connect | None, nursery: trio.Nursery) -> None:
        self.connect = connect
        self.nursery = nursery
        self.upstreams: dict[str, list[H2Peer]] = {}
        self.opening: dict[str, trio.Lock] = {}

    async def aclose(self) -> None:
        for peers in self.upstreams.values():
            for peer in peers:
                await trio.aclose_forcefully(peer.stream)

    async def retire_if_spent(self, peer: H2Peer, cluster: ClusterState) -> None:
        """Close an upstream connection that carried `maxRequestsPerConnection` streams once
        its last one is done (GOAWAY, then the transport), as the HTTP/1.1 pool does."""
        limit = cluster.spec.policy.max_requests_per_connection
        if limit is None or peer.requests < limit or peer.active or peer.closed:
            return
        with trio.CancelScope(shield=True):
            await peer.goaway_and_close(h2wire.NO_ERROR)
            await trio.aclose_forcefully(peer.stream)

    @staticmethod
    async def _close_when_idle(peer: H2Peer, timeout: float) -> None:
        """DestinationRule `http.idleTimeout`: close an upstream connection that carried no
        request for `timeout` s (GOAWAY, then the transport), as the HTTP/1.1 pool does."""
        while not (peer.closed or peer.goaway):
            if peer.active:
                await trio.sleep(max(timeout, _BUSY_RECHECK))  # busy: look again later
            elif trio.current_time() < peer.idle_since + timeout:
                await trio.sleep_until(peer.idle_since + timeout)
            else:
                peer.goaway = True  # no new stream on it from now on (_upstream skips it)
                with trio.CancelScope(shield=True):
                    await peer.goaway_and_close(h2wire.NO_ERROR)
                    await trio.aclose_forcefully(peer.stream)
                return

    async def acquire(self, cluster: ClusterState, ep: EndpointState) -> H2Peer:
        """An upstream connection to `ep` with room for one more stream (opened if none);
        one that carried `maxRequestsPerConnection` streams takes no more. Takes a request
        slot of the cluster (Overflow at `http2MaxRequests`): give it back with `done`."""
        cluster.take_request_slot()
        try:
            return await self._upstream_for(cluster, ep)
        except BaseException:
            cluster.free_request_slot()
            raise

    @staticmethod
    def done(peer: H2Peer, cluster: ClusterState) -> None:
        """A stream `_upstream` gave out is over: its slot and its reservation go back."""
        cluster.free_request_slot()
        peer.release()

    def _with_room(self, key: str, spent_at: int | None) -> H2Peer | None:
        """An open connection to `key` that takes one more stream, if there is one."""
        for peer in self.upstreams.get(key, ()):
            if peer.closed or peer.goaway:
                continue
            if spent_at is not None and peer.requests >= spent_at:
                continue
            if peer.conn.open_outbound_streams < peer.conn.remote_settings.max_concurrent_streams:
                return peer
        return None

    async def _upstream_for(self, cluster: ClusterState, ep: EndpointState) -> H2Peer:
        key = ep.address
        spent_at = cluster.spec.policy.max_requests_per_connection
        peer = self._with_room(key, spent_at)
        if peer is not None:  # the usual case: no lock (a scheduler round trip) to take
            return peer.reserve()
        lock = self.opening.get(key)
        if lock is None:
            lock = self.opening[key] = trio.Lock()
        async with lock:  # one connect at a time per endpoint
            peer = self._with_room(key, spent_at)  # opened while this task waited
            if peer is not None:
                return peer.reserve()
            connect = self.connect
            if connect is None:
                raise UpstreamError("connect-failure", "no connector")
            try:
                with trio.fail_after(cluster.spec.policy.connect_timeout):
                    opened = await connect(ep.endpoint, ep.port, cluster.spec)
            except UpstreamError:
                raise
            except trio.TooSlowError:
                raise UpstreamError("connect-failure", "connect timeout") from None
            except Exception as exc:
                message = str(exc) or type(exc).__name__
                transport = getattr(exc, "transport", "")
                raise UpstreamError("connect-failure", message, transport) from exc
            stream = getattr(opened, "stream", opened)
            peer = H2Peer(stream, h2wire.new_connection(client_side=True))
            peer.info = None if stream is opened else opened
            try:
                await peer.flush()
            except StreamGone:
                await trio.aclose_forcefully(stream)
                raise UpstreamError("connect-failure", "closed at once") from None
            self.upstreams.setdefault(key, []).append(peer)
            idle_timeout = cluster.spec.policy.http_idle_timeout
            self.nursery.start_soon(self._run_upstream, key, peer, idle_timeout)
            return peer.reserve()

    @staticmethod
    async def _close_when_done(peer: H2Peer) -> None:
        """The server said GOAWAY (a draining proxy, a server shutting down): no new stream
        goes on the connection, and once the streams it still carries are done this side
        closes it, as gRPC's clients do, so the server's drain ends then, not at its timeout."""
        while peer.active:
            await trio.sleep(_DRAIN_POLL)
        await trio.aclose_forcefully(peer.stream)

    async def _run_upstream(self, key: str, peer: H2Peer, idle_timeout: float | None) -> None:
        try:
            async with trio.open_nursery() as nursery:
                if idle_timeout is not None and idle_timeout < math.inf:
                    nursery.start_soon(self._close_when_idle, peer, idle_timeout)
                closing = False

                def on_event(event: h2.events.Event) -> bool:
                    nonlocal closing
                    if isinstance(event, h2.events.ConnectionTerminated) and not closing:
                        closing = True
                        nursery.start_soon(self._close_when_done, peer)
                    return False

                await peer.run(on_event)
                nursery.cancel_scope.cancel()
        finally:
            peers = self.upstreams.get(key, [])
            if peer in peers:
                peers.remove(peer)
            await trio.aclose_forcefully(peer.stream)


class _Session:
    def __init__(self, client: trio.abc.Stream, ctx: HttpContext, limits: h2wire.H2Limits) -> None:
        self.ctx = ctx
        self.limits = limits
        self.down = H2Peer(client, h2wire.new_connection(client_side=False, limits=limits))
        self.guard = self.down.guard = FloodGuard(
            trio.current_time, max_header_block=limits.max_header_list_size
        )
        self.down.header_timeout = ctx.settings.request_header_timeout
        self.scopes: dict[int, trio.CancelScope] = {}
        self.opened: dict[int, float] = {}  # when the client opened each stream in flight
        self.nursery: trio.Nursery | None = None
        self.up: H2Upstreams | None = None  # the upstream connections, in `nursery`
        self.draining = False
        self.goaway_seen = trio.Event()  # the client answered the drain's PING
        self.mirroring = 0  # mirrored copies in flight (the client may be gone already)

    async def _drain_when_asked(self, session: trio.CancelScope) -> None:
        """On drain (SIGTERM, a worker replaced), RFC 9113 6.8's graceful shutdown as gRPC's
        servers do it: a first GOAWAY (last stream id 2^31-1) with a PING behind it; once the
        client answers the PING (or DRAIN_GRACE passed) it has seen the GOAWAY, so the final
        GOAWAY names the last stream it opened here, and a stream it opens after that is
        refused (REFUSED_STREAM: not processed, retried elsewhere); the streams in flight
        finish, then the connection ends, once the client has closed it (gRPC and curl do once
        their last stream is answered) or CLOSE_TIMEOUT later. A fixed grace instead once cut
        4 calls of a client that had not read the GOAWAY within it (a loaded machine): their
        HEADERS, unread, met the close."""
        drain = self.ctx.drain
        assert drain is not None
        wait = trio.CancelScope()
        drain.watch(wait)
        try:
            with wait:
                await trio.sleep_forever()
        finally:
            drain.unwatch(wait)
        try:
            await self.down.announce_shutdown(_DRAIN_PING)
            with trio.move_on_after(DRAIN_GRACE):
                await self.goaway_seen.wait()
            self.draining = True
            await self.down.refuse_after(self.down.conn.highest_inbound_stream_id)
        except StreamGone:
            session.cancel()
            return
        while self.scopes:
            await trio.sleep(_DRAIN_POLL)
        with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(StreamGone):
            await self.down.flush()
        await trio.sleep(CLOSE_TIMEOUT)  # the client's close ends the session before this
        session.cancel()

    async def run(self, initial: bytes) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self.up = H2Upstreams(self.ctx.connect, nursery)
                try:
                    await self.down.flush()
                except StreamGone:
                    return
                if self.ctx.drain is not None:
                    nursery.start_soon(self._drain_when_asked, nursery.cancel_scope)
                await self.down.run(self._on_event, initial)
                while self.mirroring:  # copies in flight finish (each bounded by its timeout)
                    await trio.sleep(_DRAIN_POLL)
                nursery.cancel_scope.cancel()
            if self.down.abuse is not None:
                abuse = self.down.abuse
                ABUSE.labels(listener=self.ctx.listener, kind=abuse.kind).inc()
                abuse_log.warning(
                    f"abuse-{abuse.kind}",
                    "HTTP/2 connection from %s ended with GOAWAY ENHANCE_YOUR_CALM: %s",
                    self.ctx.peer or "?",
                    abuse,
                )
        finally:
            if self.up is not None:
                await self.up.aclose()

    def _on_event(self, event: h2.events.Event) -> bool:
        if isinstance(event, h2.events.RequestReceived):
            assert self.nursery is not None
            if self.draining:  # after our GOAWAY: the client retries it elsewhere
                self.down.reset(event.stream_id, h2wire.REFUSED_STREAM)
                return True
            self.down.open_inbox(event.stream_id)
            scope = self.scopes[event.stream_id] = trio.CancelScope()
            self.opened[event.stream_id] = self.guard.clock()
            ended = event.stream_ended is not None  # a request without a body (GET)
            self.nursery.start_soon(
                self._serve_stream, event.stream_id, event.headers, scope, ended
            )
            return True
        if isinstance(event, h2.events.PingAckReceived):
            if event.ping_data == _DRAIN_PING:
                self.goaway_seen.set()
            return True
        if isinstance(event, h2.events.StreamReset):
            scope = self.scopes.get(event.stream_id)
            if scope is not None:
                scope.cancel()
                opened = self.opened.get(event.stream_id, self.guard.clock())
                abuse = self.guard.stream_reset(self.guard.clock() - opened)
                if abuse is not None:  # rapid reset (CVE-2023-44487)
                    self.down.abuse = abuse
                    with contextlib.suppress(*H2_ERRORS):
                        self.down.conn.close_connection(
                            error_code=h2wire.ENHANCE_YOUR_CALM,
                            additional_data=abuse.reason.encode("ascii", "replace")[:200],
                        )
                    self.down.closed = True  # the reader sends the GOAWAY and stops
        return False

    @property
    def _ups(self) -> H2Upstreams:
        assert self.up is not None
        return self.up

    # -- one stream -----------------------------------------------------------------------

    async def _serve_stream(
        self,
        stream_id: int,
        headers: list[tuple[bytes, bytes]],
        scope: trio.CancelScope,
        ended: bool = False,
    ) -> None:
        pseudo = dict(h for h in headers if h[0].startswith(b":"))
        record = RequestRecord(
            pseudo.get(b":method", b"").decode("ascii", "replace"),
            pseudo.get(b":path", b"").decode("latin-1"),
            pseudo.get(b":authority", b"").decode("latin-1"),
            self.ctx.peer,
            time.time(),
        )
        started = trio.current_time()
        grpc = False
        try:
            with scope, contextlib.ExitStack() as held:
                if not self._admit(held):
                    resp = LocalResponse(503, b"too many requests in flight from this source")
                    await self._local(stream_id, record, resp, "UO", grpc)
                    return
                try:
                    head = h2wire.parse_request(headers)
                    head.ended = ended
                    grpc = record.grpc = head.grpc
                    if grpc:
                        record.request_messages = MessageCounter()
                        record.response_messages = MessageCounter()
                    head.path = self._normalize(head.path)
                except (h2wire.BadRequest, InvalidPath) as exc:
                    body = f"bad request: {exc}\n".encode()[:512]
                    await self._local(stream_id, record, LocalResponse(400, body), "DPE", grpc)
                    return
                info = RequestInfo(
                    method=head.method,
                    target=head.path,
                    authority=head.authority,
                    headers=head.headers,
                    peer=self.ctx.peer,
                )
                d = await decide(self.ctx, info, record)
                if d.local is not None:
                    await self._local(stream_id, record, d.local, d.flag, grpc)
                    return
                if d.target is not None or d.authority is not None or d.request_ops:
                    head.path = head.path if d.target is None else d.target
                    head.authority = d.authority or head.authority
                    head.headers = d.edit_request(head.headers)
                timeout = h2wire.request_timeout(
                    d.route.timeout if d.route is not None else None, head.headers
                )
                if timeout is None:
                    await self._forward(stream_id, head, d, record)
                else:
                    with trio.move_on_after(timeout) as deadline:
                        await self._forward(stream_id, head, d, record)
                    if deadline.cancelled_caught:
                        await self._timed_out(stream_id, record)
            if scope.cancelled_caught:
                record.flags.append("DC")  # the client reset the stream
        except StreamGone:
            record.flags.append("DC")
        finally:
            record.duration = trio.current_time() - started
            self.scopes.pop(stream_id, None)
            self.opened.pop(stream_id, None)
            self.down.close_inbox(stream_id)
            if self.ctx.on_request_done is not None:
                try:
                    self.ctx.on_request_done(record)
                except Exception:
                    log.exception("on_request_done failed")

    def _admit(self, held: contextlib.ExitStack) -> bool:
        """Hold one of the source's requests in flight (in `held`); False, counted and
        logged, when it already has as many as `Limits` allows."""
        limits = self.ctx.limits
        if limits is None or held.enter_context(limits.pending_request(self.ctx.source_key)):
            return True
        limits.refused(
            self.ctx.listener,
            SOURCE_PENDING_REQUESTS,
            self.ctx.peer,
            f"{limits.max_pending_requests} requests of this source in flight",
        )
        return False

    async def _timed_out(self, stream_id: int, record: RequestRecord) -> None:
        """The route timeout (or the call's grpc-timeout) passed: 504 UT (gRPC:
        DEADLINE_EXCEEDED) before the response head, a reset stream after it."""
        if record.status:
            record.flags.append("UT")
            self.down.reset(stream_id, h2wire.CANCEL)
            with contextlib.suppress(StreamGone):
                await self.down.flush()
            return
        resp = LocalResponse(
            504, b"upstream request timeout", grpc_status=h2wire.GRPC_DEADLINE_EXCEEDED
        )
        await self._local(stream_id, record, resp, "UT", record.grpc)

    def _normalize(self, path: str) -> str:
        mode = self.ctx.settings.path_normalization
        if mode is PathNormalization.NONE:
            return path
        target, _ = normalize_target(path, mode)
        return target

    async def _local(
        self,
        stream_id: int,
        record: RequestRecord,
        resp: LocalResponse,
        flag: str,
        grpc: bool,
        respond: Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]] | None = None,
    ) -> None:
        """A reply the proxy makes itself (a gRPC call gets a trailers-only response);
        `respond`: the route's response edits, for one the same-node destination made."""
        if flag:
            record.flags.append(flag)
        record.flags.extend(resp.flags)
        headers, body = h2wire.local_reply(resp, grpc=grpc)
        if respond is not None:
            headers = respond(headers)
        record.status = h2wire.status_of(headers)
        if grpc:
            record.grpc_status = h2wire.grpc_status_of(headers)
        await self.down.send_headers(stream_id, headers, end=not body)
        if body:
            await self.down.send_data(stream_id, body, end=True)
        if self.down.conn.streams.get(stream_id) is not None:
            # the client may still be sending its body: it is not wanted
            with contextlib.suppress(*H2_ERRORS):
                if not self.down.conn.streams[stream_id].closed:
                    self.down.reset(stream_id, h2wire.NO_ERROR)
                    await self.down.flush()

    async def _destination_answer(
        self,
        stream_id: int,
        cluster: ClusterState,
        ep: EndpointState,
        hop: localhop.Hop,
        record: RequestRecord,
        respond: Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]],
        policy: RetryPolicy | None,
        slot: RetrySlot | None,
        *,
        counted: bool = False,
    ) -> Outcome | None:
        """The destination answered a same-node request itself (a denial, a 503 in the place
        of a pod that reset the stream; localhop.py): for the source, the endpoint's response
        (retried as one, `policy` when a retry may follow; the route's response edits apply;
        no flag on this side). `counted`: the attempt is in the cluster's figures already (the
        pod was tried). None: answered."""
        answer = hop.answer
        assert answer is not None
        answer = replace(answer, flags=())
        headers = respond(h2wire.local_reply(answer, grpc=record.grpc)[0])
        status = h2wire.status_of(headers)
        if not counted:
            cluster.request_started(ep)
        try:
            if record.grpc:
                record.grpc_status = h2wire.grpc_status_of(headers)
            if (
                policy is not None
                and (
                    retriable_status(policy, status)
                    or (record.grpc and retriable_grpc(policy, record.grpc_status))
                )
                and (slot is None or slot.take())  # maxRetries
            ):
                record.status = status
                return Outcome.STATUS
            await self._local(stream_id, record, answer, "", record.grpc, respond)
            return None
        finally:
            if not counted:
                cluster.request_finished(ep, status)
            localhop.finish(hop, record, status, hop.answer.flags, relayed=False)

    async def _forward(
        self, stream_id: int, head: h2wire.RequestHead, d: RouteDecision, record: RequestRecord
    ) -> None:
        """Attempts on endpoints until one answers or the retry policy gives up. A request is
        retried (another endpoint first) on a failed connect, a reset before the response and
        a retriable status or trailers-only gRPC status, while its body fits the retry
        buffer: the body is kept as it streams, and replayed on the next attempt."""
        assert d.cluster is not None and d.routes is not None
        cluster = d.cluster
        policy = d.route.retry if d.route is not None else None
        body = _Body(complete=head.ended)
        if not body.complete:
            self._take_arrived_body(stream_id, record, body)
        if not d.mirrors:
            await self._forward_attempts(stream_id, head, d, record, cluster, policy, body)
            return
        # Counted from here: a client that hangs up once it has its answer must not cancel
        # the copies (the session waits for `mirroring` to drop to 0).
        self.mirroring += 1
        try:
            await self._forward_attempts(stream_id, head, d, record, cluster, policy, body)
            if body.complete and not body.overflow:
                # the copies go once the request came whole (the kept body is theirs to send)
                authority = head.authority or f"{d.routes.hostname}:{d.routes.port}"
                self._mirror(d, replace(head, authority=authority), body)
        finally:
            self.mirroring -= 1

    def _take_arrived_body(self, stream_id: int, record: RequestRecord, body: _Body) -> None:
        """Take into `body` what of the request's body and end already arrived (a unary gRPC
        call's message and END_STREAM usually come in the read that brought its HEADERS), as
        `_pump_request` would, up to the retry buffer: a request that came whole then goes
        upstream in one send, without a task of its own (`_exchange`). An event that is not
        part of the body, or DATA past the retry buffer, is put back for the pump."""
        inbox = self.down.inboxes[stream_id]
        limit = self.ctx.settings.retry_buffer_limit
        while not body.complete:
            event = inbox.ready()
            if event is None:
                return
            if isinstance(event, h2.events.DataReceived):
                if body.size + len(event.data) > limit:
                    inbox.hold(event)
                    return
                record.bytes_received += len(event.data)
                if record.request_messages is not None:
                    record.request_messages.feed(event.data)
                body.keep(event.data, limit)
                self.down.ack(stream_id, event.flow_controlled_length)
            elif isinstance(event, h2.events.TrailersReceived):
                body.trailers = h2wire.response_headers(event.headers)
                body.complete = True
            elif isinstance(event, h2.events.StreamEnded):
                body.complete = True
            else:
                inbox.hold(event)
                return

    def _mirror(self, d: RouteDecision, head: h2wire.RequestHead, body: _Body) -> None:
        assert self.nursery is not None
        timeout = d.route.timeout if d.route is not None else None
        shadow = replace(head, authority=shadow_authority(head.authority))
        for cluster in d.mirrors:
            self.mirroring += 1  # until _send_mirror ends
            self.nursery.start_soon(self._send_mirror, cluster, shadow, body, timeout)

    async def _send_mirror(
        self, cluster: ClusterState, head: h2wire.RequestHead, body: _Body, timeout: float | None
    ) -> None:
        """A copy of a request (`mirror`) on an upstream stream: sent whole, its answer read
        and dropped, failures only logged (as mirror.py for HTTP/1.1)."""
        try:
            ep = cluster.pick([])
            if ep is not None:
                await self._mirror_to(cluster, ep, head, body, timeout)
        finally:
            self.mirroring -= 1

    async def _mirror_to(
        self,
        cluster: ClusterState,
        ep: EndpointState,
        head: h2wire.RequestHead,
        body: _Body,
        timeout: float | None,
    ) -> None:
        with trio.move_on_after(timeout or MIRROR_TIMEOUT):
            try:
                peer = await self._ups.acquire(cluster, ep)
            except (UpstreamError, Overflow) as exc:
                log.debug("mirror to %s not sent: %s", ep.address, exc)
                return
            hop = None
            duties = localhop.duties_of(peer.info)
            if duties is not None:  # a same-node pod: the destination checks the copy too
                hop = await localhop.check(
                    duties,
                    head.method,
                    head.path,
                    head.authority,
                    head.headers,
                    self.ctx.peer,
                    partial(self._ups.done, peer, cluster),  # no stream went on it
                )
                if hop.answer is not None:
                    localhop.finish(hop, None, hop.answer.status, hop.answer.flags)
                    return
                if hop.headers is not None:
                    head = replace(head, headers=hop.headers)
            cluster.request_started(ep)
            status = None
            up_id = None
            try:
                up_id = peer.conn.get_next_available_stream_id()
                inbox = peer.open_inbox(up_id)
                bodyless = not body.chunks and body.trailers is None
                await peer.send_headers(up_id, h2wire.upstream_request(head, ""), end=bodyless)
                for chunk in body.chunks:
                    await peer.send_data(up_id, chunk)
                if body.trailers is not None:
                    await peer.send_headers(up_id, body.trailers, True)
                elif not bodyless:
                    await peer.end(up_id)
                while (event := await inbox.receive.receive()) is not None:
                    if isinstance(event, h2.events.ResponseReceived):
                        status = h2wire.status_of(event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        peer.ack(up_id, event.flow_controlled_length)
                        await peer.flush()
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        break
            except (StreamGone, *H2_ERRORS) as exc:
                log.debug("mirror to %s failed: %r", ep.address, exc)
            finally:
                with trio.CancelScope(shield=True):
                    if up_id is not None:
                        stream = peer.conn.streams.get(up_id)
                        if stream is not None and not stream.closed:
                            peer.reset(up_id, h2wire.CANCEL)
                            with contextlib.suppress(StreamGone):
                                await peer.flush()
                        peer.close_inbox(up_id)
                    cluster.request_finished(ep, status)
                    self._ups.done(peer, cluster)
                    await self._ups.retire_if_spent(peer, cluster)
                if hop is not None:
                    localhop.finish(hop, None, status or 0)

    async def _forward_attempts(
        self,
        stream_id: int,
        head: h2wire.RequestHead,
        d: RouteDecision,
        record: RequestRecord,
        cluster: ClusterState,
        policy: RetryPolicy | None,
        body: _Body,
    ) -> None:
        retries_left = policy.attempts if policy is not None else 0
        tried: list[EndpointState] = []
        assert d.routes is not None
        authority = f"{d.routes.hostname}:{d.routes.port}"
        settings = self.ctx.settings
        slot = cluster.retry_slot()  # maxRetries: taken when a retry is decided
        try:
            while True:
                ep = cluster.pick(tried, d.hash_key)
                if ep is None:
                    await self._local(
                        stream_id,
                        record,
                        LocalResponse(503, b"no healthy upstream"),
                        "UH",
                        record.grpc,
                    )
                    return
                tried.append(ep)
                record.attempts += 1
                record.endpoint = ep.endpoint
                record.upstream = ep.address
                may_retry = retries_left > 0 and policy is not None and not body.overflow
                outcome: Outcome | None
                try:
                    peer = await self._ups.acquire(cluster, ep)
                except Overflow:
                    outcome = Outcome.OVERFLOW  # http2MaxRequests: 503 UO
                except UpstreamError as exc:
                    cluster.report(ep, CONNECT_FAILURE_CODE)
                    log.debug("connect to %s failed: %s", ep.address, exc)
                    record.transport_failure = exc.transport
                    outcome = Outcome.CONNECT_FAILURE
                else:
                    outcome = await self._attempt(
                        stream_id, head, authority, d, record, cluster, ep, peer, body,
                        policy, may_retry, slot,
                    )  # fmt: skip
                if outcome is None:
                    return  # answered
                if (
                    may_retry
                    and policy is not None
                    # a held-back response took its slot already (_exchange)
                    and (
                        outcome is Outcome.STATUS
                        or (retriable(policy, outcome, record.status) and slot.take())
                    )
                ):
                    retries_left -= 1
                    record.status = 0
                    record.grpc_status = None
                    retry = policy.attempts - retries_left
                    base, cap = settings.retry_backoff_base, settings.retry_backoff_max
                    await trio.sleep(backoff(retry, base, cap, self.ctx.rng))
                    continue
                if outcome is Outcome.STATUS:  # not retriable after all: cannot happen
                    outcome = Outcome.RESET
                code, flag, text = _FAILURES[outcome]
                if outcome is Outcome.CONNECT_FAILURE and record.transport_failure:
                    text += b", transport failure reason: " + record.transport_failure.encode()
                await self._local(stream_id, record, LocalResponse(code, text), flag, record.grpc)
                return
        finally:
            slot.release()

    async def _attempt(
        self,
        stream_id: int,
        head: h2wire.RequestHead,
        authority: str,
        d: RouteDecision,
        record: RequestRecord,
        cluster: ClusterState,
        ep: EndpointState,
        peer: H2Peer,
        body: _Body,
        policy: RetryPolicy | None,
        may_retry: bool,
        slot: RetrySlot,
    ) -> Outcome | None:
        """One attempt on ``peer``, a connection to ``ep``: None once a response went to the
        client, else how it failed. A same-node pod's destination checks come first; the
        destination answers in the pod's place when they deny, or when the pod reset the
        stream (localhop.py)."""
        record.upstream_info = peer.info
        duties = localhop.duties_of(peer.info)
        hop = None
        sent = head
        if duties is not None:  # a same-node pod: the destination's checks first
            hop = await localhop.check(
                duties,
                head.method,
                head.path,
                head.authority or authority,
                head.headers,
                self.ctx.peer,
                partial(self._ups.done, peer, cluster),  # no stream went on it
            )
            if hop.headers is not None:
                sent = replace(head, headers=hop.headers)
        tried = hop is None or hop.answer is None
        if tried:
            cluster.request_started(ep)
            outcome, status, ended = None, None, False  # until the exchange returns
            try:
                outcome, status = await self._exchange(
                    stream_id,
                    peer,
                    sent,
                    authority,
                    record,
                    body,
                    policy if may_retry else None,
                    policy.per_try_timeout if policy is not None else None,
                    d.edit_response,
                    slot,
                )
                ended = True
            finally:
                cluster.request_finished(ep, status)
                self._ups.done(peer, cluster)
                await self._ups.retire_if_spent(peer, cluster)
                instead = _in_pods_place(hop, outcome) if ended else None
                if hop is not None and instead is None:
                    # the pod's answer (or one held back for a retry), else none
                    localhop.finish(hop, record, record.status)
            if instead is None:
                return outcome
            assert hop is not None
            hop.answer = instead
        assert hop is not None
        return await self._destination_answer(
            stream_id,
            cluster,
            ep,
            hop,
            record,
            d.edit_response,
            policy if may_retry else None,
            slot,
            counted=tried,
        )

    async def _exchange(
        self,
        stream_id: int,
        peer: H2Peer,
        head: h2wire.RequestHead,
        authority: str,
        record: RequestRecord,
        body: _Body,
        policy: RetryPolicy | None,
        per_try: float | None = None,
        respond: Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]] = _same,
        slot: RetrySlot | None = None,
    ) -> tuple[Outcome | None, int | None]:
        """One attempt on one upstream stream: (None, status) once a response went to the
        client; else how it failed before a response (a dropped retriable response: STATUS,
        its code in record.status; no response head within `per_try` seconds, the route's
        `perTryTimeout`, as the HTTP/1.1 engine: TIMEOUT). `policy`: the retry policy when a
        retry may follow; `slot`: the request's share of maxRetries, which a retriable
        response must get to be held back."""
        down = self.down
        down_inbox = down.inboxes[stream_id]
        try:
            up_id = peer.conn.get_next_available_stream_id()
            up_inbox = peer.open_inbox(up_id)
            # a request without a body goes in one HEADERS frame with END_STREAM, so the
            # stream is not left open (and reset) when the response ends first
            bodyless = body.complete and not body.chunks and body.trailers is None
            headers = h2wire.upstream_request(head, authority)
            peer.conn.send_headers(up_id, headers, end_stream=bodyless)
        except H2_ERRORS:
            return Outcome.OVERFLOW, None
        finished = False
        retry = False
        # until the response head: the attempt's perTryTimeout (disarmed by _pump_response)
        head_wait = None
        if per_try is not None:
            head_wait = trio.CancelScope(deadline=trio.current_time() + per_try)
        # A body that came whole and fits the send windows goes with the HEADERS, from this
        # task; else _pump_request sends it (and what is still coming) beside the response.
        whole = bodyless or (
            body.complete and body.size <= peer.conn.local_flow_control_window(up_id)
        )

        async def respond_to_client() -> None:
            nonlocal finished
            if whole:
                if not bodyless:
                    await self._queue_whole_body(peer, up_id, body)
                await peer.flush()
            finished = await self._pump_response(
                up_inbox, peer, up_id, stream_id, record, policy, head_wait, respond, slot
            )

        async def answer() -> None:
            nonlocal retry
            try:
                if head_wait is None:
                    await respond_to_client()
                else:
                    with head_wait:
                        await respond_to_client()
            except _Retry:
                retry = True
            except StreamGone:
                pass

        try:
            if whole:
                await answer()
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        self._pump_request, down_inbox, stream_id, peer, up_id, record, body
                    )
                    await answer()
                    nursery.cancel_scope.cancel()
        finally:
            if not finished:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    peer.reset(up_id, h2wire.CANCEL)
                    with contextlib.suppress(StreamGone):
                        await peer.flush()
            elif up_id in peer.conn.streams and not peer.conn.streams[up_id].closed:
                peer.reset(up_id, h2wire.NO_ERROR)  # answered early
                with contextlib.suppress(StreamGone):
                    await peer.flush()
            peer.close_inbox(up_id)
        if retry:
            return Outcome.STATUS, record.status
        responded = record.status != 0  # the response head went to the client
        if head_wait is not None and head_wait.cancelled_caught and not responded:
            return Outcome.TIMEOUT, TIMEOUT_CODE  # as the HTTP/1.1 engine tells the outlier
        if not finished and not responded and not down.closed and up_inbox.reset is not None:
            # before a response: the caller answers or retries (REFUSED: nothing was processed)
            refused = up_inbox.reset == h2wire.REFUSED_STREAM
            return (Outcome.REFUSED if refused else Outcome.RESET), RESET_CODE
        if not finished and responded:
            record.flags.append("UC")
            down.reset(stream_id, h2wire.CANCEL)
            with contextlib.suppress(StreamGone):
                await down.flush()
        return None, record.status or None

    async def _pump_request(
        self,
        inbox: H2Inbox,
        stream_id: int,
        peer: H2Peer,
        up_id: int,
        record: RequestRecord,
        body: _Body,
    ) -> None:
        """Request DATA and trailers from the client to the upstream stream: first what an
        earlier attempt kept, then what comes (kept too, up to the retry buffer limit). What
        came in one read goes upstream in one send (with the request's HEADERS, which
        `_exchange` queued), the END_STREAM flag on the last DATA frame when the end came
        with it."""
        down = self.down
        try:
            if body.complete:
                await self._queue_whole_body(peer, up_id, body)
                await peer.flush()
                return
            for chunk in list(body.chunks):
                await peer.send_data(up_id, chunk, flush=False)
            limit = self.ctx.settings.retry_buffer_limit
            held: h2.events.Event | None = None
            while True:
                event, held = held or await inbox.next(peer, down), None
                if event is None or isinstance(event, h2.events.StreamReset):
                    return  # the session cancels this stream
                if isinstance(event, h2.events.DataReceived):
                    record.bytes_received += len(event.data)
                    if record.request_messages is not None:
                        record.request_messages.feed(event.data)
                    body.keep(event.data, limit)
                    down.ack(stream_id, event.flow_controlled_length)
                    held = inbox.ready()
                    if isinstance(held, h2.events.StreamEnded):
                        body.complete = True
                        await peer.send_data(up_id, event.data, end=True, flush=False, acks=down)
                        break
                    await peer.send_data(up_id, event.data, flush=False, acks=down)
                elif isinstance(event, h2.events.TrailersReceived):
                    body.trailers = h2wire.response_headers(event.headers)
                    body.complete = True
                    peer.queue_headers(up_id, body.trailers, True)
                    break
                elif isinstance(event, h2.events.StreamEnded):
                    body.complete = True
                    await peer.end(up_id, flush=False)
                    break
            await peer.flush()
            with contextlib.suppress(StreamGone):
                await down.flush()
        except StreamGone:
            return

    @staticmethod
    async def _queue_whole_body(peer: H2Peer, up_id: int, body: _Body) -> None:
        """A complete kept body into the upstream stream's queue (as the windows allow; the
        caller flushes): its DATA, END_STREAM on the last frame, or its trailers."""
        chunks = list(body.chunks)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1 and body.trailers is None
            await peer.send_data(up_id, chunk, end=last, flush=False)
        if body.trailers is not None:
            peer.queue_headers(up_id, body.trailers, True)
        elif not chunks:
            await peer.end(up_id, flush=False)

    async def _pump_response(
        self,
        inbox: H2Inbox,
        peer: H2Peer,
        up_id: int,
        stream_id: int,
        record: RequestRecord,
        policy: RetryPolicy | None,
        head_wait: trio.CancelScope | None = None,
        respond: Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]] = _same,
        slot: RetrySlot | None = None,
    ) -> bool:
        """The upstream's response to the client. Returns True when it completed; raises
        _Retry (nothing sent yet) for a response `policy` retries, StreamGone (after the head was
        sent: the caller resets) when either side broke off. `head_wait` (the per-try
        timeout) is disarmed once a response head arrives. What came in one read (a small
        response's HEADERS, DATA and end; a gRPC call's HEADERS, message and trailers) goes to
        the client in one send, END_STREAM on the last DATA frame when the end came with it;
        the upstream's WINDOW_UPDATEs follow what they acknowledge."""
        down = self.down
        ended = False
        held: h2.events.Event | None = None
        while True:
            event, held = held or await inbox.next(down, peer), None
            if event is None or isinstance(event, h2.events.StreamReset):
                raise StreamGone
            if isinstance(event, h2.events.InformationalResponseReceived):
                down.queue_headers(stream_id, h2wire.response_headers(event.headers))
            elif isinstance(event, h2.events.ResponseReceived):
                if head_wait is not None:
                    head_wait.deadline = math.inf
                headers = respond(h2wire.response_headers(event.headers))
                record.status = h2wire.status_of(headers)
                ended = event.stream_ended is not None
                if record.grpc:
                    record.grpc_status = h2wire.grpc_status_of(headers)
                if (
                    policy is not None
                    and (
                        retriable_status(policy, record.status)
                        or (ended and record.grpc and retriable_grpc(policy, record.grpc_status))
                    )
                    and (slot is None or slot.take())  # maxRetries
                ):
                    raise _Retry
                down.queue_headers(stream_id, headers, end=ended)
            elif isinstance(event, h2.events.DataReceived):
                held = inbox.ready()
                last = isinstance(held, h2.events.StreamEnded)
                await down.send_data(stream_id, event.data, end=last, flush=False, acks=peer)
                record.bytes_sent += len(event.data)
                if record.response_messages is not None:
                    record.response_messages.feed(event.data)
                peer.ack(up_id, event.flow_controlled_length)
                if last:
                    break
            elif isinstance(event, h2.events.TrailersReceived):
                trailers = h2wire.response_headers(event.headers)
                if record.grpc:
                    record.grpc_status = h2wire.grpc_status_of(trailers)
                down.queue_headers(stream_id, trailers, end=True)
                ended = True
            elif isinstance(event, h2.events.StreamEnded):
                if not ended:
                    await down.end(stream_id, flush=False)
                break
        await down.flush()
        with contextlib.suppress(StreamGone):
            await peer.flush()
        return True
