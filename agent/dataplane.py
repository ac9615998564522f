"""The node proxy's data plane: outbound (15001) and HBONE (15008), in one process.

The agent runs one `DataPlane` in its own process (``proxy_workers: 1``) or one in each
worker process (agent/workers/). Either way it gets its inputs from outside: the snapshot
store, a source of workload certificates (`IdentitySource`: the identity manager, or a
worker's mirror of it), the TLS contexts and the orig_dst map. It owns the pools, the
proxies and their listeners, and says what it did through `status`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import trio
from meshagent.agent.config import AgentConfig
from meshagent.agent.datapath.join import open_socket_join
from meshagent.agent.handover import handoff_socket, own_handoff_folder
from meshagent.agent.hbone import metrics as hbone_metrics
from meshagent.agent.hbone.client import open_tunnel_pool
from meshagent.agent.hbone.server import serve_hbone
from meshagent.agent.identity.manager import WorkloadCert
from meshagent.agent.proxy import handoff
from meshagent.agent.proxy.http import HttpSettings, open_connection_pool
from meshagent.agent.proxy.inbound import InboundProxy
from meshagent.agent.proxy.inputs import ProxyInputs
from meshagent.agent.proxy.limits import Limits
from meshagent.agent.proxy.mtls import WorkloadTls
from meshagent.agent.proxy.outbound import OutboundProxy, serve_outbound
from meshagent.agent.proxy.traffic import Traffic
from meshagent.agent.proxy.trim import trim_after_bursts
from meshagent.agent.proxy.upstream import Connector
from meshagent.agent.state import SnapshotStore
from meshagent.agent.telemetry import AccessLog, ProxyMetrics
from meshagent.common import extauthz
from meshagent.common.listeners import InFlight, PausableListener
from meshagent.common.spiffe import Identity

log = logging.getLogger(__name__)


class IdentitySource(Protocol):
    """What the proxy needs of the node's workload certificates."""

    def get(self, identity: Identity) -> WorkloadCert | None: ...

    async def wait_for(self, identity: Identity, timeout: float) -> WorkloadCert: ...


def _counter(metric) -> float:
    return sum(s.value for m in metric.collect() for s in m.samples if s.name.endswith("_total"))


