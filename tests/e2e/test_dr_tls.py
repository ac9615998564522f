"""Issue #21 item 3: DestinationRule `tls` in the lab, as a user checks it with stock tools.

A non-meshed nginx serves TLS (a certificate the test makes with `cryptography`) in an
un-meshed namespace on node-2. The meshed client on node-1 sends plain `curl http://...:443`:
with `tls.mode: SIMPLE` its node's proxy originates TLS (nginx logs TLS and the SNI); against
a CA that did not sign the server's certificate the proxy answers 503 naming the verification
failure. `tls.mode: DISABLE` toward a pod whose PeerAuthentication is STRICT is refused (the
same pod answers through a Service without that rule).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.certs import TestCA
from tests.e2e.conftest import meshlab, render_manifest
from tests.e2e.nginx import write_conf
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifests" / "dr-tls.yaml"
CLIENT = "drt/client"
SERVER_NAME = "tls-server.plain.svc.cluster.local"

NGINX_HTTP = """\
  log_format tls '$ssl_protocol $ssl_server_name $request client=$ssl_client_verify';
  access_log {dir}/access.log tls;
  server {{
    listen 8443 ssl;
    ssl_certificate {dir}/server.pem;
    ssl_certificate_key {dir}/server.key;
    location / {{ return 200 "over $ssl_protocol\\n"; }}
  }}
  server {{
    listen 8444 ssl;
    ssl_certificate {dir}/server.pem;
    ssl_certificate_key {dir}/server.key;
    ssl_client_certificate {dir}/client-ca.pem;
    ssl_verify_client on;
    location / {{ return 200 "client $ssl_client_verify\\n"; }}
  }}
"""


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dr-tls")
    ca = TestCA("dr-tls server CA")
    leaf = ca.issue(dns=(SERVER_NAME,))
    (folder / "server.pem").write_bytes(leaf.chain_pem)
    (folder / "server.key").write_bytes(leaf.key_pem)
    (folder / "ca.pem").write_bytes(ca.pem)
    (folder / "other-ca.pem").write_bytes(TestCA("unrelated CA").pem)
    client_ca = TestCA("dr-tls client CA")
    client = client_ca.issue(dns=("client.drt",))
    (folder / "client-ca.pem").write_bytes(client_ca.pem)
    (folder / "client.pem").write_bytes(client.chain_pem)
    (folder / "client.key").write_bytes(client.key_pem)
    write_conf(folder, "server", NGINX_HTTP.format(dir=folder))
    folder.chmod(0o755)
    lab = lab_factory(render_manifest(MANIFEST, folder, NGINX=folder), nodes=2)
    lab.folder = folder
    server_ip = meshlab("exec", "plain/server", "--", "hostname", "-I").stdout.split()[0]
    wait_until(
        lambda: meshlab("exec", "--node", "node-2", "--", "curl", "-sk", "-o", "/dev/null",
                        "-w", "%{http_code}", f"https://{server_ip}:8443/", check=False).stdout,
        lambda code: code == "200",
        what="the TLS server outside the mesh answers",
        timeout=60,
    )  # fmt: skip
    return lab


def test_simple_originates_tls_to_a_server_outside_the_mesh(lab):
    _, body = wait_until(
        lambda: lab.curl(CLIENT, "http://tls-server.plain:443/hello", timeout=10),
        lambda got: got[0] == "200",
        what="plain HTTP from the meshed client reaches the TLS server",
        timeout=60,
    )
    assert body.startswith("over TLSv1."), body
    for i in range(3):  # later requests may reuse the pooled TLS connection
        assert lab.curl(CLIENT, f"http://tls-server.plain:443/again/{i}", timeout=10)[0] == "200"
    wait_until(
        lambda: _log(lab).splitlines(),
        lambda log: any(
            line.startswith("TLSv1.") and f" {SERVER_NAME} GET /hello " in line for line in log
        ),
        what="nginx logs the request as TLS with the SNI the mesh sent",
        timeout=10,
    )


def _log(lab) -> str:
    path = lab.folder / "access.log"
    return path.read_text() if path.exists() else ""


def test_simple_on_a_tcp_port_and_mutual_with_client_certificate_files(lab):
    _, body = wait_until(
        lambda: lab.curl(CLIENT, "http://tls-tcp.plain:443/tcp", timeout=10),
        lambda got: got[0] == "200",
        what="plain HTTP relayed as TCP reaches the TLS server (portLevelSettings tls)",
        timeout=60,
    )
    assert body.startswith("over TLSv1."), body
    _, body = wait_until(
        lambda: lab.curl(CLIENT, "http://tls-mutual.plain:443/m", timeout=10),
        lambda got: got[0] == "200",
        what="MUTUAL presents the client certificate nginx requires",
        timeout=60,
    )
    assert body.strip() == "client SUCCESS", body


def test_a_server_the_ca_did_not_sign_is_refused_with_the_reason(lab):
    _, body = wait_until(
        lambda: lab.curl(CLIENT, "http://tls-wrong-ca.plain:443/x", timeout=10),
        lambda got: got[0] == "503" and "transport failure reason" in got[1],
        what="a 503 naming the TLS failure",
        timeout=60,
    )
    assert "CERTIFICATE_VERIFY_FAILED" in body, body
    # the HTTP/2 engine says the same to an HTTP/2 client
    code, body = lab.curl(
        CLIENT, "http://tls-wrong-ca.plain:443/y", "--http2-prior-knowledge", timeout=10
    )
    assert code == "503" and "CERTIFICATE_VERIFY_FAILED" in body, (code, body)
    assert "GET /x " not in _log(lab)  # no request went through


def test_disable_toward_a_strict_pod_is_refused(lab):
    lab.wait_answer(
        CLIENT,
        "http://strict-ok.drt/ok",
        what="the STRICT pod answers through HBONE (no DestinationRule)",
        timeout=60,
    )
    code, body = wait_until(
        lambda: lab.curl(CLIENT, "http://strict.drt/plain", timeout=10),
        lambda got: got[0] != "000",
        what="an answer for the DISABLE service",
        timeout=30,
    )
    assert code == "503", (code, body)
    assert "GET /plain" not in body
