"""Issue #15: gRPC and HTTP/2 as L7 traffic, with stock clients (Debian's grpcio, curl, h2load)
and servers (grpcio, nginx h2c) in the lab.

One gRPC channel's calls are balanced per request over endpoints on two nodes, streams and big
messages pass intact, gRPC metadata route to a subset, a DENY on one method is
PERMISSION_DENIED while another method on the same channel passes, the calls are counted with
grpc_response_status and their messages each way (istio_request/response_messages_total); h2c
with prior knowledge passes on `http-*` and `http2-*` ports, same node and cross node, also
when one pod port is behind both (the protocol follows the Service port the client dialled).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import APPS, meshlab, render_manifest
from tests.e2e.nginx import write_conf
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifests" / "grpc-l7.yaml"
SYSTEM_PYTHON = "/usr/bin/python3"  # the one Debian's python3-grpcio is installed for
ECHO = "echo.g7:50051"
NGINX_HTTP = """\
  access_log off;
  server {{ listen 8082 http2; location / {{ return 200 "{name}\\n"; }} }}
"""
DENY_UNARY = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-unary", "namespace": "g7"},
    "spec": {
        "selector": {"matchLabels": {"app": "echo"}},
        "action": "DENY",
        "rules": [{"to": [{"operation": {"paths": ["/meshtest.Echo/Unary"]}}]}],
    },
}


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpc-l7")
    for name in ("web-local", "web-remote"):
        write_conf(folder, name, NGINX_HTTP.format(dir=folder, name=name))
    lab = lab_factory(render_manifest(MANIFEST, folder, NGINX=folder), nodes=2)
    for service in ("web-local", "web-remote"):  # the Services have their endpoints
        url = f"http://{service}.g7:8082/"
        lab.wait_answer("g7/client", url, "--http2-prior-knowledge", what=f"{service} answers")
    return lab


def _grpc(*args: str, timeout: float = 120) -> dict:
    proc = meshlab(
        "exec", "g7/client", "--", "env", "GRPC_DNS_RESOLVER=native",  # /etc/hosts, no DNS
        SYSTEM_PYTHON, str(APPS / "grpc_echo.py"), *args,
        timeout=timeout,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _requests(node: str, metric: str = "istio_requests_total", **labels: str) -> float:
    page = meshlab("exec", "--node", node, "--", "curl", "-s", "127.0.0.1:15020/metrics").stdout
    return sum(
        s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _snapshot_versions(lab) -> tuple:
    return tuple(lab.status(node)["agent"]["snapshot_version"] for node in ("node-1", "node-2"))


def _change(lab, verb: str, path: Path) -> None:
    before = _snapshot_versions(lab)
    meshlab(verb, "-f", str(path))
    wait_until(
        lambda: _snapshot_versions(lab),
        lambda now: all(a != b for a, b in zip(now, before, strict=True)),
        what=f"{verb} {path.name}: both nodes run a new snapshot",
        timeout=30,
    )


def test_one_channel_is_balanced_per_call_and_counted_with_grpc_status(lab):
    labels = {
        "request_protocol": "grpc",
        "destination_service_name": "echo",
        "grpc_response_status": "0",
    }
    source_before = _requests("node-1", reporter="source", **labels)
    dest_before = sum(_requests(n, reporter="destination", **labels) for n in ("node-1", "node-2"))
    names = _grpc("who", ECHO, "200")
    assert set(names) == {"echo-a", "echo-b"}, names
    assert all(80 <= names[n] <= 120 for n in names), names
    assert _requests("node-1", reporter="source", **labels) - source_before == 200
    dest = sum(_requests(n, reporter="destination", **labels) for n in ("node-1", "node-2"))
    assert dest - dest_before == 200


MESSAGES = ("istio_request_messages_total", "istio_response_messages_total")


def _messages(reporter: str) -> tuple[float, float]:
    """gRPC messages (requests, responses) to echo, as the reporter's nodes count them."""
    labels = {"reporter": reporter, "destination_service_name": "echo", "request_protocol": "grpc"}
    nodes = ("node-1",) if reporter == "source" else ("node-1", "node-2")
    return tuple(sum(_requests(n, m, **labels) for n in nodes) for m in MESSAGES)


@pytest.mark.parametrize(
    ("args", "want"),
    [(("unary",), (1, 1)), (("stream", "25"), (1, 25))],
    ids=["unary", "server-streaming"],
)
def test_grpc_messages_are_counted_each_way(lab, args, want):
    """istio_request/response_messages_total move by the call's messages on both reporters
    (the client's node and the serving endpoint's)."""
    before = {r: _messages(r) for r in ("source", "destination")}
    result = _grpc(args[0], ECHO, *args[1:])
    assert result == ({"code": "OK"} if args[0] == "unary" else {"messages": 25})
    for reporter, (requests, responses) in before.items():
        wait_until(
            lambda reporter=reporter: _messages(reporter),
            lambda now, r=requests, s=responses: (now[0] - r, now[1] - s) == want,
            what=f"{reporter} counts {want} gRPC messages (request, response)",
            timeout=15,
        )


