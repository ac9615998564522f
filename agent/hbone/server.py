"""The inbound side of HBONE: the node proxy's mutual-TLS HTTP/2 listener (port 15008).

What flows through: TLS connections from other nodes' proxies come in; each CONNECT stream
on them becomes an `InboundTunnel` (who is asking, which of our identities they asked for,
which pod address) handed to the injected handler, which answers it: `accept` (200, then
bytes flow) or `reject` (401 denied, 503 unreachable, ...). Requests that are not a valid
CONNECT are answered 400 here, without bothering the handler.

Faults stay local: a failed handshake (or none within 10 s), garbage, or malformed HTTP/2
closes that one connection and is counted (`metrics`); a handler that crashes resets only its
stream. A connection with no tunnel for `idle_timeout` (600 s) is closed with GOAWAY NO_ERROR.

Abuse stays bounded: each connection has a `FloodGuard` (common/h2guard.py, the guard the
pod-facing HTTP/2 engine uses too) that ends it with GOAWAY ENHANCE_YOUR_CALM on a
rapid-reset, CONTINUATION, PING or SETTINGS flood, an oversized header block or too many
tunnel requests pending at once; counted by kind
(``meshagent_http2_abuse_total{listener="hbone"}``). A stream the peer reset before its
handler ran never reaches the handler (no pod is dialled for it). The log lines a peer can
cause at will
(bad requests, abuse) are rate-limited.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import h2.errors
import trio
from meshagent.agent.hbone import metrics
from meshagent.agent.hbone.connection import CloseReason, HboneConnection, TunnelStream
from meshagent.agent.hbone.errors import PeerIdentityError
from meshagent.agent.hbone.protocol import BadRequest, ConnectRequest, parse_connect_request
from meshagent.agent.hbone.tls import ALPN, ServerContextSelector, peer_identity
from meshagent.agent.hbone.tlsstream import TlsStream
from meshagent.agent.telemetry.ratelog import RateLimitedLog
from meshagent.common.h2guard import ABUSE, FloodGuard
from meshagent.common.listeners import InFlight, serve_owned
from meshagent.common.spiffe import Identity

__all__ = ["HANDSHAKE_TIMEOUT", "InboundTunnel", "TunnelHandler", "serve_hbone"]

log = logging.getLogger(__name__)
# Lines a peer can make us write at will: a few at once, then a couple a second per kind.
peer_log = RateLimitedLog(log)

HANDSHAKE_TIMEOUT = 10.0
# A connection that carries no tunnel this long is closed (the agent's hbone_idle_timeout_s).
IDLE_TIMEOUT = 600.0
# Answer when the handler crashed or returned without deciding.
_HANDLER_FAILED_STATUS = 500


@dataclass(eq=False)
class InboundTunnel:
    """One CONNECT request on an HBONE connection, waiting for the handler's decision."""

    peer_identity: Identity  # the client's workload identity (its certificate's SPIFFE ID)
    local_identity: Identity  # ours that the client asked for in SNI and we presented
    request: ConnectRequest
    peer_address: tuple[str, int]  # the connecting node proxy's address
    _stream: TunnelStream = field(repr=False)
    _answered: bool = field(default=False, repr=False)

    @property
    def authority(self) -> str:
        """The requested ``podIP:port``, as sent."""
        return self.request.authority

    @property
    def target(self) -> tuple[str, int]:
        """The requested pod address, parsed."""
        return self.request.target

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """The request's regular headers (lowercase names), e.g. ``forwarded``, ``baggage``."""
        return self.request.headers

    @property
    def forwarded_for(self) -> str | None:
        """The original client's IP from ``Forwarded: for=``, if present and well-formed."""
        return self.request.forwarded_for

    @property
    def baggage(self) -> str | None:
        return self.request.baggage

    @property
    def answered(self) -> bool:
        return self._answered

    async def accept(self) -> trio.abc.HalfCloseableStream:
        """Answer 200 and return the tunnel's byte stream (closed when the handler returns).

        Raises `trio.BrokenResourceError` if the client already gave up.
        """
        self._claim()
        metrics.count_stream(metrics.INBOUND_STREAMS, "200")
        await self._stream.respond(200)
        return self._stream

    async def reject(self, status: int) -> None:
        """Refuse the tunnel with ``status`` (401 denied, 503 unreachable, ...)."""
        if not 400 <= status <= 599:
            raise ValueError(f"reject status must be 4xx or 5xx, got {status}")
        self._claim()
        metrics.count_stream(metrics.INBOUND_STREAMS, str(status))
        with contextlib.suppress(trio.BrokenResourceError):  # the client may be gone already
            await self._stream.respond(status)

    def _claim(self) -> None:
        if self._answered:
            raise RuntimeError("this tunnel request was already answered")
        self._answered = True


