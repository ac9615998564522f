"""Issue #21 item 3: VirtualService `tls` routes (SNI) in the lab, with curl and nginx.

Two nginx pods serve TLS themselves (a certificate the test makes for the Service's names)
behind a `tls-` Service port; the mesh relays the TLS untouched over its own mTLS tunnel and
picks the destination by the ClientHello's SNI: curl verifying the server against the test's
CA by the Service's FQDN (the SNI the VirtualService names) always reaches v2 on the other
node, which logs that SNI; by the short name (another SNI) both versions answer, as the
Service alone would route it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.certs import TestCA
from tests.e2e.conftest import render_manifest
from tests.e2e.nginx import write_conf
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifests" / "tls-routes.yaml"
CLIENT = "sni/client"
FQDN = "tlsweb.sni.svc.cluster.local"
CALLS = 20

NGINX_HTTP = """\
  log_format sni '$ssl_server_name $request';
  access_log {dir}/{name}.log sni;
  server {{
    listen 8443 ssl;
    ssl_certificate {dir}/server.pem;
    ssl_certificate_key {dir}/server.key;
    location / {{ return 200 "{name}\\n"; }}
  }}
"""


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls-routes")
    ca = TestCA("tls-routes server CA")
    leaf = ca.issue(dns=(FQDN, "tlsweb.sni", "tlsweb"))
    (folder / "server.pem").write_bytes(leaf.chain_pem)
    (folder / "server.key").write_bytes(leaf.key_pem)
    (folder / "ca.pem").write_bytes(ca.pem)
    for name in ("v1", "v2"):
        write_conf(folder, name, NGINX_HTTP.format(dir=folder, name=name))
    folder.chmod(0o755)
    lab = lab_factory(render_manifest(MANIFEST, folder, NGINX=folder), nodes=2)
    lab.folder = folder
    lab.wait_answer(CLIENT, f"https://{FQDN}/", "--cacert", str(folder / "ca.pem"),
                    what="the TLS Service answers through the mesh")  # fmt: skip
    return lab


def _answers(lab, host: str) -> list[str]:
    bodies = []
    for _ in range(CALLS):
        code, body = lab.curl(
            CLIENT, f"https://{host}/", "--cacert", str(lab.folder / "ca.pem"), timeout=10
        )
        assert code == "200", (host, code, body)
        bodies.append(body.strip())
    return bodies


def test_the_sni_the_virtual_service_names_always_reaches_v2(lab):
    assert set(_answers(lab, FQDN)) == {"v2"}
    # the server itself terminated the TLS, with the name the client asked for
    log = (lab.folder / "v2.log").read_text().splitlines()
    assert sum(line == f"{FQDN} GET / HTTP/1.1" for line in log) >= CALLS, log[-3:]


def test_another_sni_goes_where_the_service_sends_it(lab):
    seen = wait_until(
        lambda: _answers(lab, "tlsweb.sni"),
        lambda bodies: set(bodies) == {"v1", "v2"},
        what="both versions answer connections whose SNI no tls rule names",
        timeout=30,
    )
    assert set(seen) == {"v1", "v2"}
