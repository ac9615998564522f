"""The Grafana dashboard loads and queries only metrics the agent really exports."""

import json
import re
from pathlib import Path

from meshagent.agent.telemetry.labels import ConnectionLabels
from meshagent.agent.telemetry.metrics import NodeMetrics, ProxyMetrics
from meshagent.common.authz import Decision

DASHBOARD = Path(__file__).resolve().parents[2] / "daemonset" / "dashboards" / "meshagent.json"

# PromQL words followed by no "(" that are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
_KEYWORDS |= {"unless", "bool", "offset", "inf", "nan"}
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana's label_values()) selects."""
    label_values = re.match(r"\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", expr)
    if label_values:
        return {label_values.group(1)}
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group(0) in _KEYWORDS:
            continue  # a function or a keyword
        names.add(match.group(0))
    return names


def test_metric_names_parser():
    expr = (
        "histogram_quantile(0.99, sum by (le, destination_service) (rate("
        'istio_request_duration_milliseconds_bucket{reporter="source",x=~"a{1}"}[$__rate_interval])))'
        " / on (instance) group_left sum without (pid) (meshagent_proxy_workers) > bool 0"
    )
    assert metric_names(expr) == {
        "istio_request_duration_milliseconds_bucket",
        "meshagent_proxy_workers",
    }
    assert metric_names('label_values(istio_requests_total{a="b"}, destination_service)') == {
        "istio_requests_total"
    }


def _exported_sample_names() -> set[str]:
    """Every sample name one scrape can show, with each family exercised once."""
    node = NodeMetrics(
        datapath_counters=lambda: {
            "redirected": 1,
            "excluded": 1,
            "established": 1,
            "inflight_miss": 1,
            "strict_dropped": 1,
        },
        certificate_expiry=lambda: {"spiffe://cluster.local/ns/a/sa/b": 1e10},
        include_default_registry=False,
    )
    node.set_snapshot_version("v1")
    node.set_controller_connected(True)
    node.set_proxy_workers(1)
    proxy = ProxyMetrics(node.local_registry)
    labels = ConnectionLabels("destination", request_protocol="http")
    proxy.tcp_opened(labels)
    proxy.tcp_closed(labels, 1, 1)
    proxy.http_request(labels, 200, "-", 1.0, 1, 1)
    proxy.policy_decision(Decision(False, "DENY", "a/b", 0, "matched"))
    proxy.set_tunnel_pool_connections(1)
    proxy.outlier_ejection(labels.service)
    return {s.name for family in node.registry.collect() for s in family.samples}


def _dashboard():
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _queries(dashboard):
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"${variable['name']}", variable["query"]["query"]


def test_every_query_names_an_exported_metric():
    exported = _exported_sample_names()
    queried = set()
    for title, expr in _queries(_dashboard()):
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        missing = names - exported
        assert not missing, f"{title}: {sorted(missing)} not exported (query {expr!r})"
        queried |= names
    # the panels the dashboard promises
    assert {
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_connections_opened_total",
        "meshagent_policy_decisions_total",
        "meshagent_datapath_redirects_total",
        "meshagent_certificate_expiry_seconds",
    } <= queried


def test_latency_quantiles_and_mtls_share_are_shown():
    exprs = [expr for _, expr in _queries(_dashboard())]
    for quantile in ("0.5", "0.9", "0.99"):
        assert any(
            f"histogram_quantile({quantile}," in e
            and "istio_request_duration_milliseconds_bucket" in e
            and "destination_service" in e
            for e in exprs
        ), quantile
    assert any('connection_security_policy="mutual_tls"' in e for e in exprs)


def test_panels_are_well_formed():
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and refs, panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used - variables)
