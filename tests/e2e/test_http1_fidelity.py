"""Issue #15 item 3: HTTP/1.x passes through the mesh as it came, seen with stock curl and the
stdlib's http.server (apps/head_echo.py answers with the request line and headers it got),
same node and cross node (through both nodes' engines): HTTP/1.0 arrives as 1.0 and keeps
1.0's keep-alive rule, `Expect: 100-continue` reaches the server, whose 100 Continue comes
back, a malformed request's body names the problem in plain words, and an `Upgrade: h2c`
offer (`curl --http2`) is served as HTTP/1.1 (item 2, as Envoy does), a chunked body included.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import meshlab, render_manifest

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifests" / "http1-fidelity.yaml"
SERVICES = pytest.mark.parametrize(
    "service", ["echo-local", "echo-remote"], ids=["same-node", "cross-node"]
)
# A request line llhttp refuses: a space inside a header name.
MALFORMED = "GET / HTTP/1.1\\r\\nHost: echo-remote.h1f:8080\\r\\nBad Name: x\\r\\n\\r\\n"
RAW_CLIENT = """
import socket
s = socket.create_connection(("echo-remote.h1f", 8080), timeout=5)
s.sendall(b"{request}")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.decode("latin-1"), end="")
"""


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory):
    lab = lab_factory(render_manifest(MANIFEST, tmp_path_factory.mktemp("http1")), nodes=2)
    for service in ("echo-local", "echo-remote"):
        lab.wait_answer("h1f/client", f"http://{service}.h1f:8080/", what=f"{service} answers")
    return lab


def _curl(*args: str) -> tuple[str, str]:
    """(stdout, stderr) of curl -sv in the client pod."""
    proc = meshlab("exec", "h1f/client", "--", "curl", "-sv", "--max-time", "10", *args)
    return proc.stdout, proc.stderr


@SERVICES
def test_http_1_0_arrives_as_1_0_without_keep_alive(lab, service):
    out, err = _curl("--http1.0", f"http://{service}.h1f:8080/old")
    assert out.splitlines()[0] == "GET /old HTTP/1.0"  # the server's own reading
    assert "connection:" not in out.lower()  # no keep-alive asked: none added
    assert "< connection: close" in err.lower()  # and the client's connection ends


@SERVICES
def test_http_1_0_keep_alive_is_kept_when_asked(lab, service):
    url = f"http://{service}.h1f:8080/"
    out, err = _curl("--http1.0", "-H", "Connection: keep-alive", url, url)
    assert out.count("GET / HTTP/1.0") == 2
    assert "connection: keep-alive" in out.lower()  # the server was asked for keep-alive too
    assert "Re-using existing connection" in err  # curl kept its 1.0 connection


@SERVICES
def test_expect_100_continue_reaches_the_server_which_answers_it(lab, service):
    out, err = _curl(
        "-H", "Expect: 100-continue", "--data-binary", "hello", f"http://{service}.h1f:8080/up"
    )
    assert "expect: 100-continue" in out.lower().splitlines()  # the server saw the header
    assert "body: 5" in out
    assert "< HTTP/1.1 100 Continue" in err  # the server's own 100, with its reason phrase


@SERVICES
def test_upgrade_h2c_is_served_as_http_1_1(lab, service):
    out, err = _curl(
        "--http2", "-w", "\n%{http_code} %{http_version}", f"http://{service}.h1f:8080/"
    )
    assert out.splitlines()[-1] == "200 1.1"
    assert "upgrade" not in out.lower() and "http2-settings" not in out.lower()
    assert "< HTTP/1.1 101" not in err


@SERVICES
def test_upgrade_h2c_with_a_chunked_body_is_served_as_http_1_1(lab, service):
    """curl --http2 offers h2c with a body of unknown length too (it got 400: the chunks were
    taken for the new protocol's bytes); Envoy serves it as HTTP/1.1, body and all."""
    out, err = _curl(
        "--http2", "-H", "Transfer-Encoding: chunked", "--data-binary", "hello",
        "-w", "\n%{http_code} %{http_version}", f"http://{service}.h1f:8080/up",
    )  # fmt: skip
    assert out.splitlines()[-1] == "200 1.1", out + err
    assert out.splitlines()[0] == "POST /up HTTP/1.1"
    assert "transfer-encoding: chunked" in out.lower().splitlines()
    assert "body: 5" in out.splitlines()  # the server decoded the 5 bytes from the chunks
    assert "upgrade" not in out.lower() and "< HTTP/1.1 101" not in err


def test_a_malformed_request_is_answered_in_plain_words(lab):
    proc = meshlab(
        "exec", "h1f/client", "--", "python3", "-c", RAW_CLIENT.format(request=MALFORMED)
    )
    head, _, body = proc.stdout.partition("\n\n")  # read as text: CRLF became LF
    assert head.startswith("HTTP/1.1 400 Bad Request\n"), proc.stdout
    assert body == "bad request: invalid character in a header name\n"


@SERVICES
@pytest.mark.parametrize(
    "how", [("-0",), ("-H", "Connection: close")], ids=["http-1.0", "connection-close"]
)
def test_connections_the_server_side_ends_keep_their_responses(lab, service, how):
    """A session that ends after its response (1.0, or `Connection: close`) ends the tunnel
    stream cleanly: each of a run of such requests gets its 200 (a CANCEL reset dropped the
    response cross-node: 503 UC)."""
    codes = [lab.curl("h1f/client", f"http://{service}.h1f:8080/n{i}", *how)[0] for i in range(12)]
    assert codes == ["200"] * 12
