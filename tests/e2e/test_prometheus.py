"""Issue #20: the Grafana dashboard against a real Prometheus.

Debian's `prometheus` (scripts/install.sh) runs inside the lab's underlay network namespace,
from where it reaches both nodes' 15020 (``/stats/prometheus``, the one documented scrape path)
and the controller's 15014, scraping every second. Known traffic goes through the mesh:
`frontend` (node-1) gets 200s and 404s from `reviews` (HTTP, node-2) and echoes over `echo`
(TCP, node-2); `intruder` (node-1) is refused by AuthorizationPolicy on both (HTTP 403 RBAC,
TCP DENY); `flaky`'s failing backend answers 503 until outlier detection ejects it. Then every
expression of daemonset/dashboards/meshagent.json, its template variables filled in with the
values the variables' own queries return, runs through Prometheus's HTTP API and must return
the series that traffic implies, some with exact values.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from meshagent.lab.paths import NETNS_PREFIX

from tests.e2e.conftest import meshlab, proxy_workers
from tests.waiting import wait_until

DASHBOARD = Path(__file__).resolve().parents[2] / "daemonset" / "dashboards" / "meshagent.json"
UNDERLAY = NETNS_PREFIX + "underlay"
NODES = {"node-1": "172.30.0.11", "node-2": "172.30.0.12"}
CONTROLLER = "172.30.0.1:15014"
PROM = "127.0.0.1:19090"  # on the underlay namespace's loopback: nothing outside sees it
RATE_INTERVAL = "3m"  # covers all of the test's traffic
REVIEWS = "reviews.shop.svc.cluster.local"
ECHO = "echo.shop.svc.cluster.local"
FLAKY = "flaky.shop.svc.cluster.local"
OK, MISSING, DENIED_HTTP, ECHOES, DENIED_TCP = 20, 10, 5, 3, 2

HTTP_SERVER = """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        code = int(os.environ.get("STATUS", "200")) if self.path == "/" else 404
        body = os.environ.get("HOSTNAME", "pod").encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", 8080), H).serve_forever()
"""

ECHO_SERVER = """
import socketserver
class H(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("", 9000), H).serve_forever()
"""

# `count` GETs of `path` on one keep-alive connection; prints the status codes as JSON.
GETS = """
import http.client, json, sys
host, path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn, codes = http.client.HTTPConnection(host, 8080, timeout=10), []
for _ in range(count):
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    codes.append(resp.status)
print(json.dumps(codes))
"""

# `count` echo connections of 100 bytes each; prints how many got their bytes back.
ECHOS = """
import socket, sys
ok = 0
for _ in range(int(sys.argv[1])):
    try:
        s = socket.create_connection(("echo.shop", 9000), timeout=5)
        s.sendall(b"x" * 100)
        got = b""
        while len(got) < 100 and (data := s.recv(100)):
            got += data
        ok += len(got) == 100
        s.close()
    except OSError:
        pass
print(ok)
"""


def _manifest() -> list[dict]:
    def pod(name: str, node: str, command: list[str], app: str, port: int = 0, **env: str):
        container: dict = {"name": "c", "command": command}
        if env:
            container["env"] = [{"name": k, "value": v} for k, v in env.items()]
        if port:
            container["readinessProbe"] = {"tcpSocket": {"port": port}}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
            "spec": {"nodeName": node, "serviceAccountName": name, "containers": [container]},
        }

    def service(name: str, port: int, port_name: str) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"selector": {"app": name}, "ports": [{"name": port_name, "port": port}]},
        }

    def only_frontend(name: str) -> dict:
        return {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": f"{name}-from-frontend", "namespace": "shop"},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "action": "ALLOW",
                "rules": [
                    {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}]}
                ],
            },
        }

    http = ["python3", "-c", HTTP_SERVER]
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"meshagent.io/mesh": "enabled"}},
        },
        pod("frontend", "node-1", ["sleep", "infinity"], "frontend"),
        pod("intruder", "node-1", ["sleep", "infinity"], "intruder"),
        pod("reviews", "node-2", http, "reviews", 8080),
        pod("echo", "node-2", ["python3", "-c", ECHO_SERVER], "echo", 9000),
        pod("flaky-good", "node-2", http, "flaky", 8080),
        pod("flaky-bad", "node-2", http, "flaky", 8080, STATUS="503"),
        service("reviews", 8080, "http"),
        service("flaky", 8080, "http"),
        service("echo", 9000, "tcp-echo"),
        only_frontend("reviews"),
        only_frontend("echo"),
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "flaky", "namespace": "shop"},
            "spec": {
                "host": "flaky",
                "trafficPolicy": {
                    "outlierDetection": {
                        "consecutive5xxErrors": 3,
                        "interval": "1s",
                        "baseEjectionTime": "60s",
                        "maxEjectionPercent": 50,
                    }
                },
            },
        },
    ]


def _config(folder: Path) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "meshagent",
                "metrics_path": "/stats/prometheus",
                "static_configs": [{"targets": [f"{ip}:15020" for ip in NODES.values()]}],
            },
            {
                "job_name": "meshctl",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [CONTROLLER]}],
            },
        ],
    }
    path = folder / "prometheus.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


class Prometheus:
    """Prometheus's HTTP API, called from inside the underlay namespace (curl)."""

    def api(self, endpoint: str, **params: str) -> object:
        argv = ["ip", "netns", "exec", UNDERLAY, "curl", "-sG", "--max-time", "10"]
        for key, value in params.items():
            argv += ["--data-urlencode", f"{key}={value}"]
        proc = subprocess.run(
            [*argv, f"http://{PROM}/api/v1/{endpoint}"], capture_output=True, text=True, timeout=15
        )
        assert proc.returncode == 0, f"{endpoint} {params}: curl {proc.returncode} {proc.stderr}"
        body = json.loads(proc.stdout)
        assert body["status"] == "success", (endpoint, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory):
    path = tmp_path_factory.mktemp("prometheus-lab") / "lab.yaml"
    path.write_text("---\n".join(json.dumps(doc) + "\n" for doc in _manifest()))
    with proxy_workers(2):  # per-worker process figures are part of what is checked
        return lab_factory(path, nodes=2)