def test_a_stream_of_1000_messages_and_a_3_mib_message_pass_intact(lab):
    result = _grpc("call", ECHO, str(3 * 1024 * 1024))
    assert result == {"unary_intact": True, "stream_messages": 1000, "stream_intact": True}


def test_grpc_metadata_route_to_subset_v2(lab):
    assert _grpc("who", ECHO, "40", "x-version=v2") == {"echo-b": 40}


def test_a_deny_on_one_method_is_permission_denied_and_the_other_passes(lab, tmp_path):
    path = tmp_path / "deny-unary.yaml"
    path.write_text(yaml.safe_dump(DENY_UNARY))
    denied = {
        "reporter": "destination",
        "destination_service_name": "echo",
        "request_protocol": "grpc",
        "grpc_response_status": "7",
    }
    before = sum(_requests(n, **denied) for n in ("node-1", "node-2"))
    _change(lab, "apply", path)
    try:
        for _ in range(4):  # either endpoint, same-node and cross-node
            assert _grpc("methods", ECHO) == {"Unary": "PERMISSION_DENIED", "Who": "OK"}
        # each denial counted by its destination, same-node (one engine) as cross-node
        wait_until(
            lambda: sum(_requests(n, **denied) for n in ("node-1", "node-2")) - before,
            lambda counted: counted == 4,
            what="the destinations count the 4 denied calls (grpc_response_status 7)",
            timeout=10,
        )
    finally:
        _change(lab, "delete", path)
    assert _grpc("methods", ECHO) == {"Unary": "OK", "Who": "OK"}


RETRY_UNAVAILABLE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "echo-retry", "namespace": "g7"},
    "spec": {
        "hosts": ["echo"],
        "http": [
            {
                "match": [{"uri": {"exact": "/meshtest.Echo/Flaky"}}],
                "route": [{"destination": {"host": "echo"}}],
                "retries": {"attempts": 2, "retryOn": "unavailable"},
            },
            {"route": [{"destination": {"host": "echo"}}]},
        ],
    },
}


def test_a_retry_on_unavailable_turns_one_shot_failures_into_success(lab, tmp_path):
    """Each server fails every other /Flaky call with a trailers-only UNAVAILABLE."""
    without = _grpc("flaky", ECHO, "20")
    assert without.get("UNAVAILABLE", 0) > 0, without  # Istio's default policy: not retried
    path = tmp_path / "echo-retry.yaml"
    path.write_text(yaml.safe_dump(RETRY_UNAVAILABLE))
    # a second VirtualService for the host: rename the manifest's to make this one apply
    original = yaml.safe_load(MANIFEST.read_text().split("---")[-1])
    _change(lab, "delete", _write(tmp_path, original))
    _change(lab, "apply", path)
    try:
        assert _grpc("flaky", ECHO, "20") == {"OK": 20}
    finally:
        _change(lab, "delete", path)
        _change(lab, "apply", _write(tmp_path, original))


def _write(folder: Path, doc: dict) -> Path:
    path = folder / f"{doc['kind']}-{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("service", ["web-local", "web-remote"], ids=["same-node", "cross-node"])
@pytest.mark.parametrize("port", [8083, 8082], ids=["http-port", "http2-port"])
def test_h2c_prior_knowledge_through_http_and_http2_ports(lab, service, port):
    """nginx speaks only h2c on 8082, the pod port behind both Service ports."""
    code, body = lab.curl("g7/client", f"http://{service}.g7:{port}/", "--http2-prior-knowledge")
    assert (code, body) == ("200", f"{service}\n")


H2LOAD_SUMMARY = re.compile(
    r"requests: (\d+) total, .*?(\d+) succeeded, (\d+) failed, (\d+) errored"
)


@pytest.mark.parametrize("service", ["web-local", "web-remote"], ids=["same-node", "cross-node"])
@pytest.mark.parametrize("port", [8083, 8082], ids=["http-port", "http2-port"])
def test_h2load_through_http_and_http2_ports(lab, service, port):
    """2,000 h2c requests, 10 connections x 10 streams: all succeed, and the serving node
    counts each one (reporter destination) for that Service."""
    labels = {"reporter": "destination", "destination_service_name": service}
    before = sum(_requests(n, **labels) for n in ("node-1", "node-2"))
    proc = meshlab(
        "exec", "g7/client", "--", "h2load", "-n", "2000", "-c", "10", "-m", "10",
        f"http://{service}.g7:{port}/", timeout=180,
    )  # fmt: skip
    found = H2LOAD_SUMMARY.search(proc.stdout)
    assert found, proc.stdout
    assert found.groups() == ("2000", "2000", "0", "0"), proc.stdout
    wait_until(
        lambda: sum(_requests(n, **labels) for n in ("node-1", "node-2")) - before,
        lambda grown: grown == 2000,
        what=f"the destination reporter counts 2000 requests to {service}:{port}",
        timeout=15,
    )