TunnelHandler = Callable[[InboundTunnel], Awaitable[None]]


async def _run_handler(
    handler: TunnelHandler, tunnel: InboundTunnel, pending: list[int], in_flight: InFlight
) -> None:
    stream = tunnel._stream
    try:
        if stream.finished:  # reset by the peer (or its connection gone) before we started
            return
        await handler(tunnel)
        if not tunnel.answered:
            log.warning("HBONE handler returned without answering %s", tunnel.authority)
            await tunnel.reject(_HANDLER_FAILED_STATUS)
        # A handler that returns has said all it had to say: end the stream after its last
        # byte (END_STREAM, then NO_ERROR if the peer still sends: RFC 9113 8.1), e.g. an HTTP
        # session that ended after an HTTP/1.0 response. Only a failure or a cancellation
        # resets it (below), which drops what the peer had not read yet.
        await stream.aclose()
    except Exception:
        log.exception("HBONE handler failed for %s from %s", tunnel.authority, tunnel.peer_identity)
        if not tunnel.answered:
            await tunnel.reject(_HANDLER_FAILED_STATUS)
    finally:
        pending[0] -= 1
        in_flight.count -= 1
        stream._abort()  # no-op if the tunnel already finished cleanly


async def _answer_bad_request(stream: TunnelStream, reason: str) -> None:
    peer_log.info("bad_request", "HBONE bad request on stream %d: %s", stream.stream_id, reason)
    metrics.count_stream(metrics.INBOUND_STREAMS, "400")
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.respond(400)


def _on_request(
    nursery: trio.Nursery,
    handler: TunnelHandler,
    peer: Identity,
    local: Identity,
    peer_address: tuple[str, int],
    refuse_new: Callable[[], bool] | None,
    pending: list[int],
    activity: list[float],
    in_flight: InFlight,
    stream: TunnelStream,
    headers: list[tuple[bytes, bytes]],
) -> None:
    activity[0] = trio.current_time()
    if refuse_new is not None and refuse_new():
        # Draining: REFUSED_STREAM tells the client nothing was done, so it opens the tunnel
        # over a new connection (to whichever agent or worker accepts on the port now).
        stream._abort(h2.errors.ErrorCodes.REFUSED_STREAM)
        return
    try:
        request = parse_connect_request(headers)
    except BadRequest as exc:
        nursery.start_soon(_answer_bad_request, stream, str(exc))
        return
    abuse = FloodGuard.pending_requests(pending[0] + 1)
    if abuse is not None:  # handlers of streams the peer reset do not count for h2's limit
        stream._conn.end_for_abuse(abuse)
        return
    pending[0] += 1
    # a drain waits for it until its handler returns (the handler counts the tunnel as open
    # only once it relays: it dials the pod first)
    in_flight.count += 1
    tunnel = InboundTunnel(peer, local, request, peer_address, stream)
    nursery.start_soon(_run_handler, handler, tunnel, pending, in_flight)


async def _close_when_idle(
    conn: HboneConnection, activity: list[float], timeout: float, scope: trio.CancelScope
) -> None:
    """End `conn` gracefully (GOAWAY NO_ERROR) once it has had no tunnel open and none
    requested for `timeout` s (checked every eighth of it): a peer cannot keep a TLS connection
    and its buffers here for nothing. Clients release theirs sooner (300 s)."""
    with scope:
        while True:
            await trio.sleep(timeout / 8)
            now = trio.current_time()
            if conn.active_streams:
                activity[0] = now
            elif now - activity[0] >= timeout:
                await conn.aclose()
                return


def _peer_address(stream: trio.abc.Stream) -> tuple[str, int]:
    try:
        return tuple(stream.socket.getpeername()[:2])  # type: ignore[attr-defined,return-value]
    except (AttributeError, OSError):
        return ("?", 0)


