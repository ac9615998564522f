"""The HTTP/1.1 engine: one downstream connection in, requests routed and balanced per request.

What flows through, per request on a keep-alive client connection (the `wire` codec, h11's
model at a fraction of its cost, on both sides):
request head -> path normalization (common/pathnorm.py; 400 when impossible) -> optional
`request_filter` (may answer itself: authorization, ...) -> route match
-> fault injection (delay DI, abort FI) -> weighted cluster -> endpoint (lb) -> pooled upstream
connection -> request forwarded, body streamed -> response head -> retry or stream the response
back -> a RequestRecord to `on_request_done`.

Bodies are streamed, never buffered whole: up to `retry_buffer_limit` bytes are read first so a
request can be replayed; a request with a larger body gets a single attempt. Envoy's semantics:
the route timeout runs from the end of the request body to the end of the response (504 UT
before the response head; after it, the client connection is closed); the per-try timeout runs
until the response head. Retries choose another endpoint while one is left. Failures before a
response: connect 503 UF, reset 503 UC, invalid response 503 UPE, circuit breaker 503 UO, no
healthy endpoint 503 UH, unknown destination 503 NC, no route 404 NR; URX is added when the
retry budget ran out on a retriable outcome. A malformed request gets its 4xx (usually 400,
flag DPE) with a body naming the problem in plain words, and the connection is closed. Upgrades
(WebSocket) are relayed as bytes after the 101.

Slow and idle clients: a request head not complete `request_header_timeout` after its first
byte (a slowloris) gets 408 and the connection closes; a keep-alive connection with no request
begun for `client_idle_timeout` is closed. Each source (`HttpContext.source_key`) has at most
`Limits.max_pending_requests` requests in flight in this process; one more gets 503 UO. The 408,
the 400 and the 503 are counted and logged (rate-limited) by `HttpContext.limits`.

HTTP/1.x passes as it came: an HTTP/1.0 request goes upstream as 1.0 (keep-alive only with
`Connection: keep-alive`); `Expect: 100-continue` goes to the server, whose 100 Continue (or
final answer) comes back: the mesh never answers 100 itself, so a request with it streams its
body and gets no retries. `Upgrade: h2c` (with HTTP2-Settings) is dropped and the request served
as HTTP/1.1, as Envoy does by default: the connection never switches; a client wanting HTTP/2
uses prior knowledge, which the HTTP/2 engine serves on the same ports.

A cluster whose DestinationRule says `h2UpgradePolicy: UPGRADE` gets its requests (except
upgrades and CONNECT) as HTTP/2 streams: on connections the HTTP/2 engine's upstream side
(`H2Upstreams`, opened through `HttpContext.connect_h2`) keeps for this client connection, the
request head translated by `h2upgrade`, the answer sent back as HTTP/1.1 without its trailers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import h2.events
import trio
from meshagent.agent import sockio
from meshagent.agent.proxy.http import h2upgrade, h2wire, localhop, wire
from meshagent.agent.proxy.http import headers as hdrs
from meshagent.agent.proxy.http.decide import RouteDecision, decide
from meshagent.agent.proxy.http.h2proxy import (
    H2_ERRORS,
    H2Events,
    H2Inbox,
    H2Peer,
    H2Upstreams,
    StreamGone,
)
from meshagent.agent.proxy.http.mirror import mirror_http1, shadow_headers
from meshagent.agent.proxy.http.pool import RECEIVE_SIZE, UpstreamConnection
from meshagent.agent.proxy.http.retry import Outcome, backoff, retriable, retriable_status
from meshagent.agent.proxy.http.types import (
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
from meshagent.agent.proxy.limits import BAD_REQUEST, HEADER_TIMEOUT, SOURCE_PENDING_REQUESTS
from meshagent.agent.proxy.relay import relay
from meshagent.agent.proxy.routing import HttpRoute, HttpRoutes, RetryPolicy
from meshagent.common.pathnorm import InvalidPath, PathNormalization, normalize_target

log = logging.getLogger(__name__)

CLIENT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_EMPTY: dict[str, str] = {}


async def linger(client: trio.abc.Stream, limit: int) -> None:
    """Envoy's delayed close: after a reply to a request we did not read in full, end our side
    and drop what the client still sends (up to `limit` bytes, 1 s), so that closing with unread
    bytes does not reset the connection before the client has read the reply."""
    if not isinstance(client, trio.abc.HalfCloseableStream):
        return
    left = limit
    with trio.move_on_after(1.0), contextlib.suppress(*CLIENT_ERRORS, trio.BusyResourceError):
        await client.send_eof()
        while left > 0 and (data := await client.receive_some(RECEIVE_SIZE)):
            left -= len(data)


_RESET_BEFORE_HEADERS = b"upstream connect error or disconnect/reset before headers. reset reason: "
# Envoy's local replies for failures before a response: status, flag, body.
_FAILURES: dict[Outcome, tuple[int, str, bytes]] = {
    Outcome.CONNECT_FAILURE: (503, "UF", _RESET_BEFORE_HEADERS + b"connection failure"),
    Outcome.RESET: (503, "UC", _RESET_BEFORE_HEADERS + b"connection termination"),
    Outcome.PROTOCOL: (503, "UPE", _RESET_BEFORE_HEADERS + b"protocol error"),
    Outcome.OVERFLOW: (503, "UO", _RESET_BEFORE_HEADERS + b"overflow"),
    Outcome.TIMEOUT: (504, "UT", b"upstream request timeout"),
}
# The status's words before the problem in a malformed request's body (Envoy's DPE replies).
_REJECT_WORDS = {431: "request header fields too large", 501: "not implemented"}
# Methods safe to send again when a reused connection failed before any response byte.
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_STALE_REPLAYS = 3  # connections tried per attempt when pooled ones turn out closed
_OUTLIER_CODE = {
    Outcome.CONNECT_FAILURE: CONNECT_FAILURE_CODE,
    Outcome.RESET: RESET_CODE,
    Outcome.PROTOCOL: RESET_CODE,
    Outcome.TIMEOUT: TIMEOUT_CODE,
}


def _edited(req: wire.Request, d: RouteDecision) -> wire.Request:
    """The request as the route's rewrite and header operations make it."""
    headers = d.edit_request(req.headers)
    if d.authority is not None:
        host = d.authority.encode("latin-1")
        headers = [(b"host", host), *((n, v) for n, v in headers if n != b"host")]
    target = req.target if d.target is None else d.target.encode("latin-1")
    return wire.Request(
        method=req.method, target=target, headers=headers, http_version=req.http_version
    )


