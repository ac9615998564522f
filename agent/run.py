"""The agent process: datapath, snapshot, identities, proxy, telemetry and admin, in one nursery.

Order matters for readiness: the datapath is installed (or found still attached
from a previous run), the saved snapshot is loaded if any, the controller
stream and the identity manager start, then the listeners (15001 outbound,
15008 HBONE, 15020 metrics, 15000 admin) — and only then does 15021 answer ready.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import asdict
from functools import partial

import trio
from meshagent.agent import handover
from meshagent.agent.config import AgentConfig
from meshagent.agent.configclient import ControllerLink, serve_controller_link
from meshagent.agent.datapath import loader
from meshagent.agent.hbone import metrics as hbone_metrics
from meshagent.agent.hbone.client import open_tunnel_pool
from meshagent.agent.hbone.server import serve_hbone
from meshagent.agent.identity.certstore import CertStore
from meshagent.agent.identity.controller_signer import ControllerSigner
from meshagent.agent.identity.manager import IdentityManager
from meshagent.agent.meshing import MeshReconciler
from meshagent.agent.proxy.http import open_connection_pool
from meshagent.agent.proxy.inbound import InboundProxy
from meshagent.agent.proxy.inputs import ProxyInputs
from meshagent.agent.proxy.mtls import WorkloadTls
from meshagent.agent.proxy.outbound import OutboundProxy, serve_outbound
from meshagent.agent.proxy.traffic import Traffic
from meshagent.agent.proxy.upstream import Connector, workload_identity
from meshagent.agent.state import SnapshotStore, Tables
from meshagent.agent.telemetry import (
    AccessLogSettings,
    NodeMetrics,
    ProxyMetrics,
    metrics_handler,
    open_access_log,
)
from meshagent.common.httpserve import Handler, Response, json_response, serve_http
from meshagent.common.listeners import PausableListener, enable_request_migration

log = logging.getLogger(__name__)

VERSION = "0.1.0"


def _counter(metric) -> float:
    return sum(s.value for m in metric.collect() for s in m.samples if s.name.endswith("_total"))


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.store = SnapshotStore(config.node_name, config.state_dir)
        self.link = ControllerLink(config.controller)
        self.signer = ControllerSigner()
        self.identities = IdentityManager(self.signer, store=CertStore(config.state_dir / "certs"))
        self.workload_tls = WorkloadTls(self.identities, config.trust_domain)
        self.ready = False
        self.draining = False
        self.phase = handover.Phase.OWNER
        self.accepting: list[PausableListener] = []
        self.datapath_reused = False
        self.store.on_change(self._on_snapshot)

    def _on_snapshot(self, tables: Tables) -> None:
        """Certificates for every meshed pod on this node; the new trust bundle for TLS."""
        td = self.config.trust_domain
        self.identities.set_wanted({workload_identity(w, td) for w in tables.local_meshed()})
        self.workload_tls.set_trust_bundle(tables.snapshot.trust_bundle)
        if hasattr(self, "node_metrics"):
            self.node_metrics.set_snapshot_version(tables.snapshot.version)
        if hasattr(self, "traffic"):
            self.traffic.update(tables.snapshot)

    def _certificate_expiry(self) -> dict:
        return self.identities.expiries()

    def live_status(self) -> dict:
        """The agent's own view, served on the admin port for `meshagent status`."""
        stats, inbound, authz = self.proxy.stats, self.inbound.stats, self.inputs.authz
        return {
            "node": self.config.node_name,
            "version": VERSION,
            "uptime_s": round(time.time() - self.started_at, 1),
            "ready": self.ready,
            "phase": "draining" if self.draining else self.phase.value,
            "datapath_reused": self.datapath_reused,
            "controller": asdict(self.link),
            "snapshot_version": self.store.version,
            "meshed_pods": [asdict(p) for p in self.reconciler.state.pods],
            "waiting_pods": self.reconciler.state.waiting,
            "certificates": self.identities.status(),
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

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Registered before anything is loaded, so that an older agent on the node sees its
        # successor at once (daemonset/README.md, "Upgrade and removal"; none in the lab).
        with handover.open_registration_from_env(self.config.state_dir) as registration:
            await self._serve(registration, task_status=task_status)

    async def _serve(
        self,
        registration: handover.AgentRegistration | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        cfg = self.config
        settings = loader.datapath_settings(cfg)
        self.datapath_reused = not await trio.to_thread.run_sync(loader.install, settings)
        maps = loader.open_maps(settings)
        maps.set_excluded_ports(set(cfg.excluded_ports))
        # The node itself (its proxy, kubelet probes) may always reach pods, STRICT or not.
        maps.set_trusted_sources({cfg.proxy_ip, *cfg.trusted_sources})
        self.node_metrics = NodeMetrics(
            datapath_counters=maps.read_counters, certificate_expiry=self._certificate_expiry
        )
        self.store.load_saved()
        self.reconciler = MeshReconciler(self.store, maps, cfg.discovery_interval)

        async def status(_query: str) -> Response:
            return json_response(json.dumps(self.live_status()))

        async def ready(_query: str) -> Response:
            return Response(
                200 if self.ready else 503, b"ready\n" if self.ready else b"not ready\n"
            )

        try:
            async with (
                open_access_log(
                    AccessLogSettings(output=cfg.access_log, sample=cfg.access_log_sample)
                ) as access_log,
                open_tunnel_pool(self.workload_tls.client_context) as pool,
                open_connection_pool() as http_pool,
                trio.open_nursery() as nursery,
            ):
                self.traffic = Traffic(http_pool, cfg.root_namespace)
                if self.store.tables is not None:
                    self.traffic.update(self.store.tables.snapshot)
                self.pool = pool
                self.inputs = ProxyInputs(
                    store=self.store,
                    node=cfg.node_name,
                    trust_domain=cfg.trust_domain,
                    metrics=ProxyMetrics(self.node_metrics.local_registry),
                    access_log=access_log,
                )
                connector = Connector(self.inputs, pool, self.identities, cfg.hbone_port)
                self.proxy = OutboundProxy(self.inputs, maps.pop_orig_dst, connector, self.traffic)
                self.inbound = InboundProxy(self.inputs, http_pool)
                connector.attach_local(self.inbound, nursery)
                # 15021 and the admin port (up early, for `meshagent status`) are closed while a
                # newer agent runs on the node; serving is marked in the registry once ready.
                await nursery.start(
                    partial(
                        handover.serve_handover,
                        registration,
                        lambda: self.ready,
                        partial(self._serve_owner_ports, status, ready),
                        on_phase=self._on_phase,
                    )
                )
                await nursery.start(serve_controller_link, cfg, self.store, self.link, self.signer)
                await nursery.start(self.identities.serve)
                await nursery.start(self.reconciler.serve)
                # Bound now, served below: a successor on the node shares them (SO_REUSEPORT).
                enable_request_migration()
                outbound = PausableListener(cfg.proxy_ip, cfg.outbound_port)
                hbone = PausableListener("0.0.0.0", cfg.hbone_port)
                metrics = PausableListener("0.0.0.0", cfg.metrics_port)
                self.accepting = [outbound, hbone, metrics]
                if self.phase is handover.Phase.HANDED_OVER:  # a restart behind a successor
                    self._stop_accepting()
                await nursery.start(serve_outbound, self.proxy, [outbound])
                if self.workload_tls.selector is None:
                    log.info("waiting for the trust bundle before serving HBONE")
                    await self._wait_for_trust_bundle()
                await nursery.start(
                    lambda task_status: serve_hbone(
                        [hbone],
                        ssl_selector=self.workload_tls.selector,
                        handler=self.inbound.handle,
                        task_status=task_status,
                    )
                )
                scrape = metrics_handler(self.node_metrics.registry)
                await nursery.start(
                    serve_http, [metrics], {"/metrics": scrape, "/stats/prometheus": scrape}
                )
                nursery.start_soon(self._report_link_state)
                nursery.start_soon(self._drain_on_sigterm, nursery.cancel_scope)
                self.ready = True
                log.info(
                    "agent ready on node %s (proxy %s:%d, HBONE :%d)",
                    cfg.node_name,
                    cfg.proxy_ip,
                    cfg.outbound_port,
                    cfg.hbone_port,
                )
                task_status.started()
        finally:
            maps.close()

    async def _serve_owner_ports(
        self,
        status: Handler,
        ready: Handler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Readiness (15021) and admin (15000): only the node's newest agent answers them."""
        cfg = self.config
        async with trio.open_nursery() as nursery:
            admin = [PausableListener("127.0.0.1", cfg.admin_port)]
            readiness = [PausableListener("0.0.0.0", cfg.readiness_port)]
            await nursery.start(serve_http, admin, {"/status": status})
            await nursery.start(serve_http, readiness, {"/healthz/ready": ready})
            task_status.started()

    def _on_phase(self, phase: handover.Phase) -> None:
        """A newer agent serving owns the node: stop accepting and stop writing the maps,
        keep relaying what was accepted. Take everything back if it goes away."""
        self.phase = phase
        if self.draining:
            return
        if phase is handover.Phase.HANDED_OVER:
            self._stop_accepting()
            self.reconciler.pause()
        else:
            try:
                for listener in self.accepting:
                    listener.resume()
            except OSError as exc:
                log.error("cannot listen again after the successor went away: %s", exc)
            self.reconciler.resume()

    def _stop_accepting(self) -> None:
        for listener in self.accepting:
            listener.pause()

    def _open_connections(self) -> int:
        return self.proxy.stats.active + self.inbound.stats.active

    async def _drain_on_sigterm(self, serving: trio.CancelScope) -> None:
        """SIGTERM: stop accepting, let established connections finish (up to
        ``drain_timeout_s``), then stop. The datapath is left as it is (a restart or the
        successor keeps using it; removal is `meshagent uninstall`, the preStop hook)."""
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                break
        self.draining, self.ready = True, False
        self._stop_accepting()
        open_now = self._open_connections()
        log.info(
            "SIGTERM: draining %d connection(s) for up to %.0f s",
            open_now,
            self.config.drain_timeout_s,
        )
        with trio.move_on_after(self.config.drain_timeout_s):
            while self._open_connections():
                await trio.sleep(0.1)
        log.info("drained, %d connection(s) left open; exiting", self._open_connections())
        serving.cancel()

    async def _wait_for_trust_bundle(self) -> None:
        while self.workload_tls.selector is None:
            await trio.sleep(0.05)

    async def _report_link_state(self) -> None:
        """Gauges that are states, not events: refreshed every second."""
        self.node_metrics.set_proxy_workers(1)  # one proxy process per node today (issue #9)
        while True:
            self.node_metrics.set_controller_connected(self.link.connected)
            pools = self.pool.stats().values()
            self.inputs.metrics.set_tunnel_pool_connections(sum(s.connections for s in pools))
            await trio.sleep(1.0)
