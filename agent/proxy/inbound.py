"""The inbound side (15008): HBONE tunnels from other nodes' proxies to this node's pods.

For each CONNECT: the target must be a meshed pod on this node, and the identity
the client asked for (SNI) must be that pod's; then (authorization comes here)
the pod is dialled from the node, the tunnel answered 200 and bytes relayed.
A target that is not ours is refused 401; an unreachable pod 503, as ztunnel does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio
from meshagent.agent.hbone.server import InboundTunnel
from meshagent.agent.policy import authorization
from meshagent.agent.policy.authorization import AuthzStats
from meshagent.agent.proxy.relay import relay
from meshagent.agent.proxy.upstream import workload_identity
from meshagent.agent.state import SnapshotStore

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
    def __init__(self, store: SnapshotStore, node: str, trust_domain: str) -> None:
        self.store = store
        self.node = node
        self.trust_domain = trust_domain
        self.stats = InboundStats()
        self.authz_stats = AuthzStats()

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
        ip, port = tunnel.target
        tables = self.store.tables
        target = tables.workload_by_ip.get(ip) if tables else None
        if target is None or target.node != self.node or not target.meshed:
            await self._refuse(tunnel, 401, "not a meshed pod on this node")
            return
        if workload_identity(target, self.trust_domain) != tunnel.local_identity:
            await self._refuse(tunnel, 401, f"{ip} is not {tunnel.local_identity.uri}")
            return
        source_ip = tunnel.forwarded_for or tunnel.peer_address[0]
        decision = authorization.check(
            tables.authz,
            self.authz_stats,
            source=tunnel.peer_identity,
            source_ip=source_ip,
            destination=target,
            destination_ip=ip,
            port=port,
        )
        if not decision.allowed:
            await self._refuse(tunnel, 401, f"denied by {decision.policy or 'default'}")
            return
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                pod = await trio.open_tcp_stream(ip, port)
        except (OSError, trio.TooSlowError) as exc:
            await self._refuse(tunnel, 503, f"pod unreachable: {exc or 'timeout'}")
            return
        principal = tunnel.peer_identity.uri
        self.stats.peers[principal] = self.stats.peers.get(principal, 0) + 1
        self.stats.accepted += 1
        self.stats.active += 1
        try:
            async with pod:
                stream = await tunnel.accept()
                result = await relay(stream, pod)
            self.stats.bytes_in += result.sent
            self.stats.bytes_out += result.received
            log.info(
                "inbound %s -> %s (%s) in=%d out=%d",
                principal,
                tunnel.authority,
                f"{target.namespace}/{target.name}",
                result.sent,
                result.received,
            )
        except trio.BrokenResourceError:
            pass
        finally:
            self.stats.active -= 1
