"""Issue #7: both ends count what really went through, in Istio's metric names and labels, and
`meshagent status --json` tells a script everything the screen shows.

Pod `frontend` (node-1) talks to `reviews` (HTTP, node-2) and `echo` (a TCP service, port name
`tcp-echo`, node-2). The servers print what they counted to their logs; the clients print what
they counted; the metrics scraped from each node's 15020 must agree byte for byte.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from meshagent.agent.status import REPORT_FIELDS
from meshagent.lab.paths import LOG_DIR
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import BIN, DATAPATH_PROGRAMS, meshlab
from tests.waiting import wait_until

REVIEWS_SVC = "reviews.shop.svc.cluster.local"
ECHO_SVC = "echo.shop.svc.cluster.local"

# Answers each POST with a body of 3*len(request)+11 bytes; prints "COUNT <in> <out>".
HTTP_SERVER = """
import http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        reply = b"r" * (3 * len(body) + 11)
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
        print("COUNT", len(body), len(reply), flush=True)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", 9080), H).serve_forever()
"""

# Sends every chunk back twice (so the two directions differ); prints "COUNT <in> <out>".
ECHO_SERVER = """
import socketserver
class H(socketserver.BaseRequestHandler):
    def handle(self):
        got = sent = 0
        while data := self.request.recv(65536):
            got += len(data)
            self.request.sendall(data + data)
            sent += 2 * len(data)
        print("COUNT", got, sent, flush=True)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("", 9000), H).serve_forever()
"""

# One connection: send SIZE bytes, read back the 2*SIZE the server sends; prints "<sent> <got>".
ECHO_CLIENT = """
import socket, sys
size = int(sys.argv[1])
s = socket.create_connection(("echo.shop", 9000), timeout=10)
s.sendall(b"e" * size)
got = 0
while got < 2 * size:
    data = s.recv(65536)
    if not data:
        break
    got += len(data)
