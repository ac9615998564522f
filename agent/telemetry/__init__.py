"""Telemetry: Istio-compatible Prometheus metrics, meshagent's own figures and access logs.

What flows through: the proxy reports connections and requests (`ProxyMetrics`, `AccessLog`)
with labels built once per connection (`ConnectionLabels`); the agent reports its state and
serves one page for the whole node (`NodeMetrics`, `render`, `metrics_handler`). See
`metrics` for where each call goes in a connection's life, `exposition` for running proxy
workers in several processes, `page` for how a full node's page is built cheaply, and
`meshagent.common.istio.telemetry` for the Telemetry overrides `ProxyMetrics` applies.
"""

from meshagent.agent.telemetry.accesslog import AccessLog, AccessLogSettings, open_access_log
from meshagent.agent.telemetry.exposition import (
    metrics_handler,
    prepare_multiprocess_dir,
    render,
    worker_exited,
)
from meshagent.agent.telemetry.labels import (
    UNKNOWN_PEER,
    UNKNOWN_SERVICE,
    ConnectionLabels,
    Peer,
    ServiceRef,
    local_hop_security,
    peer_from_workload,
    service_ref,
    workload_name,
)
from meshagent.agent.telemetry.metrics import NodeMetrics, ProxyMetrics
from meshagent.agent.telemetry.process import ProcessCollector

__all__ = [
    "UNKNOWN_PEER",
    "UNKNOWN_SERVICE",
    "AccessLog",
    "AccessLogSettings",
    "ConnectionLabels",
    "NodeMetrics",
    "Peer",
    "ProcessCollector",
    "ProxyMetrics",
    "ServiceRef",
    "local_hop_security",
    "metrics_handler",
    "open_access_log",
    "peer_from_workload",
    "prepare_multiprocess_dir",
    "render",
    "service_ref",
    "worker_exited",
    "workload_name",
]
