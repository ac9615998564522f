"""What a scrape of 15020 shows: Istio's families with Istio's labels, and the agent's figures."""

from datetime import UTC, datetime

import pytest
from meshagent.agent.telemetry.exposition import MergingCollector, metrics_handler, render
from meshagent.agent.telemetry.labels import ConnectionLabels, Peer, ServiceRef
from meshagent.agent.telemetry.metrics import ISTIO_BUCKETS, NodeMetrics, ProxyMetrics
from meshagent.common.authz import Decision, DryRunDenial
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

# Istio's standard labels, written out as Istio's proxy emits them (istio/proxy istio_stats).
ISTIO_TCP_LABELS = {
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
}
ISTIO_HTTP_LABELS = ISTIO_TCP_LABELS | {"response_code", "grpc_response_status"}

FRONTEND = Peer(
    "frontend",
    "shop",
    "spiffe://cluster.local/ns/shop/sa/frontend",
    "frontend",
    "latest",
    "frontend",
    "latest",
    "Kubernetes",
)
REVIEWS = Peer(
    "reviews-v1",
    "shop",
    "spiffe://cluster.local/ns/shop/sa/reviews",
    "reviews",
    "v1",
    "reviews",
    "v1",
    "Kubernetes",
)
SERVICE = ServiceRef("reviews.shop.svc.cluster.local", "reviews", "shop")


def _one_counter(families: dict, name: str):
    """The one `<name>_total` sample of counter family `name` on a scraped page."""
    family = families[name]
    assert family.type == "counter"
    (sample,) = [s for s in family.samples if s.name == name + "_total"]
    return sample


def _labels(reporter="source", protocol="http"):
    return ConnectionLabels(reporter, FRONTEND, REVIEWS, SERVICE, protocol, "mutual_tls")


