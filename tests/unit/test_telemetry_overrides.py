"""Istio's Telemetry API, metrics overrides: what meshctl accepts or refuses (naming the
resource and field), how mesh-wide and namespace resources combine, and what the proxy then
reports."""

import pytest
import yaml
from meshagent.agent.telemetry.labels import HTTP_LABELS, ConnectionLabels, Peer, ServiceRef
from meshagent.agent.telemetry.metrics import ProxyMetrics
from meshagent.common.istio import ResourceError, parse_resource
from meshagent.common.istio.telemetry import (
    ISTIO_TAGS,
    KEEP_ALL,
    SeriesRule,
    Telemetry,
    compile_metrics_policy,
)
from prometheus_client import CollectorRegistry


def telemetry(namespace, overrides, *, name="t", api="telemetry.istio.io/v1", providers=None):
    metrics = {"overrides": overrides}
    if providers is not None:
        metrics["providers"] = providers
    return {
        "apiVersion": api,
        "kind": "Telemetry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"metrics": [metrics]},
    }


REMOVE_PROTOCOL = {
    "match": {"metric": "REQUEST_COUNT", "mode": "CLIENT_AND_SERVER"},
    "tagOverrides": {"request_protocol": {"operation": "REMOVE"}},
}


def test_the_documented_example_is_accepted_in_both_api_versions():
    doc = yaml.safe_load(
        """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: ALL_METRICS, mode: CLIENT}
      disabled: true
    - match: {metric: REQUEST_COUNT}
      tagOverrides:
        request_protocol: {operation: REMOVE}
        grpc_response_status: {operation: REMOVE}
"""
    )
    res = parse_resource(doc)
    assert isinstance(res, Telemetry)
    assert res.spec.metrics[0].overrides[0].disabled is True
    doc["apiVersion"] = "telemetry.istio.io/v1alpha1"
    assert isinstance(parse_resource(doc), Telemetry)


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        (
            lambda d: d["spec"].update(selector={"matchLabels": {"a": "b"}}),
            "spec.selector",
            "not supported",
        ),
        (lambda d: d["spec"].update(tracing=[{}]), "spec.tracing", "not supported"),
        (lambda d: d["spec"].update(accessLogging=[{}]), "spec.accessLogging", "not supported"),
        (lambda d: d["spec"].update(targetRefs=[{}]), "spec.targetRefs", "not supported"),
        (
            lambda d: d["spec"]["metrics"][0].update(reportingInterval="5s"),
            "spec.metrics[0].reportingInterval",
            "not supported",
        ),
        (
            lambda d: d["spec"]["metrics"][0]["overrides"][0]["match"].update(
                metric="REQUEST_COUNTS"
            ),
            "spec.metrics[0].overrides[0].match.metric",
            "REQUEST_COUNT",
        ),
        (
            lambda d: d["spec"]["metrics"][0]["overrides"][0]["match"].update(mode="BOTH"),
            "spec.metrics[0].overrides[0].match.mode",
            "CLIENT_AND_SERVER",
        ),
        (
            lambda d: d["spec"]["metrics"][0]["overrides"][0]["match"].update(customMetric="x"),
            "spec.metrics[0].overrides[0].match.customMetric",
            "not supported",
        ),
        (
            lambda d: d["spec"]["metrics"][0]["overrides"][0]["tagOverrides"].update(
                request_protocol={"operation": "UPSERT", "value": "'x'"}
            ),
            "spec.metrics[0].overrides[0].tagOverrides.request_protocol.value",
            "not supported",
        ),
        (
            lambda d: d["spec"]["metrics"][0]["overrides"][0]["tagOverrides"].update(
                request_protocol={}
            ),
            "spec.metrics[0].overrides[0].tagOverrides.request_protocol.operation",
            "only operation REMOVE",
        ),
        (
            lambda d: d["spec"]["metrics"][0]["overrides"][0]["tagOverrides"].update(
                source_pod={"operation": "REMOVE"}
            ),
            "spec.metrics[0].overrides[0].tagOverrides",
            "unknown label(s) source_pod",
        ),
        (
            lambda d: d["spec"]["metrics"][0]["overrides"][0].update(disabled="maybe"),
            "spec.metrics[0].overrides[0].disabled",
            "",
        ),
        (lambda d: d.update(apiVersion="telemetry.istio.io/v2"), "apiVersion", "v1alpha1"),
    ],
)
def test_malformed_or_unsupported_telemetry_is_refused_naming_resource_and_field(
    change, path, words
):
    doc = telemetry(
        "shop",
        [
            dict(
                REMOVE_PROTOCOL,
                tagOverrides=dict(REMOVE_PROTOCOL["tagOverrides"]),
                match=dict(REMOVE_PROTOCOL["match"]),
            )
        ],
        name="trim",
    )
    change(doc)
    with pytest.raises(ResourceError) as info:
        parse_resource(doc)
    err = info.value
    assert (err.kind, err.namespace, err.name) == ("Telemetry", "shop", "trim")
    paths = [p for p, _ in err.problems]
    assert path in paths, err.problems
    message = dict(err.problems)[path]
    assert words in message, message