@pytest.fixture(scope="module")
def prometheus(lab, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("Debian's prometheus is not installed: run scripts/install.sh")
    folder = tmp_path_factory.mktemp("prometheus")
    log = (folder / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "ip", "netns", "exec", UNDERLAY, binary,
            f"--config.file={_config(folder)}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={PROM}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        prom = Prometheus()

        def targets_up() -> list:
            try:
                return prom.query("up == 1")
            except AssertionError:
                return []

        up = wait_until(targets_up, lambda r: len(r) == 3, what="3 targets up", timeout=60)
        assert {r["metric"]["job"] for r in up} == {"meshagent", "meshctl"}
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _in_pod(pod: str, script: str, *args: str) -> str:
    return meshlab("exec", pod, "--", "python3", "-c", script, *args, timeout=60).stdout.strip()


@pytest.fixture(scope="module")
def traffic(prometheus):
    """The known traffic, then a wait until Prometheus has scraped all of it.

    A counter's first sample is taken as its start (rate() sees no increase up to it): one
    request first, scraped from both reporters before the rest, so that the reviews series
    have an increase inside the rate window however slow the scrapes are."""
    assert json.loads(_in_pod("shop/frontend", GETS, "reviews.shop", "/", "1")) == [200]
    reviews_ok = f'istio_requests_total{{destination_service="{REVIEWS}",response_code="200"}}'
    wait_until(
        lambda: prometheus.query(f"sum by (reporter) ({reviews_ok})"),
        lambda r: len(r) == 2 and all(float(x["value"][1]) == 1 for x in r),
        what="Prometheus has scraped the first request from both reporters",
        timeout=30,
    )
    rest = json.loads(_in_pod("shop/frontend", GETS, "reviews.shop", "/", str(OK - 1)))
    assert rest == [200] * (OK - 1)
    missing = json.loads(_in_pod("shop/frontend", GETS, "reviews.shop", "/nope", str(MISSING)))
    assert missing == [404] * MISSING
    denied = json.loads(_in_pod("shop/intruder", GETS, "reviews.shop", "/", str(DENIED_HTTP)))
    assert denied == [403] * DENIED_HTTP
    assert _in_pod("shop/frontend", ECHOS, str(ECHOES)) == str(ECHOES)
    assert _in_pod("shop/intruder", ECHOS, str(DENIED_TCP)) == "0"
    # flaky-bad's 503s are retried on flaky-good (Istio's default retries) until ejected
    codes = json.loads(_in_pod("shop/frontend", GETS, "flaky.shop", "/", "30"))
    assert set(codes) <= {200, 503}, codes
    wait_until(
        lambda: prometheus.query(
            f'sum(istio_requests_total{{reporter="destination",destination_service="{REVIEWS}"}})'
        ),
        lambda r: r and float(r[0]["value"][1]) == OK + MISSING + DENIED_HTTP,
        what="Prometheus has scraped the requests",
        timeout=30,
    )
    wait_until(
        lambda: prometheus.query("sum(meshagent_outlier_cluster_ejections_total)"),
        lambda r: r and float(r[0]["value"][1]) >= 1,
        what="Prometheus has scraped the ejection",
        timeout=30,
    )
    # two more scrapes of every target after the traffic: every series has two samples (what
    # rate() and increase() need), whenever its first one was taken
    after = time.time() + 1.0  # the scrape interval is 1 s
    wait_until(
        lambda: prometheus.query("min(timestamp(up))"),
        lambda r: r and float(r[0]["value"][1]) > after,
        what="Prometheus scraped every target twice after the traffic",
        timeout=30,
    )
    # rate() over the panels' window sees the rest of the reviews requests from both reporters
    wait_until(
        lambda: prometheus.query(f"sum by (reporter) (rate({reviews_ok}[{RATE_INTERVAL}]))"),
        lambda r: len(r) == 2 and all(float(x["value"][1]) > 0 for x in r),
        what="Prometheus's rate() sees the reviews requests from both reporters",
        timeout=30,
    )
    return prometheus


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _variables(prom: Prometheus) -> dict[str, str]:
    """Each variable's value, as Grafana fills it in: a query variable gets every value its own
    query returns (Grafana's multi-value format: ``(a|b)``)."""
    values = {"reporter": "destination", "__rate_interval": RATE_INTERVAL}
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["query"]["query"]
        selector = _fill(match.group(1), values)
        found = prom.api(f"label/{match.group(2)}/values", **{"match[]": selector})
        assert found, f"${variable['name']}: {selector} gave no {match.group(2)}"
        values[variable["name"]] = "(" + "|".join(_regex(v) for v in found) + ")"
    return values


def _regex(value: str) -> str:
    """`value` as Grafana writes it into a =~ matcher: regex-escaped, then escaped again for
    the PromQL string (``a\\.b``)."""
    return re.escape(value).replace("\\", "\\\\")


def _fill(expr: str, values: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)


def _targets():
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield f"{panel['id']}{target['refId']} {panel['title']}", target["expr"]


def test_the_variables_list_http_and_tcp_services(traffic):
    values = _variables(traffic)
    assert values["namespace"] == "(shop)"
    for service in (REVIEWS, ECHO, FLAKY):
        assert _regex(service) in values["service"], values["service"]


@pytest.mark.parametrize("reporter", ["destination", "source"])
def test_every_panel_returns_data(traffic, reporter):
    values = {**_variables(traffic), "reporter": reporter}
    empty = []
    for name, expr in _targets():
        if not traffic.query(_fill(expr, values)):
            empty.append(f"{name}: {_fill(expr, values)}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def _panel(panel_id: int, ref: str = "A") -> str:
    panel = next(p for p in _dashboard()["panels"] if p["id"] == panel_id)
    return next(t["expr"] for t in panel["targets"] if t["refId"] == ref)


def _totals(expr: str) -> str:
    """A rate() panel as the totals it is the rate of (exact, no extrapolation)."""
    return re.sub(r"rate\((.*?)\[\$__rate_interval\]\)", r"max_over_time(\1[10m])", expr)


def test_key_panels_show_exact_values(traffic):
    values = _variables(traffic)
    reviews = {**values, "service": _regex(REVIEWS)}
    by_code = {
        (r["metric"]["response_code"], r["metric"]["response_flags"]): float(r["value"][1])
        for r in traffic.query(_fill(_totals(_panel(13)), reviews))
    }
    assert by_code == {("200", "-"): OK, ("404", "-"): MISSING, ("403", "RBAC"): DENIED_HTTP}
    # every hop was meshed (cross-node: mTLS tunnels): 100 % for both reporters
    for reporter in ("destination", "source"):
        assert traffic.value(_fill(_panel(4), {**values, "reporter": reporter})) == 1.0
    # success rate of reviews: no 5xx
    assert traffic.value(_fill(_panel(9), reviews)) == 1.0
    # denials per service and kind
    http_denials = traffic.query(_fill(_totals(_panel(23, "A")), values))
    assert [(r["metric"]["destination_service"], float(r["value"][1])) for r in http_denials] == [
        (REVIEWS, DENIED_HTTP)
    ]
    # each denied TCP connection is one or more refused tunnels (the source tries the connect
    # again, as on any refusal): as many as node-2's policy denials other than the HTTP ones
    tcp_denials = traffic.query(_fill(_totals(_panel(23, "B")), values))
    decided = traffic.value(
        'sum(meshagent_policy_decisions_total{action="deny",dry_run="false",'
        f'instance="{NODES["node-2"]}:15020"}})'
    )
    assert [(r["metric"]["destination_service"], float(r["value"][1])) for r in tcp_denials] == [
        (ECHO, decided - DENIED_HTTP)
    ]
    assert decided - DENIED_HTTP >= DENIED_TCP
    # the ejection, of flaky's cluster
    ejected = {
        r["metric"]["cluster"]: float(r["value"][1])
        for r in traffic.query(_fill(_panel(20, "B"), values))
        if float(r["value"][1])
    }
    assert ejected == {f"outbound|8080||{FLAKY}": 1}
    # both agents on one version; each node's agent and both of its workers measured
    versions = traffic.query(_panel(27, "B"))
    assert [(r["metric"]["version"], float(r["value"][1])) for r in versions] == [("0.1.0", 2)]
    workers = {(r["metric"]["instance"], r["metric"]["worker"]) for r in traffic.query(_panel(31))}
    assert workers == {(f"{ip}:15020", w) for ip in NODES.values() for w in ("agent", "0", "1")}
    for age in traffic.query(_panel(29)):
        assert 0 <= float(age["value"][1]) < 600, age
