"""Issue #21 item 3: DestinationRule `consistentHash` in the lab. Three nginx servers behind one
Service, each answering its own name. Requests with the same `x-user` header value stick to one
server, through both HTTP engines (HTTP/1.1, and HTTP/2 with curl --http2-prior-knowledge);
different values spread over more than one; a request without the cookie of an `httpCookie`
policy with a ttl gets a Set-Cookie, and requests sending it back stick; with `useSourceIp` on a
TCP port every connection of the client goes to one server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import meshlab, render_manifest
from tests.e2e.nginx import write_conf

pytestmark = pytest.mark.e2e

MANIFEST = Path(__file__).resolve().parent / "manifests" / "consistent-hash.yaml"
CLIENT = "ch/client"
SERVERS = ("one", "two", "three")
USERS = [f"user-{i}" for i in range(10)]
TRIES = 4
NGINX_HTTP = """\
  access_log off;
  server {{ listen 8080; location / {{ return 200 "{name}"; }} }}
  server {{ listen 8082 http2; location / {{ return 200 "{name}"; }} }}
"""


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("consistent-hash")
    for name in SERVERS:
        write_conf(folder, name, NGINX_HTTP.format(dir=folder, name=name))
    lab = lab_factory(render_manifest(MANIFEST, folder, NGINX=folder), nodes=2)
    for url in ("http://backend.ch:8080/", "http://cookie.ch:8080/"):
        lab.wait_answer(CLIENT, url, what=f"{url} answers through the mesh")
    return lab


def _server(lab, url: str, *extra: str) -> str:
    code, body = lab.curl(CLIENT, url, *extra)
    assert code == "200", (code, body)
    assert body in SERVERS, body
    return body


@pytest.mark.parametrize(
    ("url", "extra"),
    [("http://backend.ch:8080/", ()), ("http://backend.ch:8082/", ("--http2-prior-knowledge",))],
    ids=["http1", "http2"],
)
def test_same_header_value_sticks_different_values_spread(lab, url, extra):
    chosen = {}
    for user in USERS:
        seen = {_server(lab, url, "-H", f"x-user: {user}", *extra) for _ in range(TRIES)}
        assert len(seen) == 1, (user, seen)
        chosen[user] = seen.pop()
    assert len(set(chosen.values())) >= 2, chosen


def test_cookie_is_made_when_missing_and_sticks_when_sent_back(lab):
    proc = meshlab(
        "exec", CLIENT, "--", "curl", "-s", "-D", "-", "--max-time", "5", "http://cookie.ch:8080/"
    )
    lines = proc.stdout.splitlines()
    cookies = [line for line in lines if line.lower().startswith("set-cookie:")]
    assert len(cookies) == 1, proc.stdout
    header = cookies[0].split(":", 1)[1].strip()
    assert header.startswith('sticky="') and "Max-Age=3600" in header and "Path=/" in header
    first = lines[-1]
    assert first in SERVERS, proc.stdout
    pair = header.split(";", 1)[0]
    seen = {_server(lab, "http://cookie.ch:8080/", "-H", f"cookie: {pair}") for _ in range(TRIES)}
    assert seen == {first}
    # a request that sends the cookie gets no new one
    proc = meshlab(
        "exec",
        CLIENT,
        "--",
        "curl",
        "-s",
        "-D",
        "-",
        "--max-time",
        "5",
        "-H",
        f"cookie: {pair}",
        "http://cookie.ch:8080/",
    )
    assert "set-cookie" not in proc.stdout.lower(), proc.stdout


def test_source_ip_sticks_every_tcp_connection_to_one_server(lab):
    seen = {_server(lab, "http://backend.ch:9000/") for _ in range(8)}
    assert len(seen) == 1, seen
