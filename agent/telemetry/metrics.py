"""Istio's standard metrics and meshagent's own figures, served on 15020.

What flows through: the proxy reports each connection and HTTP request to `ProxyMetrics`
(counters and histograms with Istio's names, types, labels and buckets, so Istio's dashboards
and alerts work unchanged); the agent reports its state to `NodeMetrics` and hands it callables
that are read at scrape time (BPF counters, certificate expiry). `NodeMetrics.registry` is what
`render` turns into the page for ``/metrics`` and ``/stats/prometheus``.

Where each call goes in a connection's life (reporter ``source`` on the client's node,
``destination`` on the server's):

- accepted, peers and service known: build `ConnectionLabels`, then `tcp_opened(labels)`;
- while bytes flow, optionally: `tcp_bytes(labels, sent, received)` with the bytes since the
  last report, so long connections show traffic before they end;
- at close: `tcp_closed(labels, sent, received, response_flags)` with the bytes not yet
  reported (all of them if `tcp_bytes` was never called);
- on an HTTP port, per request once the response is done:
  `http_request(labels, code, flags, duration_ms, request_bytes, response_bytes)`, for a gRPC
  call with `grpc_status` and `messages` (gRPC messages each way: Istio's
  istio_request_messages_total and istio_response_messages_total, only for gRPC calls);
- per authorization decision: `policy_decision(decision)`. (Outlier ejections are counted by
  the balancer itself: ``meshagent_outlier_cluster_ejections_total{cluster}``, `proxy.lb`.)

``sent`` is what the proxy sent to the connection's client (the response direction),
``received`` what it received from the client (the request direction), as Istio counts them.
Response flags are Envoy's short codes (``-`` for none; ztunnel uses ``DENY`` for a policy
denial and ``CONNECT`` for a failed upstream connection).

Istio's label set: every family carries reporter, source_* and destination_* (workload,
workload_namespace, principal, app, version, canonical_service, canonical_revision, cluster),
destination_service(_name, _namespace), request_protocol, connection_security_policy and
response_flags; HTTP families add response_code and grpc_response_status, as Istio's proxy does.
Histogram buckets are Envoy's defaults, which Istio keeps for all three histograms.

Cost: the metric children for a (connection, flags, code) are cached, so a report is one dict
lookup plus the increments. Children are never removed (as in Istio's proxies, series live
until restart); the cache is bounded and only re-resolves children when full.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from meshagent.agent.telemetry.exposition import MULTIPROC_ENV, in_multiprocess_mode
from meshagent.agent.telemetry.labels import (
    HTTP_LABELS,
    NO_RESPONSE_FLAGS,
    TCP_LABELS,
    ConnectionLabels,
)
from meshagent.agent.telemetry.page import NodeRegistry
from meshagent.common.istio.telemetry import EMPTY_POLICY, MetricsPolicy
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from meshagent.common.authz import Decision

log = logging.getLogger(__name__)

__all__ = [
    "DATAPATH_COUNTERS",
    "ISTIO_BUCKETS",
    "NodeMetrics",
    "ProxyMetrics",
]

# Istio's default histogram buckets (ms for durations, bytes for sizes): Envoy's defaults,
# which Istio keeps for all three histograms (its sidecar.istio.io/statsHistogramBuckets
# annotation documents them as the default), so dashboards' histogram_quantile sees the same
# boundaries.
ISTIO_BUCKETS: tuple[float, ...] = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)

# The BPF counters (`Counter` in meshagent.agent.datapath.maps, lower-cased) -> metric name
# (``_total`` added) and help. Counters the datapath adds later appear as
# meshagent_datapath_<name>_total without an edit here.
DATAPATH_COUNTERS: dict[str, tuple[str, str]] = {
    "redirected": (
        "meshagent_datapath_redirects",
        "Meshed TCP connects the kernel redirected to the node proxy.",
    ),
    "excluded": (
        "meshagent_datapath_excluded",
        "Meshed TCP connects left alone because their port is excluded.",
    ),
    "established": (
        "meshagent_datapath_established",
        "Redirected connections whose original destination was handed to the proxy.",
    ),
    "inflight_miss": (
        "meshagent_datapath_inflight_misses",
        "Redirected connections established after their connect record was gone.",
    ),
    "strict_dropped": (
        "meshagent_datapath_strict_drops",
        "Plaintext connections to STRICT mTLS pods dropped in the kernel (IPv4 and IPv6).",
    ),
    "redirected_ipv6": (
        "meshagent_datapath_redirects_ipv6",
        "Of the redirects, those made on IPv6 sockets (native or IPv4-mapped destinations).",
    ),
    "refused": (
        "meshagent_datapath_refused",
        "Meshed connects refused in the kernel: link-local IPv6, MPTCP, or IPv6 on a node "
        "whose proxy has no IPv6 address.",
    ),
    "peer_restored": (
        "meshagent_datapath_peer_restored",
        "getpeername() calls answered with the original destination instead of the proxy.",
    ),
    "fail_open": (
        "meshagent_datapath_fail_open",
        "Connects of fail-open pods let through to their destination, unmeshed, while the "
        "agent's heartbeat was stale.",
    ),
    "fail_closed": (
        "meshagent_datapath_fail_closed",
        "Connects of fail-closed pods refused in the kernel while the agent's heartbeat was stale.",
    ),
    "join_redirected": (
        "meshagent_datapath_join_redirected",
        "Batches of bytes the sk_skb verdict sent from one joined proxy socket to its partner "
        "(kernel_join; the bytes are meshagent_kernel_joined_bytes_total).",
    ),
    "join_unpaired": (
        "meshagent_datapath_join_unpaired",
        "Batches that arrived on a joined socket without a partner (being joined or parted): "
        "passed up to the proxy, not redirected.",
    ),
}

_CHILD_CACHE_LIMIT = 20_000


class _Off:
    """The series of a metric a Telemetry override disabled: reports go nowhere."""

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_OFF = _Off()


class ProxyMetrics:
    """The proxy's figures: Istio's standard metrics plus policy decisions, open connections and
    tunnel pool size. One per process that proxies traffic.

    `registry`: where to register; the agent's `NodeMetrics.local_registry` when the proxy runs
    in the agent process, ``None`` in a worker process in multiprocess mode (values then go to
    the multiprocess files the agent reads). Raises ValueError for a registry in multiprocess
    mode, which would count every value twice.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        if registry is not None and in_multiprocess_mode():
            raise ValueError(
                f"this process writes metrics to {MULTIPROC_ENV} files; build ProxyMetrics(None)"
                " so the agent's scrape does not count them twice"
            )
        kw = {"registry": registry}
        self.tcp_connections_opened = Counter(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            TCP_LABELS,
            **kw,
        )
        self.tcp_connections_closed = Counter(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            TCP_LABELS,
            **kw,
        )
        self.tcp_sent_bytes = Counter(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            TCP_LABELS,
            **kw,
        )
        self.tcp_received_bytes = Counter(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            TCP_LABELS,
            **kw,
        )
        self.requests = Counter("istio_requests", "The total number of requests", HTTP_LABELS, **kw)
        self.request_duration = Histogram(
            "istio_request_duration_milliseconds",
            "Duration of requests in milliseconds",
            HTTP_LABELS,
            buckets=ISTIO_BUCKETS,
            **kw,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes",
            "Sizes of requests in bytes",
            HTTP_LABELS,
            buckets=ISTIO_BUCKETS,
            **kw,
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "Sizes of responses in bytes",
            HTTP_LABELS,
            buckets=ISTIO_BUCKETS,
            **kw,
        )
        self.request_messages = Counter(
            "istio_request_messages",
            "The total number of gRPC messages sent by clients",
            HTTP_LABELS,
            **kw,
        )
        self.response_messages = Counter(
            "istio_response_messages",
            "The total number of gRPC messages sent by servers",
            HTTP_LABELS,
            **kw,
        )
        self.policy_decisions = Counter(
            "meshagent_policy_decisions",
            "Authorization decisions by action (allow, deny); dry_run=true counts the denials"
            " dry-run policies would have made.",
            ("action", "dry_run"),
            **kw,
        )
        self.refused = Counter(
            "meshagent_proxy_refused",
            "Connections and requests the proxy refused to stay bounded, by listener (pod:"
            " 15001, a pod's own connections; hbone: 15008) and reason (source_connections,"
            " source_pending_requests, header_timeout, bad_request; idle_timeout: a TCP relay"
            " closed after no byte moved for tcp_idle_timeout_s).",
            ("listener", "reason"),
            **kw,
        )
        self.observe_stops = Counter(
            "meshagent_observe_stopped",
            "Connections at the observe L7 level whose HTTP the proxy stopped parsing, the bytes"
            " still relayed, by reporter and reason (parse_error, http2: the HTTP/2 preface on an"
            " HTTP/1.1 port, upgrade, unmatched_response, internal_error): their later requests"
            " are not in istio_requests_total.",
            ("reporter", "reason"),
            **kw,
        )
        self.memory_trims = Counter(
            "meshagent_proxy_memory_trims",
            "Heap trims after a burst of connections ended (agent/proxy/trim.py): memory a"
            " burst took is handed back to the system once its connections are gone.",
            **kw,
        )
        self.open_connections = Gauge(
            "meshagent_proxy_open_connections",
            "Connections the proxy holds now, by direction (outbound: reporter=source).",
            ("direction",),
            multiprocess_mode="livesum",
            **kw,
        )
        self.tunnel_pool_connections = Gauge(
            "meshagent_tunnel_pool_connections",
            "HBONE tunnel connections (mutual TLS, HTTP/2) pooled to other nodes.",
            multiprocess_mode="livesum",
            **kw,
        )
        self._policy = EMPTY_POLICY
        self._tcp: dict[tuple[ConnectionLabels, str], tuple[Counter, ...]] = {}
        self._http: dict[tuple[ConnectionLabels, int, str, str], tuple] = {}
        self._grpc: dict[tuple[ConnectionLabels, int, str, str], tuple] = {}
        self._open = {
            "source": self.open_connections.labels("outbound"),
            "destination": self.open_connections.labels("inbound"),
        }
        self._allowed = self.policy_decisions.labels("allow", "false")
        self._denied = self.policy_decisions.labels("deny", "false")
        self._dry_run_denied = self.policy_decisions.labels("deny", "true")

    def set_policy(self, policy: MetricsPolicy) -> None:
        """Telemetry overrides from a new snapshot: series made from now on follow them
        (those already reported stay on the page, as counters never go away)."""
        if policy != self._policy:
            self._policy = policy
            self._tcp.clear()
            self._http.clear()
            self._grpc.clear()

    def _series(self, metric, labels: ConnectionLabels, values: tuple[str, ...]):
        """`metric`'s child for `values`, as the Telemetry overrides of the reporting
        workload's namespace have it: off, or with removed labels empty (Prometheus reads an
        empty label as no label)."""
        if not self._policy.rules:
            return metric.labels(*values)
        peer = labels.source if labels.reporter == "source" else labels.destination
        rule = self._policy.rule(peer.workload_namespace, labels.reporter, metric._name)
        if rule.disabled:
            return _OFF
        if rule.removed:
            names = metric._labelnames
            values = tuple(
                "" if n in rule.removed else v for n, v in zip(names, values, strict=True)
            )
        return metric.labels(*values)

    def _tcp_children(self, labels: ConnectionLabels, flags: str) -> tuple[Counter, ...]:
        key = (labels, flags)
        children = self._tcp.get(key)
        if children is None:
            if len(self._tcp) >= _CHILD_CACHE_LIMIT:
                self._tcp.clear()
            values = (*labels.values, flags)
            children = self._tcp[key] = (
                self._series(self.tcp_connections_opened, labels, values),
                self._series(self.tcp_connections_closed, labels, values),
                self._series(self.tcp_sent_bytes, labels, values),
                self._series(self.tcp_received_bytes, labels, values),
            )
        return children

    def tcp_opened(self, labels: ConnectionLabels) -> None:
        """A connection was accepted and its peers are known."""
        self._tcp_children(labels, NO_RESPONSE_FLAGS)[0].inc()
        self._open[labels.reporter].inc()

    def tcp_bytes(
        self,
        labels: ConnectionLabels,
        sent: int,
        received: int,
        response_flags: str = NO_RESPONSE_FLAGS,
    ) -> None:
        """Bytes moved since the last report on a connection that is still open."""
        children = self._tcp_children(labels, response_flags)
        if sent:
            children[2].inc(sent)
        if received:
            children[3].inc(received)

    def tcp_handed_out(self, labels: ConnectionLabels, sent: int, received: int) -> None:
        """The connection went on in another proxy process (agent/proxy/handoff.py): its bytes
        not yet reported are; it is no longer open here, yet not closed (the other closes it)."""
        self.tcp_bytes(labels, sent, received)
        self._open[labels.reporter].dec()

    def tcp_handed_in(self, labels: ConnectionLabels) -> None:
        """A connection another proxy process opened (and counted) goes on here."""
        self._open[labels.reporter].inc()

    def tcp_closed(
        self,
        labels: ConnectionLabels,
        sent: int,
        received: int,
        response_flags: str = NO_RESPONSE_FLAGS,
    ) -> None:
        """The connection ended; `sent`/`received` are the bytes not yet reported."""
        children = self._tcp_children(labels, response_flags)
        children[1].inc()
        if sent:
            children[2].inc(sent)
        if received:
            children[3].inc(received)
        self._open[labels.reporter].dec()

    def http_request(
        self,
        labels: ConnectionLabels,
        code: int,
        flags: str,
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
        *,
        grpc_status: int | None = None,
        messages: tuple[int, int] | None = None,
    ) -> None:
        """One HTTP request finished (`code` 0 if no response was sent). `labels` should say
        request_protocol ``http`` (or ``grpc``, with `grpc_status` from the trailers and
        `messages`, the gRPC messages of the request and of the response)."""
        grpc = "" if grpc_status is None else str(grpc_status)
        key = (labels, code, flags, grpc)
        children = self._http.get(key)
        if children is None:
            if len(self._http) >= _CHILD_CACHE_LIMIT:
                self._http.clear()
            values = (*labels.values, flags, str(code), grpc)
            children = self._http[key] = (
                self._series(self.requests, labels, values),
                self._series(self.request_duration, labels, values),
                self._series(self.request_bytes, labels, values),
                self._series(self.response_bytes, labels, values),
            )
        children[0].inc()
        children[1].observe(duration_ms)
        children[2].observe(request_bytes)
        children[3].observe(response_bytes)
        if messages is not None:
            pair = self._grpc.get(key)
            if pair is None:
                if len(self._grpc) >= _CHILD_CACHE_LIMIT:
                    self._grpc.clear()
                values = (*labels.values, flags, str(code), grpc)
                pair = self._grpc[key] = (
                    self._series(self.request_messages, labels, values),
                    self._series(self.response_messages, labels, values),
                )
            pair[0].inc(messages[0])
            pair[1].inc(messages[1])

    def policy_decision(self, decision: Decision) -> None:
        """Count an authorization decision and the denials dry-run policies would have made."""
        (self._allowed if decision.allowed else self._denied).inc()
        if decision.dry_run_denials:
            self._dry_run_denied.inc(len(decision.dry_run_denials))

    def refusal(self, listener: str, reason: str) -> None:
        """One connection or request refused (agent/proxy/limits.py)."""
        self.refused.labels(listener, reason).inc()

    def observe_stopped(self, reporter: str, reason: str) -> None:
        """An observed connection's HTTP no longer parsed (agent/proxy/http/observer.py)."""
        self.observe_stops.labels(reporter, reason).inc()

    def set_tunnel_pool_connections(self, count: int) -> None:
        self.tunnel_pool_connections.set(count)


