"""benchmarks/configs.py and certs.py: the sidecar pair's certificates make a mutual-TLS 1.3
handshake that checks both sides (done here in memory with Python's ssl), and the nginx and
HAProxy configurations pass the programs' own checks where they are installed."""

from __future__ import annotations

import contextlib
import shutil
import ssl
import subprocess

import pytest

from benchmarks import configs
from benchmarks.certs import write_sidecar_certs

NAMES = {"sidecar-a": "sidecar-a.bench-plain", "sidecar-b": configs.SIDECAR_B_NAME}


def _contexts(files) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Proxy A as TLS client, proxy B as TLS server requiring a client certificate, as the
    HAProxy configurations set them up."""
    a = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    a.minimum_version = ssl.TLSVersion.TLSv1_3
    a.load_cert_chain(files["sidecar-a"].crt)
    a.load_verify_locations(files["sidecar-a"].ca)
    b = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    b.minimum_version = ssl.TLSVersion.TLSv1_3
    b.load_cert_chain(files["sidecar-b"].crt)
    b.load_verify_locations(files["sidecar-b"].ca)
    b.verify_mode = ssl.CERT_REQUIRED
    return a, b


def _handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, name: str):
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done: set[str] = set()
    for _ in range(10):
        for label, side in (("client", client), ("server", server)):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
                done.add(label)
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == {"client", "server"}:
            return client, server
    raise AssertionError("handshake did not finish")


def test_sidecar_certificates_make_a_mutual_tls13_handshake(tmp_path):
    files = write_sidecar_certs(tmp_path, NAMES)
    assert (tmp_path / "sidecar-a.pem").stat().st_mode & 0o077 == 0  # holds a private key
    client, server = _handshake(*_contexts(files), configs.SIDECAR_B_NAME)
    assert client.version() == "TLSv1.3"
    assert ("DNS", "sidecar-a.bench-plain") in server.getpeercert()["subjectAltName"]


def test_proxy_a_refuses_a_server_with_another_name(tmp_path):
    files = write_sidecar_certs(tmp_path, NAMES)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(*_contexts(files), "someone-else.bench-plain")


def test_proxy_b_refuses_a_client_from_another_ca(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "other").mkdir()
    files = write_sidecar_certs(tmp_path / "run", NAMES)
    other = write_sidecar_certs(tmp_path / "other", NAMES)  # a second, unrelated CA
    a, b = _contexts(files)
    a.load_cert_chain(other["sidecar-a"].crt)  # A now presents a certificate B does not trust
    with pytest.raises(ssl.SSLError):
        _handshake(a, b, configs.SIDECAR_B_NAME)


def test_haproxy_configurations_pass_haproxy_check(tmp_path):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (scripts/install.sh installs it)")
    files = write_sidecar_certs(tmp_path, NAMES)
    a = tmp_path / "a.cfg"
    a.write_text(configs.haproxy_a("10.1.2.12", files["sidecar-a"]))
    b = tmp_path / "b.cfg"
    b.write_text(configs.haproxy_b("10.1.2.10", "10.1.2.11", "10.1.2.13", files["sidecar-b"]))
    for cfg in (a, b):
        proc = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"server b 10.1.2.12:{configs.SIDECAR_B_HTTP} ssl" in a.read_text()
    assert "verify required" in b.read_text()
    # h2c and gRPC: HTTP mode, h2 over the mutual TLS, h2c prior knowledge to the servers
    assert f"bind :{configs.SIDECAR_A_GRPC} proto h2" in a.read_text()
    assert f"server b 10.1.2.12:{configs.SIDECAR_B_GRPC} ssl" in a.read_text()
    assert f"server s 10.1.2.13:{configs.GRPC_PORT} proto h2" in b.read_text()
    assert f"server s 10.1.2.10:{configs.H2_PORT} proto h2" in b.read_text()


def test_nginx_configuration_passes_nginx_test(tmp_path):
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (scripts/install.sh installs nginx-light)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(configs.nginx_conf())
    proc = subprocess.run(
        ["nginx", "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert f'return 200 "{configs.KIB_BODY}"' in conf.read_text()
    assert f"listen {configs.H2_PORT} http2" in conf.read_text()
    assert len(configs.KIB_BODY.encode()) == 1024
