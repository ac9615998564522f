"""Issue #18 item 1: L7 only where it is needed. Pod `client` (node-1) fetches a blob from nginx
in pod `web` (node-2) through three Services in front of the same pod port: `web` (an `http`
port: `observe` by default), `plain` (annotated `meshagent.io/l7: off`: `l4`) and, for the run
time change, `web` again with a VirtualService (`full` at the source; its pods' node only
observes, since the routes are the source's decisions).

What a user checks: the bytes arrive unchanged (sha256 of the body as curl got it), each
node's 15020 counts exactly the requests made, as its reporter, where the level says so and
not where it does not, and `meshagent status` says the level in force.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import meshlab
from tests.e2e.nginx import write_conf
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

CHANGE_DEADLINE = 2.0  # s: a VirtualService added or removed moves the level within this
BLOB_SIZE = 300_000  # beyond one read: the parser sees the body in several pieces
N = 5
NGINX_HTTP = """\
  access_log off;
  server {{ listen 8080; root {root}; }}
"""


def _manifest(folder) -> list[dict]:
    conf = folder / "web.conf"
    pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "client", "namespace": "lvl", "labels": {"app": "client"}},
            "spec": {
                "nodeName": "node-1",
                "containers": [{"name": "c", "command": ["sleep", "infinity"]}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": "lvl", "labels": {"app": "web"}},
            "spec": {
                "nodeName": "node-2",
                "containers": [
                    {
                        "name": "c",
                        "command": ["nginx", "-p", f"{folder}/", "-c", str(conf)],
                        "readinessProbe": {"tcpSocket": {"port": 8080}},
                    }
                ],
            },
        },
    ]

    def service(name: str, port_name: str, annotations: dict | None = None) -> dict:
        meta: dict = {"name": name, "namespace": "lvl"}
        if annotations:
            meta["annotations"] = annotations
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "selector": {"app": "web"},
                "ports": [{"name": port_name, "port": 80, "targetPort": 8080}],
            },
        }

    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "lvl", "labels": {"meshagent.io/mesh": "enabled"}},
        },
        *pods,
        service("web", "http"),
        service("plain", "http-plain", {"meshagent.io/l7": "off"}),
    ]


VIRTUAL_SERVICE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "web", "namespace": "lvl"},
    "spec": {
        "hosts": ["web"],
        "http": [
            {
                "headers": {"response": {"set": {"x-level": "full"}}},
                "route": [{"destination": {"host": "web"}}],
            }
        ],
    },
}


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("l7-levels")
    os.chmod(folder, 0o755)
    root = folder / "www"
    root.mkdir()
    blob = os.urandom(BLOB_SIZE)
    (root / "blob").write_bytes(blob)
    write_conf(folder, "web", NGINX_HTTP.format(root=root))
    path = folder / "l7-levels.yaml"
    path.write_text("---\n".join(json.dumps(doc) + "\n" for doc in _manifest(folder)))
    lab = lab_factory(path, nodes=2)
    for host in ("web", "plain"):
        lab.wait_answer(
            "lvl/client", f"http://{host}.lvl/blob", "-o", "/dev/null", what=f"{host} answers"
        )
    lab.blob_sha256 = hashlib.sha256(blob).hexdigest()
    lab.folder = folder
    return lab


def _fetch(host: str, n: int = N) -> list[str]:
    """`n` GETs of the blob on one keep-alive connection (one curl, n URLs); the sha256 of each
    body as curl got it."""
    files = " ".join(f"-o /tmp/lvl-{i}-$$" for i in range(n))
    urls = " ".join(f"http://{host}.lvl/blob" for _ in range(n))
    proc = meshlab(
        "exec",
        "lvl/client",
        "--",
        "sh",
        "-c",
        f"curl -s --max-time 20 {files} {urls} && sha256sum /tmp/lvl-*-$$; rm -f /tmp/lvl-*-$$",
    )
    return [line.split()[0] for line in proc.stdout.splitlines()]


def _value(node: str, sample: str, **labels: str) -> float:
    page = meshlab("exec", "--node", node, "--", "curl", "-s", "127.0.0.1:15020/metrics").stdout
    return sum(
        s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )


def _port(lab, node: str, service: str) -> dict:
    for svc in lab.status(node)["services"]:
        if (svc["namespace"], svc["name"]) == ("lvl", service):
            return svc["ports"][0]
    raise AssertionError(f"no Service lvl/{service} in {node}'s status")


def _level(lab, node: str, service: str) -> str:
    return _port(lab, node, service)["l7"]


def _requests(node: str, service: str, reporter: str) -> float:
    return _value(
        node,
        "istio_requests_total",
        reporter=reporter,
        destination_service=f"{service}.lvl.svc.cluster.local",
        source_workload="client",
        destination_workload="web",
    )


def test_observe_counts_exactly_n_requests_on_both_reporters_with_unchanged_bytes(lab):
    assert _level(lab, "node-1", "web") == "observe"
    assert _level(lab, "node-2", "web") == "observe"
    before = {
        r: _requests(n, "web", r) for n, r in (("node-1", "source"), ("node-2", "destination"))
    }
    opened = _value(
        "node-1",
        "istio_tcp_connections_opened_total",
        reporter="source",
        destination_service="web.lvl.svc.cluster.local",
    )
    assert _fetch("web") == [lab.blob_sha256] * N
    for node, reporter in (("node-1", "source"), ("node-2", "destination")):
        counted = wait_until(
            lambda node=node, reporter=reporter: (
                _requests(node, "web", reporter) - before[reporter]
            ),
            lambda value: value >= N,
            what=f"{node} counts {N} requests as their {reporter}",
        )
        assert counted == N, (node, reporter)
        want = {
            "reporter": reporter,
            "destination_service": "web.lvl.svc.cluster.local",
            "response_code": "200",
            "request_protocol": "http",
        }
        assert _value(node, "istio_response_bytes_sum", **want) >= N * BLOB_SIZE
    # relayed, not served by the engine: one TCP connection (the engine reports none)
    assert (
        _value(
            "node-1",
            "istio_tcp_connections_opened_total",
            reporter="source",
            destination_service="web.lvl.svc.cluster.local",
        )
        == opened + 1
    )
    assert _value("node-1", "meshagent_observe_stopped_total") == 0


def test_the_annotation_forces_off_no_request_metrics_bytes_relayed(lab):
    assert _level(lab, "node-1", "plain") == "l4"
    # both Services lead to the same pod port: the destination counts no request of either
    served = {"reporter": "destination", "destination_workload": "web"}
    before = _value("node-2", "istio_requests_total", **served)
    closed = {"reporter": "source", "destination_service": "plain.lvl.svc.cluster.local"}
    closed_before = _value("node-1", "istio_tcp_connections_closed_total", **closed)
    assert _fetch("plain") == [lab.blob_sha256] * N
    wait_until(
        lambda: _value("node-1", "istio_tcp_connections_closed_total", **closed),
        lambda value: value == closed_before + 1,
        what="node-1 counts the one plain connection closed",
    )
    assert _requests("node-1", "plain", "source") == 0
    assert _value("node-2", "istio_requests_total", **served) == before


def _apply(folder, verb: str) -> float:
    path = folder / f"vs-{verb}-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(VIRTUAL_SERVICE))
    meshlab(verb, "-f", str(path))
    return time.monotonic()


def _routed(lab) -> bool:
    proc = meshlab(
        "exec", "lvl/client", "--", "curl", "-s", "-D", "-", "-o", "/dev/null", "--max-time",
        "5", "http://web.lvl/blob",
    )  # fmt: skip
    return "x-level: full" in proc.stdout.lower()


def test_a_virtual_service_moves_the_service_to_full_and_back(lab):
    applied = _apply(lab.folder, "apply")
    wait_until(
        lambda: _routed(lab) and _level(lab, "node-1", "web") == "full",
        what="the route applies and status says full",
        timeout=applied + CHANGE_DEADLINE - time.monotonic(),
        interval=0.05,
    )
    # the route is the source's decision: the pods' node observes (no engine there), counts
    # each request as the destination and passes the bytes unchanged
    wait_until(
        lambda: _port(lab, "node-2", "web"),
        lambda port: (port["l7"], port.get("l7_pods")) == ("full", "observe"),
        what="node-2's status says web is full, observed at its pods",
    )
    before = _requests("node-2", "web", "destination")
    assert _fetch("web", 2) == [lab.blob_sha256] * 2
    counted = wait_until(
        lambda: _requests("node-2", "web", "destination") - before,
        lambda value: value >= 2,
        what="node-2 counts the 2 routed requests as their destination",
    )
    assert counted == 2
    removed = _apply(lab.folder, "delete")
    wait_until(
        lambda: not _routed(lab) and _level(lab, "node-1", "web") == "observe",
        what="the route is gone and status says observe",
        timeout=removed + CHANGE_DEADLINE - time.monotonic(),
        interval=0.05,
    )
    assert _level(lab, "node-2", "web") == "observe"