async def _serve_connection(
    tcp: trio.abc.Stream,
    *,
    selector: ServerContextSelector,
    handler: TunnelHandler,
    handshake_timeout: float,
    refuse_new: Callable[[], bool] | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
    in_flight: InFlight,
) -> None:
    peer_address = _peer_address(tcp)
    tls = TlsStream(tcp, selector.context, server_side=True)
    try:
        try:
            # a drain waits for a handshake under way: the client's tunnel request follows
            with in_flight.hold(), trio.fail_after(handshake_timeout):
                await tls.do_handshake()
            if tls.selected_alpn_protocol() != ALPN:
                raise PeerIdentityError(f"client did not negotiate ALPN {ALPN}")
            peer = peer_identity(tls)
            local = selector.identity_of(tls.context)
            if local is None:
                raise PeerIdentityError("no local identity was selected")
        except (trio.BrokenResourceError, trio.TooSlowError, PeerIdentityError) as exc:
            metrics.INBOUND_HANDSHAKE_FAILURES.inc()
            log.info("HBONE handshake from %s:%d failed: %s", *peer_address, exc.__cause__ or exc)
            await trio.aclose_forcefully(tls)
            return
        metrics.INBOUND_CONNECTIONS.inc()
        async with trio.open_nursery() as nursery:
            pending = [0]  # tunnel requests whose handler runs
            activity = [trio.current_time()]  # when the last tunnel was requested
            conn = HboneConnection(
                tls,
                client_side=False,
                on_request=partial(
                    _on_request,
                    nursery,
                    handler,
                    peer,
                    local,
                    peer_address,
                    refuse_new,
                    pending,
                    activity,
                    in_flight,
                ),
                guard=FloodGuard(trio.current_time),
            )
            idle = trio.CancelScope()
            nursery.start_soon(_close_when_idle, conn, activity, idle_timeout, idle)
            reason = await conn.run()
            idle.cancel()
            if reason is CloseReason.ABUSE and conn.abuse is not None:
                ABUSE.labels(listener="hbone", kind=conn.abuse.kind).inc()
                peer_log.warning(
                    f"abuse-{conn.abuse.kind}",
                    "HBONE connection from %s:%d (%s) ended with GOAWAY: %s",
                    *peer_address,
                    peer,
                    conn.abuse,
                )
            elif reason is CloseReason.PROTOCOL_ERROR:
                metrics.INBOUND_PROTOCOL_ERRORS.inc()
                log.info("HBONE connection from %s (%s) closed: %s", peer_address, peer, reason)
    except Exception:
        # One connection's bug must not end the listener (trio.serve_listeners would re-raise).
        log.exception("HBONE connection from %s:%d crashed", *peer_address)
        await trio.aclose_forcefully(tls)


async def serve_hbone(
    listen: tuple[str, int] | Sequence[trio.SocketListener],
    *,
    ssl_selector: ServerContextSelector,
    handler: TunnelHandler,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    refuse_new: Callable[[], bool] | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
    in_flight: InFlight | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HBONE on ``listen`` (``(host, port)`` or ready listeners) until cancelled.

    Reports the listeners through ``task_status`` once accepting (so ``port=0`` callers learn
    the port). ``ssl_selector`` picks our certificate by SNI and holds the trust bundle client
    certificates must chain to; ``handler`` decides each tunnel (see `InboundTunnel`).
    While ``refuse_new()`` says so (draining), new streams on open connections are refused.
    ``in_flight`` counts what a drain must wait for besides the tunnels the handler counts:
    connections accepted or in their handshake, and tunnel requests whose handler runs.
    A connection with no tunnel for ``idle_timeout`` s is closed (GOAWAY NO_ERROR).
    """
    if isinstance(listen, tuple):
        host, port = listen
        listeners: list[trio.SocketListener] = await trio.open_tcp_listeners(port, host=host)
    else:
        listeners = list(listen)
    in_flight = in_flight or InFlight()

    async def serve(tcp: trio.SocketStream) -> None:
        try:
            await _serve_connection(
                tcp,
                selector=ssl_selector,
                handler=handler,
                handshake_timeout=handshake_timeout,
                refuse_new=refuse_new,
                idle_timeout=idle_timeout,
                in_flight=in_flight,
            )
        finally:
            await trio.aclose_forcefully(tcp)  # closed already, unless cancelled mid-handshake

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_owned, serve, listeners, in_flight=in_flight))
        task_status.started(listeners)
