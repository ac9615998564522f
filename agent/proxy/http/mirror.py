"""Traffic mirroring for the HTTP/1.1 engine: a copy of a request, sent and forgotten.

What flows through: the request as it goes upstream (after rewrites and header operations)
and its body, already read whole; out: nothing. The copy goes to one endpoint of the mirror
cluster over the shared connection pool (same connector and pool key as the request, so it
leaves as the same source), with `-shadow` appended to its Host as Envoy does; the response
is read to its end and dropped, any failure only logged. It runs in a task of the client
connection's nursery, bounded by `MIRROR_TIMEOUT` (or the route's timeout), so the client's
own response never waits for it. A copy to a same-node pod gets the destination's checks and
report as any request does (localhop.py). The HTTP/2 engine sends its copies itself (h2proxy.py).
"""

from __future__ import annotations

import logging

import trio
from meshagent.agent.proxy.http import localhop, wire
from meshagent.agent.proxy.http.types import HttpContext, UpstreamError
from meshagent.agent.proxy.lb import ClusterState, Overflow
from meshagent.agent.proxy.route_actions import HeaderList, shadow_authority

log = logging.getLogger(__name__)

# How long a copy may take when the route sets no timeout (Envoy: the route's timeout, 15 s
# by default; Istio routes have none, a copy must still end).
MIRROR_TIMEOUT = 15.0


def shadow_headers(headers: HeaderList, authority: str) -> HeaderList:
    """`headers` with Host replaced by the shadow authority of `authority`."""
    shadow = shadow_authority(authority).encode("latin-1")
    return [(b"host", shadow), *((n, v) for n, v in headers if n != b"host")]


async def mirror_http1(
    ctx: HttpContext,
    cluster: ClusterState,
    request: wire.Request,
    body: list[bytes],
    timeout: float | None,
) -> None:
    """Send `request` (its Host already the shadow one) and `body` to an endpoint of
    `cluster`; read the answer and drop it. Never raises (but for cancellation)."""
    ep = cluster.pick([])
    if ep is None:
        return
    with trio.move_on_after(timeout or MIRROR_TIMEOUT):
        try:
            up = await ctx.pool.acquire(cluster, ep, key=ctx.pool_key, connect=ctx.connect)
        except (Overflow, UpstreamError) as exc:
            log.debug("mirror to %s not sent: %s", ep.address, exc)
            return
        hop = None
        duties = localhop.duties_of(up.info)
        if duties is not None:  # a same-node pod: the destination checks the copy too
            hop, request = await localhop.check_request(
                duties, request, ctx.peer, lambda: ctx.pool.unused(up)
            )
            if hop.answer is not None:
                localhop.finish(hop, None, hop.answer.status, hop.answer.flags)
                return
        cluster.request_started(ep)
        status = None
        reusable = False
        try:
            data = bytearray(up.codec.send(request))
            for chunk in body:
                data += up.codec.send(wire.Data(data=chunk))
            data += up.codec.send(wire.EndOfMessage())
            await up.send_bytes(data)
            while True:
                event = await up.next_event()
                if isinstance(event, wire.Response):
                    status = event.status_code
                elif isinstance(event, wire.EndOfMessage):
                    reusable = True
                    break
                elif not isinstance(event, (wire.Data, wire.InformationalResponse)):
                    break
        except (UpstreamError, wire.ProtocolError) as exc:
            log.debug("mirror to %s failed: %s", ep.address, exc)
        finally:
            cluster.request_finished(ep, status)
            ctx.pool.release(up, reusable)
            if hop is not None:
                localhop.finish(hop, None, status or 0)
