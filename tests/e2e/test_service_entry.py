"""Issue #21 item 3: a ServiceEntry makes a host outside the mesh a destination that
VirtualService rules and the metrics apply to. The server (the stdlib's http.server via
apps/head_echo.py, answering with the request line it got) runs in an un-meshed namespace on
node-2; the meshed client on node-1 reaches it with stock curl through the entry's address,
by IP and by host name, while a fault abort on one path answers from the proxy. The proxy
dials the endpoint directly in plain TCP (no HBONE: nothing of ours is in front of it), and
labels istio_requests_total with destination_service = the entry's host. A second entry,
`resolution: NONE` with the server's own address and a two-label host (as httpbin.org), sends
connections on to where they were dialled, under its host (its own abort applies).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from meshagent.lab.paths import LOG_DIR
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import meshlab, render_manifest
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifests" / "service-entry.yaml"
HOST = "api.outside.example"
VIP = "240.0.0.10"  # the entry's address: no interface has it, only the mesh knows it
CLIENT = "se/client"
DIRECT_HOST = "outside.example"  # two labels, as httpbin.org: the entry makes it the external host


def _entry(server_ip: str) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "outside-api", "namespace": "se"},
        "spec": {
            "hosts": [HOST],
            "addresses": [VIP],
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8080}],
            "location": "MESH_EXTERNAL",
            "resolution": "STATIC",
            "endpoints": [{"address": server_ip}],
        },
    }


def _original_destination(server_ip: str) -> dict:
    """resolution NONE: the server's own address, so connections go on to where they were
    dialled, under the entry's host."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "outside-direct", "namespace": "se"},
        "spec": {
            "hosts": [DIRECT_HOST],
            "addresses": [server_ip],
            "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
            "resolution": "NONE",
        },
    }


DIRECT_ROUTES = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "outside-direct", "namespace": "se"},
    "spec": {
        "hosts": [DIRECT_HOST],
        "http": [
            {
                "match": [{"uri": {"prefix": "/blocked"}}],
                "fault": {"abort": {"httpStatus": 451, "percentage": {"value": 100}}},
                "route": [{"destination": {"host": DIRECT_HOST}}],
            },
            {"route": [{"destination": {"host": DIRECT_HOST}}]},
        ],
    },
}

ROUTES = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "outside-api", "namespace": "se"},
    "spec": {
        "hosts": [HOST],
        "http": [
            {
                "match": [{"uri": {"prefix": "/blocked"}}],
                "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
                "route": [{"destination": {"host": HOST}}],
            },
            {"route": [{"destination": {"host": HOST}}]},
        ],
    },
}


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("service-entry")
    lab = lab_factory(render_manifest(MANIFEST, folder), nodes=2)
    server_ip = meshlab("exec", "outside/server", "--", "hostname", "-I").stdout.split()[0]
    lab.server_ip = server_ip
    wait_until(
        lambda: meshlab("exec", "--node", "node-2", "--", "curl", "-s", "-o", "/dev/null",
                        "-w", "%{http_code}", f"http://{server_ip}:8080/", check=False).stdout,
        lambda code: code == "200",
        what="the server outside the mesh answers",
        timeout=30,
    )  # fmt: skip
    path = folder / "entry.yaml"
    docs = [_entry(server_ip), ROUTES, _original_destination(server_ip), DIRECT_ROUTES]
    path.write_text(yaml.safe_dump_all(docs))
    meshlab("apply", "-f", str(path))
    return lab


def _metric(node: str, metric: str = "istio_requests_total", **labels: str) -> float:
    page = meshlab("exec", "--node", node, "--", "curl", "-s", "127.0.0.1:15020/metrics").stdout
    return sum(
        s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name == metric and labels.items() <= s.labels.items()
    )


def test_entry_address_reaches_the_outside_server_and_the_fault_applies(lab):
    code, body = wait_until(
        lambda: lab.curl(CLIENT, f"http://{VIP}/blocked/x", timeout=10),
        lambda got: got[0] == "418",
        what="the VirtualService's abort on the entry's host is in force",
        timeout=60,
    )
    assert "GET" not in body, body  # answered by the proxy, the server was not asked
    code, body = lab.curl(CLIENT, f"http://{VIP}/open/y", timeout=10)
    assert (code, body.splitlines()[0]) == ("200", "GET /open/y HTTP/1.1"), body
    # By host name, as a client resolving it to the entry's address would.
    resolve = f"{HOST}:80:{VIP}"
    code, body = lab.curl(CLIENT, f"http://{HOST}/by-name", "--resolve", resolve, timeout=10)
    assert (code, body.splitlines()[0]) == ("200", "GET /by-name HTTP/1.1"), body
    code, _ = lab.curl(CLIENT, f"http://{HOST}/blocked/z", "--resolve", resolve, timeout=10)
    assert code == "418"


def test_metrics_label_the_entry_host_as_destination_service(lab):
    for path in ("/blocked/m", "/open/m"):
        wait_until(
            lambda path=path: lab.curl(CLIENT, f"http://{VIP}{path}", timeout=10)[0],
            lambda code: code in ("418", "200"),
            what=f"{path} through the entry",
            timeout=60,
        )
    for code in ("418", "200"):
        wait_until(
            lambda code=code: _metric(
                "node-1",
                reporter="source",
                destination_service=HOST,
                destination_service_name=HOST,
                destination_service_namespace="se",
                response_code=code,
            ),
            lambda value: value >= 1,
            what=f"istio_requests_total for {HOST} with response_code {code}",
            timeout=30,
        )


