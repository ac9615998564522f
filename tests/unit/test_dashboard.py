"""The Grafana dashboard's structure: it loads, its panels are well formed, its queries use only
its own variables and name metrics that the agent or the controller define.

Whether each query returns the data the traffic implies is proven against a real Prometheus
scraping the lab: tests/e2e/test_prometheus.py. Nothing here increments a metric to satisfy a
panel.
"""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "daemonset" / "dashboards" / "meshagent.json"

# PromQL words followed by no "(" that are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
_KEYWORDS |= {"unless", "bool", "offset", "inf", "nan"}
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# Sample-name suffixes of counters and histograms, and the family names they belong to.
_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana's label_values()) selects, also those
    named by a ``{__name__=~"a|b"}`` matcher."""
    names = set()
    for alternatives in re.findall(r'__name__=~?"([^"]*)"', expr):
        names |= set(alternatives.split("|"))
    label_values = re.match(r"\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)?", expr)
    if label_values:  # label_values(metric{...}, label) or label_values({__name__=~...}, label)
        return names | ({label_values.group(1)} if label_values.group(1) else set())
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
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
    assert metric_names('sum(rate({__name__=~"istio_a_total|istio_b_total",x="y"}[1m]))') == {
        "istio_a_total",
        "istio_b_total",
    }


def _family(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _defined_in_sources() -> str:
    """The text of every Python module of the agent and the controller."""
    return "\n".join(
        path.read_text()
        for folder in ("agent", "controller")
        for path in (ROOT / folder).rglob("*.py")
    )


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


def test_every_query_names_a_metric_defined_in_the_code():
    sources = _defined_in_sources()
    for title, expr in _queries(_dashboard()):
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        for name in names:
            family = _family(name)
            defined = f'"{family}"' in sources or f'"{name}"' in sources
            # the datapath's counters are named from a table (telemetry.metrics.DATAPATH_COUNTERS)
            assert defined, f"{title}: {name} is defined nowhere (query {expr!r})"


def test_the_variables_are_drawn_from_every_istio_family():
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    for name in ("namespace", "service"):
        names = metric_names(variables[name]["query"]["query"])
        assert {"istio_requests_total", "istio_tcp_connections_opened_total"} <= names, name


def test_latency_quantiles_mtls_share_and_denials_are_shown():
    exprs = [expr for _, expr in _queries(_dashboard())]
    for quantile in ("0.5", "0.9", "0.99"):
        assert any(
            f"histogram_quantile({quantile}," in e
            and "istio_request_duration_milliseconds_bucket" in e
            and "destination_service" in e
            for e in exprs
        ), quantile
    mtls = [e for e in exprs if 'connection_security_policy="mutual_tls"' in e]
    assert mtls and all("istio_requests_total" in e for e in mtls)
    assert any('response_code="403",response_flags="RBAC"' in e for e in exprs)
    assert any('response_flags="DENY"' in e for e in exprs)
    assert any("meshagent_outlier_cluster_ejections_total" in e for e in exprs)


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
