"""The agent process: datapath, snapshot, identities, proxy, telemetry and admin, in one nursery.

Order matters for readiness: the datapath is installed (or found still attached
from a previous run), the saved snapshot is loaded if any, the controller
stream and the identity manager start, then the listeners (15001 outbound,
15008 HBONE, 15020 metrics, 15000 admin) — and only then does 15021 answer ready.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict
from functools import partial
from typing import TYPE_CHECKING

import trio
from meshagent.agent import handover
from meshagent.agent.config import AgentConfig
from meshagent.agent.configclient import ControllerLink, serve_controller_link
from meshagent.agent.datapath import loader
from meshagent.agent.heartbeat import Heartbeat
from meshagent.agent.identity.certstore import CertStore
from meshagent.agent.identity.controller_signer import ControllerSigner
from meshagent.agent.identity.manager import IdentityManager
from meshagent.agent.meshing import MeshReconciler
from meshagent.agent.state import SnapshotStore, Tables
from meshagent.agent.telemetry import (
    AccessLogSettings,
    NodeMetrics,
    ProcessCollector,
    metrics_handler,
    open_access_log,
)
from meshagent.agent.telemetry.flows import FlowTap, flow_socket, serve_flow_tap
from meshagent.agent.telemetry.process import seconds_since_start
from meshagent.agent.workers.launch import WorkerLaunch, start_workers
from meshagent.agent.workers.pool import WorkerPool
from meshagent.common.httpserve import Handler, Request, Response, json_response, serve_http
from meshagent.common.listeners import PausableListener, enable_request_migration
from meshagent.common.procmem import memory_report
from meshagent.common.spiffe import workload_identity

if TYPE_CHECKING:
    from meshagent.agent.datapath.maps import DatapathMaps
    from meshagent.agent.dataplane import DataPlane
    from meshagent.agent.telemetry import AccessLog

log = logging.getLogger(__name__)

VERSION = "0.1.0"
HANDOVER_CHECK_TIMEOUT_S = 2.0  # a look at the registry on SIGTERM: a few file reads


class Agent:
    def __init__(self, config: AgentConfig, workers: WorkerLaunch | None = None) -> None:
        """``workers``: the proxy workers `meshagent run` started before importing the agent
        (workers/launch.py); started here when not given."""
        self.config = config
        self.launch = workers
        self.started_at = time.time()
        self.store = SnapshotStore(
            config.node_name,
            config.state_dir,
            root_namespace=config.root_namespace,
            trust_domains=config.trust_domains,
        )
        self.link = ControllerLink(config.controller)
        self.signer = ControllerSigner()
        self.identities = IdentityManager(self.signer, store=CertStore(config.state_dir / "certs"))
        self.ready = False
        self.draining = False
        self.phase = handover.Phase.OWNER
        self.handover_check = handover.Recheck()
        self.registration: handover.AgentRegistration | None = None
        self.metrics_listener: PausableListener | None = None  # bound once the proxy serves
        self.datapath_reused = False
        self.ready_after_s: float | None = None  # from the process's start (fork) to ready
        self.store.on_change(self._on_snapshot)

    def _on_snapshot(self, tables: Tables) -> None:
        """Certificates for every meshed pod on this node (the data plane takes the rest)."""
        td = self.config.trust_domain
        self.identities.set_wanted({workload_identity(w, td) for w in tables.local_meshed()})
        self.node_metrics.set_snapshot_version(tables.snapshot.version)

    def dataplane_status(self) -> dict:
        return self.dataplane.status()

    def _certificate_expiry(self) -> dict:
        return self.identities.expiries()

    def _proxy_processes(self) -> dict[str, int]:
        """The processes that proxy on this node, for their CPU, memory and fd figures."""
        dataplane = getattr(self, "dataplane", None)
        workers = dataplane.pids() if isinstance(dataplane, WorkerPool) else {}
        return {"agent": os.getpid(), **workers}

    def _processes_by_role(self) -> list[tuple[str, int]]:
        """The agent, its workers' fork server and the workers, for their memory in status."""
        dataplane = getattr(self, "dataplane", None)
        out = [("agent", os.getpid())]
        if isinstance(dataplane, WorkerPool):
            if dataplane.launch.server is not None:
                out.append(("fork server", dataplane.launch.server.pid))
            out += [(f"worker {index}", pid) for index, pid in dataplane.pids().items()]
        return out

    def live_status(self) -> dict:
        """The agent's own view, served on the admin port for `meshagent status`."""
        return {
            "node": self.config.node_name,
            "version": VERSION,
            "uptime_s": round(time.time() - self.started_at, 1),
            "ready": self.ready,
            "phase": "draining" if self.draining else self.phase.value,
            "datapath_reused": self.datapath_reused,
            "ready_after_s": self.ready_after_s,
            "controller": asdict(self.link),
            "snapshot_version": self.store.version,
            "meshed_pods": [asdict(p) for p in self.reconciler.state.pods],
            "waiting_pods": self.reconciler.state.waiting,
            "heartbeat": {
                "beating": self.heartbeat.beating,
                "interval_s": self.config.heartbeat_interval_s,
                "timeout_s": self.config.heartbeat_timeout_s,
            },
            "certificates": self.identities.status(),
            # RSS beside PSS: the fork server and workers share pages with the agent
            "processes": memory_report(self._processes_by_role()),
            **self.dataplane_status(),
        }

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Registered before anything is loaded, so that an older agent on the node sees its
        # successor at once (daemonset/README.md, "Upgrade and removal"; none in the lab).
        with handover.open_registration_from_env(self.config.state_dir) as registration:
            self.registration = registration
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
        maps.set_trusted_sources(
            {cfg.proxy_ip, *([cfg.proxy_ip6] if cfg.proxy_ip6 else []), *cfg.trusted_sources}
        )
        # this pod's hand-off sockets (agent/proxy/handoff.py): a previous container's are dead
        handover.clear_handoff(handover.own_handoff_folder(cfg.state_dir))
        workers = cfg.worker_count
        if self.launch is None:
            self.launch = start_workers(cfg.model_dump_json(), workers, cfg.worker_metrics_dir)
        launch = self.launch
        self.node_metrics = NodeMetrics(
            datapath_counters=maps.read_counters,
            certificate_expiry=self._certificate_expiry,
            multiprocess_dir=launch.metrics_dir if launch else None,
            build_version=VERSION,
        )
        self.node_metrics.local_registry.register(ProcessCollector(self._proxy_processes))
        self.store.load_saved()
        self.reconciler = MeshReconciler(self.store, maps, cfg.discovery_interval)
        # Beats while this agent's proxy serves the node (agent/heartbeat.py): ready, not
        # draining, not handed over to a newer agent.
        heartbeat = Heartbeat(
            partial(maps.beat, cfg.heartbeat_timeout_s),
            self._serves_node,
            cfg.heartbeat_interval_s,
        )
        self.heartbeat = heartbeat
        heartbeat.start()

        async def status(_query: str) -> Response:
            return json_response(json.dumps(self.live_status()))

        async def ready(_query: str) -> Response:
            return Response(
                200 if self.ready else 503, b"ready\n" if self.ready else b"not ready\n"
            )

        flow_tap = FlowTap()  # `meshagent observe` (the workers have their own)
        try:
            async with (
                open_access_log(
                    AccessLogSettings(output=cfg.access_log, sample=cfg.access_log_sample),
                    tap=flow_tap,
                ) as access_log,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(serve_flow_tap, flow_tap, flow_socket(cfg.state_dir))
                if launch is not None:
                    self.dataplane = WorkerPool(
                        cfg,
                        workers,
                        self.store,
                        self.identities,
                        launch,
                        on_recycled=self.node_metrics.worker_recycled,
                    )
                else:
                    self.dataplane = await nursery.start(
                        _run_dataplane, self._in_process_dataplane(maps, access_log)
                    )
                # 15021 and the admin port (up early, for `meshagent status`) are closed while a
                # newer agent runs on the node; serving is marked in the registry once ready.
                await nursery.start(
                    partial(
                        handover.serve_handover,
                        registration,
                        lambda: self.ready,
                        partial(self._serve_owner_ports, status, ready),
                        on_phase=self._on_phase,
                        recheck=self.handover_check,
                    )
                )
                await nursery.start(serve_controller_link, cfg, self.store, self.link, self.signer)
                await nursery.start(self.identities.serve)
                await nursery.start(self.reconciler.serve)
                # Bound now, served below: a successor on the node shares them (SO_REUSEPORT).
                enable_request_migration()
                metrics = PausableListener("0.0.0.0", cfg.metrics_port)
                self.metrics_listener = metrics
                await nursery.start(self.dataplane.serve)
                self.node_metrics.set_proxy_workers(workers)
                if self.phase is handover.Phase.HANDED_OVER:  # a restart behind a successor
                    self._set_accepting(False)
                scrape = metrics_handler(self.node_metrics.registry)
                await nursery.start(
                    serve_http, [metrics], {"/metrics": scrape, "/stats/prometheus": scrape}
                )
                nursery.start_soon(self._report_link_state)
                nursery.start_soon(self._drain_on_sigterm, nursery.cancel_scope)
                self.ready = True
                heartbeat.beat_now()  # before any task can answer ready (no await between)
                self.ready_after_s = round(seconds_since_start(), 3)
                log.info(
                    "agent ready on node %s (proxy %s:%d, HBONE :%d) %.3f s after its start (%s)",
                    cfg.node_name,
                    cfg.proxy_ip,
                    cfg.outbound_port,
                    cfg.hbone_port,
                    self.ready_after_s,
                    "reused pinned datapath" if self.datapath_reused else "built the datapath",
                )
                task_status.started()
        finally:
            heartbeat.stop()
            maps.close()
            if launch is not None:
                launch.close()
                shutil.rmtree(launch.metrics_dir, ignore_errors=True)

    def _in_process_dataplane(self, maps: DatapathMaps, access_log: AccessLog) -> DataPlane:
        """The proxy in the agent's own process (one worker). Imported here: with workers the
        agent never proxies, and a restart serves sooner without importing the proxy."""
        from meshagent.agent.dataplane import DataPlane
        from meshagent.agent.proxy.mtls import WorkloadTls
        from meshagent.agent.telemetry import ProxyMetrics

        return DataPlane(
            self.config,
            store=self.store,
            identities=self.identities,
            workload_tls=WorkloadTls(self.identities, self.config.trust_domain),
            pop_orig_dst=maps.pop_orig_dst,
            metrics=ProxyMetrics(self.node_metrics.local_registry),
            access_log=access_log,
        )

    def _serves_node(self) -> bool:
        """Whether this agent's proxy takes the node's new connections (so it beats): ready,
        not draining, not handed over, and with proxy workers, at least one of them running
        (with every worker dead nothing listens on 15001: the pods' fail modes should hold)."""
        if not self.ready or self.draining or self.phase is handover.Phase.HANDED_OVER:
            return False
        dataplane = getattr(self, "dataplane", None)
        return not isinstance(dataplane, WorkerPool) or dataplane.running > 0

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
            await nursery.start(
                partial(serve_http, post_routes={"/workers/recycle": self._recycle_workers}),
                admin,
                {"/status": status},
            )
            await nursery.start(serve_http, readiness, {"/healthz/ready": ready})
            task_status.started()

    async def _recycle_workers(self, request: Request) -> Response:
        """`POST /workers/recycle` (admin port, local only): replace every proxy worker as a
        grown one is (agent/workers/pool.py `recycle_all`); says how many."""
        dataplane = getattr(self, "dataplane", None)
        if not isinstance(dataplane, WorkerPool):
            return json_response('{"error": "no proxy workers: the proxy runs in the agent"}', 409)
        return json_response(json.dumps({"recycled": dataplane.recycle_all("asked")}))

    def _on_phase(self, phase: handover.Phase) -> None:
        """A newer agent serving owns the node: stop accepting and stop writing the maps,
        keep relaying what was accepted. Take everything back if it goes away (a draining
        agent only stops writing the maps: the newer one owns them)."""
        self.phase = phase
        if self.draining:
            if phase is handover.Phase.HANDED_OVER:
                self.reconciler.pause()
            return
        if phase is handover.Phase.HANDED_OVER:
            self._set_accepting(False)
            self.reconciler.pause()
        else:
            self._set_accepting(True)
            self.reconciler.resume()

    def _set_accepting(self, on: bool) -> None:
        if self.metrics_listener is None:
            return  # not listening yet: `_serve` looks at the phase once it does
        self.dataplane.set_accepting(on)
        try:
            self.metrics_listener.resume() if on else self.metrics_listener.pause()
        except OSError as exc:
            log.error("cannot listen on the metrics port again: %s", exc)

    def _open_connections(self) -> int:
        return self.dataplane.open_connections()

    async def _drain_on_sigterm(self, serving: trio.CancelScope) -> None:
        """SIGTERM: stop accepting, let established connections finish (up to
        ``drain_timeout_s``), then stop. The datapath is left as it is (a restart or the
        successor keeps using it; removal is `meshagent uninstall`, the preStop hook)."""
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                break
        # where the node stands now (a successor may serve since the last poll): a handed-over
        # agent stops writing the maps before it drains
        await self.handover_check.now(timeout=HANDOVER_CHECK_TIMEOUT_S)
        self.draining, self.ready = True, False
        self._set_accepting(False)
        # behind a serving successor (an upgrade), plain same-node relays go on in its
        # processes instead (agent/proxy/handoff.py)
        handoff_to = (
            await trio.to_thread.run_sync(
                handover.successor_handoff_sockets, self.registration, self.config.state_dir
            )
            if self.phase is handover.Phase.HANDED_OVER
            else []
        )
        log.info(
            "SIGTERM: draining %d connection(s) for up to %.0f s (%d successor process(es) to"
            " hand plain same-node ones to)",
            self._open_connections(),
            self.config.drain_timeout_s,
            len(handoff_to),
        )
        left = await self.dataplane.drain(self.config.drain_timeout_s, handoff_to)
        log.info("drained, %d connection(s) left open; exiting", left)
        serving.cancel()

    async def _report_link_state(self) -> None:
        """Gauges that are states, not events: refreshed every second."""
        while True:
            self.node_metrics.set_controller_connected(self.link.connected)
            await trio.sleep(1.0)


async def _run_dataplane(
    dataplane: DataPlane, *, task_status: trio.TaskStatus[DataPlane] = trio.TASK_STATUS_IGNORED
) -> None:
    async with dataplane.open():
        task_status.started(dataplane)
        await trio.sleep_forever()
