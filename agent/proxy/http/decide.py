"""The per-request decisions both HTTP engines share (HTTP/1.1 `proxy.py`, HTTP/2 `h2proxy.py`).

What flows through: a request as `RequestInfo` and the connection's `HttpContext` in; a
`RouteDecision` out: either a local answer (the request filter's denial, no route 404 NR, a
fault abort FI, no cluster 503 NC) or the route and cluster to forward to. The order is
Envoy's filter chain: request filter (authorization) -> route match -> fault injection (delay,
then abort) -> weighted destination. The engines only carry the request out: one copy of the
decisions, whatever the protocol.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from meshagent.agent.proxy.http.types import HttpContext, LocalResponse, RequestInfo, RequestRecord

if TYPE_CHECKING:
    from meshagent.agent.proxy.lb import ClusterState
    from meshagent.agent.proxy.routing import HttpRoute, HttpRoutes

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
        route = routes.match(info.method, info.target, headers)
    if routes is None or route is None:
        return RouteDecision(routes, local=LocalResponse(404), flag="NR")
    record.route = route.name
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
    spec = route.destinations.pick(ctx.rng.random)
    if spec is None:
        return RouteDecision(routes, route, local=LocalResponse(503), flag="NC")
    record.cluster = spec.name
    return RouteDecision(routes, route, ctx.clusters.get(spec))
