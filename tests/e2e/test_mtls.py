"""Issue #4: cross-node traffic between meshed pods is mutual TLS (HBONE on 15008), the
destination knows the source's SPIFFE identity, tunnels are pooled, and 15008 shrugs off
bad clients."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import uuid
from pathlib import Path

import yaml
from meshagent.common.netns import entered
from meshagent.lab.paths import NETNS_DIR, NETNS_PREFIX, POD_NET_OCTET, RUN_DIR

from tests.e2e.conftest import meshlab
from tests.waiting import wait_until

REVIEWS = f"10.{POD_NET_OCTET}.2.10"
NODE2_UNDERLAY = "172.30.0.12"
FRONTEND_ID = "spiffe://cluster.local/ns/shop/sa/frontend"
BARRIER_PORT = 9  # discard: nothing listens on node-2, the SYN is answered with a reset


def _capture(seconds_max: float, action, tmp: Path) -> bytes:
    """Capture node-2's link on the underlay while `action` runs; return pcap bytes. (Not the
    bridge itself: a bridge device sees only flooded frames once it has learnt the MACs.)

    After the action, one SYN from the underlay to node-2's discard port crosses the same
    link; once it is in the file, so is everything the action sent before it."""
    pcap = Path(f"/tmp/meshtest-{uuid.uuid4().hex}.pcap")
    underlay = f"{NETNS_PREFIX}underlay"
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            underlay,
            "tcpdump",
            "-i",
            "ul-node-2",
            "-U",
            "--immediate-mode",  # deliver each packet now, not in ~1 s blocks
            "-s",
            "0",
            "-w",
            str(pcap),
            "tcp",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # tcpdump says "listening on ..." once it captures
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        assert "listening" in line, line
        action()
        with entered(str(NETNS_DIR / underlay)), contextlib.suppress(OSError):
            socket.create_connection((NODE2_UNDERLAY, BARRIER_PORT), timeout=1).close()
        wait_until(
            lambda: _ports_seen(pcap.read_bytes(), tmp),
            lambda ports: BARRIER_PORT in ports,
            what=f"tcpdump wrote the barrier SYN to port {BARRIER_PORT}",
            retry_on=(FileNotFoundError,),
        )
    finally:
        proc.terminate()
        proc.wait(timeout=seconds_max)
    data = pcap.read_bytes()
    pcap.unlink()
    return data


def _ports_seen(pcap: bytes, tmp: Path) -> set[int]:
    path = tmp / "c.pcap"
    path.write_bytes(pcap)
    out = subprocess.run(["tcpdump", "-nn", "-r", str(path)], capture_output=True, text=True).stdout
    ports = set()
    for line in out.splitlines():
        for field in line.split()[2:5:2]:  # "src.port" and "dst.port:"
            tail = field.rstrip(":").rsplit(".", 1)[-1]
            if tail.isdigit():
                ports.add(int(tail))
    return ports


def test_cross_node_traffic_is_mutual_tls_on_15008(demo_lab, tmp_path):
    marker = f"MARKER-{uuid.uuid4().hex}"
    result = {}

    def request():
        result["curl"] = demo_lab.curl(
            "shop/frontend", f"http://reviews.shop:9080/?q={marker}", "-H", f"X-Marker: {marker}"
        )

    pcap = _capture(10, request, tmp_path)
    code, body = result["curl"]
    assert code == "200", body
    assert marker.encode() not in pcap  # never in clear between the nodes
    ports = _ports_seen(pcap, tmp_path)
    assert 15008 in ports
    assert 9080 not in ports  # no plaintext hop to the pod across the underlay
    # the server pod saw the request (its log has the marker)
    log = (RUN_DIR / "logs" / "pod-shop-reviews-v1.log").read_text()
    assert marker in log


def test_destination_sees_the_source_identity(demo_lab):
    assert demo_lab.curl("shop/frontend", "http://reviews.shop:9080/")[0] == "200"
    # as the proxy workers last reported (every second)
    wait_until(
        lambda: demo_lab.status("node-2")["agent"]["inbound"],
        lambda inbound: inbound["peers"].get(FRONTEND_ID, 0) >= 1,
        what=f"node-2 names {FRONTEND_ID} among its inbound peers",
    )
    wait_until(
        lambda: demo_lab.status("node-1")["agent"]["proxy"]["mutual_tls"],
        lambda mutual_tls: mutual_tls >= 1,
        what="node-1 counts a mutual-TLS connection",
    )


def test_many_connections_share_a_few_tunnels(demo_lab):
    # 200 concurrent connections from one pod: curl's parallel mode, one connection each
    urls = [f"http://reviews.shop:9080/?n={i}" for i in range(200)]
    config = "\n".join(f'url = "{u}"\noutput = "/dev/null"' for u in urls)
    cfg = Path("/tmp/meshtest-curl.cfg")
    cfg.write_text(config)
    try:
        proc = meshlab(
            "exec",
            "shop/frontend",
            "--",
            "curl",
            "-s",
            "--parallel",
            "--parallel-max",
            "200",
            "--no-keepalive",
            "-w",
            "%{http_code}\n",
            "-K",
            str(cfg),
            check=False,
        )
    finally:
        cfg.unlink()
    codes = proc.stdout.split()
    assert codes.count("200") == 200, proc.stdout[-500:]
    # the tunnels stay pooled; the status shows them once the workers have reported
    tunnels = wait_until(
        lambda: demo_lab.status("node-1")["agent"]["tunnels"],
        lambda tunnels: sum(t["connections"] for t in tunnels) >= 1,
        what="node-1 reports its pooled tunnels",
    )
    total = sum(t["connections"] for t in tunnels)
    assert 1 <= total <= 4, tunnels


def _expired_mesh_leaf(uri: str) -> tuple[bytes, bytes]:
    """A leaf for `uri` signed by the lab's own mesh CA, but expired an hour ago."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (RUN_DIR / "ca" / "ca.pem").read_bytes()
    ca_cert = x509.load_pem_x509_certificate(pem)
    ca_key = serialization.load_pem_private_key(pem[pem.index(b"-----BEGIN", 10) :], None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=3))
        .not_valid_after(now - dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _node_python(node: str, code: str) -> subprocess.CompletedProcess:
    return meshlab("exec", "--node", node, "--", "python3", "-c", code, check=False)


def test_bad_clients_on_15008_are_refused_and_the_proxy_keeps_serving(demo_lab, tmp_path):
    from tests.certs import TestCA  # a throwaway CA the mesh does not trust

    before = demo_lab.status("node-2")["agent"]["hbone"]
    rogue = TestCA()
    leaf = rogue.issue("spiffe://cluster.local/ns/shop/sa/frontend")
    (tmp_path / "c.pem").write_bytes(leaf.chain_pem)
    (tmp_path / "k.pem").write_bytes(leaf.key_pem)
    expired_cert, expired_key = _expired_mesh_leaf("spiffe://cluster.local/ns/shop/sa/frontend")
    (tmp_path / "xc.pem").write_bytes(expired_cert)
    (tmp_path / "xk.pem").write_bytes(expired_key)
    script = f"""
import socket, ssl
def tls(prefix):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE; ctx.set_alpn_protocols(["h2"])
    if prefix: ctx.load_cert_chain(f"{tmp_path}/{{prefix}}c.pem", f"{tmp_path}/{{prefix}}k.pem")
    s = socket.create_connection(("{NODE2_UNDERLAY}", 15008), timeout=3)
    try:
        t = ctx.wrap_socket(s, server_hostname="frontend.shop.cluster.local.mesh.meshagent.io")
        t.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n"); t.recv(10)
        return "open"
    except (OSError, ssl.SSLError) as e:
        return "refused"
for case in ("garbage", "truncated", "nocert", "othercert", "expired"):
    if case == "garbage":
        s = socket.create_connection(("{NODE2_UNDERLAY}", 15008), timeout=3)
        s.sendall(b"GET / HTTP/1.1\\r\\n\\r\\n" * 10); print(case, s.recv(100) == b"")
    elif case == "truncated":
        s = socket.create_connection(("{NODE2_UNDERLAY}", 15008), timeout=3)
        s.sendall(bytes.fromhex("160301020001"))  # a ClientHello header, then nothing
        s.shutdown(socket.SHUT_WR); print(case, s.recv(100) == b"")
    else:
        prefix = {{"nocert": None, "othercert": "", "expired": "x"}}[case]
        print(case, tls(prefix) == "refused")
"""
    proc = _node_python("node-1", script)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split() for line in proc.stdout.splitlines())
    assert lines == {
        "garbage": "True",
        "truncated": "True",
        "nocert": "True",
        "othercert": "True",
        "expired": "True",
    }, proc.stdout
    failures = before["inbound_handshake_failures"]
    wait_until(
        lambda: demo_lab.status("node-2")["agent"]["hbone"]["inbound_handshake_failures"],
        lambda after: after - failures >= 5,
        what=f"node-2 counts 5 more failed handshakes on 15008 (before: {failures})",
    )
    # and real traffic still flows
    assert demo_lab.curl("shop/frontend", "http://reviews.shop:9080/")[0] == "200"


def test_strict_still_admits_meshed_traffic_through_the_tunnel(demo_lab, tmp_path):
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "shop"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }
    path = tmp_path / "strict.yaml"
    path.write_text(yaml.safe_dump(doc))
    meshlab("apply", "-f", str(path))
    try:
        wait_until(
            lambda: demo_lab.curl("legacy/client", f"http://{REVIEWS}:9080/", timeout=1)[0],
            lambda code: code != "200",
            what="STRICT refuses plaintext from outside the mesh",
        )
        assert demo_lab.curl("shop/frontend", "http://reviews.shop:9080/")[0] == "200"
    finally:
        meshlab("delete", "-f", str(path))
