"""The agent process: datapath, snapshot, meshing, proxy and admin in one nursery.

Order matters for readiness: the datapath is installed (or found still
attached from a previous run), the saved snapshot is loaded if any, then the
proxy listens, and only then does 15021 answer ready.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

import trio
from meshagent.agent.config import AgentConfig
from meshagent.agent.configclient import ControllerLink, serve_config_client
from meshagent.agent.datapath import loader
from meshagent.agent.meshing import MeshReconciler
from meshagent.agent.proxy.outbound import OutboundProxy, serve_outbound
from meshagent.agent.proxy.upstream import Connector
from meshagent.agent.state import SnapshotStore
from meshagent.common.httpserve import Response, json_response, serve_http

log = logging.getLogger(__name__)

VERSION = "0.1.0"


def datapath_settings(config: AgentConfig) -> loader.DatapathSettings:
    return loader.DatapathSettings(
        pin_dir=config.pin_dir,
        cgroup_path=config.cgroup_path,
        proxy_ip=config.proxy_ip,
        proxy_port=config.outbound_port,
    )


def _authz_view(stats) -> dict:
    return {
        "allowed": stats.allowed,
        "denied": stats.denied,
        "dry_run_denied": stats.dry_run_denied,
        "recent_denials": list(stats.recent),
    }


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.store = SnapshotStore(config.node_name, config.state_dir)
        self.link = ControllerLink(config.controller)
        self.ready = False
        self.datapath_reused = False

    def live_status(self) -> dict:
        """The agent's own view, served on the admin port for `meshagent status`."""
        stats = self.proxy.stats
        return {
            "node": self.config.node_name,
            "version": VERSION,
            "uptime_s": round(time.time() - self.started_at, 1),
            "ready": self.ready,
            "datapath_reused": self.datapath_reused,
            "controller": asdict(self.link),
            "snapshot_version": self.store.version,
            "meshed_pods": [asdict(p) for p in self.reconciler.state.pods],
            "waiting_pods": self.reconciler.state.waiting,
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
            },
            "authz_same_node": _authz_view(self.connector.authz_stats),
        }

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        settings = datapath_settings(cfg)
        self.datapath_reused = not await trio.to_thread.run_sync(loader.install, settings)
        maps = loader.open_maps(settings)
        maps.set_excluded_ports(set(cfg.excluded_ports))
        # The node itself (its proxy, kubelet probes) may always reach pods, STRICT or not.
        maps.set_trusted_sources({cfg.proxy_ip, *cfg.trusted_sources})
        self.store.load_saved()
        self.reconciler = MeshReconciler(self.store, maps, cfg.discovery_interval)
        self.connector = Connector(self.store, cfg.node_name, cfg.trust_domain, None, None)
        self.proxy = OutboundProxy(self.store, maps.pop_orig_dst, self.connector)
        token = cfg.token_file.read_text().strip() if cfg.token_file else ""

        async def status(_query: str) -> Response:
            return json_response(json.dumps(self.live_status()))

        async def ready(_query: str) -> Response:
            return Response(
                200 if self.ready else 503, b"ready\n" if self.ready else b"not ready\n"
            )

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_http, "127.0.0.1", cfg.admin_port, {"/status": status})
                host, port = cfg.controller_addr
                await nursery.start(serve_config_client, self.store, host, port, token, self.link)
                await nursery.start(self.reconciler.serve)
                await nursery.start(serve_outbound, self.proxy, cfg.proxy_ip, cfg.outbound_port)
                await nursery.start(
                    serve_http, "0.0.0.0", cfg.readiness_port, {"/healthz/ready": ready}
                )
                self.ready = True
                log.info(
                    "agent ready on node %s (proxy %s:%d)",
                    cfg.node_name,
                    cfg.proxy_ip,
                    cfg.outbound_port,
                )
                task_status.started()
        finally:
            maps.close()