def test_resolution_none_goes_on_to_the_dialled_address_under_the_entry_host(lab):
    server = f"http://{lab.server_ip}:8080"
    wait_until(
        lambda: lab.curl(CLIENT, f"{server}/blocked/n", timeout=10)[0],
        lambda code: code == "451",
        what="the abort on the NONE entry's host is in force",
        timeout=60,
    )
    code, body = lab.curl(CLIENT, f"{server}/open/n", timeout=10)
    assert (code, body.splitlines()[0]) == ("200", "GET /open/n HTTP/1.1"), body
    wait_until(
        lambda: _metric(
            "node-1", reporter="source", destination_service=DIRECT_HOST, response_code="451"
        ),
        lambda value: value >= 1,
        what=f"istio_requests_total for {DIRECT_HOST}",
        timeout=30,
    )


def test_resolution_dns_serves_what_resolves_and_says_what_does_not(lab, tmp_path):
    """Issue #21: `resolution: DNS`. The controller resolves the entry's endpoint names (here
    one in the reserved `.invalid` domain, which never resolves: the lab has no DNS of its
    own) and uses its IP endpoints as they are: requests to the entry's address reach the
    server through the IP endpoint, and the controller's log names the unresolved name."""
    vip = "240.0.0.11"
    entry = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "outside-dns", "namespace": "se"},
        "spec": {
            "hosts": ["dns.outside.example"],
            "addresses": [vip],
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8080}],
            "resolution": "DNS",
            "endpoints": [{"address": "nowhere.invalid"}, {"address": lab.server_ip}],
        },
    }
    path = tmp_path / "dns-entry.yaml"
    path.write_text(yaml.safe_dump(entry))
    meshlab("apply", "-f", str(path))
    try:
        _, body = wait_until(
            lambda: lab.curl(CLIENT, f"http://{vip}/dns", timeout=10),
            lambda got: got[0] == "200",
            what="the DNS entry's address reaches the server",
            timeout=60,
        )
        assert body.splitlines()[0] == "GET /dns HTTP/1.1", body
        wait_until(
            lambda: (LOG_DIR / "controller.log").read_text(errors="replace"),
            lambda log: "cannot resolve nowhere.invalid" in log,
            what="the controller's log names the name it cannot resolve",
            timeout=30,
        )
    finally:
        meshlab("delete", "-f", str(path))


def test_cidr_addresses_take_every_address_of_their_block(lab, tmp_path):
    """Issue #21: ServiceEntry `addresses` may be CIDR blocks (Istio: "could be CIDR prefix").
    STATIC `240.1.0.0/16` on a TCP port: connections to any two addresses of the block reach
    the server (an address outside it does not); NONE `<server2>/24`: a connection to server2
    goes on to the address dialled. Both are counted under their entry's host."""
    server2 = meshlab("exec", "outside/server2", "--", "hostname", "-I").stdout.split()[0]
    tcp = [{"number": 80, "name": "tcp", "protocol": "TCP", "targetPort": 8080}]
    block = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "outside-block", "namespace": "se"},
        "spec": {
            "hosts": ["block.outside.example"],
            "addresses": ["240.1.0.0/16"],
            "ports": tcp,
            "resolution": "STATIC",
            "endpoints": [{"address": lab.server_ip}],
        },
    }
    dialled = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "outside-range", "namespace": "se"},
        "spec": {
            "hosts": ["range.outside.example"],
            "addresses": [f"{server2}/24"],
            "ports": [{"number": 8080, "name": "tcp", "protocol": "TCP"}],
            "resolution": "NONE",
        },
    }

    def _opened(host: str) -> float:
        return _metric(
            "node-1",
            "istio_tcp_connections_opened_total",
            reporter="source",
            destination_service=host,
        )

    path = tmp_path / "cidr-entries.yaml"
    path.write_text(yaml.safe_dump_all([block, dialled]))
    meshlab("apply", "-f", str(path))
    try:
        for address in ("240.1.2.3", "240.1.250.7"):
            _, body = wait_until(
                lambda address=address: lab.curl(CLIENT, f"http://{address}/cidr", timeout=10),
                lambda got: got[0] == "200",
                what=f"{address}, in the entry's block, reaches the server",
                timeout=60,
            )
            assert body.splitlines()[0] == "GET /cidr HTTP/1.1", body
        assert lab.curl(CLIENT, "http://240.2.0.1/cidr", timeout=5)[0] == "000"  # outside it
        wait_until(
            lambda: _opened("block.outside.example"),
            lambda value: value >= 2,
            what="the block's connections counted under its host",
            timeout=30,
        )
        code, body = lab.curl(CLIENT, f"http://{server2}:8080/dialled", timeout=10)
        assert (code, body.splitlines()[0]) == ("200", "GET /dialled HTTP/1.1"), body
        wait_until(
            lambda: _opened("range.outside.example"),
            lambda value: value >= 1,
            what="the connection to server2 counted under the NONE entry's host",
            timeout=30,
        )
    finally:
        meshlab("delete", "-f", str(path))
