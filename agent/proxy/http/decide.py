"""The per-request decisions both HTTP engines share (HTTP/1.1 `proxy.py`, HTTP/2 `h2proxy.py`).

What flows through: a request as `RequestInfo` and the connection's `HttpContext` in; a
`RouteDecision` out: either a local answer (the request filter's denial, no route 404 NR, a
fault abort FI, no cluster 503 NC) or the route and cluster to forward to. The order is
Envoy's filter chain: request filter (authorization) -> route match -> fault injection (delay,
then abort) -> weighted destination. The engines only carry the request out: one copy of the
decisions, whatever the protocol.

After the route match and faults, the rule's actions (agent/proxy/route_actions.py) are
decided here too: a `redirect` is a local answer (Location built here); otherwise the
decision carries the rewritten target and authority, the header operations for the request
(the destination's, then the rule's) and for the response, and the mirror clusters drawn for
this request. The engines apply them (`edit_request`, `edit_response`) and send the mirrors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from meshagent.agent.proxy.hashkey import request_key
from meshagent.agent.proxy.http.types import HttpContext, LocalResponse, RequestInfo, RequestRecord
from meshagent.agent.proxy.route_actions import HeaderList, HeaderOps, apply_all

if TYPE_CHECKING:
    from meshagent.agent.proxy.lb import ClusterState
    from meshagent.agent.proxy.routing import DestinationHeaders, HttpRoute, HttpRoutes

log = logging.getLogger(__name__)

_EMPTY: dict[str, str] = {}


@dataclass(slots=True)
class RouteDecision:
    """Forward to `cluster` along `route`, or answer `local` (with response flag `flag`)."""

    routes: HttpRoutes | None = None
    route: HttpRoute | None = None
    cluster: ClusterState | None = None
    local: LocalResponse | None = None
    flag: str = ""
    target: str | None = None  # the request target after `rewrite` (None: unchanged)
    authority: str | None = None  # the Host / :authority after `rewrite.authority`
    request_ops: tuple[HeaderOps, ...] = ()  # in order: the destination's, the rule's
    response_ops: tuple[HeaderOps, ...] = ()
    mirrors: tuple[ClusterState, ...] = ()  # where a copy of this request goes
    hash_key: bytes | None = None  # consistentHash: what `cluster.pick` hashes

    def edit_request(self, headers: HeaderList) -> HeaderList:
        """The request headers with the header operations applied (the list itself when
        there are none)."""
        return apply_all(self.request_ops, headers) if self.request_ops else headers

    def edit_response(self, headers: HeaderList) -> HeaderList:
        return apply_all(self.response_ops, headers) if self.response_ops else headers


async def decide(ctx: HttpContext, info: RequestInfo, record: RequestRecord) -> RouteDecision:
    """Run the shared decisions for one request; fills `record.route`, `record.cluster` and
    `record.decision` (the filter's, if it left one on `info`). A fault delay is slept here."""
    if ctx.request_filter is not None:
        try:
            local = await ctx.request_filter(info)
        except Exception:
            log.exception("request filter failed on %s %s", info.method, info.target)
            local = LocalResponse(500, b"request filter failed")
        record.decision = info.decision
        if local is not None:
            return RouteDecision(local=local)
    routes = ctx.routes()
    route = None
    if routes is not None:
        headers = info.header_map() if routes.uses_headers else _EMPTY
        route = routes.match(info.method, info.target, headers, ctx.source)
    if routes is None or route is None:
        return RouteDecision(routes, local=LocalResponse(404), flag="NR")
    record.route = route.name
    cors_ops = None
    if route.cors is not None:
        origin = info.header_map().get("origin")
        if origin:
            preflight = info.method == "OPTIONS" and info.header_map().get(
                "access-control-request-method"
            )
            if route.cors.allows(origin):
                if preflight:  # answered here, as Envoy's CORS filter does
                    answer = LocalResponse(200, b"", route.cors.preflight_headers(origin))
                    return RouteDecision(routes, route, local=answer)
                cors_ops = route.cors.response_ops(origin)
            elif preflight and not route.cors.forward_unmatched:
                return RouteDecision(routes, route, local=LocalResponse(200))
    fault = route.fault
    if fault is not None:
        if fault.delay and ctx.rng.random() * 100 < fault.delay_percent:
            record.flags.append("DI")
            await trio.sleep(fault.delay)
        if fault.abort_status and ctx.rng.random() * 100 < fault.abort_percent:
            abort = LocalResponse(
                fault.abort_status, b"fault filter abort", grpc_status=fault.abort_grpc_status
            )
            return RouteDecision(routes, route, local=abort, flag="FI")
    if route.redirect is not None or route.direct_response is not None:
        return RouteDecision(routes, route, local=_answer(route, info, routes.port, cors_ops))
    dests = route.destinations
    index = dests.pick_index(ctx.rng.random)
    spec = None if index is None else dests.clusters[index]
    if spec is None:
        return RouteDecision(routes, route, local=LocalResponse(503), flag="NC")
    record.cluster = spec.name
    decision = RouteDecision(routes, route, ctx.clusters.get(spec))
    if (
        route.rewrite is not None
        or dests.headers
        or route.request_headers
        or route.response_headers
        or route.mirrors
        or cors_ops
    ):
        _actions(ctx, info, route, dests.headers_of(index), decision)
        if cors_ops is not None:
            decision.response_ops += (cors_ops,)
    if spec.policy.hash is not None:
        decision.hash_key, cookie = request_key(spec.policy.hash, info, ctx.peer, ctx.rng)
        if cookie is not None:
            decision.response_ops += (cookie,)
    return decision


def _answer(
    route: HttpRoute, info: RequestInfo, port: int, cors_ops: HeaderOps | None
) -> LocalResponse:
    """The proxy's own answer for a `redirect` or `directResponse` rule, with the rule's
    response header operations (and CORS headers) applied, as Envoy's direct responses."""
    headers: HeaderList = []
    status, body = route.direct_response or (0, b"")
    if route.redirect is not None:
        location = route.redirect.location(info.target, info.authority, port)
        headers = [(b"location", location.encode("latin-1"))]
        status = route.redirect.status
    for ops in (route.response_headers, cors_ops):
        if ops is not None:
            headers = ops.apply(headers)
    return LocalResponse(status, body, tuple(headers))


def _actions(
    ctx: HttpContext, info: RequestInfo, route: HttpRoute, own: DestinationHeaders, d: RouteDecision
) -> None:
    """Fill in what the rule does to the request besides routing it (rare: kept off the
    common path)."""
    rewrite = route.rewrite
    if rewrite is not None:
        if rewrite.uri is not None or rewrite.regex is not None:
            prefix = None
            if rewrite.regex is None:
                headers = info.header_map() if any(m.headers for m in route.matches) else _EMPTY
                entry = route.matching_entry(info.method, info.target, headers, ctx.source)
                prefix = entry.rewrite_prefix if entry is not None else "/"
            d.target = rewrite.target(info.target, prefix)
        d.authority = rewrite.authority
    d.request_ops = tuple(op for op in (own.request, route.request_headers) if op is not None)
    d.response_ops = tuple(op for op in (own.response, route.response_headers) if op is not None)
    if route.mirrors:
        d.mirrors = tuple(
            ctx.clusters.get(m.cluster)
            for m in route.mirrors
            if m.cluster is not None and ctx.rng.random() * 100 < m.percent
        )
