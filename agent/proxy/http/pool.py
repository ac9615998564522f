"""Keep-alive HTTP/1.1 connections to endpoints, within each cluster's circuit breakers.

What flows through: the engine asks for a connection to one endpoint of one cluster and gives it
back after the exchange, saying whether it can be reused. An idle connection is reused first
(most recently used first); else a new one is opened through `Connect` if the cluster's
`maxConnections` allows; else the request waits as pending (ClusterState.wait_pending, which
overflows at `http1MaxPendingRequests`). A connection is closed instead of pooled after
`maxRequestsPerConnection` requests, when its endpoint left the snapshot, or when it was not
left clean.

An idle connection the server closed must not be reused (the request would fail, UC). A TCP
socket is polled (no wait) when it is taken from the pool: readable while idle means closed
or talking out of turn; a sweep every few seconds closes those, the ones idle too long, and
those idle over `max_idle` per key and endpoint since the last sweep (what a burst left).
"Too long" is the cluster's DestinationRule `http.idleTimeout` (`0s`: never), else the pool's
`idle_timeout`; a connection is closed at the first sweep after it ran out (up to 5 s late).
A stream without a socket (HBONE) is watched instead by a task blocked in a one-byte receive,
cancelled when the connection is taken again. That task is started by the sweep, once the
connection has stayed idle until then, not at every release: under load a connection is taken
again within milliseconds, and a task per request cost about 5% of the proxy's CPU. A close
that lands in the unwatched moment is the race any reuse has: an idempotent request finds the
connection closed before any response byte and is sent again on another one (proxy.py).

Connections pooled under a `dedicated` key serve one downstream connection only (the inbound
side: one tunnel, one connection to the pod). When the pool closes one of them while it is idle
(the server closed it, or it idled out) the downstream is told, so that it closes too: the
client side's pooled tunnel then ends instead of staying open, counted, for nothing; and when
the downstream ends, its pooled connections are closed with it.
"""

from __future__ import annotations

import select
from collections.abc import AsyncIterator, Callable, Hashable, Iterable
from contextlib import asynccontextmanager, suppress

import trio
from meshagent.agent import sockio
from meshagent.agent.proxy.http import wire
from meshagent.agent.proxy.http.types import Connect, UpstreamError
from meshagent.agent.proxy.lb import ClusterState, EndpointState

DEFAULT_IDLE_TIMEOUT = 300.0
# Idle connections kept per (key, endpoint) past one sweep: a burst of concurrent requests
# leaves as many idle connections, and those over this many are closed at the next sweep
# (nginx's upstream `keepalive N`, without the churn: a connection reused within a sweep
# interval is never closed for it), so memory returns after a burst, not 5 minutes later.
DEFAULT_MAX_IDLE = 64
SWEEP_INTERVAL = 5.0
# What the HTTP engines' reads ask for: a read allocates what it asks for, and 64 KiB or more is,
# under the workers' allocator (agent/workers/launch.py), an mmap, an mremap and an munmap per
# read, a small message keeping a page of its own meanwhile (relay.SMALL_READ has the figures).
RECEIVE_SIZE = 32 * 1024
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, UpstreamError)