def _scrape(registry):
    body, content_type = render(registry)
    assert content_type.startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def _value(family, sample_name, **labels):
    matches = [
        s.value
        for s in family.samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert matches, f"no {sample_name} sample with {labels}"
    return sum(matches)


@pytest.fixture
def node():
    return NodeMetrics(include_default_registry=False)


def test_tcp_families_have_istio_names_types_and_exact_label_set(node):
    proxy = ProxyMetrics(node.local_registry)
    labels = _labels(protocol="tcp")
    proxy.tcp_opened(labels)
    proxy.tcp_closed(labels, 120, 45)
    families = _scrape(node.registry)
    for name in (
        "istio_tcp_connections_opened",
        "istio_tcp_connections_closed",
        "istio_tcp_sent_bytes",
        "istio_tcp_received_bytes",
    ):
        sample = _one_counter(families, name)
        assert set(sample.labels) == ISTIO_TCP_LABELS
        assert sample.labels["source_workload"] == "frontend"
        assert sample.labels["destination_service"] == "reviews.shop.svc.cluster.local"
        assert sample.labels["response_flags"] == "-"


def test_http_families_have_istio_names_types_label_set_and_buckets(node):
    proxy = ProxyMetrics(node.local_registry)
    proxy.http_request(_labels(), 200, "-", 12.5, 300, 4000)
    families = _scrape(node.registry)
    requests = families["istio_requests"]
    assert requests.type == "counter"
    assert set(requests.samples[0].labels) == ISTIO_HTTP_LABELS
    assert requests.samples[0].labels["grpc_response_status"] == ""
    for name in (
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
    ):
        family = families[name]
        assert family.type == "histogram"
        buckets = [s for s in family.samples if s.name == name + "_bucket"]
        assert [float(s.labels["le"]) for s in buckets] == [
            *map(float, ISTIO_BUCKETS),
            float("inf"),
        ]
        assert all(set(s.labels) == ISTIO_HTTP_LABELS | {"le"} for s in buckets)
    duration = families["istio_request_duration_milliseconds"]
    assert _value(duration, "istio_request_duration_milliseconds_bucket", le="10.0") == 0
    assert _value(duration, "istio_request_duration_milliseconds_bucket", le="25.0") == 1


def test_counters_add_up_after_n_calls(node):
    proxy = ProxyMetrics(node.local_registry)
    source, dest = _labels("source"), _labels("destination")
    n = 37
    for i in range(n):
        for labels in (source, dest):
            proxy.tcp_opened(labels)
            proxy.tcp_bytes(labels, 10, 1)
            proxy.tcp_closed(labels, i, 2 * i)
            proxy.http_request(labels, 200 if i % 4 else 503, "-", 3.0, 100 + i, 1000)
    families = _scrape(node.registry)
    for reporter in ("source", "destination"):
        assert _value(families["istio_requests"], "istio_requests_total", reporter=reporter) == n
        assert (
            _value(
                families["istio_requests"],
                "istio_requests_total",
                reporter=reporter,
                response_code="503",
            )
            == 10
        )
        assert _value(
            families["istio_tcp_sent_bytes"], "istio_tcp_sent_bytes_total", reporter=reporter
        ) == 10 * n + sum(range(n))
        assert _value(
            families["istio_tcp_received_bytes"],
            "istio_tcp_received_bytes_total",
            reporter=reporter,
        ) == n + 2 * sum(range(n))
        assert _value(
            families["istio_request_bytes"], "istio_request_bytes_sum", reporter=reporter
        ) == 100 * n + sum(range(n))
        assert (
            _value(
                families["istio_request_duration_milliseconds"],
                "istio_request_duration_milliseconds_count",
                reporter=reporter,
            )
            == n
        )
    open_now = families["meshagent_proxy_open_connections"]
    assert _value(open_now, "meshagent_proxy_open_connections", direction="outbound") == 0


def test_open_connections_follow_opened_and_closed(node):
    proxy = ProxyMetrics(node.local_registry)
    for _ in range(3):
        proxy.tcp_opened(_labels("destination"))
    proxy.tcp_closed(_labels("destination"), 0, 0, "DENY")
    proxy.tcp_opened(_labels("source"))
    families = _scrape(node.registry)
    gauge = families["meshagent_proxy_open_connections"]
    assert _value(gauge, "meshagent_proxy_open_connections", direction="inbound") == 2
    assert _value(gauge, "meshagent_proxy_open_connections", direction="outbound") == 1
    closed = families["istio_tcp_connections_closed"]
    assert _value(closed, "istio_tcp_connections_closed_total", response_flags="DENY") == 1


def test_policy_decisions_count_enforced_and_dry_run(node):
    proxy = ProxyMetrics(node.local_registry)
    allow = Decision(True, "ALLOW", None, None, "no policy")
    deny = Decision(False, "DENY", "shop/deny-all", 0, "matched")
    shadow = Decision(
        True,
        "ALLOW",
        None,
        None,
        "ok",
        dry_run_denials=(DryRunDenial("shop/dry", 0, "would deny"),),
    )
    for decision in (allow, allow, deny, shadow):
        proxy.policy_decision(decision)
    family = _scrape(node.registry)["meshagent_policy_decisions"]
    total = "meshagent_policy_decisions_total"
    assert _value(family, total, action="allow", dry_run="false") == 3
    assert _value(family, total, action="deny", dry_run="false") == 1
    assert _value(family, total, action="deny", dry_run="true") == 1


def test_grpc_status_is_a_label_only_when_given(node):
    proxy = ProxyMetrics(node.local_registry)
    proxy.http_request(_labels(protocol="grpc"), 200, "-", 1.0, 5, 5, grpc_status=7)
    family = _scrape(node.registry)["istio_requests"]
    assert (
        _value(family, "istio_requests_total", grpc_response_status="7", request_protocol="grpc")
        == 1
    )


def test_agent_figures_and_callables_are_read_at_scrape_time():
    counters = {"redirected": 5, "inflight_miss": 1, "strict_dropped": 2, "new_thing": 9}
    expiry = {
        "spiffe://cluster.local/ns/shop/sa/frontend": datetime.fromtimestamp(1_000_600, tz=UTC),
        "spiffe://cluster.local/ns/shop/sa/reviews": 999_990.0,
    }
    node = NodeMetrics(
        datapath_counters=lambda: counters,
        certificate_expiry=lambda: expiry,
        include_default_registry=False,
        clock=lambda: 1_000_000.0,
    )
    assert _scrape(node.registry)["meshagent_snapshot_info"].samples == []  # none before the first
    node.set_snapshot_version("3f2a")
    node.set_snapshot_version("9c1d")
    node.set_controller_connected(True)
    node.set_proxy_workers(4)
    ProxyMetrics(node.local_registry).set_tunnel_pool_connections(3)
    families = _scrape(node.registry)
    assert families["meshagent_datapath_redirects"].type == "counter"
    assert (
        _value(families["meshagent_datapath_redirects"], "meshagent_datapath_redirects_total") == 5
    )
    assert (
        _value(
            families["meshagent_datapath_inflight_misses"],
            "meshagent_datapath_inflight_misses_total",
        )
        == 1
    )
    assert (
        _value(families["meshagent_datapath_new_thing"], "meshagent_datapath_new_thing_total") == 9
    )
    cert = families["meshagent_certificate_expiry_seconds"]
    seconds = "meshagent_certificate_expiry_seconds"
    assert _value(cert, seconds, identity="spiffe://cluster.local/ns/shop/sa/frontend") == 600
    assert _value(cert, seconds, identity="spiffe://cluster.local/ns/shop/sa/reviews") == -10
    info = [s.labels for s in families["meshagent_snapshot_info"].samples]
    assert info == [{"version": "9c1d"}]
    assert _value(families["meshagent_controller_connected"], "meshagent_controller_connected") == 1
    assert _value(families["meshagent_proxy_workers"], "meshagent_proxy_workers") == 4
    accepted = "meshagent_snapshot_accepted_timestamp_seconds"
    assert _value(families[accepted], accepted) == 1_000_000.0
    build = [s.labels for s in families["meshagent_build_info"].samples]
    assert build == [{"version": "unknown"}]  # no build_version given

    pool = families["meshagent_tunnel_pool_connections"]
    assert _value(pool, "meshagent_tunnel_pool_connections") == 3
    counters["redirected"] = 8
    redirects = _scrape(node.registry)["meshagent_datapath_redirects"]
    assert _value(redirects, "meshagent_datapath_redirects_total") == 8


def test_build_info_names_the_version():
    node = NodeMetrics(include_default_registry=False, build_version="0.1.0")
    family = _scrape(node.registry)["meshagent_build_info"]
    assert [(s.labels, s.value) for s in family.samples] == [({"version": "0.1.0"}, 1.0)]


def test_a_failing_callable_leaves_the_rest_of_the_page(caplog):
    def broken():
        raise OSError("map not pinned")

    node = NodeMetrics(
        datapath_counters=broken, certificate_expiry=broken, include_default_registry=False
    )
    node.set_controller_connected(True)
    families = _scrape(node.registry)
    assert "meshagent_datapath_redirects" not in families
    assert "meshagent_certificate_expiry_seconds" not in families
    assert _value(families["meshagent_controller_connected"], "meshagent_controller_connected") == 1
    assert "map not pinned" in caplog.text


def test_the_default_registry_is_included_once_and_merged():
    # A module-level counter (like HBONE's) defined both here and in a second source sums.
    mine, other = CollectorRegistry(), CollectorRegistry()
    Counter("meshagent_demo_events", "demo", registry=mine).inc(2)
    Counter("meshagent_demo_events", "demo", registry=other).inc(3)
    merged = CollectorRegistry()
    merged.register(MergingCollector([mine, other]))
    family = _scrape(merged)["meshagent_demo_events"]
    assert [(s.name, s.value) for s in family.samples] == [("meshagent_demo_events_total", 5)]

    node = NodeMetrics()
    names = _scrape(node.registry)
    assert "process_cpu_seconds" in names or "python_info" in names


async def test_metrics_handler_serves_the_page(node):
    ProxyMetrics(node.local_registry).tcp_opened(_labels())
    response = await metrics_handler(node.registry)("")
    assert response.status == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(response.body.decode())}
    assert "istio_tcp_connections_opened" in names


def test_grpc_calls_count_their_messages_each_way(node):
    proxy = ProxyMetrics(node.local_registry)
    grpc = _labels(protocol="grpc")
    proxy.http_request(grpc, 200, "-", 2.0, 10, 5000, grpc_status=0, messages=(1, 1))
    proxy.http_request(grpc, 200, "-", 9.0, 10, 5000, grpc_status=0, messages=(1, 100))
    proxy.http_request(_labels(), 200, "-", 1.0, 0, 10)  # HTTP: no message series
    families = _scrape(node.registry)
    for name, want in (("istio_request_messages", 2), ("istio_response_messages", 101)):
        sample = _one_counter(families, name)
        assert set(sample.labels) == ISTIO_HTTP_LABELS
        assert sample.labels["request_protocol"] == "grpc"
        assert sample.labels["grpc_response_status"] == "0"
        assert sample.value == want
