"""The outbound side of HBONE: pooled mutual-TLS HTTP/2 connections to other nodes' proxies.

What flows through: a request for a tunnel (source workload identity, destination workload
identity, destination node address, pod ``ip:port``) comes in; a byte stream to that pod,
relayed by the destination node's proxy, goes out.

Connections are pooled per (source identity, destination identity, node address): one
connection carries up to ``max_streams_per_connection`` concurrent streams, the next one
opens when it is full, and a connection without streams for ``idle_timeout`` seconds is
closed. Each connection is dialled and served by a task in the pool's nursery, so a caller
that gives up (cancellation) never breaks a connection other callers are waiting for.

Secure naming: the server must prove the destination identity (its certificate's SPIFFE
ID), chained to the trust bundle of the source's TLS context; otherwise no stream is opened.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from meshagent.agent.hbone import metrics
from meshagent.agent.hbone.connection import (
    ConnectionUnavailable,
    HboneConnection,
    TunnelStream,
)
from meshagent.agent.hbone.errors import (
    PeerIdentityError,
    SecureNamingError,
    TunnelFailed,
    TunnelRefused,
)
from meshagent.agent.hbone.protocol import MAX_CONCURRENT_STREAMS, connect_request_headers
from meshagent.agent.hbone.tls import ALPN, peer_identity
from meshagent.agent.hbone.tlsstream import TlsStream
from meshagent.common.spiffe import Identity, sni_for

__all__ = ["PoolKey", "PoolKeyStats", "TunnelPool", "open_tunnel_pool"]

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 300.0
CONNECT_TIMEOUT = 10.0
RESPONSE_TIMEOUT = 10.0
# A full or closing connection is skipped and another chosen; a few rounds cover races.
_OPEN_ATTEMPTS = 3

ConnectFn = Callable[[tuple[str, int]], Awaitable[trio.abc.Stream]]


async def _open_tcp(addr: tuple[str, int]) -> trio.abc.Stream:
    return await trio.open_tcp_stream(*addr)


@dataclass(frozen=True)
class PoolKey:
    """What a pooled connection is shared by."""

    source: Identity
    destination: Identity
    node_addr: tuple[str, int]


@dataclass(frozen=True)
class PoolKeyStats:
    """Pool occupancy for one key: TLS connections (including ones being dialled), streams."""

    connections: int
    streams: int


class _Pooled:
    """One pool slot: a connection being dialled or serving, and its stream reservations."""

    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self.reserved = 0  # streams open or being opened on this connection
        self.usable = True
        self.ready = trio.Event()
        self.conn: HboneConnection | None = None
        self.error: BaseException | None = None
        self.idle_deadline = math.inf
        self.idle_scope: trio.CancelScope | None = None

    def has_room(self, limit: int) -> bool:
        if not self.usable:
            return False
        if self.conn is not None:
            if not self.conn.is_open:
                return False
            limit = min(limit, self.conn.max_outbound_streams)
        return self.reserved < limit

    def _set_idle_deadline(self, deadline: float) -> None:
        self.idle_deadline = deadline
        if self.idle_scope is not None:
            self.idle_scope.deadline = deadline

    def acquire(self) -> None:
        self.reserved += 1
        if self.reserved == 1:
            self._set_idle_deadline(math.inf)

    def release_after(self, idle_timeout: float) -> Callable[[], None]:
        def release() -> None:
            self.reserved -= 1
            if self.reserved == 0:
                self._set_idle_deadline(trio.current_time() + idle_timeout)

        return release


class TunnelPool:
    """Opens HBONE tunnels over pooled connections; make one with `open_tunnel_pool`."""

    def __init__(
        self,
        nursery: trio.Nursery,
        ssl_context_for_source: Callable[[Identity], ssl.SSLContext],
        *,
        max_streams_per_connection: int = MAX_CONCURRENT_STREAMS,
        idle_timeout: float = IDLE_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        response_timeout: float = RESPONSE_TIMEOUT,
        connect: ConnectFn = _open_tcp,
    ) -> None:
        if max_streams_per_connection < 1:
            raise ValueError("max_streams_per_connection must be at least 1")
        self._nursery = nursery
        self._ssl_context_for_source = ssl_context_for_source
        self._max_streams = max_streams_per_connection
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._response_timeout = response_timeout
        self._connect = connect
        self._pools: dict[PoolKey, list[_Pooled]] = {}
        self._closed = False

    def stats(self) -> dict[PoolKey, PoolKeyStats]:
        """Connections and active streams per key, for metrics and ``meshagent status``."""
        return {
            key: PoolKeyStats(
                connections=len(pooled),
                streams=sum(p.conn.active_streams for p in pooled if p.conn is not None),
            )
            for key, pooled in self._pools.items()
            if pooled
        }

    async def open_stream(
        self,
        *,
        source: Identity,
        destination: Identity,
        node_addr: tuple[str, int],
        authority: str,
        forwarded_for: str,
        baggage: str | None = None,
        protocol: str | None = None,
    ) -> trio.abc.HalfCloseableStream:
        """Open a tunnel to ``authority`` (pod ``ip:port``) through ``node_addr``'s proxy.

        Presents ``source``'s certificate and requires the server to prove ``destination``.
        Returns the tunnel once the peer answered 200; the caller owns it (``aclose`` it).
        Raises `TunnelRefused` (the peer's non-200 status), `SecureNamingError`,
        `TunnelFailed` (connect, TLS, HTTP/2, timeouts) or `ValueError` for bad arguments.
        """
        if self._closed:
            raise TunnelFailed("tunnel pool is closed")
        headers = connect_request_headers(authority, forwarded_for, baggage, protocol)
        sni_for(destination)  # raises early if the identity cannot be named in SNI
        key = PoolKey(source, destination, node_addr)
        for _ in range(_OPEN_ATTEMPTS):
            pooled = self._reserve(key)
            release = pooled.release_after(self._idle_timeout)
            try:
                if not pooled.ready.is_set():  # a pooled connection's is: no round trip
                    await pooled.ready.wait()
                if pooled.conn is None:
                    raise _dial_failure(pooled)
                stream = pooled.conn.start_request(headers)
            except ConnectionUnavailable:
                release()
                continue
            except BaseException as exc:
                release()
                if isinstance(exc, TunnelFailed):
                    metrics.count_stream(metrics.OUTBOUND_STREAMS, "error")
                raise
            stream.set_on_done(release)
            try:
                status = await self._await_response(stream, node_addr)
            except TunnelFailed:
                stream._abort()
                # The peer drains (REFUSED_STREAM), or a connection it had taken (its SETTINGS
                # came) ended before it answered (a replaced worker exiting as the request
                # arrived): nothing went through a tunnel that never said 200, so it is asked
                # for again over a new connection. A peer that refused the connection itself
                # (our certificate) sent no SETTINGS: that failure is final.
                conn = pooled.conn
                if stream.refused or (conn.close_reason is not None and conn.peer_settings_seen):
                    self._forget(pooled)
                    continue
                raise
            except BaseException:
                stream._abort()
                raise
            metrics.count_stream(metrics.OUTBOUND_STREAMS, str(status))
            if status != 200:
                stream._abort()
                raise TunnelRefused(status)
            return stream
        metrics.count_stream(metrics.OUTBOUND_STREAMS, "error")
        raise TunnelFailed(f"no HBONE connection to {node_addr} could take another stream")

    async def _await_response(self, stream: TunnelStream, node_addr: tuple[str, int]) -> int:
        try:
            with trio.fail_after(self._response_timeout):
                return await stream.wait_response()
        except trio.TooSlowError:
            metrics.count_stream(metrics.OUTBOUND_STREAMS, "error")
            raise TunnelFailed(
                f"no CONNECT response from {node_addr} within {self._response_timeout}s"
            ) from None
        except TunnelFailed:
            metrics.count_stream(metrics.OUTBOUND_STREAMS, "error")
            raise

    def _reserve(self, key: PoolKey) -> _Pooled:
        """A slot on a connection with room for one more stream, dialling one if needed."""
        pooled_list = self._pools.setdefault(key, [])
        for pooled in pooled_list:
            if pooled.has_room(self._max_streams):
                pooled.acquire()
                return pooled
        pooled = _Pooled(key)
        pooled_list.append(pooled)
        pooled.acquire()
        self._nursery.start_soon(self._run_connection, pooled)
        return pooled

    def _forget(self, pooled: _Pooled) -> None:
        pooled.usable = False
        pooled_list = self._pools.get(pooled.key)
        if pooled_list is not None and pooled in pooled_list:
            pooled_list.remove(pooled)
            if not pooled_list:
                del self._pools[pooled.key]

    async def _run_connection(self, pooled: _Pooled) -> None:
        """Dial, then serve the connection until it ends or stays idle too long."""
        try:
            try:
                pooled.conn = await self._dial(pooled.key)
            except Exception as exc:
                pooled.error = exc
                log.info("HBONE connection to %s failed: %s", pooled.key.node_addr, exc)
                return
            finally:
                if pooled.conn is None:
                    self._forget(pooled)
                    if pooled.error is None:  # cancelled: the pool is closing
                        pooled.error = TunnelFailed("tunnel pool closed while connecting")
                pooled.ready.set()
            metrics.OUTBOUND_CONNECTIONS.inc()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._close_when_idle, pooled, pooled.conn)
                reason = await pooled.conn.run()
                nursery.cancel_scope.cancel()
            log.debug("HBONE connection to %s ended: %s", pooled.key.node_addr, reason.value)
        finally:
            self._forget(pooled)

    async def _close_when_idle(self, pooled: _Pooled, conn: HboneConnection) -> None:
        if pooled.reserved == 0:
            pooled.idle_deadline = trio.current_time() + self._idle_timeout
        while True:
            with trio.CancelScope(deadline=pooled.idle_deadline) as scope:
                pooled.idle_scope = scope
                await trio.sleep_forever()
            pooled.idle_scope = None
            if pooled.reserved == 0 and trio.current_time() >= pooled.idle_deadline:
                break
        self._forget(pooled)
        log.debug("closing idle HBONE connection to %s", pooled.key.node_addr)
        await conn.aclose()

    async def _dial(self, key: PoolKey) -> HboneConnection:
        """TCP connect, TLS handshake, ALPN and secure-naming checks; raise `TunnelFailed`."""
        stage = "connect"
        transport: trio.abc.Stream | None = None
        try:
            with trio.fail_after(self._connect_timeout):
                transport = await self._connect(key.node_addr)
                stage = "tls"
                ctx = self._ssl_context_for_source(key.source)
                tls = TlsStream(transport, ctx, server_hostname=sni_for(key.destination))
                transport = tls
                await tls.do_handshake()
                if tls.selected_alpn_protocol() != ALPN:
                    raise TunnelFailed(f"{key.node_addr} did not negotiate ALPN {ALPN}")
                peer = peer_identity(tls)
                if peer != key.destination:
                    stage = "secure_naming"
                    raise SecureNamingError(key.destination, peer)
            return HboneConnection(tls, client_side=True)
        except BaseException as exc:
            if transport is not None:
                await trio.aclose_forcefully(transport)
            if isinstance(exc, trio.TooSlowError):
                stage = "timeout"
            if isinstance(exc, Exception):
                metrics.OUTBOUND_CONNECT_FAILURES.labels(stage=stage).inc()
            if isinstance(exc, TunnelFailed):
                raise
            if isinstance(exc, trio.TooSlowError):
                raise TunnelFailed(
                    f"HBONE connect to {key.node_addr} timed out after {self._connect_timeout}s"
                ) from None
            if isinstance(exc, OSError | trio.BrokenResourceError | PeerIdentityError):
                detail = exc.__cause__ or exc
                raise TunnelFailed(f"HBONE {stage} to {key.node_addr} failed: {detail}") from exc
            raise


def _dial_failure(pooled: _Pooled) -> TunnelFailed:
    error = pooled.error
    if isinstance(error, TunnelFailed):
        return error
    failure = TunnelFailed(f"HBONE connection to {pooled.key.node_addr} failed: {error}")
    failure.__cause__ = error
    return failure


@asynccontextmanager
async def open_tunnel_pool(
    ssl_context_for_source: Callable[[Identity], ssl.SSLContext],
    *,
    max_streams_per_connection: int = MAX_CONCURRENT_STREAMS,
    idle_timeout: float = IDLE_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
    response_timeout: float = RESPONSE_TIMEOUT,
    connect: ConnectFn = _open_tcp,
) -> AsyncIterator[TunnelPool]:
    """A `TunnelPool` whose connections live in a nursery owned by this context.

    ``ssl_context_for_source(identity)`` returns the client context presenting that workload's
    certificate (see `tls.client_context`); the caller caches and renews them. ``connect``
    opens the TCP stream to a node (default: `trio.open_tcp_stream`). Leaving the context
    closes every connection; tunnels still open break.
    """
    async with trio.open_nursery() as nursery:
        pool = TunnelPool(
            nursery,
            ssl_context_for_source,
            max_streams_per_connection=max_streams_per_connection,
            idle_timeout=idle_timeout,
            connect_timeout=connect_timeout,
            response_timeout=response_timeout,
            connect=connect,
        )
        try:
            yield pool
        finally:
            pool._closed = True
            nursery.cancel_scope.cancel()