class _NoScope:
    """Stands in for the CancelScope of a timeout the route does not set (most routes set
    none): entering real scopes twice per request cost more than the rest of the timers."""

    __slots__ = ()
    cancel_called = False

    def __enter__(self) -> _NoScope:
        return self

    def __exit__(self, *exc: object) -> bool:
        return False


_NO_SCOPE = _NoScope()


class _HeaderTimeout:
    """What `_read_head` returns for a head not complete in time."""


_HEAD_TIMED_OUT = _HeaderTimeout()
_NO_LIMIT = contextlib.nullcontext(True)
_TOO_MANY_PENDING = LocalResponse(503, b"too many requests in flight from this source")


class _ClientGone(Exception):
    """The client closed, reset or garbled its connection: stop, close it, log DC."""


class _CloseClient(Exception):
    """The response cannot be completed (upstream died mid-response, timeout after the
    head): close the client connection so it sees a truncated response, not a wrong one."""


@dataclass(slots=True)
class _Attempt:
    """What one attempt came to, carried out of its nursery."""

    outcome: Outcome | None = None
    status: int | None = None
    reusable: bool = False
    error: Exception | None = None
    sent: trio.Event = field(default_factory=trio.Event)  # done sending (or given up)
    sent_all: bool = False  # the whole request reached the upstream's socket
    cancel: Callable[[], None] = lambda: None

    def settle(self, deadline: trio.CancelScope | _NoScope) -> None:
        """Once the try is over: cut by the route timeout before any answer is TIMEOUT."""
        if self.status is None and self.outcome is None and deadline.cancel_called:
            self.outcome = Outcome.TIMEOUT

    def outlier_status(self, stale: bool = False) -> int | None:
        """What outlier detection learns about the endpoint (None: nothing, as when the
        client went away before an answer or a stale pooled connection was replayed)."""
        if stale or (self.error is not None and self.status is None):
            return None
        if self.outcome is not None and self.outcome is not Outcome.STATUS:
            return _OUTLIER_CODE.get(self.outcome)
        return self.status


@dataclass(slots=True)
class _Body:
    """The request body as far as read: kept chunks, and whether the client finished."""

    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    complete: bool = False
    # (scope, seconds): timers that start when the body is complete (route/per-try timeouts)
    timers: list[tuple[trio.CancelScope, float]] = field(default_factory=list)

    def arm(self, scope: trio.CancelScope | _NoScope, seconds: float | None) -> None:
        if seconds is None or not isinstance(scope, trio.CancelScope):
            return
        if self.complete:
            scope.deadline = trio.current_time() + seconds
        else:
            self.timers.append((scope, seconds))

    def finished(self) -> None:
        self.complete = True
        now = trio.current_time()
        for scope, seconds in self.timers:
            scope.deadline = min(scope.deadline, now + seconds)
        self.timers.clear()


def _in_pods_place(hop: localhop.Hop | None, state: _Attempt) -> LocalResponse | None:
    """What the destination's engine answered in a same-node pod's place when the pod reset or
    garbled the exchange before a response (its 503 UC or UPE, as through a tunnel): for the
    source an endpoint's 503, which its retry policy may retry (Istio's default retries 503,
    not resets)."""
    if hop is None or state.error is not None:
        return None
    if state.outcome is not Outcome.RESET and state.outcome is not Outcome.PROTOCOL:
        return None
    code, flag, text = _FAILURES[state.outcome]
    return LocalResponse(code, text, flags=(flag,))


def _hop_finished(hop: localhop.Hop, record: RequestRecord, state: _Attempt) -> None:
    """Report an attempt on a same-node pod as its destination: the pod's answer (or the one
    held back for a retry), else nothing went back (the source gave up: DC)."""
    if state.outcome is None or state.outcome is Outcome.STATUS:
        localhop.finish(hop, record, state.status or 0)
    else:
        localhop.finish(hop, record, 0)


def _not_acquired(
    exc: Overflow | UpstreamError, cluster: ClusterState, ep: EndpointState, record: RequestRecord
) -> Outcome:
    """The outcome of a try that got no upstream: its pool was full (not the endpoint's
    fault), or the connection failed (reported to outlier detection)."""
    if isinstance(exc, Overflow):
        return Outcome.OVERFLOW
    cluster.report(ep, CONNECT_FAILURE_CODE)
    record.transport_failure = exc.transport
    return Outcome.CONNECT_FAILURE


async def _carried(
    state: _Attempt,
    exchange: Callable[[trio.Nursery | None], Awaitable[None]],
    *,
    body_sender: bool,
) -> None:
    """Run one try's exchange, HTTP/1.1 or HTTP/2 alike. With ``body_sender`` it gets a
    nursery for a concurrent body sender, cancelled when the exchange ends. A client that
    cannot go on (_ClientGone, _CloseClient) is carried out in ``state.error``, not raised
    through the nursery (trio would wrap it in an ExceptionGroup), so the caller settles
    the try and releases the upstream before raising it."""
    if not body_sender:
        try:
            await exchange(None)
        except (_ClientGone, _CloseClient) as exc:
            state.error = exc
        return
    async with trio.open_nursery() as nursery:
        state.cancel = nursery.cancel_scope.cancel
        try:
            await exchange(nursery)
        except (_ClientGone, _CloseClient) as exc:
            state.error = exc
        nursery.cancel_scope.cancel()  # the body sender, if still running


