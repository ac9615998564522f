"""The outbound capture listener (15001): connections the datapath redirected.

For each accepted connection: consume its original destination from the
orig_dst map (keyed by the client's ip:port), identify the source pod, resolve
a Service VIP:port to an endpoint (round robin over ready pods), connect, and
relay. A pod IP or any other destination is relayed as is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from meshagent.agent.proxy.inputs import ProxyInputs
from meshagent.agent.proxy.relay import RelayResult, relay
from meshagent.agent.proxy.upstream import Connector, UpstreamError
from meshagent.agent.telemetry import (
    UNKNOWN_PEER,
    UNKNOWN_SERVICE,
    ConnectionLabels,
    Peer,
    peer_from_workload,
    service_ref,
)
from meshagent.common.snapshot import Service, Workload

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
    def __init__(self, inputs: ProxyInputs, orig_dst: OrigDstLookup, connector: Connector) -> None:
        self.inputs = inputs
        self.store = inputs.store
        self.orig_dst = orig_dst
        self.connector = connector
        self.stats = ProxyStats()

    def resolve(self, ip: str, port: int) -> tuple[list[tuple[str, int]], Service | None]:
        """Where to connect for an original destination: candidate (ip, port)s in the order
        to try them, and the service (None for a pass-through destination)."""
        tables = self.store.tables
        route = tables.by_vip_port.get((ip, port)) if tables else None
        if route is None:
            return [(ip, port)], None  # pod IP or outside the mesh: pass through unchanged
        candidates = [(e.ip, port) for e, port in route.pick(CONNECT_ATTEMPTS)]
        return candidates, route.service

    async def handle(self, client: trio.SocketStream) -> None:
        self.stats.accepted += 1
        self.stats.active += 1
        try:
            await self._handle(client)
        finally:
            self.stats.active -= 1
            await trio.aclose_forcefully(client)

    async def _handle(self, client: trio.SocketStream) -> None:
        start, started = time.time(), trio.current_time()
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
        tables = self.store.tables
        source = tables.workload_by_ip.get(peer_ip) if tables else None
        source_peer = self._peer(source)
        service_labels = service_ref(service) if service else UNKNOWN_SERVICE
        if not candidates:
            self.stats.no_endpoints += 1
            log.warning("%s:%d -> %s:%d: service has no ready endpoints", peer_ip, peer_port, *orig)
            return
        upstream, error = None, ""
        for ip, port in candidates:  # a failed connect moves on to the next endpoint
            try:
                upstream = await self.connector.open(source, ip, port, peer_ip)
                break
            except UpstreamError as exc:
                self.stats.upstream_failures += 1
                error = f"{exc.kind}: {exc}"
                log.warning("%s:%d -> %s:%d: %s", peer_ip, peer_port, ip, port, error)
        if upstream is None:
            labels = ConnectionLabels("source", source_peer, UNKNOWN_PEER, service_labels)
            self._report(labels, start, started, 0, 0, "UF", peer_ip, f"{orig[0]}:{orig[1]}", error)
            return
        key = f"{ip}:{port}"
        self.stats.by_destination[key] = self.stats.by_destination.get(key, 0) + 1
        if upstream.security == "mutual_tls":
            self.stats.mutual_tls += 1
        labels = ConnectionLabels(
            "source",
            source_peer,
            self._peer(upstream.peer),
            service_labels,
            connection_security_policy=upstream.security,
        )
        self.inputs.metrics.tcp_opened(labels)
        result = RelayResult()
        try:
            async with upstream.stream:
                result = await relay(client, upstream.stream)
        finally:
            self.stats.bytes_sent += result.sent
            self.stats.bytes_received += result.received
            self._report(
                labels,
                start,
                started,
                result.received,
                result.sent,
                "-",
                peer_ip,
                key,
                "",
                opened=True,
            )

    def _peer(self, workload: Workload | None) -> Peer:
        if workload is None:
            return UNKNOWN_PEER
        return peer_from_workload(workload, trust_domain=self.inputs.trust_domain)

    def _report(
        self,
        labels: ConnectionLabels,
        start: float,
        started: float,
        to_client: int,
        from_client: int,
        flags: str,
        client: str,
        upstream: str,
        error: str,
        opened: bool = False,
    ) -> None:
        if opened:
            self.inputs.metrics.tcp_closed(labels, to_client, from_client, flags)
        if self.inputs.access_log is not None:
            self.inputs.access_log.tcp_connection(
                labels,
                start=start,
                duration_ms=(trio.current_time() - started) * 1000,
                bytes_sent=to_client,
                bytes_received=from_client,
                response_flags=flags,
                source_address=client,
                destination_address=upstream,
                error=error or None,
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
