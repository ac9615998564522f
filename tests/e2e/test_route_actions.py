"""Issue #21 item 3: VirtualService route actions in the lab, seen with stock curl and the
stdlib's http.server (apps/head_echo.py answers with the request line and headers it got):
`rewrite` (the server sees the new path and Host), `headers` set/add/remove (the server sees
the request's, curl the response's), `redirect` (curl gets 301 and the Location, no server is
asked), `delegate` (a delegate's rules serve the root rule's prefix only, with its settings)
and `mirror` (the mirror server gets a copy, Host `-shadow`, while the client gets the
primary's answer). The client is on node-1, the servers on node-2: cross node, through HBONE.
The same through the HTTP/2 engine: nginx speaking h2c behind http2 ports, curl with prior
knowledge.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import meshlab, render_manifest
from tests.e2e.nginx import write_conf
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifests" / "route-actions.yaml"
ECHO = "http://echo.ra:8080"
WEB = "http://web.ra:8082"
API = "http://api.ra:8080"
H2 = "--http2-prior-knowledge"
SEEN = "$request_method $request_uri host=$host x-set=$http_x_set x-gone=$http_x_gone"
NGINX_HTTP = """\
  log_format seen '{seen}';
  access_log {dir}/{name}.log seen;
  server {{
    listen 8082 http2;
    location / {{ add_header x-drop secret; return 200 "{seen}\\n"; }}
  }}
"""


@pytest.fixture(scope="module")
def mirror_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mirror") / "requests.log"


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory, mirror_log):
    folder = tmp_path_factory.mktemp("route-actions")
    for name in ("web", "web-mirror"):
        write_conf(folder, name, NGINX_HTTP.format(dir=folder, name=name, seen=SEEN))
    manifest = render_manifest(MANIFEST, folder, MIRROR_LOG=mirror_log, NGINX=folder)
    lab = lab_factory(manifest, nodes=2)
    lab.nginx = folder
    for url, extra in ((f"{ECHO}/ready", ()), (f"{WEB}/ready", (H2,))):
        lab.wait_answer("ra/client", url, *extra, what=f"{url} answers through the mesh")
    return lab


def _curl(*args: str) -> tuple[str, str]:
    """(stdout, stderr) of curl -sv in the client pod."""
    proc = meshlab("exec", "ra/client", "--", "curl", "-sv", "--max-time", "10", *args)
    return proc.stdout, proc.stderr


def test_rewrite_the_server_sees_the_new_path_and_host(lab):
    out, _ = _curl(f"{ECHO}/old/item?id=7")
    assert out.startswith("GET /new/item?id=7 HTTP/1.1\n"), out
    assert "host: echo.internal\n" in out, out


def test_a_delegate_serves_the_roots_prefix_only_with_the_roots_settings(lab):
    out, _ = _curl(f"{API}/v1/items/3")
    assert out.startswith("GET /items/3 HTTP/1.1\n"), out  # the delegate's rewrite
    assert "x-set: by-root" in out.splitlines(), out  # the root rule's headers, inherited
    out, err = _curl(f"{API}/v1/other")
    assert "< HTTP/1.1 418 " in err and out == "v1 has no such thing\n", (out, err)
    # the delegate's /admin rule lies outside the root's /v1: no rule routes it
    out, err = _curl(f"{API}/admin")
    assert "< HTTP/1.1 404 " in err, err


def test_headers_set_add_remove_seen_by_server_and_client(lab):
    out, err = _curl("-H", "x-gone: 1", "-H", "x-add: client", f"{ECHO}/headers")
    assert out.startswith("GET /headers HTTP/1.1\n"), out
    lines = out.splitlines()
    assert "x-set: by-mesh" in lines, out
    assert "x-add: client" in lines and "x-add: by-mesh" in lines, out
    assert not any(line.lower().startswith("x-gone:") for line in lines), out
    received = [line[2:].lower() for line in err.splitlines() if line.startswith("< ")]
    assert "x-answered-by: mesh" in received, err
    assert not any(line.startswith("server:") for line in received), err


def test_redirect_curl_gets_301_with_location(lab, mirror_log):
    code, _ = lab.curl("ra/client", f"{ECHO}/redirect/x?a=1")
    assert code == "301"
    _, err = _curl(f"{ECHO}/redirect/x?a=1")
    assert "< location: http://echo.ra.svc.cluster.local/moved?a=1" in err.lower(), err


def test_mirror_the_copy_reaches_the_mirror_and_the_client_gets_the_primary(lab, mirror_log):
    out, err = _curl("-d", "payload", f"{ECHO}/mirror/one")
    assert out.startswith("POST /mirror/one HTTP/1.1\n"), out
    assert "< HTTP/1.1 200" in err, err
    copy = wait_until(
        lambda: mirror_log.read_text() if mirror_log.exists() else "",
        lambda text: "POST /mirror/one HTTP/1.1" in text,
        what="the mirror server logs the copy",
        timeout=10,
    )
    assert "host: echo.ra:8080" not in copy and "host: echo.ra-shadow:8080" in copy, copy
    assert "body: 7" in copy, copy
    # only the mirrored rule copies: a request to another rule does not reach the mirror
    _curl(f"{ECHO}/old/not-mirrored")
    _curl("-d", "payload", f"{ECHO}/mirror/two")
    wait_until(
        lambda: mirror_log.read_text(),
        lambda text: "/mirror/two" in text,
        what="the mirror server logs the second copy",
        timeout=10,
    )
    assert "not-mirrored" not in mirror_log.read_text()


def test_http2_rewrite_and_headers(lab):
    out, err = _curl(H2, "-H", "x-gone: 1", f"{WEB}/old/item?id=7")
    assert out.strip() == "GET /new/item?id=7 host=web.internal x-set=by-mesh x-gone=", out
    received = [line[2:].lower() for line in err.splitlines() if line.startswith("< ")]
    assert "x-answered-by: mesh" in received, err
    assert not any(line.startswith("x-drop:") for line in received), err


def test_http2_redirect(lab):
    _, err = _curl(H2, f"{WEB}/redirect/x?a=1")
    assert "< HTTP/2 308" in err, err
    assert "< location: https://web.ra:8082/moved?a=1" in err.lower(), err


def test_http2_mirror(lab):
    out, _ = _curl(H2, f"{WEB}/mirror/h2")
    assert out.startswith("GET /mirror/h2 host=web.ra"), out
    log = lab.nginx / "web-mirror.log"
    copy = wait_until(
        lambda: log.read_text() if log.exists() else "",
        lambda text: "/mirror/h2" in text,
        what="the mirror nginx logs the copy",
        timeout=10,
    )
    assert "host=web.ra-shadow" in copy, copy