async def proxy_http1(
    client: trio.abc.Stream, ctx: HttpContext, *, initial: bytes = b"", begun: float | None = None
) -> None:
    """Serve HTTP/1.1 on `client` until it closes or idles out (`initial`: bytes already read
    from it, the first at trio time `begun`, for the header timeout). Never raises for anything
    the client or an upstream does; the caller still owns (and closes) `client`."""
    session = _Session(client, ctx)
    if initial:
        session.conn.receive_data(initial)
        now = trio.current_time()
        session.begun = now if begun is None else min(begun, now)
    async with trio.open_nursery() as nursery:  # owns the mirrored copies (mirror.py)
        session.nursery = nursery
        try:
            await session.run()
        except (_ClientGone, _CloseClient, *CLIENT_ERRORS):
            pass
        except Exception:  # a bug here must cost one connection, not the listener
            log.exception("HTTP session from %s failed", ctx.peer or "?")
        finally:
            if session.h2 is not None:  # their readers end with their transports
                await session.h2.aclose()


class _Session:
    def __init__(self, client: trio.abc.Stream, ctx: HttpContext) -> None:
        self.client = client
        self.ctx = ctx
        self.settings = ctx.settings
        self.conn = wire.Connection(
            wire.SERVER, max_incomplete_event_size=ctx.settings.max_header_bytes
        )
        self.skip_drain = False
        self.expect_continue = False  # the request's `Expect: 100-continue` awaits the server
        self.served = 0  # requests answered on this connection
        self.nursery: trio.Nursery | None = None
        self.decision: RouteDecision | None = None  # the current request's (response edits)
        self.begun: float | None = None  # when the first byte of the pending head came
        # h2UpgradePolicy UPGRADE: the HTTP/2 connections this connection's requests went on
        # (the HTTP/2 engine's upstream side, in `nursery`), and whether this request does
        self.h2: H2Upstreams | None = None
        self.upgrade_h2 = False

    # -- downstream I/O -------------------------------------------------------------------

    async def _receive(self) -> wire.Event:
        while True:
            event = self.conn.next_event()
            if event is not wire.NEED_DATA:
                return event
            try:
                data = await sockio.receive_some(self.client, RECEIVE_SIZE, False)
            except CLIENT_ERRORS as exc:
                raise _ClientGone from exc
            self.conn.receive_data(data)

    async def _body_event(self) -> wire.Event:
        """The next request body event; a client that breaks off mid-body is gone."""
        try:
            event = await self._receive()
        except wire.RemoteProtocolError as exc:
            raise _ClientGone from exc
        if isinstance(event, wire.ConnectionClosed):
            raise _ClientGone
        return event

    async def _send(self, event: wire.Event) -> None:
        await self._send_bytes(self.conn.send(event))

    async def _send_bytes(self, data: bytes | bytearray | None) -> None:
        if data:
            try:
                await sockio.send_all(self.client, data)
            except CLIENT_ERRORS as exc:
                raise _ClientGone from exc

    async def _read_head(self) -> wire.Event | _HeaderTimeout | None:
        """The next request head (or ConnectionClosed); None when the client idled out or went
        away, `_HEAD_TIMED_OUT` when its head was not complete in time. Waits up to
        client_idle_timeout for a request to begin, then request_header_timeout (from its first
        byte) for the rest of its head."""
        started = self.begun is not None  # bytes of it came before (`proxy_http1`'s initial)
        if self.begun is not None:
            deadline = self.begun + self.settings.request_header_timeout
        else:
            deadline = trio.current_time() + self.settings.client_idle_timeout
        drain = self.ctx.drain
        while True:
            event = self.conn.next_event()
            if event is not wire.NEED_DATA:
                return event
            # A drain ends a keep-alive wait like the idle timeout; a connection's first
            # request (it may be on its way: the connection was accepted) is still served.
            watched = drain if drain is not None and self.served and not started else None
            with trio.move_on_at(deadline) as wait:
                if watched is not None:
                    watched.watch(wait)
                try:
                    # before a head begins the client waits for our answer: its socket is
                    # empty, so wait for it first (sockio)
                    data = await sockio.receive_some(self.client, RECEIVE_SIZE, not started)
                except CLIENT_ERRORS:
                    return None
                finally:
                    if watched is not None:
                        watched.unwatch(wait)
                if data and not started:
                    started = True
                    deadline = trio.current_time() + self.settings.request_header_timeout
                self.conn.receive_data(data)
                continue
            return _HEAD_TIMED_OUT if started else None

    # -- connection loop ------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                event = await self._read_head()
            except wire.RemoteProtocolError as exc:
                await self._reject(exc)
                return
            if event is _HEAD_TIMED_OUT:
                await self._header_timeout()
                return
            if not isinstance(event, wire.Request):
                return  # closed, or idle too long
            if not await self._handle(event):
                return
            if not await self._finish_cycle():
                return
            self.served += 1
            if self.ctx.drain is not None and self.ctx.drain.draining:
                return  # draining: close after the response (the client retries elsewhere)

    def _refused(self, why: str, detail: str) -> None:
        if self.ctx.limits is not None:
            self.ctx.limits.refused(self.ctx.listener, why, self.ctx.peer, detail)

    async def _header_timeout(self) -> None:
        """A slowloris: 408 (Envoy's words), then the caller closes the connection."""
        seconds = self.settings.request_header_timeout
        self._refused(HEADER_TIMEOUT, f"request head not complete within {seconds:g} s")
        record = RequestRecord("", "", "", peer=self.ctx.peer, start=time.time())
        if self.conn.our_state in (wire.IDLE, wire.SEND_RESPONSE):
            resp = LocalResponse(408, b"request header timeout", ((b"connection", b"close"),))
            with contextlib.suppress(_ClientGone, _CloseClient, wire.LocalProtocolError):
                await self._local(record, resp)
                await self._linger()
        self._done(record)

    async def _reject(self, exc: wire.RemoteProtocolError) -> None:
        """Answer a malformed request with its 4xx, then the caller closes the connection."""
        self._refused(BAD_REQUEST, str(exc))
        status = exc.error_status_hint or 400
        record = RequestRecord("", "", "", peer=self.ctx.peer, start=time.time())
        record.flags.append("DPE")
        if self.conn.our_state in (wire.IDLE, wire.SEND_RESPONSE):
            words = _REJECT_WORDS.get(status, "bad request")
            body = f"{words}: {exc}\n".encode()[:512]
            extra = ((b"connection", b"close"),)
            with contextlib.suppress(_ClientGone, wire.LocalProtocolError):
                await self._local(record, LocalResponse(status, body, extra))
                await self._linger()
        self._done(record)

    async def _linger(self) -> None:
        await linger(self.client, self.settings.drain_limit)

    async def _finish_cycle(self) -> bool:
        """After a response: read and drop what is left of the request body (bounded), then
        get ready for the next request. False when the connection must close instead."""
        conn = self.conn
        if conn.our_state is not wire.DONE:
            return False
        if conn.their_state is wire.SEND_BODY:
            if self.skip_drain:
                return False
            left = self.settings.drain_limit
            with trio.move_on_after(self.settings.drain_timeout):
                while conn.their_state is wire.SEND_BODY and left >= 0:
                    event = await self._body_event()
                    if isinstance(event, wire.Data):
                        left -= len(event.data)
            if conn.their_state is not wire.DONE:
                return False
        if conn.their_state is not wire.DONE:
            return False
        conn.start_next_cycle()
        return True

    # -- one request ----------------------------------------------------------------------

    async def _handle(self, req: wire.Request) -> bool:
        """Serve one request; False when the connection must close afterwards."""
        if self.settings.path_normalization is not PathNormalization.NONE:
            normalized = await self._normalize(req)
            if normalized is None:
                return False
            req = normalized
        host = next((v for n, v in req.headers if n == b"host"), b"")
        info = RequestInfo(
            method=req.method.decode("ascii", "replace"),
            target=req.target.decode("latin-1"),
            authority=host.decode("latin-1"),
            headers=req.headers,
            peer=self.ctx.peer,
        )
        record = RequestRecord(info.method, info.target, info.authority, self.ctx.peer, time.time())
        self.skip_drain = False
        self.begun = None
        started = trio.current_time()
        keep = True
        limits = self.ctx.limits
        pending = limits.pending_request(self.ctx.source_key) if limits else _NO_LIMIT
        try:
            with pending as admitted:
                if admitted:
                    await self._process(req, info, record)
                else:
                    assert limits is not None
                    self._refused(
                        SOURCE_PENDING_REQUESTS,
                        f"{limits.max_pending_requests} requests of this source in flight",
                    )
                    await self._local(record, _TOO_MANY_PENDING, "UO")
        except _ClientGone:
            record.flags.append("DC")
            keep = False
        except _CloseClient:
            keep = False
        finally:
            record.duration = trio.current_time() - started
            self._done(record)
        return keep

    async def _normalize(self, req: wire.Request) -> wire.Request | None:
        """The request with its path normalized (the same object when nothing changes), before
        anything reads the path: the filter (authorization), routes and the upstream all see
        the normalized one. A path that cannot be normalized gets 400 and None."""
        if req.method == b"CONNECT":
            return req  # authority-form: no path
        text = req.target.decode("latin-1")
        try:
            target, authority = normalize_target(text, self.settings.path_normalization)
        except InvalidPath as exc:
            record = RequestRecord(
                req.method.decode("ascii", "replace"), text, "", self.ctx.peer, time.time()
            )
            body = f"bad request: {exc}\n".encode()[:512]
            resp = LocalResponse(400, body, ((b"connection", b"close"),))
            with contextlib.suppress(_ClientGone, _CloseClient, wire.LocalProtocolError):
                await self._local(record, resp)
            self._done(record)
            return None
        if authority is None:
            if target == text:
                return req
            headers = req.headers
        else:  # absolute form: its authority is the host (RFC 9112 section 3.2.2)
            headers = [(b"host", authority.encode("latin-1"))]
            headers += [(n, v) for n, v in req.headers if n != b"host"]
        return wire.Request(
            method=req.method,
            target=target.encode("latin-1"),
            headers=headers,
            http_version=req.http_version,
        )

    def _done(self, record: RequestRecord) -> None:
        if self.ctx.on_request_done is not None:
            try:
                self.ctx.on_request_done(record)
            except Exception:
                log.exception("on_request_done failed")

    async def _local(
        self, record: RequestRecord, resp: LocalResponse, flag: str = "", upstream: bool = False
    ) -> None:
        """Send a response the proxy makes itself (`upstream`: one the same-node destination
        made, passed on as an endpoint's response: the route's response edits apply)."""
        if flag:
            record.flags.append(flag)
        record.flags.extend(resp.flags)
        if self.conn.our_state is not wire.SEND_RESPONSE and self.conn.our_state is not wire.IDLE:
            raise _CloseClient  # a response already started: all we can do is close
        if self.conn.client_is_waiting_for_100_continue:
            self.skip_drain = True  # the client may never send that body
        headers = [
            (b"content-length", str(len(resp.body)).encode()),
            *([(b"content-type", b"text/plain")] if resp.body else []),
            *resp.headers,
        ]
        if upstream:
            headers = self._response_headers(headers)
        out = bytearray(self.conn.send(wire.Response(status_code=resp.status, headers=headers)))
        if resp.body:
            out += self.conn.send(wire.Data(data=resp.body))
        out += self.conn.send(wire.EndOfMessage())
        record.status = resp.status
        await self._send_bytes(out)

    async def _process(self, req: wire.Request, info: RequestInfo, record: RequestRecord) -> None:
        d = self.decision = await decide(self.ctx, info, record)
        if d.local is not None:
            await self._local(record, d.local, d.flag)
            return
        assert d.routes is not None and d.route is not None and d.cluster is not None
        if d.target is not None or d.authority is not None or d.request_ops:
            req = _edited(req, d)
        await self._forward(req, d.routes, d.route, d.cluster, record)

    async def _forward(
        self,
        req: wire.Request,
        routes: HttpRoutes,
        route: HttpRoute,
        cluster: ClusterState,
        record: RequestRecord,
    ) -> None:
        # Expect: 100-continue goes to the server, which decides: the body is streamed once the
        # client sends it (after the server's 100 Continue comes back, or its own timeout)
        self.expect_continue = self.conn.client_is_waiting_for_100_continue
        body = _Body() if self.expect_continue else await self._prefetch(record)
        client_headers = req.headers
        upgrade = hdrs.upgrade_protocol(client_headers)
        if upgrade is not None and hdrs.is_h2c_upgrade(client_headers):
            client_headers = hdrs.h2c_upgrade(client_headers)  # served as HTTP/1.1 (Envoy)
            upgrade = hdrs.upgrade_protocol(client_headers)
        headers = hdrs.request_headers(
            client_headers,
            default_host=f"{routes.hostname}:{routes.port}".encode(),
            upgrade=upgrade,
        )
        if req.http_version == b"1.0" and b"keep-alive" in hdrs.connection_tokens(req.headers):
            headers = [*headers, (b"connection", b"keep-alive")]  # 1.0 keeps only when asked
        upstream_req = wire.Request(
            method=req.method, target=req.target, headers=headers, http_version=req.http_version
        )
        self.upgrade_h2 = (
            cluster.spec.policy.h2_upgrade
            and self.ctx.connect_h2 is not None
            and h2upgrade.upgradable(req, upgrade)
        )
        if self.decision is not None and self.decision.mirrors and body.complete and not upgrade:
            self._mirror(upstream_req, body, route.timeout)
        policy = route.retry if body.complete and upgrade is None else None
        retries_left = policy.attempts if policy else 0
        deadline = trio.CancelScope() if route.timeout is not None else _NO_SCOPE
        body.arm(deadline, route.timeout)
        tried: list[EndpointState] = []
        key = self.decision.hash_key if self.decision is not None else None
        slot = cluster.retry_slot()  # maxRetries: taken when a retry is decided
        try:
            with deadline:
                while True:
                    ep = cluster.pick(tried, key)
                    if ep is None:
                        await self._local(record, LocalResponse(503, b"no healthy upstream"), "UH")
                        return
                    tried.append(ep)
                    record.attempts += 1
                    record.endpoint = ep.endpoint
                    record.upstream = ep.address
                    may_retry = slot if retries_left > 0 else None
                    outcome, status = await self._attempt(
                        cluster, ep, upstream_req, body, policy, may_retry, deadline, record
                    )
                    if outcome is None:
                        return  # the response went to the client
                    if (
                        may_retry is not None
                        and policy is not None
                        and retriable(policy, outcome, status)
                        # a held-back response took its slot already (_exchange)
                        and (outcome is Outcome.STATUS or slot.take())
                    ):
                        retries_left -= 1
                        retry = policy.attempts - retries_left
                        s = self.settings
                        await trio.sleep(
                            backoff(retry, s.retry_backoff_base, s.retry_backoff_max, self.ctx.rng)
                        )
                        continue
                    code, flag, text = _FAILURES[outcome]
                    if outcome is Outcome.CONNECT_FAILURE and record.transport_failure:
                        text += b", transport failure reason: " + record.transport_failure.encode()
                    await self._local(record, LocalResponse(code, text), flag)
                    if policy is not None and retriable(policy, outcome, status):
                        record.flags.append("URX")
                    return
        finally:
            slot.release()
        # The route timeout passed.
        if record.status:
            record.flags.append("UT")
            raise _CloseClient
        await self._local(record, LocalResponse(504, b"upstream request timeout"), "UT")

    def _mirror(self, req: wire.Request, body: _Body, timeout: float | None) -> None:
        """Start the copies of a request the route mirrors (its body read whole)."""
        assert self.decision is not None and self.nursery is not None
        host = next((v for n, v in req.headers if n == b"host"), b"").decode("latin-1")
        shadow = wire.Request(
            method=req.method,
            target=req.target,
            headers=shadow_headers(req.headers, host),
            http_version=b"1.1",
        )
        for cluster in self.decision.mirrors:
            self.nursery.start_soon(mirror_http1, self.ctx, cluster, shadow, body.chunks, timeout)

    async def _prefetch(self, record: RequestRecord) -> _Body:
        """Read the request body up to the retry buffer limit (all of a small body)."""
        body = _Body()
        limit = self.settings.retry_buffer_limit
        while body.size <= limit:
            event = await self._body_event()
            if isinstance(event, wire.Data):
                body.chunks.append(event.data)
                body.size += len(event.data)
                record.bytes_received += len(event.data)
            else:  # EndOfMessage
                body.finished()
                break
        return body

    async def _send_body(
        self, up: UpstreamConnection, body: _Body, record: RequestRecord, state: _Attempt
    ) -> None:
        """Send the kept body, then stream the rest from the client, then end the request."""
        try:
            for chunk in body.chunks:
                await up.send(wire.Data(data=chunk))
            while not body.complete:
                event = await self._body_event()
                if isinstance(event, wire.Data):
                    record.bytes_received += len(event.data)
                    await up.send(wire.Data(data=event.data))
                else:
                    body.finished()
            await up.send(wire.EndOfMessage())
            state.sent_all = True
        except UpstreamError:
            pass  # the upstream is gone: the response side sees it too
        except _ClientGone as exc:
            state.error = exc
            state.cancel()
        finally:
            state.sent.set()

    async def _attempt(
        self,
        cluster: ClusterState,
        ep: EndpointState,
        req: wire.Request,
        body: _Body,
        policy: RetryPolicy | None,
        may_retry: RetrySlot | None,
        deadline: trio.CancelScope | _NoScope,
        record: RequestRecord,
    ) -> tuple[Outcome | None, int]:
        """One try on one endpoint. Returns (None, status) when a response went to the
        client, else how the attempt failed (and the dropped status, for Outcome.STATUS).
        Raises _ClientGone or _CloseClient when the client connection cannot go on.

        A pooled connection can be closed by the server just as it is reused. When that
        happens to an idempotent request (no response byte came back), it is sent again on
        another connection to the same endpoint, as Go's http.Transport does, not counted as
        a retry nor against the endpoint (Envoy would answer 503 UC)."""
        if self.upgrade_h2:
            return await self._on_h2(cluster, ep, req, body, policy, may_retry, deadline, record)
        replay = body.complete and req.method in _IDEMPOTENT
        checked = None  # a same-node pod's checks, made for a connection found stale
        for _ in range(_STALE_REPLAYS):
            outcome, status, stale, checked = await self._on_connection(
                cluster, ep, req, body, policy, may_retry, deadline, record, replay, checked
            )
            if not stale:
                break
        return outcome, status

    async def _on_connection(
        self,
        cluster: ClusterState,
        ep: EndpointState,
        req: wire.Request,
        body: _Body,
        policy: RetryPolicy | None,
        may_retry: RetrySlot | None,
        deadline: trio.CancelScope | _NoScope,
        record: RequestRecord,
        replay: bool,
        checked: localhop.Hop | None,
    ) -> tuple[Outcome | None, int, bool, localhop.Hop | None]:
        """One try on one pooled connection to ``ep``: (outcome, status, stale, checks).
        Stale: the connection turned out closed before the request reached the server, and it
        may be sent again on another; checks: then the same-node pod's checks made for it,
        `checked` on that next try, which does not make them again (the destination counts one
        decision per request)."""
        pool = self.ctx.pool
        try:
            up = await pool.acquire(cluster, ep, key=self.ctx.pool_key, connect=self.ctx.connect)
        except (Overflow, UpstreamError) as exc:
            return _not_acquired(exc, cluster, ep, record), 0, False, None
        reused = up.requests > 0
        record.upstream_info = up.info
        hop = None
        duties = localhop.duties_of(up.info)
        if duties is not None and checked is not None:  # checked for a stale connection
            hop, req = checked, localhop.checked_request(checked, req)
        elif duties is not None:  # a same-node pod: the destination's checks first
            hop, req = await localhop.check_request(
                duties, req, self.ctx.peer, lambda: pool.unused(up)
            )
            if hop.answer is not None:
                outcome, status = await self._destination_answer(
                    cluster, ep, hop, policy, may_retry, record
                )
                return outcome, status, False, None
        cluster.request_started(ep)
        state = _Attempt()
        try:
            await _carried(
                state,
                lambda nursery: self._exchange(
                    nursery, up, req, body, policy, may_retry, record, state
                ),
                body_sender=not body.complete,  # the common case needs no concurrent sender
            )
        finally:
            state.settle(deadline)
            stale = replay and reused and state.outcome is Outcome.RESET and up.cycle_bytes == 0
            cluster.request_finished(ep, state.outlier_status(stale))
            pool.release(up, state.reusable)
            instead = None if stale else _in_pods_place(hop, state)
            if hop is not None and not stale and instead is None:
                _hop_finished(hop, record, state)
        if state.error is not None:
            raise state.error
        if instead is not None:
            assert hop is not None
            hop.answer = instead
            outcome, status = await self._destination_answer(
                cluster, ep, hop, policy, may_retry, record, counted=True
            )
            return outcome, status, False, None
        return state.outcome, state.status or 0, stale, hop if stale else None

    async def _destination_answer(
        self,
        cluster: ClusterState,
        ep: EndpointState,
        hop: localhop.Hop,
        policy: RetryPolicy | None,
        may_retry: RetrySlot | None,
        record: RequestRecord,
        *,
        counted: bool = False,
    ) -> tuple[Outcome | None, int]:
        """The destination answered a same-node request itself (a denial; a 503 in the place
        of a pod that reset): for the source, the endpoint's response (its retry policy and
        response edits apply, no flag here). `counted`: the attempt is in the cluster's
        figures already (the pod was tried)."""
        answer = hop.answer
        assert answer is not None
        status = answer.status
        if not counted:
            cluster.request_started(ep)
        try:
            if policy is not None and retriable_status(policy, status):
                if may_retry is not None and may_retry.take():  # held back for a retry
                    return Outcome.STATUS, status
                record.flags.append("URX")
            await self._local(record, replace(answer, flags=()), upstream=True)
            return None, status
        finally:
            if not counted:
                cluster.request_finished(ep, status)
            localhop.finish(hop, record, status, answer.flags, relayed=False)

    async def _exchange(
        self,
        nursery: trio.Nursery | None,
        up: UpstreamConnection,
        req: wire.Request,
        body: _Body,
        policy: RetryPolicy | None,
        may_retry: RetrySlot | None,
        record: RequestRecord,
        state: _Attempt,
    ) -> None:
        if nursery is None:  # the whole request at once
            data = bytearray(up.codec.send(req))
            for chunk in body.chunks:
                data += up.codec.send(wire.Data(data=chunk))
            data += up.codec.send(wire.EndOfMessage())
            with contextlib.suppress(UpstreamError):  # it may have answered anyway: read on
                await up.send_bytes(data)
                state.sent_all = True
            state.sent.set()
        else:
            try:
                await up.send(req)
            except UpstreamError:
                state.outcome = Outcome.RESET
                return
            nursery.start_soon(self._send_body, up, body, record, state)
        per_try_timeout = policy.per_try_timeout if policy else None
        per_try = trio.CancelScope() if per_try_timeout is not None else _NO_SCOPE
        body.arm(per_try, per_try_timeout)
        response: wire.Response | wire.InformationalResponse | None = None
        with per_try:
            try:
                response = await self._response_head(up)
            except UpstreamError:
                state.outcome = Outcome.RESET
            except wire.RemoteProtocolError:
                state.outcome = Outcome.PROTOCOL
        if response is None:
            state.outcome = state.outcome or Outcome.TIMEOUT
            return
        status = state.status = response.status_code
        if policy is not None and retriable_status(policy, status):
            if may_retry is not None and may_retry.take():  # held back for a retry
                state.outcome = Outcome.STATUS
                return
            record.flags.append("URX")
        if status == 101:
            await state.sent.wait()
            await self._switch(up, response, record)
            return
        assert isinstance(response, wire.Response)
        ended = await self._stream_response(up, response, record)
        # Reusable only if the request was sent in full too (a server may answer early).
        state.reusable = ended and state.sent_all

    async def _response_head(
        self, up: UpstreamConnection
    ) -> wire.Response | wire.InformationalResponse:
        while True:
            event = await up.next_event()
            if isinstance(event, wire.Response):
                return event
            if isinstance(event, wire.InformationalResponse):
                if event.status_code == 101:
                    return event
                if event.status_code == 100 and self.expect_continue:
                    self.expect_continue = False  # the server's go-ahead, relayed once
                    await self._send(
                        wire.InformationalResponse(
                            status_code=100, headers=[], reason=event.reason or b"Continue"
                        )
                    )
                continue  # other 1xx are dropped
            raise UpstreamError("reset", f"unexpected {type(event).__name__} before a response")

    async def _stream_response(
        self, up: UpstreamConnection, response: wire.Response, record: RequestRecord
    ) -> bool:
        """Send the response to the client; True if the upstream connection ended clean.
        Whatever one receive brought is written in one send (head, data, end)."""
        if self.conn.client_is_waiting_for_100_continue:
            self.skip_drain = True  # answered without 100: the client may never send the body
        out = bytearray(
            self.conn.send(
                wire.Response(
                    status_code=response.status_code,
                    headers=self._response_headers(response.headers),
                    reason=response.reason,
                )
            )
        )
        record.status = response.status_code
        while True:
            try:
                event = up.poll_event()
                if event is wire.NEED_DATA:
                    if out:
                        await self._send_bytes(out)
                        out = bytearray()
                    await up.fill()
                    continue
            except (UpstreamError, wire.RemoteProtocolError) as exc:
                await self._send_bytes(out)
                record.flags.append("UC")
                raise _CloseClient from exc
            if isinstance(event, wire.Data):
                record.bytes_sent += len(event.data)
                out += self.conn.send(wire.Data(data=event.data))
            elif isinstance(event, wire.EndOfMessage):
                out += self.conn.send(wire.EndOfMessage())  # trailers dropped, as Envoy does
                await self._send_bytes(out)
                return True
            else:
                await self._send_bytes(out)
                record.flags.append("UC")
                raise _CloseClient

    def _response_headers(self, headers: wire.Headers) -> wire.Headers:
        out = hdrs.response_headers(headers)
        return self.decision.edit_response(out) if self.decision is not None else out

    async def _switch(
        self,
        up: UpstreamConnection,
        response: wire.InformationalResponse,
        record: RequestRecord,
    ) -> None:
        """The upstream accepted an upgrade: answer 101 and relay raw bytes both ways."""
        await self._send(
            wire.InformationalResponse(
                status_code=101,
                headers=hdrs.response_headers(response.headers, upgrade=True),
                reason=response.reason,
            )
        )
        record.status = 101
        client_rest, _ = self.conn.trailing_data
        upstream_rest, _ = up.codec.trailing_data
        try:
            if client_rest:
                await up.stream.send_all(client_rest)
            if upstream_rest:
                await self.client.send_all(upstream_rest)
        except (*CLIENT_ERRORS, UpstreamError) as exc:
            raise _CloseClient from exc
        result = await relay(self.client, up.stream)
        record.bytes_received += len(client_rest) + result.sent
        record.bytes_sent += len(upstream_rest) + result.received
        raise _CloseClient  # the connection was handed over; it cannot carry HTTP again

    # -- h2UpgradePolicy UPGRADE: the request on an HTTP/2 stream -------------------------

    async def _on_h2(
        self,
        cluster: ClusterState,
        ep: EndpointState,
        req: wire.Request,
        body: _Body,
        policy: RetryPolicy | None,
        may_retry: RetrySlot | None,
        deadline: trio.CancelScope | _NoScope,
        record: RequestRecord,
    ) -> tuple[Outcome | None, int]:
        """One try on one endpoint as HTTP/2: a stream on this connection's HTTP/2 connection
        to it (opened through `connect_h2`, multiplexed, as the HTTP/2 engine's upstreams);
        the same outcomes as an HTTP/1.1 try."""
        if self.h2 is None:
            assert self.nursery is not None
            self.h2 = H2Upstreams(self.ctx.connect_h2, self.nursery)
        ups = self.h2
        try:
            peer = await ups.acquire(cluster, ep)
        except (Overflow, UpstreamError) as exc:
            return _not_acquired(exc, cluster, ep, record), 0
        record.upstream_info = peer.info
        hop = None
        duties = localhop.duties_of(peer.info)
        if duties is not None:  # a same-node pod: the destination's checks first
            hop, req = await localhop.check_request(
                duties, req, self.ctx.peer, lambda: ups.done(peer, cluster)
            )
            if hop.answer is not None:
                return await self._destination_answer(cluster, ep, hop, policy, may_retry, record)
        cluster.request_started(ep)
        state = _Attempt()
        try:
            await _carried(
                state,
                lambda nursery: self._exchange_h2(
                    nursery, peer, req, body, policy, may_retry, record, state
                ),
                body_sender=True,
            )
        finally:
            state.settle(deadline)
            cluster.request_finished(ep, state.outlier_status())
            ups.done(peer, cluster)
            await ups.retire_if_spent(peer, cluster)
            instead = _in_pods_place(hop, state)
            if hop is not None and instead is None:
                _hop_finished(hop, record, state)
        if state.error is not None:
            raise state.error
        if instead is not None:
            assert hop is not None
            hop.answer = instead
            return await self._destination_answer(
                cluster, ep, hop, policy, may_retry, record, counted=True
            )
        return state.outcome, state.status or 0

    async def _exchange_h2(
        self,
        nursery: trio.Nursery,
        peer: H2Peer,
        req: wire.Request,
        body: _Body,
        policy: RetryPolicy | None,
        may_retry: RetrySlot | None,
        record: RequestRecord,
        state: _Attempt,
    ) -> None:
        head = h2upgrade.request_head(req, record.authority)
        bodyless = body.complete and not body.chunks
        try:
            up_id = peer.conn.get_next_available_stream_id()
            inbox = peer.open_inbox(up_id)
            peer.conn.send_headers(up_id, h2wire.upstream_request(head, ""), end_stream=bodyless)
        except H2_ERRORS:
            state.outcome = Outcome.OVERFLOW
            return
        finished = False
        try:
            try:
                await peer.flush()
            except StreamGone:
                state.outcome = Outcome.RESET
                return
            if bodyless:
                state.sent_all = True
                state.sent.set()
            else:
                nursery.start_soon(self._send_body_h2, peer, up_id, body, record, state)
            per_try_timeout = policy.per_try_timeout if policy else None
            per_try = trio.CancelScope() if per_try_timeout is not None else _NO_SCOPE
            body.arm(per_try, per_try_timeout)
            event = None
            with per_try:
                event = await self._response_head_h2(inbox.receive)
            if event is None:
                state.outcome = Outcome.RESET if inbox.reset is not None else Outcome.TIMEOUT
                return
            ended = event.stream_ended is not None
            response = h2upgrade.response_head(event.headers, ended, req.method)
            status = state.status = response.status_code
            if policy is not None and retriable_status(policy, status):
                if may_retry is not None and may_retry.take():  # held back for a retry
                    state.outcome = Outcome.STATUS
                    return
                record.flags.append("URX")
            finished = await self._stream_response_h2(peer, up_id, inbox, response, ended, record)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                stream = peer.conn.streams.get(up_id)
                if stream is not None and not stream.closed:  # unfinished, or answered early
                    peer.reset(up_id, h2wire.NO_ERROR if finished else h2wire.CANCEL)
                    with contextlib.suppress(StreamGone):
                        await peer.flush()
                peer.close_inbox(up_id)

    async def _response_head_h2(self, receive: H2Events) -> h2.events.ResponseReceived | None:
        """The upstream stream's response head (h2 ResponseReceived); None when the stream
        was reset or its connection ended first. A 100 Continue the client waits for is
        relayed once; other 1xx are dropped, as on HTTP/1.1 upstreams."""
        while True:
            event = await receive.receive()
            if event is None or isinstance(event, h2.events.StreamReset):
                return None
            if isinstance(event, h2.events.ResponseReceived):
                return event
            if (
                isinstance(event, h2.events.InformationalResponseReceived)
                and h2wire.status_of(event.headers) == 100
                and self.expect_continue
            ):
                self.expect_continue = False
                await self._send(
                    wire.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                )

    async def _stream_response_h2(
        self,
        peer: H2Peer,
        up_id: int,
        inbox: H2Inbox,
        response: wire.Response,
        ended: bool,
        record: RequestRecord,
    ) -> bool:
        """The HTTP/2 response to the HTTP/1.1 client (its trailers dropped, as Envoy does);
        True when it ended whole. A reset after the head closes the client connection (UC)."""
        if self.conn.client_is_waiting_for_100_continue:
            self.skip_drain = True  # answered without 100: the client may never send the body
        head = wire.Response(
            status_code=response.status_code, headers=self._response_headers(response.headers)
        )
        out = bytearray(self.conn.send(head))
        record.status = response.status_code
        while not ended:
            await self._send_bytes(out)
            out = bytearray()
            event = await inbox.receive.receive()
            if event is None or isinstance(event, h2.events.StreamReset):
                record.flags.append("UC")
                raise _CloseClient
            if isinstance(event, h2.events.DataReceived):
                record.bytes_sent += len(event.data)
                out += self.conn.send(wire.Data(data=event.data))
                peer.ack(up_id, event.flow_controlled_length)
                with contextlib.suppress(StreamGone):
                    await peer.flush()
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
        out += self.conn.send(wire.EndOfMessage())
        await self._send_bytes(out)
        return True

    async def _send_body_h2(
        self, peer: H2Peer, up_id: int, body: _Body, record: RequestRecord, state: _Attempt
    ) -> None:
        """The kept body, then the rest from the client, as DATA on the upstream stream."""
        try:
            for chunk in body.chunks:
                await peer.send_data(up_id, chunk)
            while not body.complete:
                event = await self._body_event()
                if isinstance(event, wire.Data):
                    record.bytes_received += len(event.data)
                    await peer.send_data(up_id, event.data)
                else:
                    body.finished()
            await peer.end(up_id)
            state.sent_all = True
        except StreamGone:
            pass  # the upstream is gone: the response side sees it too
        except _ClientGone as exc:
            state.error = exc
            state.cancel()
        finally:
            state.sent.set()
