"""Issue #21: DestinationRule `connectionPool.http.h2UpgradePolicy: UPGRADE` in the lab. A meshed
client speaks HTTP/1.1 (`curl --http1.1`) to Services whose pods run nginx speaking only HTTP/2
with prior knowledge (`listen 8080 http2;`), one on the client's node and one across nodes
(HBONE). With UPGRADE the client's node proxy sends the requests on as HTTP/2: nginx logs
`HTTP/2.0` and curl gets 200 with the body (over HTTP/1.1). With DO_NOT_UPGRADE, or without a
DestinationRule, an HTTP/1.1 nginx logs `HTTP/1.1`. A body travels both ways (PUT, GET). Both
reporters count each request with `request_protocol` `http`, as Istio labels either version."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import meshlab, render_manifest
from tests.e2e.nginx import write_conf
from tests.e2e.test_l7_levels import _value
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

MANIFEST = Path(__file__).resolve().parent / "manifests" / "h2-upgrade.yaml"
CLIENT = "up/client"
N = 3
NGINX_HTTP = """\
  log_format proto '$host $server_protocol $request_uri';
  access_log {folder}/{name}.access proto;
  server {{
    listen 8080{http2};
    location / {{ return 200 "{name}"; }}
    location /files/ {{ root {folder}/{name}-root; dav_methods PUT; client_max_body_size 1m; }}
  }}
"""


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("h2-upgrade")
    for name, http2 in (("far", " http2"), ("near", " http2"), ("plain", "")):
        write_conf(folder, name, NGINX_HTTP.format(folder=folder, name=name, http2=http2))
        (folder / f"{name}-root" / "files").mkdir(parents=True)
    lab = lab_factory(render_manifest(MANIFEST, folder, NGINX=folder), nodes=2)
    lab.folder = folder
    for service in ("far", "near", "plain", "bare"):
        url = f"http://{service}.up:8080/ready"
        lab.wait_answer(CLIENT, url, "--http1.1", what=f"{url} answers through the mesh")
    return lab


def _logged(lab, name: str, path: str, count: int = N) -> list[str]:
    """The protocols nginx `name` logged for requests to `path`, once there are `count`."""
    access = lab.folder / f"{name}.access"
    return wait_until(
        lambda: [
            line.split()[1]
            for line in access.read_text().splitlines()
            if line.split()[2:] == [path]
        ],
        lambda protocols: len(protocols) >= count,
        what=f"nginx {name} logs {count} requests to {path}",
    )


def _requests(node: str, service: str, reporter: str) -> float:
    return _value(
        node,
        "istio_requests_total",
        reporter=reporter,
        destination_service=f"{service}.up.svc.cluster.local",
        request_protocol="http",  # Istio's label for HTTP/1.1 and HTTP/2 alike
        response_code="200",
    )


@pytest.mark.parametrize(
    ("service", "node"), [("far", "node-2"), ("near", "node-1")], ids=["cross-node", "same-node"]
)
def test_upgrade_sends_http1_requests_to_the_pod_as_http2(lab, service, node):
    path = f"/upgraded-{service}"
    counted = {
        ("node-1", "source"): _requests("node-1", service, "source"),
        (node, "destination"): _requests(node, service, "destination"),
    }
    for _ in range(N):
        proc = meshlab(
            "exec", CLIENT, "--", "curl", "-s", "--http1.1", "-w", "\n%{http_code} %{http_version}",
            "--max-time", "5", f"http://{service}.up:8080{path}",
        )  # fmt: skip
        body, _, status = proc.stdout.rpartition("\n")
        assert (status, body) == ("200 1.1", service), proc.stdout  # HTTP/1.1 to the client
    assert _logged(lab, service, path) == ["HTTP/2.0"] * N
    for (where, reporter), before in counted.items():
        wait_until(
            lambda w=where, r=reporter, b=before: _requests(w, service, r) - b,
            lambda added: added == N,
            what=f"{where} counts the {N} requests as their {reporter}",
        )


def test_a_body_goes_up_and_comes_back(lab):
    """PUT stores the body (nginx's WebDAV module), GET returns it: both over HTTP/2 to the pod."""
    blob = "".join(f"{i:07d}\n" for i in range(20_000))  # 160 kB: several DATA frames
    (lab.folder / "blob").write_text(blob)
    url = "http://far.up:8080/files/blob"
    code, _ = lab.curl(CLIENT, url, "--http1.1", "-T", str(lab.folder / "blob"))
    assert code == "201"
    assert lab.curl(CLIENT, url, "--http1.1") == ("200", blob)
    assert (lab.folder / "far-root" / "files" / "blob").read_text() == blob
    assert _logged(lab, "far", "/files/blob", count=2) == ["HTTP/2.0"] * 2


@pytest.mark.parametrize("service", ["plain", "bare"], ids=["do-not-upgrade", "no-rule"])
def test_without_upgrade_the_pod_sees_http1(lab, service):
    path = f"/kept-{service}"
    for _ in range(N):
        assert lab.curl(CLIENT, f"http://{service}.up:8080{path}", "--http1.1") == ("200", "plain")
    assert _logged(lab, "plain", path) == ["HTTP/1.1"] * N