def test_known_tags_are_exactly_the_labels_of_istios_metrics():
    assert frozenset(HTTP_LABELS) == ISTIO_TAGS


def _policy(*docs, root="istio-system"):
    return compile_metrics_policy([parse_resource(d) for d in docs], root)


def test_mesh_wide_then_namespace_overrides_in_order():
    mesh = telemetry(
        "istio-system",
        [
            {"match": {"metric": "ALL_METRICS", "mode": "CLIENT"}, "disabled": True},
            {"tagOverrides": {"request_protocol": {"operation": "REMOVE"}}},
        ],
    )
    shop = telemetry(
        "shop",
        [
            {"match": {"metric": "REQUEST_COUNT", "mode": "CLIENT"}, "disabled": False},
            {
                "match": {"metric": "REQUEST_DURATION", "mode": "SERVER"},
                "tagOverrides": {"response_flags": {"operation": "REMOVE"}},
            },
        ],
    )
    policy = _policy(mesh, shop)
    # a namespace without Telemetry of its own: the mesh-wide resource
    assert policy.rule("legacy", "source", "istio_requests") == SeriesRule(
        True, frozenset({"request_protocol"})
    )
    assert policy.rule("legacy", "destination", "istio_requests") == SeriesRule(
        False, frozenset({"request_protocol"})
    )
    # shop turns client-side request counts back on; removed labels add up
    assert policy.rule("shop", "source", "istio_requests") == SeriesRule(
        False, frozenset({"request_protocol"})
    )
    assert policy.rule("shop", "source", "istio_tcp_sent_bytes").disabled
    assert policy.rule("shop", "destination", "istio_request_duration_milliseconds") == (
        SeriesRule(False, frozenset({"request_protocol", "response_flags"}))
    )


def test_other_providers_and_no_telemetry_change_nothing():
    other = telemetry(
        "shop",
        [{"disabled": True}],
        providers=[{"name": "stackdriver"}],
    )
    policy = _policy(other)
    assert policy.rule("shop", "source", "istio_requests") == KEEP_ALL
    assert _policy().rules == {}
    assert _policy(other) == _policy()  # equal policies: the proxy keeps its series


def _connection(reporter, namespace="shop"):
    peer = Peer(
        "web",
        namespace,
        "spiffe://cluster.local/ns/shop/sa/web",
        "web",
        "v1",
        "web",
        "v1",
        "Kubernetes",
    )
    return ConnectionLabels(
        reporter=reporter,
        source=peer,
        destination=peer,
        service=ServiceRef("web.shop.svc.cluster.local", "web", "shop"),
        request_protocol="http",
        connection_security_policy="mutual_tls",
    )


def _samples(registry, name):
    return [s for m in registry.collect() for s in m.samples if s.name == name]