class DataPlane:
    def __init__(
        self,
        config: AgentConfig,
        *,
        store: SnapshotStore,
        identities: IdentitySource,
        workload_tls: WorkloadTls,
        pop_orig_dst: Callable,
        metrics: ProxyMetrics,
        access_log: AccessLog | None,
    ) -> None:
        self.config = config
        self.store = store
        self.identities = identities
        self.workload_tls = workload_tls
        self.pop_orig_dst = pop_orig_dst
        self.inputs = ProxyInputs(
            store=store,
            node=config.node_name,
            trust_domain=config.trust_domain,
            metrics=metrics,
            access_log=access_log,
            http=HttpSettings(
                path_normalization=config.path_normalization,
                request_header_timeout=config.http_request_headers_timeout_s,
                client_idle_timeout=config.http_idle_timeout_s,
            ),
            limits=Limits(
                max_connections=config.max_connections_per_source,
                max_pending_requests=config.max_pending_requests_per_source,
                count=metrics.refusal,
            ),
            ext_authz=extauthz.providers(config.extension_providers),
            tcp_idle_timeout=config.tcp_idle_timeout_s,
        )
        self.listeners: list[PausableListener] = []
        # accepted and not yet counted as open: a drain waits for these too
        self.in_flight = InFlight()
        self.traffic: Traffic | None = None
        # where other proxy processes hand this one their connections (until it drains)
        self.handoff_path = handoff_socket(own_handoff_folder(config.state_dir), os.getpid())
        self._handoff_scope = trio.CancelScope()
        store.on_change(self._on_snapshot)

    def _on_snapshot(self, tables) -> None:
        # The store built and checked all of it (routes, trust bundle) before accepting the
        # snapshot: here it is only swapped in.
        self.workload_tls.set_trust_bundle(tables.snapshot.trust_bundle)
        self.inputs.metrics.set_policy(tables.metrics_policy)
        if self.traffic is not None:
            self.traffic.update(tables.routes)
        # Policy reaches open connections: those the new snapshot forbids end now.
        self.inputs.live.reevaluate(tables)

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[DataPlane]:
        """Pools and proxies, and a nursery for their connections; listeners come in `serve`."""
        async with (
            open_tunnel_pool(self.workload_tls.client_context) as pool,
            open_connection_pool() as http_pool,
            trio.open_nursery() as nursery,
        ):
            self.nursery = nursery
            self.pool = pool
            self.traffic = Traffic(http_pool, self.config.root_namespace)
            if self.store.tables is not None:
                self._on_snapshot(self.store.tables)
            connector = Connector(self.inputs, pool, self.identities, self.config.hbone_port)
            self.proxy = OutboundProxy(self.inputs, self.pop_orig_dst, connector, self.traffic)
            if self.config.kernel_join:  # same-node L4 connections relayed in the kernel
                self.proxy.kernel_join = open_socket_join(self.config.pin_dir)
            self.inbound = InboundProxy(self.inputs, http_pool)
            connector.attach_local(self.inbound, nursery)
            self.inbound.connector = connector  # to reach ext-authz providers
            nursery.start_soon(self._report_pool_size)
            nursery.start_soon(
                partial(trim_after_bursts, on_trim=self.inputs.metrics.memory_trims.inc),
                self.open_connections,
            )
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()
        if self.proxy.kernel_join is not None:  # after the connections that use it
            self.proxy.kernel_join.close()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED):
        """Bind 15001 and 15008 (shared with any other agent or worker on the node: see
        common/listeners.py) and accept; HBONE waits for the first trust bundle."""
        outbound = [PausableListener(self.config.proxy_ip, self.config.outbound_port)]
        if self.config.proxy_ip6:  # native IPv6 connects of meshed pods (bpf/connect6.c)
            outbound.append(PausableListener(self.config.proxy_ip6, self.config.outbound_port))
        hbone = PausableListener("0.0.0.0", self.config.hbone_port)
        self.listeners = [*outbound, hbone]
        await self.nursery.start(
            partial(serve_outbound, self.proxy, outbound, in_flight=self.in_flight)
        )
        await self.nursery.start(self._serve_handoff)
        if self.workload_tls.selector is None:
            log.info("waiting for the trust bundle before serving HBONE")
            while self.workload_tls.selector is None:
                await trio.sleep(0.05)
        await self.nursery.start(
            lambda task_status: serve_hbone(
                [hbone],
                ssl_selector=self.workload_tls.selector,
                handler=self.inbound.handle,
                refuse_new=lambda: self.inputs.drain.draining,
                idle_timeout=self.config.hbone_idle_timeout_s,
                in_flight=self.in_flight,
                task_status=task_status,
            )
        )
        task_status.started()

    async def _serve_handoff(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Take connections handed over by a draining process (agent/proxy/handoff.py); they
        run in the data plane's nursery, so stopping this (our own drain) leaves them be."""

        def take(conn, client, upstream) -> None:
            self.in_flight.start_soon(self.nursery, self.proxy.resume, conn, client, upstream)

        with self._handoff_scope:
            await handoff.serve_handoff(self.handoff_path, take, task_status=task_status)

    async def _report_pool_size(self) -> None:
        """The tunnel pool gauge is a state, not an event: refreshed every second."""
        while True:
            self.inputs.metrics.set_tunnel_pool_connections(self.tunnel_connections())
            await trio.sleep(1.0)

    async def drain(self, timeout: float, handoff_to: Sequence[os.PathLike] = ()) -> int:
        """Stop accepting; close idle HTTP keep-alive connections (busy ones after their
        response) and refuse new tunnels on open HBONE connections (peers retry over new
        ones); hand plain same-node relays to the processes listening at ``handoff_to`` (a
        replacement or a successor: agent/proxy/handoff.py); wait up to ``timeout`` s for
        the other open connections to end; how many are left."""
        self.set_accepting(False)
        self._handoff_scope.cancel()  # a draining process takes no more hand-offs
        self.inputs.drain.start()
        sender = self.proxy.handoff
        if handoff_to:
            asked = sender.start([Path(p) for p in handoff_to])
            log.info("handing %d connection(s) over to %d process(es)", asked, len(handoff_to))
        with trio.move_on_after(timeout):
            # and what was accepted but not yet counted (common/listeners.InFlight)
            while self.open_connections() or self.in_flight.count:
                await trio.sleep(0.1)
        if handoff_to:
            log.info("handed %d connection(s) over", sender.handed)
        return self.open_connections()

    def set_accepting(self, on: bool) -> None:
        """Stop (or start again) taking new connections; accepted ones go on."""
        for listener in self.listeners:
            try:
                listener.resume() if on else listener.pause()
            except OSError as exc:
                log.error("cannot listen on %s:%d again: %s", listener.host, listener.port, exc)

    def open_connections(self) -> int:
        return self.proxy.stats.active + self.inbound.stats.active

    def peak_connections(self) -> int:
        """The most connections (clients on 15001, tunnels on 15008) open at once since the
        last call, at most: a burst of short ones shows here though none is open when the
        agent looks (recycle.py)."""
        out, inbound = self.proxy.stats, self.inbound.stats
        peak = out.peak + inbound.peak
        out.peak, inbound.peak = out.active, inbound.active
        return peak

    def status(self) -> dict[str, Any]:
        """This process's share of `meshagent status` (sums across workers: `merge_status`)."""
        stats, inbound, authz = self.proxy.stats, self.inbound.stats, self.inputs.authz
        return {
            "proxy": {
                "active_connections": stats.active,
                "accepted_connections": stats.accepted,
                "orig_dst_misses": stats.orig_dst_misses,
                "upstream_failures": stats.upstream_failures,
                "no_endpoints": stats.no_endpoints,
                "bytes_sent": stats.bytes_sent,
                "bytes_received": stats.bytes_received,
                "by_destination": dict(stats.by_destination),
                "mutual_tls": stats.mutual_tls,
                "http_connections": stats.http_connections,
                "http_requests": stats.http_requests,
                "kernel_joined": stats.kernel_joined,
                "handed_out": stats.handed_out,
                "handed_in": stats.handed_in,
            },
            "outlier_ejections": [
                {
                    "cluster": e.cluster,
                    "address": e.address,
                    "until": e.until,
                    "ejections": e.ejections,
                }
                for e in self.traffic.clusters.ejected()
            ],
            "route_problems": list(self.traffic.table.problems),
            "inbound": {
                "accepted": inbound.accepted,
                "active": inbound.active,
                "refused": {str(k): v for k, v in inbound.refused.items()},
                "peers": dict(inbound.peers),
                "bytes_in": inbound.bytes_in,
                "bytes_out": inbound.bytes_out,
            },
            "tunnels": [
                {
                    "source": key.source.uri,
                    "destination": key.destination.uri,
                    "node": f"{key.node_addr[0]}:{key.node_addr[1]}",
                    "connections": s.connections,
                    "streams": s.streams,
                }
                for key, s in self.pool.stats().items()
            ],
            "hbone": {
                "inbound_connections": _counter(hbone_metrics.INBOUND_CONNECTIONS),
                "inbound_handshake_failures": _counter(hbone_metrics.INBOUND_HANDSHAKE_FAILURES),
                "inbound_protocol_errors": _counter(hbone_metrics.INBOUND_PROTOCOL_ERRORS),
                "outbound_connections": _counter(hbone_metrics.OUTBOUND_CONNECTIONS),
            },
            "authz": {
                "allowed": authz.allowed,
                "denied": authz.denied,
                "dry_run_denied": authz.dry_run_denied,
                "recent_denials": list(authz.recent),
            },
        }

    def tunnel_connections(self) -> int:
        return sum(s.connections for s in self.pool.stats().values())
