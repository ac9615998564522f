"""The inbound side (15008): HBONE tunnels from other nodes' proxies to this node's pods.

For each CONNECT: the target must be a meshed pod on this node, and the identity
the client asked for (SNI) must be that pod's; then (authorization comes here)
the pod is dialled from the node, the tunnel answered 200 and bytes relayed.
A target that is not ours is refused 401; an unreachable pod 503, as ztunnel does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio
from meshagent.agent.hbone.server import InboundTunnel
from meshagent.agent.policy import authorization
from meshagent.agent.proxy.inputs import ProxyInputs
from meshagent.agent.proxy.relay import RelayResult, relay
from meshagent.agent.proxy.upstream import workload_identity
from meshagent.agent.telemetry import (
    UNKNOWN_PEER,
    UNKNOWN_SERVICE,
    ConnectionLabels,
    peer_from_workload,
    service_ref,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0


@dataclass
class InboundStats:
    accepted: int = 0
    active: int = 0
    refused: dict[int, int] = field(default_factory=dict)  # status -> count
    bytes_in: int = 0
    bytes_out: int = 0
    peers: dict[str, int] = field(default_factory=dict)  # source principal -> connections


class InboundProxy:
    def __init__(self, inputs: ProxyInputs) -> None:
        self.inputs = inputs
        self.store = inputs.store
        self.stats = InboundStats()

    async def _refuse(self, tunnel: InboundTunnel, status: int, why: str) -> None:
        self.stats.refused[status] = self.stats.refused.get(status, 0) + 1
        log.warning(
            "tunnel from %s to %s refused %d: %s",
            tunnel.peer_identity.uri,
            tunnel.authority,
            status,
            why,
        )
        await tunnel.reject(status)

    async def handle(self, tunnel: InboundTunnel) -> None:
        start, started = time.time(), trio.current_time()
        ip, port = tunnel.target
        tables = self.store.tables
        target = tables.workload_by_ip.get(ip) if tables else None
        if tables is None or target is None or target.node != self.inputs.node or not target.meshed:
            await self._refuse(tunnel, 401, "not a meshed pod on this node")
            return
        if workload_identity(target, self.inputs.trust_domain) != tunnel.local_identity:
            await self._refuse(tunnel, 401, f"{ip} is not {tunnel.local_identity.uri}")
            return
        source_ip = tunnel.forwarded_for or tunnel.peer_address[0]
        source = tables.workload_by_ip.get(source_ip)
        service = tables.service_by_endpoint.get((ip, port))
        labels = ConnectionLabels(
            "destination",
            (
                peer_from_workload(source, trust_domain=self.inputs.trust_domain)
                if source
                else UNKNOWN_PEER
            ).with_principal(tunnel.peer_identity),
            peer_from_workload(target, trust_domain=self.inputs.trust_domain),
            service_ref(service) if service else UNKNOWN_SERVICE,
            connection_security_policy="mutual_tls",
        )
        decision = authorization.check(
            tables.authz,
            self.inputs.authz,
            source=tunnel.peer_identity,
            source_ip=source_ip,
            destination=target,
            destination_ip=ip,
            port=port,
        )
        self.inputs.metrics.policy_decision(decision)
        if not decision.allowed:
            await self._refuse(tunnel, 401, f"denied by {decision.policy or 'default'}")
            self._log(labels, start, started, 0, 0, "DENY", source_ip, tunnel.authority, decision)
            return
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                pod = await trio.open_tcp_stream(ip, port)
        except (OSError, trio.TooSlowError) as exc:
            await self._refuse(tunnel, 503, f"pod unreachable: {exc or 'timeout'}")
            self._log(
                labels, start, started, 0, 0, "CONNECT", source_ip, tunnel.authority, decision
            )
            return
        principal = tunnel.peer_identity.uri
        self.stats.peers[principal] = self.stats.peers.get(principal, 0) + 1
        self.stats.accepted += 1
        self.stats.active += 1
        self.inputs.metrics.tcp_opened(labels)
        result = RelayResult()
        try:
            async with pod:
                stream = await tunnel.accept()
                result = await relay(stream, pod)
        except trio.BrokenResourceError:
            pass
        finally:
            self.stats.active -= 1
            self.stats.bytes_in += result.sent
            self.stats.bytes_out += result.received
            # toward the client = what the pod sent back; from the client = what it received
            self.inputs.metrics.tcp_closed(labels, result.received, result.sent)
            self._log(
                labels,
                start,
                started,
                result.received,
                result.sent,
                "-",
                source_ip,
                tunnel.authority,
                decision,
            )

    def _log(
        self, labels, start, started, to_client, from_client, flags, client, upstream, decision
    ) -> None:
        if self.inputs.access_log is not None:
            self.inputs.access_log.tcp_connection(
                labels,
                start=start,
                duration_ms=(trio.current_time() - started) * 1000,
                bytes_sent=to_client,
                bytes_received=from_client,
                response_flags=flags,
                decision=decision,
                source_address=client,
                destination_address=upstream,
            )
