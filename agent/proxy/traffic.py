"""Compiled routes and the upstream state that lives across snapshots (balancer counters,
outlier ejections, pooled HTTP connections). One writer: the snapshot callback."""

from __future__ import annotations

from meshagent.agent.proxy.http import ConnectionPool
from meshagent.agent.proxy.lb import Clusters
from meshagent.agent.proxy.routing import RouteTable


class Traffic:
    def __init__(self, pool: ConnectionPool, root_namespace: str) -> None:
        self.pool = pool
        self.root_namespace = root_namespace
        self.table = RouteTable()
        self.clusters = Clusters()

    def update(self, table: RouteTable) -> None:
        """Swap in routes compiled with the snapshot (agent/state.py `Tables.routes`)."""
        self.table = table
        self.pool.discard(self.clusters.sync(self.table))