class _DatapathCollector:
    """The kernel's redirect counters, read at scrape time from a callable."""

    def __init__(self, read: Callable[[], Mapping[str, int]]) -> None:
        self._read = read

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        try:
            counters = self._read()
        except Exception as exc:  # maps gone (agent reinstalling); the rest of the page stays
            log.warning("cannot read datapath counters: %s", exc)
            return []
        out: list[Metric] = []
        for key, value in sorted(counters.items()):
            name, help_text = DATAPATH_COUNTERS.get(
                key, (f"meshagent_datapath_{key}", f"Datapath counter {key}.")
            )
            out.append(CounterMetricFamily(name, help_text, value=value))
        return out


class _CertificateCollector:
    """Seconds until each workload certificate expires, read at scrape time."""

    def __init__(
        self, read: Callable[[], Mapping[str, datetime | float]], clock: Callable[[], float]
    ) -> None:
        self._read = read
        self._clock = clock

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        family = GaugeMetricFamily(
            "meshagent_certificate_expiry_seconds",
            "Seconds until the workload certificate of an identity expires (negative: expired).",
            labels=("identity",),
        )
        try:
            expiries = self._read()
        except Exception as exc:
            log.warning("cannot read certificate expiry: %s", exc)
            return []
        now = self._clock()
        for identity, not_after in sorted(expiries.items()):
            at = not_after.timestamp() if isinstance(not_after, datetime) else float(not_after)
            family.add_metric((str(identity),), at - now)
        return [family]


