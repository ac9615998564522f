"""The outbound capture listener (15001): connections the datapath redirected.

For each accepted connection: consume its original destination from the
orig_dst map (keyed by the client's ip:port), identify the source pod, resolve
a Service VIP:port to an endpoint (round robin over ready pods), connect, and
relay. A pod IP or any other destination is relayed as is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from meshagent.agent.proxy.relay import relay
from meshagent.agent.proxy.upstream import Connector, UpstreamError
from meshagent.agent.state import SnapshotStore

log = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 3  # distinct endpoints tried for one connection
# The orig_dst entry is written before the client's final ACK leaves; this only
# covers a listener that accepts faster than the map update becomes visible.
ORIG_DST_RETRIES = 3


@dataclass
class ProxyStats:
    accepted: int = 0
    active: int = 0
    orig_dst_misses: int = 0
    upstream_failures: int = 0
    no_endpoints: int = 0
    mutual_tls: int = 0  # connections that left this node through an HBONE tunnel
    bytes_sent: int = 0
    bytes_received: int = 0
    by_destination: dict[str, int] = field(default_factory=dict)


OrigDstLookup = Callable[[str, int], "tuple[str, int] | None"]


class OutboundProxy:
    def __init__(self, store: SnapshotStore, orig_dst: OrigDstLookup, connector: Connector) -> None:
        self.store = store
        self.orig_dst = orig_dst
        self.connector = connector
        self.stats = ProxyStats()

    def resolve(self, ip: str, port: int) -> tuple[list[tuple[str, int]], str]:
        """Where to connect for an original destination: candidate (ip, port)s in the order
        to try them, and the service's hostname ('' for a pass-through destination)."""
        tables = self.store.tables
        route = tables.by_vip_port.get((ip, port)) if tables else None
        if route is None:
            return [(ip, port)], ""  # pod IP or outside the mesh: pass through unchanged
        candidates = [(e.ip, port) for e, port in route.pick(CONNECT_ATTEMPTS)]
        return candidates, route.service.hostname

    async def handle(self, client: trio.SocketStream) -> None:
        self.stats.accepted += 1
        self.stats.active += 1
        try:
            await self._handle(client)
        finally:
            self.stats.active -= 1
            await trio.aclose_forcefully(client)

    async def _handle(self, client: trio.SocketStream) -> None:
        peer_ip, peer_port = client.socket.getpeername()[:2]
        orig = None
        for _ in range(ORIG_DST_RETRIES):
            orig = self.orig_dst(peer_ip, peer_port)
            if orig is not None:
                break
            await trio.sleep(0.001)
        if orig is None:
            self.stats.orig_dst_misses += 1
            log.warning("no original destination for %s:%d; closing", peer_ip, peer_port)
            return
        candidates, service = self.resolve(*orig)
        if not candidates:
            self.stats.no_endpoints += 1
            log.warning("%s:%d -> %s:%d: service has no ready endpoints", peer_ip, peer_port, *orig)
            return
        tables = self.store.tables
        source = tables.workload_by_ip.get(peer_ip) if tables else None
        upstream = None
        for ip, port in candidates:  # a failed connect moves on to the next endpoint
            try:
                upstream = await self.connector.open(source, ip, port, peer_ip)
                break
            except UpstreamError as exc:
                self.stats.upstream_failures += 1
                log.warning("%s:%d -> %s:%d: %s: %s", peer_ip, peer_port, ip, port, exc.kind, exc)
        if upstream is None:
            return
        key = f"{ip}:{port}"
        self.stats.by_destination[key] = self.stats.by_destination.get(key, 0) + 1
        if upstream.security == "mutual_tls":
            self.stats.mutual_tls += 1
        async with upstream.stream:
            result = await relay(client, upstream.stream)
        self.stats.bytes_sent += result.sent
        self.stats.bytes_received += result.received
        log.debug(
            "%s:%d -> %s:%d (%s via %s) sent=%d received=%d",
            peer_ip,
            peer_port,
            *orig,
            service or "passthrough",
            key,
            result.sent,
            result.received,
        )


async def serve_outbound(
    proxy: OutboundProxy,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
    async with trio.open_nursery() as nursery:
        task_status.started()
        nursery.start_soon(trio.serve_listeners, proxy.handle, listeners)
