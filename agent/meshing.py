"""Keeps the datapath's membership map equal to the meshed pods running on this node.

Wanted: the snapshot's meshed workloads on this node (by pod IP). Found: their
network namespaces, by scanning /proc. The mesh_netns map is brought to exactly
that set, each entry with the pod's fail mode (from the snapshot: the controller resolves the
`meshagent.io/fail-mode` labels); it runs on every snapshot change and on a short timer, so a
pod that starts later is meshed as soon as its namespace exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio
from meshagent.agent.datapath.maps import DatapathMaps, MtlsMode
from meshagent.agent.discovery import NetnsScanner
from meshagent.agent.state import SnapshotStore

log = logging.getLogger(__name__)


@dataclass
class MeshedPod:
    namespace: str
    name: str
    ip: str
    netns_cookie: int
    fail_mode: str = "closed"  # what its connects do while the agent is down


@dataclass
class MeshingState:
    pods: list[MeshedPod] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # meshed pods whose netns is not found yet


class MeshReconciler:
    def __init__(self, store: SnapshotStore, maps: DatapathMaps, interval: float) -> None:
        self.store = store
        self.maps = maps
        self.interval = interval
        self.scanner = NetnsScanner()
        self.state = MeshingState()
        self._wake = trio.Event()
        self.paused = False
        store.on_change(lambda _tables: self._wake.set())

    def pause(self) -> None:
        """Stop writing the maps (a newer agent on the node owns them now)."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    def reconcile(self) -> None:
        """Blocking: scan namespaces and rewrite the map. Run from a worker thread.

        A pod is found by any of its IPs (IPv4 or IPv6) and known to the datapath by its
        primary one (the first in the snapshot), which keys its peer_auth entries."""
        tables = self.store.tables
        local = tables.local_meshed() if tables else []
        by_ip = {ip: w for w in local for ip in w.ips}
        found = self.scanner.scan(set(by_ip))
        desired = {ns.cookie: by_ip[ip] for ip, ns in found.items()}
        current = self.maps.meshed_pods()
        for cookie, w in desired.items():
            if current.get(cookie) != (w.ips[0], w.fail_mode):
                self.maps.set_meshed(cookie, w.ips[0], w.fail_mode)
                log.info(
                    "meshed %s/%s (%s, netns cookie %d, fail mode %s)",
                    w.namespace,
                    w.name,
                    w.ips[0],
                    cookie,
                    w.fail_mode,
                )
        for cookie, (ip, _mode) in current.items():
            if cookie not in desired:
                self.maps.unset_meshed(cookie)
                log.info("unmeshed %s (netns cookie %d)", ip, cookie)
        self.maps.set_peer_auth(self._peer_auth(tables, local) if tables else {})
        meshed_uids = {w.uid for w in desired.values()}
        self.state = MeshingState(
            pods=[
                MeshedPod(w.namespace, w.name, w.ips[0], cookie, w.fail_mode)
                for cookie, w in sorted(desired.items(), key=lambda kv: kv[1].ips[0])
            ],
            waiting=sorted(f"{w.namespace}/{w.name}" for w in local if w.uid not in meshed_uids),
        )

    @staticmethod
    def _peer_auth(tables, local: list) -> dict[tuple[str, int], MtlsMode]:
        """The kernel's view of PeerAuthentication for this node's meshed pods, keyed by each
        pod's primary IP (bpf/ingress.c finds the pod by its namespace, whatever address)."""
        entries: dict[tuple[str, int], MtlsMode] = {}
        for workload in local:
            ip = workload.ips[0]
            policy = tables.mtls_for(workload)
            strict = policy.mode == "STRICT"
            if strict:
                entries[(ip, 0)] = MtlsMode.STRICT
            for port, mode in policy.ports.items():
                if (mode == "STRICT") != strict:
                    entries[(ip, port)] = (
                        MtlsMode.STRICT if mode == "STRICT" else MtlsMode.PERMISSIVE
                    )
        return entries

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.to_thread.run_sync(self.reconcile)
        task_status.started()
        while True:
            with trio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = trio.Event()
            if self.paused:
                continue
            try:
                await trio.to_thread.run_sync(self.reconcile)
            except OSError as exc:
                log.error("mesh reconcile failed: %s", exc)