s.close()
print(size, got)
"""


# Holds one echo connection open for a few seconds (status then shows it and its tunnel).
HOLDER = """
import socket, time
s = socket.create_connection(("echo.shop", 9000), timeout=10)
s.sendall(b"x")
s.recv(2)
time.sleep(4)
"""


def _manifest() -> list[dict]:
    def pod(name: str, node: str, command: list[str], port: int | None = None) -> dict:
        container: dict = {"name": "c", "command": command}
        if port:
            container["readinessProbe"] = {"tcpSocket": {"port": port}}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": name, "containers": [container]},
        }

    def service(name: str, port: int, port_name: str) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"selector": {"app": name}, "ports": [{"name": port_name, "port": port}]},
        }

    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"meshagent.io/mesh": "enabled"}},
        },
        pod("frontend", "node-1", ["sleep", "infinity"]),
        pod("reviews", "node-2", ["python3", "-c", HTTP_SERVER], 9080),
        pod("echo", "node-2", ["python3", "-c", ECHO_SERVER], 9000),
        service("reviews", 9080, "http"),
        service("echo", 9000, "tcp-echo"),
    ]


@pytest.fixture(scope="module")
def obs_lab(lab_factory, tmp_path_factory):
    path = tmp_path_factory.mktemp("observability") / "observability.yaml"
    path.write_text("---\n".join(json.dumps(doc) + "\n" for doc in _manifest()))
    return lab_factory(path, nodes=2)


def _scrape(node: str) -> list:
    page = meshlab("exec", "--node", node, "--", "curl", "-s", "127.0.0.1:15020/metrics").stdout
    return list(text_string_to_metric_families(page))


def _value(node: str, sample: str, **labels: str) -> float:
    """Sum of the samples named `sample` whose labels include `labels`."""
    return sum(
        s.value
        for family in _scrape(node)
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )


def _server_counts(pod: str) -> list[tuple[int, int]]:
    """(bytes in, bytes out) per request or connection, as the server counted them."""
    counts = []
    for line in (LOG_DIR / f"pod-shop-{pod}.log").read_text().splitlines():
        word, _, rest = line.partition(" ")
        if word == "COUNT":
            got, sent = (int(x) for x in rest.split())
            if got or sent:  # readiness probes connect and close
                counts.append((got, sent))
    return counts


def test_http_requests_counted_by_both_ends_with_matching_bytes(obs_lab):
    sizes = [0, 1, 100, 5000, 70000]  # beyond one read and one HTTP/2 frame
    uploaded = downloaded = 0
    for size in sizes:
        proc = meshlab(
            "exec",
            "shop/frontend",
            "--",
            "sh",
            "-c",
            f"head -c {size} /dev/zero | curl -s -o /dev/null --max-time 10 "
            "-w '%{http_code} %{size_upload} %{size_download}' "
            "-H 'Content-Type: application/octet-stream' --data-binary @- "
            "http://reviews.shop:9080/",
        )
        code, up, down = proc.stdout.split()
        assert code == "200", proc.stdout
        assert int(up) == size
        uploaded, downloaded = uploaded + int(up), downloaded + int(down)
    n = len(sizes)
    # the server prints its count after it answered; connections close a moment after clients
    server = wait_until(
        lambda: _server_counts("reviews"),
        lambda counts: len(counts) == n,
        what=f"the reviews server logged {n} requests",
    )
    assert sum(c[0] for c in server) == uploaded
    assert sum(c[1] for c in server) == downloaded

    common = {
        "source_workload": "frontend",
        "source_workload_namespace": "shop",
        "destination_workload": "reviews",
        "destination_service": REVIEWS_SVC,
        "response_code": "200",
        "connection_security_policy": "mutual_tls",
    }
    for node, reporter in (("node-1", "source"), ("node-2", "destination")):
        want = {**common, "reporter": reporter}
        # a proxy counts a request once it has relayed the response: after the client has it
        counted = wait_until(
            lambda node=node, want=want: _value(node, "istio_requests_total", **want),
            lambda value: value >= n,
            what=f"{node} counts {n} requests as their {reporter}",
        )
        assert counted == n, (node, reporter)
        assert _value(node, "istio_request_duration_milliseconds_count", **want) == n
        assert _value(node, "istio_request_bytes_count", **want) == n
        assert _value(node, "istio_request_bytes_sum", **want) == uploaded, (node, reporter)
        assert _value(node, "istio_response_bytes_sum", **want) == downloaded, (node, reporter)
    source = {**common, "reporter": "source"}
    assert _value("node-1", "istio_requests_total", **{**source, "response_code": "503"}) == 0


def test_tcp_connections_and_bytes_match_what_the_client_counted(obs_lab):
    sizes = [1, 1000, 300_000]
    sent = received = 0
    for size in sizes:
        out = meshlab("exec", "shop/frontend", "--", "python3", "-c", ECHO_CLIENT, str(size))
        s, r = (int(x) for x in out.stdout.split())
        assert (s, r) == (size, 2 * size)
        sent, received = sent + s, received + r
    n = len(sizes)
    server = wait_until(
        lambda: _server_counts("echo"),
        lambda counts: len(counts) == n,
        what=f"the echo server logged {n} connections",
    )
    assert (sum(c[0] for c in server), sum(c[1] for c in server)) == (sent, received)

    labels = {
        "source_workload": "frontend",
        "destination_workload": "echo",
        "destination_service": ECHO_SVC,
        "request_protocol": "tcp",
        "connection_security_policy": "mutual_tls",
    }
    for node, reporter in (("node-1", "source"), ("node-2", "destination")):
        want = {**labels, "reporter": reporter}
        wait_until(
            lambda node=node, want=want: _value(node, "istio_tcp_connections_closed_total", **want),
            lambda closed: closed == n,
            what=f"{reporter}: {n} connections closed",
        )
        assert _value(node, "istio_tcp_connections_opened_total", **want) == n
        # received = from the client (request direction), sent = to the client
        assert _value(node, "istio_tcp_received_bytes_total", **want) == sent, reporter
        assert _value(node, "istio_tcp_sent_bytes_total", **want) == received, reporter


def test_metrics_page_parses_with_prometheus_parser_on_both_paths(obs_lab):
    for path in ("/metrics", "/stats/prometheus"):
        page = meshlab(
            "exec", "--node", "node-2", "--", "curl", "-s", "-f", f"127.0.0.1:15020{path}"
        ).stdout
        names = {f.name for f in text_string_to_metric_families(page)}
        assert {"istio_tcp_connections_opened", "meshagent_controller_connected"} <= names, path
    # the node's own figures the issue lists, with values
    workers = obs_lab.status("node-1")["agent"].get("workers")  # one per core by default
    assert _value("node-1", "meshagent_proxy_workers") == (len(workers) if workers else 1)
    assert _value("node-1", "meshagent_datapath_redirects_total") >= 1
    wait_until(
        lambda: _value("node-1", "meshagent_tunnel_pool_connections"),
        lambda pooled: pooled >= 1,
        what="node-1 reports its pooled HBONE connections",
    )


def test_status_json_carries_every_field(obs_lab):
    # a live tunnel and an outbound connection to see: hold one echo connection open
    hold = subprocess.Popen(
        [str(BIN / "meshlab"), "exec", "shop/frontend", "--", "python3", "-c", HOLDER],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # while it is held (4 s), as the proxy workers report it (every second)
        src = wait_until(
            lambda: obs_lab.status("node-1"),
            lambda report: (
                report["connections"]["outbound"]["active"] >= 1
                and any(t["destination"].endswith("/sa/echo") for t in report["tunnels"])
            ),
            what="node-1 shows the held echo connection and its tunnel",
            timeout=4,
        )
    finally:
        hold.wait(timeout=15)
    dst = obs_lab.status("node-2")
    for report in (src, dst):
        assert set(REPORT_FIELDS) <= set(report)
        agent = report["agent"]
        assert agent["running"] is True
        assert agent["version"] and agent["uptime_s"] > 0
        assert agent["controller"]["connected"] is True
        assert report["snapshot"]["version"] == agent["snapshot_version"] != ""
        assert {p["name"] for p in report["datapath"]["programs"]} == DATAPATH_PROGRAMS
        assert report["connections"]["outbound"].keys() == {
            "active",
            "accepted",
            "kernel_joined",
            "handed_out",
            "handed_in",
        }
        assert isinstance(report["ejected_endpoints"], list)
        assert isinstance(report["recent_denials"], list)
    assert src["node"] == "node-1" and dst["node"] == "node-2"
    assert src["connections"]["outbound"]["active"] >= 1
    assert any(t["destination"].endswith("/sa/echo") for t in src["tunnels"])
    pods = {p["name"]: p for p in dst["pods"]}
    echo = pods["echo"]
    assert echo["ip"].startswith("10.")
    assert echo["identity"] == "spiffe://cluster.local/ns/shop/sa/echo"
    assert echo["mtls_mode"] == "PERMISSIVE"
    assert echo["certificate"]["state"] == "ready"
    assert 0 < echo["certificate"]["expires_in_s"] <= 24 * 3600


def test_certificate_expiry_per_identity_is_scraped(obs_lab):
    expiry = {
        s.labels["identity"]: s.value
        for family in _scrape("node-2")
        for s in family.samples
        if s.name == "meshagent_certificate_expiry_seconds"
    }
    assert 0 < expiry["spiffe://cluster.local/ns/shop/sa/echo"] <= 24 * 3600


def test_status_with_the_agent_down_shows_saved_state(obs_lab):
    meshlab("agent", "stop", "node-2")
    try:
        report = obs_lab.status("node-2")
        screen = meshlab("exec", "--node", "node-2", "--", "meshagent", "status").stdout
    finally:
        meshlab("agent", "start", "node-2")
    assert report["agent"]["running"] is False
    assert report["snapshot"]["source"] == "saved" and report["snapshot"]["version"]
    assert report["connections"] is None and report["tunnels"] is None
    echo = {p["name"]: p for p in report["pods"]}["echo"]
    assert echo["identity"] == "spiffe://cluster.local/ns/shop/sa/echo"
    assert echo["certificate"]["state"] == "saved"
    assert echo["certificate"]["expires_in_s"] > 0
    assert "DOWN" in screen and "unknown (agent down)" in screen