def test_the_proxy_reports_without_removed_labels_and_not_disabled_metrics():
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    metrics.set_policy(
        _policy(
            telemetry(
                "shop",
                [
                    REMOVE_PROTOCOL,
                    {"match": {"metric": "REQUEST_SIZE", "mode": "SERVER"}, "disabled": True},
                ],
            )
        )
    )
    for reporter in ("source", "destination"):
        metrics.http_request(_connection(reporter), 200, "-", 3.0, 10, 20)
    (count_src, count_dst) = sorted(
        _samples(registry, "istio_requests_total"), key=lambda s: s.labels["reporter"]
    )
    assert count_dst.labels["request_protocol"] == "" and count_src.labels["request_protocol"] == ""
    # the other metrics keep it
    durations = _samples(registry, "istio_request_duration_milliseconds_count")
    assert {s.labels["request_protocol"] for s in durations} == {"http"}
    # request sizes only from the client side
    sizes = _samples(registry, "istio_request_bytes_count")
    assert [s.labels["reporter"] for s in sizes] == ["source"]
    # another namespace's workloads are untouched
    metrics.http_request(_connection("source", "legacy"), 200, "-", 3.0, 10, 20)
    legacy = [
        s
        for s in _samples(registry, "istio_requests_total")
        if s.labels["source_workload_namespace"] == "legacy"
    ]
    assert legacy[0].labels["request_protocol"] == "http"


def test_a_new_policy_applies_to_series_made_after_it():
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    metrics.http_request(_connection("source"), 200, "-", 1.0, 1, 1)
    metrics.set_policy(_policy(telemetry("istio-system", [REMOVE_PROTOCOL])))
    metrics.http_request(_connection("source"), 200, "-", 1.0, 1, 1)
    values = {
        s.labels["request_protocol"]: s.value for s in _samples(registry, "istio_requests_total")
    }
    assert values == {"http": 1.0, "": 1.0}


def test_telemetry_travels_apart_from_istio_resources_and_reaches_the_agents_tables(tmp_path):
    from meshagent.agent.state import SnapshotStore
    from meshagent.controller.compiler import compile_snapshot
    from meshagent.controller.model import ClusterModel

    model = ClusterModel()
    model.replace("Telemetry", [telemetry("istio-system", [REMOVE_PROTOCOL])])
    bad = telemetry("shop", [{"match": {"metric": "NOPE"}}], name="bad")
    model.upsert("Telemetry", bad)
    snap = compile_snapshot(model, "node-1")
    assert snap.istio_resources == []  # an older agent would refuse a kind it cannot parse
    assert [d["metadata"]["name"] for d in snap.telemetry] == ["t"]  # the bad one left out
    store = SnapshotStore("node-1", tmp_path)
    store.apply(snap.model_dump(mode="json"), save=False)
    rule = store.tables.metrics_policy.rule("any", "source", "istio_requests")
    assert rule.removed == {"request_protocol"}


def test_a_telemetry_change_travels_in_a_delta():
    from meshagent.common import snapshotdelta
    from meshagent.controller.compiler import compile_snapshot
    from meshagent.controller.model import ClusterModel

    model = ClusterModel()
    before = compile_snapshot(model, "node-1")
    model.upsert("Telemetry", telemetry("shop", [REMOVE_PROTOCOL]))
    after = compile_snapshot(model, "node-1")
    changes = snapshotdelta.diff(before, after, snapshotdelta.SHARED_FIELDS)
    assert set(changes) == {"telemetry"}
    rebuilt = snapshotdelta.apply(before.model_dump(mode="json"), changes)
    assert rebuilt["telemetry"] == after.model_dump(mode="json")["telemetry"]


def test_validate_explain_says_what_a_telemetry_does():
    from meshagent.controller.describe import describe

    lines = describe(
        parse_resource(
            telemetry(
                "istio-system",
                [REMOVE_PROTOCOL, {"match": {"mode": "SERVER"}, "disabled": True}],
            )
        )
    )
    assert lines[0].startswith("Istio metrics of every workload in the whole mesh")
    assert (
        "REQUEST_COUNT (istio_requests) as reported by both proxies: without the labels"
        in (lines[1])
    )
    assert (
        lines[2]
        == "every metric as reported by the server's proxy (reporter=destination): not reported."
    )