def _readable(stream: trio.abc.Stream) -> bool:
    """Whether an idle connection's socket has something to read: on a connection with no
    request outstanding that is the server's close (or garbage), so it must not be reused.
    Catches a close that raced the reuse. A stream without a socket says so itself if it can
    (`readable_now`: an HBONE tunnel stream, the same-node pair), else only the idle watch
    applies."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        readable_now = getattr(stream, "readable_now", None)
        return bool(readable_now()) if readable_now is not None else False
    try:
        fd = sock.fileno()
    except OSError:
        return True
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


class UpstreamConnection:
    """One HTTP/1.1 client connection to an endpoint, with its codec state (`wire`)."""

    __slots__ = (
        "closed",
        "cluster",
        "codec",
        "cycle_bytes",
        "endpoint",
        "idle_since",
        "info",
        "key",
        "requests",
        "stream",
        "watch_done",
        "watch_scope",
    )

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        cluster: ClusterState,
        ep: EndpointState,
        key: Hashable = None,
        info: object = None,
    ) -> None:
        self.stream = stream
        self.key = key
        self.info = info  # what Connect returned, when it was more than the stream
        self.cluster = cluster
        self.endpoint = ep
        self.codec = wire.Connection(wire.CLIENT)
        self.requests = 0
        self.cycle_bytes = 0  # bytes received in the current request/response cycle
        self.closed = False
        self.idle_since = 0.0
        self.watch_scope: trio.CancelScope | None = None
        self.watch_done: trio.Event | None = None

    async def send(self, event: wire.Event) -> None:
        """Send an event; raises UpstreamError("reset") when the stream is broken."""
        await self.send_bytes(self.codec.send(event))

    async def send_bytes(self, data: bytes | bytearray) -> None:
        if data:
            try:
                await sockio.send_all(self.stream, data)
            except STREAM_ERRORS as exc:
                raise UpstreamError("reset", f"send failed: {exc}") from exc

    def poll_event(self) -> wire.Event | wire.Sentinel:
        """The next event from what was received (NEED_DATA if more is needed). Raises
        UpstreamError("reset") for a close before any byte of the response,
        wire.RemoteProtocolError for a malformed or truncated response."""
        try:
            event = self.codec.next_event()
        except wire.RemoteProtocolError:
            if self.cycle_bytes == 0:
                raise UpstreamError("reset", "connection closed before response") from None
            raise
        if isinstance(event, wire.ConnectionClosed) and self.cycle_bytes == 0:
            raise UpstreamError("reset", "connection closed before response")
        return event

    async def fill(self) -> None:
        """Receive more from the server into the codec; UpstreamError("reset") if that fails."""
        try:
            # a response's first bytes take the server's time: wait for them first (sockio)
            data = await sockio.receive_some(self.stream, RECEIVE_SIZE, not self.cycle_bytes)
        except STREAM_ERRORS as exc:
            raise UpstreamError("reset", f"receive failed: {exc}") from exc
        self.cycle_bytes += len(data)
        self.codec.receive_data(data)

    async def next_event(self) -> wire.Event:
        while (event := self.poll_event()) is wire.NEED_DATA:
            await self.fill()
        return event


class ConnectionPool:
    """The idle connections of one proxy, by endpoint. Use `open_connection_pool`."""

    def __init__(
        self,
        connect: Connect | None,
        nursery: trio.Nursery,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_idle: int = DEFAULT_MAX_IDLE,
    ) -> None:
        self._connect = connect
        self._nursery = nursery
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle
        self._idle: dict[tuple[Hashable, EndpointState], list[UpstreamConnection]] = {}
        self._on_idle_close: dict[Hashable, Callable[[], None]] = {}  # dedicated keys

    def idle_count(self, ep: EndpointState | None = None) -> int:
        return sum(len(conns) for (_, e), conns in self._idle.items() if ep is None or e is ep)

    async def acquire(
        self,
        cluster: ClusterState,
        ep: EndpointState,
        *,
        key: Hashable = None,
        connect: Connect | None = None,
    ) -> UpstreamConnection:
        """A connection to `ep` ready for a request. Connections are shared only among
        callers passing equal `key`s: use the source workload when `connect` (default: the
        pool's) authenticates or authorizes as it. Raises lb.Overflow when the cluster's
        pending queue is full or `http2MaxRequests` are in flight, UpstreamError when a new
        connection cannot be opened. The request's slot is given back by `release`."""
        cluster.take_request_slot()
        try:
            while True:
                conn = await self._take_idle((key, ep))
                if conn is None and cluster.can_open(ep):
                    conn = await self._open(cluster, ep, key, connect or self._connect)
                if conn is not None:
                    conn.cycle_bytes = 0
                    return conn
                await cluster.wait_pending()
        except BaseException:
            cluster.free_request_slot()
            raise

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Give a connection back after an exchange; it is pooled only if `reusable`, both
        sides finished the exchange cleanly, and the connection's limits allow."""
        conn.cluster.free_request_slot()
        conn.requests += 1
        limit = conn.cluster.spec.policy.max_requests_per_connection
        if (
            not reusable
            or conn.closed
            or conn.endpoint.retired
            or (limit is not None and conn.requests >= limit)
            or conn.codec.our_state is not wire.DONE
            or conn.codec.their_state is not wire.DONE
        ):
            self._discard(conn)
            return
        conn.codec.start_next_cycle()
        self._to_idle(conn)

    def unused(self, conn: UpstreamConnection) -> None:
        """Give back a connection no request went on (a same-node destination answered the
        request itself, agent/proxy/http/localhop.py): pooled again as it was, not counted."""
        conn.cluster.free_request_slot()
        if (
            conn.closed
            or conn.endpoint.retired
            or conn.codec.our_state is not wire.IDLE
            or conn.codec.their_state is not wire.IDLE
        ):
            self._discard(conn)
            return
        self._to_idle(conn)

    def _to_idle(self, conn: UpstreamConnection) -> None:
        conn.idle_since = trio.current_time()
        self._idle.setdefault((conn.key, conn.endpoint), []).append(conn)
        if conn.cluster.pending:  # requests wait for a connection
            conn.cluster.connection_released()

    def discard(self, endpoints: Iterable[EndpointState]) -> None:
        """Close the idle connections of endpoints that left the snapshot."""
        gone = set(endpoints)
        for slot in [slot for slot in self._idle if slot[1] in gone]:
            self._close_slot(slot)

    def dedicate(self, key: Hashable, on_idle_close: Callable[[], None]) -> Callable[[], None]:
        """Connections pooled under `key` belong to one downstream connection until the
        returned function is called (when it ends): `on_idle_close` is called when the pool
        closes one of them while idle (the server closed it, or it idled out); the function
        closes the ones still pooled."""
        self._on_idle_close[key] = on_idle_close

        def end() -> None:
            self._on_idle_close.pop(key, None)
            for slot in [slot for slot in self._idle if slot[0] == key]:
                self._close_slot(slot)

        return end

    def _close_slot(self, slot: tuple[Hashable, EndpointState]) -> None:
        for conn in self._idle.pop(slot):
            if conn.watch_scope is not None:
                conn.watch_scope.cancel()
            self._discard(conn)

    def close_all(self) -> None:
        self.discard([ep for _, ep in self._idle])

    async def _take_idle(self, slot: tuple[Hashable, EndpointState]) -> UpstreamConnection | None:
        idle = self._idle.get(slot)
        while idle:
            conn = idle.pop()
            if not idle:
                del self._idle[slot]
            if conn.watch_scope is not None and conn.watch_done is not None:
                conn.watch_scope.cancel()
                try:
                    await conn.watch_done.wait()
                except BaseException:  # cancelled: out of the pool, never handed out
                    self._discard(conn)
                    raise
                conn.watch_scope = conn.watch_done = None
            elif _readable(conn.stream) or self._expired(conn, trio.current_time()):
                self._discard(conn)  # the server closed it (or spoke) while it was idle
            if not conn.closed:
                return conn
            idle = self._idle.get(slot)
        return None

    async def _open(
        self, cluster: ClusterState, ep: EndpointState, key: Hashable, connect: Connect
    ) -> UpstreamConnection:
        cluster.opened(ep)
        try:
            with trio.fail_after(cluster.spec.policy.connect_timeout):
                opened = await connect(ep.endpoint, ep.port, cluster.spec)
        except BaseException as exc:
            cluster.closed(ep)
            if isinstance(exc, trio.TooSlowError):
                raise UpstreamError("connect-failure", "connect timeout") from None
            if isinstance(exc, UpstreamError):
                raise
            if isinstance(exc, Exception):  # any connector's failure (its kind kept if given)
                kind = getattr(exc, "kind", "connect-failure")
                if kind not in ("connect-failure", "refused", "reset"):
                    kind = "connect-failure"
                message = str(exc) or type(exc).__name__
                raise UpstreamError(kind, message, getattr(exc, "transport", "")) from exc
            raise
        # Connect may return the stream itself or an object carrying it as `.stream`.
        stream = getattr(opened, "stream", opened)
        info = None if stream is opened else opened
        return UpstreamConnection(stream, cluster, ep, key, info)

    def _idle_timeout_of(self, conn: UpstreamConnection) -> float:
        """The cluster's DestinationRule `http.idleTimeout` (math.inf: never), else the pool's."""
        timeout = conn.cluster.spec.policy.http_idle_timeout
        return self._idle_timeout if timeout is None else timeout

    def _expired(self, conn: UpstreamConnection, now: float) -> bool:
        return now - conn.idle_since >= self._idle_timeout_of(conn)

    async def sweep(self, interval: float) -> None:
        """Every `interval` seconds: close idle socket connections the server closed or that
        idled out, and start watching idle streams without a socket (watched connections
        see to themselves)."""
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for conns in list(self._idle.values()):
                # oldest first: those over max_idle that stayed idle since the last sweep
                surplus = len(conns) - self._max_idle
                for conn in list(conns):
                    if surplus > 0 and now - conn.idle_since >= interval:
                        surplus -= 1
                        if conn.watch_scope is not None:
                            conn.watch_scope.cancel()
                        self._close_idle(conn)
                        continue
                    if conn.watch_scope is not None:
                        # its watch waits for the idle timeout in force when it started;
                        # a snapshot since may have shortened it (DestinationRule idleTimeout)
                        if self._expired(conn, now):
                            conn.watch_scope.cancel()
                            self._close_idle(conn)
                        continue
                    if self._expired(conn, now) or _readable(conn.stream):
                        self._close_idle(conn)
                    elif getattr(conn.stream, "socket", None) is None:
                        conn.watch_scope = trio.CancelScope()
                        conn.watch_done = trio.Event()
                        self._nursery.start_soon(self._watch, conn)

    def _discard(self, conn: UpstreamConnection) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.cluster.closed(conn.endpoint)
        self._nursery.start_soon(trio.aclose_forcefully, conn.stream)

    def _close_idle(self, conn: UpstreamConnection) -> None:
        """Close a pooled connection that idled out or that the server closed, and tell its
        downstream if the key is dedicated."""
        self._remove_idle(conn)
        self._discard(conn)
        callback = self._on_idle_close.get(conn.key)
        if callback is not None:
            callback()

    def _remove_idle(self, conn: UpstreamConnection) -> None:
        slot = (conn.key, conn.endpoint)
        idle = self._idle.get(slot)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[slot]

    async def _watch(self, conn: UpstreamConnection) -> None:
        assert conn.watch_scope is not None and conn.watch_done is not None
        try:
            with conn.watch_scope:
                with trio.move_on_at(conn.idle_since + self._idle_timeout_of(conn)):
                    with suppress(STREAM_ERRORS):
                        await conn.stream.receive_some(1)
                # Not taken back in time, or the server closed it or spoke out of turn.
                self._close_idle(conn)
        finally:
            conn.watch_done.set()


@asynccontextmanager
async def open_connection_pool(
    connect: Connect | None = None,
    *,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    max_idle: int = DEFAULT_MAX_IDLE,
) -> AsyncIterator[ConnectionPool]:
    """A ConnectionPool for the proxy's lifetime; its idle connections close on exit.
    `connect` is the default for callers that pass none to `acquire`."""
    async with trio.open_nursery() as nursery:
        pool = ConnectionPool(connect, nursery, idle_timeout, max_idle)
        nursery.start_soon(pool.sweep, min(idle_timeout, SWEEP_INTERVAL))
        try:
            yield pool
        finally:
            pool.close_all()
            nursery.cancel_scope.cancel()
