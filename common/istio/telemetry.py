"""Istio's Telemetry API, the `metrics.overrides` subset: drop metrics and labels to trim
cardinality, mesh-wide (the root namespace) or per namespace.

Wire documents flow in (`Telemetry`, validated like the other kinds by `parse_resource`); the
agent turns the accepted ones into a `MetricsPolicy` (`compile_metrics_policy`), which
`meshagent.agent.telemetry.metrics.ProxyMetrics` consults once per new series: which of
Istio's metrics a proxy reports for a workload, and with which labels removed.

Supported (https://istio.io/latest/docs/reference/config/telemetry/):

    spec:
      metrics:
      - providers: [{name: prometheus}]    # optional; entries for other providers are ignored
        overrides:
        - match: {metric: REQUEST_COUNT, mode: CLIENT}   # both optional: ALL_METRICS,
          disabled: true                                 # CLIENT_AND_SERVER
          tagOverrides: {request_protocol: {operation: REMOVE}}

`selector`, `targetRef(s)`, `tracing`, `accessLogging`, `reportingInterval`, custom metrics and
tag UPSERT (a CEL expression) are refused as not supported, naming the field.

Which apply, as in Istio: a proxy reporting as the client (``reporter="source"``, mode CLIENT)
applies the Telemetry of the client workload's namespace; as the server (``destination``,
SERVER) the server workload's. The root namespace's resources come first, then the
namespace's own, each in name order, their overrides in the order written: a later override
of the same metric wins for ``disabled`` (``disabled: false`` turns a metric back on) and
removed labels add up. A removed label is reported with an empty value, which Prometheus
treats as no label at all (and the agent's page leaves out).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from meshagent.common.istio.base import IstioModel, IstioResource, NonEmptyStr
from pydantic import Field, field_validator

__all__ = [
    "ISTIO_METRICS",
    "ISTIO_TAGS",
    "METRIC_FAMILIES",
    "MetricsPolicy",
    "Telemetry",
    "compile_metrics_policy",
]

TELEMETRY_API_VERSIONS = frozenset({"telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1"})
PROMETHEUS = "prometheus"

# Istio's metric enum -> the family it names (agent/telemetry/metrics.py).
METRIC_FAMILIES: dict[str, str] = {
    "REQUEST_COUNT": "istio_requests",
    "REQUEST_DURATION": "istio_request_duration_milliseconds",
    "REQUEST_SIZE": "istio_request_bytes",
    "RESPONSE_SIZE": "istio_response_bytes",
    "TCP_OPENED_CONNECTIONS": "istio_tcp_connections_opened",
    "TCP_CLOSED_CONNECTIONS": "istio_tcp_connections_closed",
    "TCP_SENT_BYTES": "istio_tcp_sent_bytes",
    "TCP_RECEIVED_BYTES": "istio_tcp_received_bytes",
    "GRPC_REQUEST_MESSAGES": "istio_request_messages",
    "GRPC_RESPONSE_MESSAGES": "istio_response_messages",
}
ISTIO_METRICS = ("ALL_METRICS", *METRIC_FAMILIES)
MetricName = Literal[
    "ALL_METRICS",
    "REQUEST_COUNT",
    "REQUEST_DURATION",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "TCP_OPENED_CONNECTIONS",
    "TCP_CLOSED_CONNECTIONS",
    "TCP_SENT_BYTES",
    "TCP_RECEIVED_BYTES",
    "GRPC_REQUEST_MESSAGES",
    "GRPC_RESPONSE_MESSAGES",
]
Mode = Literal["CLIENT_AND_SERVER", "CLIENT", "SERVER"]
Reporter = Literal["source", "destination"]
_MODES: dict[str, tuple[Reporter, ...]] = {
    "CLIENT_AND_SERVER": ("source", "destination"),
    "CLIENT": ("source",),
    "SERVER": ("destination",),
}

# The labels of each end, source_* and destination_* (agent/telemetry/labels.py orders by it).
PEER_FIELDS = (
    "workload",
    "workload_namespace",
    "principal",
    "app",
    "version",
    "canonical_service",
    "canonical_revision",
    "cluster",
)
# The labels of Istio's standard metrics (agent/telemetry/labels.py HTTP_LABELS, same set).
ISTIO_TAGS: frozenset[str] = frozenset(
    {
        "reporter",
        *(f"source_{p}" for p in PEER_FIELDS),
        *(f"destination_{p}" for p in PEER_FIELDS),
        "destination_service",
        "destination_service_name",
        "destination_service_namespace",
        "request_protocol",
        "connection_security_policy",
        "response_flags",
        "response_code",
        "grpc_response_status",
    }
)


class MetricSelector(IstioModel):
    """`overrides[].match`: which metric(s), reported by which side."""

    metric: MetricName = "ALL_METRICS"
    mode: Mode = "CLIENT_AND_SERVER"


class TagOverride(IstioModel):
    """`tagOverrides.<label>`: only REMOVE (UPSERT computes a value with CEL)."""

    operation: Literal["REMOVE", "UPSERT"] = Field("UPSERT", validate_default=True)

    @field_validator("operation")
    @classmethod
    def _remove_only(cls, value: str) -> str:
        if value != "REMOVE":
            raise ValueError(
                "only operation REMOVE is supported by meshagent yet (UPSERT, the default, "
                "computes a label with a CEL expression)"
            )
        return value


class MetricsOverride(IstioModel):
    """`metrics[].overrides[]`: turn metrics off (or back on) and remove labels."""

    match: MetricSelector = MetricSelector()
    disabled: bool | None = None
    tag_overrides: dict[str, TagOverride] = {}

    @field_validator("tag_overrides")
    @classmethod
    def _known_tags(cls, value: dict[str, TagOverride]) -> dict[str, TagOverride]:
        unknown = sorted(set(value) - ISTIO_TAGS)
        if unknown:
            raise ValueError(
                f"unknown label(s) {', '.join(unknown)}: Istio's standard metrics have "
                + ", ".join(sorted(ISTIO_TAGS))
            )
        return value


class ProviderRef(IstioModel):
    name: NonEmptyStr


class Metrics(IstioModel):
    """`spec.metrics[]`: overrides for the listed providers (none listed: the default one,
    Prometheus)."""

    providers: tuple[ProviderRef, ...] = ()
    overrides: tuple[MetricsOverride, ...] = ()

    def for_prometheus(self) -> bool:
        return not self.providers or any(p.name == PROMETHEUS for p in self.providers)


class TelemetrySpec(IstioModel):
    metrics: tuple[Metrics, ...] = ()


class Telemetry(IstioResource):
    """An Istio Telemetry resource, the metrics overrides subset (module docstring)."""

    API_VERSIONS = TELEMETRY_API_VERSIONS

    kind: Literal["Telemetry"]
    spec: TelemetrySpec = TelemetrySpec()


@dataclass(frozen=True)
class SeriesRule:
    """What one metric reported by one side in one namespace does: off, or which labels go."""

    disabled: bool = False
    removed: frozenset[str] = frozenset()


KEEP_ALL = SeriesRule()


@dataclass(frozen=True)
class MetricsPolicy:
    """The compiled overrides: (namespace, reporter, family) -> `SeriesRule` for namespaces
    with Telemetry of their own, (None, reporter, family) for the rest (the root namespace's);
    anything not listed is reported whole. Equal policies compare equal, so a snapshot that
    does not change them keeps the proxies' series caches."""

    rules: dict[tuple[str | None, str, str], SeriesRule] = field(default_factory=dict)
    namespaces: frozenset[str] = frozenset()  # those whose own Telemetry changes something

    def rule(self, namespace: str, reporter: str, family: str) -> SeriesRule:
        key = namespace if namespace in self.namespaces else None
        return self.rules.get((key, reporter, family), KEEP_ALL)


EMPTY_POLICY = MetricsPolicy()


def _apply(rules: dict[tuple[Reporter, str], SeriesRule], telemetry: Telemetry) -> None:
    for metrics in telemetry.spec.metrics:
        if not metrics.for_prometheus():
            continue
        for override in metrics.overrides:
            families = (
                METRIC_FAMILIES.values()
                if override.match.metric == "ALL_METRICS"
                else (METRIC_FAMILIES[override.match.metric],)
            )
            removed = frozenset(override.tag_overrides)
            for reporter in _MODES[override.match.mode]:
                for family in families:
                    now = rules.get((reporter, family), KEEP_ALL)
                    disabled = now.disabled if override.disabled is None else override.disabled
                    rules[(reporter, family)] = SeriesRule(disabled, now.removed | removed)


def compile_metrics_policy(resources: Iterable[Telemetry], root_namespace: str) -> MetricsPolicy:
    """The policy of these resources (module docstring: root namespace first, then the
    namespace's own, each in name order)."""
    by_namespace: dict[str, list[Telemetry]] = {}
    for res in sorted(resources, key=lambda r: (r.namespace, r.name)):
        by_namespace.setdefault(res.namespace, []).append(res)
    root = by_namespace.pop(root_namespace, [])
    out: dict[tuple[str | None, str, str], SeriesRule] = {}
    mesh_wide: dict[tuple[Reporter, str], SeriesRule] = {}
    for telemetry in root:
        _apply(mesh_wide, telemetry)
    own: list[str] = []
    for namespace, resources in by_namespace.items():
        rules = dict(mesh_wide)
        for telemetry in resources:
            _apply(rules, telemetry)
        if _effective(rules) != _effective(mesh_wide):
            own.append(namespace)
            out.update({(namespace, *key): rule for key, rule in _effective(rules).items()})
    out.update({(None, *key): rule for key, rule in _effective(mesh_wide).items()})
    return MetricsPolicy(out, frozenset(own))


def _effective(rules: dict[tuple[Reporter, str], SeriesRule]) -> dict:
    return {key: rule for key, rule in rules.items() if rule != KEEP_ALL}