class NodeMetrics:
    """The agent's figures and the registry one scrape of 15020 renders.

    - `local_registry`: where this process's metrics live: the agent's own gauges, the
      callables' collectors, and `ProxyMetrics` when the proxy runs in the agent process.
    - `registry`: render this one; it merges `local_registry`, prometheus_client's default
      registry (process figures and module-level counters such as HBONE's) when
      `include_default_registry`, and the workers' files when `multiprocess_dir` is given.

    `build_version` labels ``meshagent_build_info``. `datapath_counters` returns the BPF
    counters by name (`Maps.read_counters`); `certificate_expiry` returns identity (SPIFFE
    URI) -> not-after (datetime or UNIX time). Both are called at each scrape, in the scraping
    thread; an exception leaves their figures out of that scrape. Raises ValueError if this
    process is itself in multiprocess mode (the agent must give ``PROMETHEUS_MULTIPROC_DIR``
    to its workers, not to itself).
    """

    def __init__(
        self,
        *,
        datapath_counters: Callable[[], Mapping[str, int]] | None = None,
        certificate_expiry: Callable[[], Mapping[str, datetime | float]] | None = None,
        multiprocess_dir: Path | None = None,
        include_default_registry: bool = True,
        build_version: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if in_multiprocess_mode():
            raise ValueError(
                f"the agent process must not run with {MULTIPROC_ENV} set: pass"
                " multiprocess_dir= here and give the variable to the worker processes only"
            )
        self.local_registry = CollectorRegistry()
        reg = self.local_registry
        self.snapshot = Gauge(
            "meshagent_snapshot_info",
            "1 for the configuration snapshot version in use (none before the first).",
            ("version",),
            registry=reg,
        )
        self.snapshot_accepted = Gauge(
            "meshagent_snapshot_accepted_timestamp_seconds",
            "UNIX time the snapshot in use was accepted (ACKed, or loaded at start); time() minus"
            " this is its age.",
            registry=reg,
        )
        self.build = Gauge(
            "meshagent_build_info",
            "1, labelled with the agent's version (as Istio's istio_build): agents per version.",
            ("version",),
            registry=reg,
        )
        self.build.labels(build_version or "unknown").set(1)
        self._clock = clock
        self.controller_connected = Gauge(
            "meshagent_controller_connected",
            "1 while the config stream to the controller is up, else 0.",
            registry=reg,
        )
        self.proxy_workers = Gauge(
            "meshagent_proxy_workers", "Proxy worker processes running.", registry=reg
        )
        self.workers_recycled = Counter(
            "meshagent_worker_recycled",
            "Proxy workers replaced by a fresh one, the old one drained, by reason (memory: it"
            " grew past worker_recycle_growth and a burst was over).",
            ("reason",),
            registry=reg,
        )
        if datapath_counters is not None:
            reg.register(_DatapathCollector(datapath_counters))
        if certificate_expiry is not None:
            reg.register(_CertificateCollector(certificate_expiry, clock))
        sources: list = [reg]
        if include_default_registry:
            sources.append(REGISTRY)
        self.registry = NodeRegistry(sources, multiprocess_dir)
        self.controller_connected.set(0)

    def set_snapshot_version(self, version: str) -> None:
        """A snapshot was accepted (ACKed) and is now served."""
        self.snapshot.clear()
        self.snapshot.labels(version).set(1)
        self.snapshot_accepted.set(self._clock())

    def set_controller_connected(self, connected: bool) -> None:
        self.controller_connected.set(1 if connected else 0)

    def set_proxy_workers(self, count: int) -> None:
        self.proxy_workers.set(count)

    def worker_recycled(self, reason: str) -> None:
        self.workers_recycled.labels(reason).inc()
