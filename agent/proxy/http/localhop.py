"""Same-node HTTP in one engine: the destination's per-request duties around one attempt.

What flows through: an upstream connection straight to a meshed pod on this node carries the
destination's duties (`Duties`: agent/proxy/inbound.py `Destination`, handed out by
`Connector.open` as `Upstream.duties`). Before a request goes on such a connection, the engine
(HTTP/1.1 or HTTP/2, whichever parsed the request: it is parsed once) asks `check`, which runs
the destination's checks on the request as the source forwards it (after the source's route
edits), exactly as the destination's own engine would on a tunnel: RequestAuthentication (401),
AuthorizationPolicy with CUSTOM ext_authz first (403 `RBAC: access denied`, a gRPC call's
PERMISSION_DENIED), the policy decision metric, the current tables every time. An answer
instead of the pod is treated by the source's engine as an endpoint's response (its retry
policy and response edits apply, no flag on the source's side), as the destination engine's
answer was; so is the 503 UC that engine gave in the place of a pod that reset before a
response (the engines' `_in_pods_place`). Once the attempt is over, `finish` reports it as
the destination: its own RequestRecord (status, its flags: RBAC for a denial, the decision
for the access log) to `Duties.report` (`reporter=destination` metrics and log).

Not carried over: the destination engine's own per-source bound on requests in flight
(`Limits.max_pending_requests` keyed by the source's principal); the source's, keyed by its
pod, still applies in the same process. A request sent again because its pooled connection
turned out closed (the HTTP/1.1 engine's stale replay) keeps the checks made for the first
connection: the destination counts one decision per request, as it would have seen it once.

Before this, a same-node request went through the source's engine, an in-process stream pair
(memstream.py) and a second engine, the destination's, which parsed and wrote every request and
response again (about half the CPU of a same-node request at level `full`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import trio
from meshagent.agent.proxy.http import wire
from meshagent.agent.proxy.http.types import LocalResponse, RequestInfo, RequestRecord


class Duties(Protocol):
    """The destination's part of a same-node request (agent/proxy/inbound.py `Destination`)."""

    async def authorize(self, request: RequestInfo) -> LocalResponse | None: ...

    def report(self, record: RequestRecord) -> None: ...


def duties_of(info: object) -> Duties | None:
    """The destination's duties an upstream connection carries (what `Connect` returned with
    the stream), or None: a tunnel, another node, a pod out of the mesh."""
    return getattr(info, "duties", None)


class Hop:
    """One attempt on a same-node pod, as the destination sees it."""

    __slots__ = ("answer", "duties", "headers", "record", "started")

    def __init__(self, duties: Duties, record: RequestRecord) -> None:
        self.duties = duties
        self.record = record  # the destination's record of the attempt
        self.started = trio.current_time()
        self.answer: LocalResponse | None = None  # the destination answered instead of the pod
        # the request's headers after the checks when they changed them (a verified JWT
        # removed, what an ext_authz provider set): the request goes on with these
        self.headers: list[tuple[bytes, bytes]] | None = None


async def check(
    duties: Duties,
    method: str,
    target: str,
    authority: str,
    headers: list[tuple[bytes, bytes]],
    peer: str,
    release: Callable[[], None],
) -> Hop:
    """Run the destination's checks on a request about to go to the pod (`headers` are not
    changed: a change comes back in `Hop.headers`); `Hop.answer` is set when it must not go.
    `release` gives the connection back when nothing goes on it (an answer, or the checks
    failed), as every caller must."""
    hop = None
    try:
        request = RequestInfo(method, target, authority, list(headers), peer)
        hop = Hop(duties, RequestRecord(method, target, authority, peer, time.time()))
        hop.answer = await duties.authorize(request)
        hop.record.decision = request.decision
        if request.headers != headers:
            hop.headers = request.headers
        return hop
    finally:
        if hop is None or hop.answer is not None:
            release()


async def check_request(
    duties: Duties, req: wire.Request, peer: str, release: Callable[[], None]
) -> tuple[Hop, wire.Request]:
    """`check` for an HTTP/1.1 request, and the request as it goes on (with the headers the
    checks left)."""
    host = next((v for n, v in req.headers if n == b"host"), b"")
    hop = await check(
        duties,
        req.method.decode("ascii", "replace"),
        req.target.decode("latin-1"),
        host.decode("latin-1"),
        req.headers,
        peer,
        release,
    )
    return hop, checked_request(hop, req)


def checked_request(hop: Hop, req: wire.Request) -> wire.Request:
    """``req`` as it goes on after ``hop``'s checks (with the headers they left)."""
    if hop.headers is None:
        return req
    return wire.Request(
        method=req.method, target=req.target, headers=hop.headers, http_version=req.http_version
    )


def finish(
    hop: Hop,
    source: RequestRecord | None,
    status: int,
    flags: Sequence[str] = (),
    *,
    relayed: bool = True,
) -> None:
    """Report the attempt as the destination: `status` what went back (0: none, the source
    gave up: DC), `flags` the destination's own; `source` the source's record of the request
    (None: a mirrored copy); `relayed` False for the destination's own answer (no byte of the
    request's body or the pod's response passed it)."""
    record = hop.record
    record.status = status
    record.flags.extend(flags)
    if not status and not flags:
        record.flags.append("DC")  # the source cancelled the request (timeout, client gone)
    if source is None:
        record.duration = trio.current_time() - hop.started
        hop.duties.report(record)
        return
    if relayed:
        record.bytes_received = source.bytes_received
        record.bytes_sent = source.bytes_sent
    record.grpc = source.grpc
    if source.grpc:
        record.grpc_status = source.grpc_status
        record.request_messages = source.request_messages
        record.response_messages = source.response_messages
    record.attempts = 1
    record.duration = trio.current_time() - hop.started
    hop.duties.report(record)
