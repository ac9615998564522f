"""Compiled routes and the upstream state that lives across snapshots (balancer counters,
outlier ejections, pooled HTTP connections). One writer: the snapshot callback."""

from __future__ import annotations

from meshagent.agent.proxy.http import ConnectionPool
from meshagent.agent.proxy.lb import Clusters
from meshagent.agent.proxy.routing import RouteTable, compile_routes
from meshagent.common.snapshot import Snapshot


class Traffic:
    def __init__(self, pool: ConnectionPool, root_namespace: str) -> None:
        self.pool = pool
        self.root_namespace = root_namespace
        self.table = RouteTable()
        self.clusters = Clusters()

    def update(self, snap: Snapshot) -> None:
        self.table = compile_routes(snap, root_namespace=self.root_namespace)
        self.pool.discard(self.clusters.sync(self.table))
