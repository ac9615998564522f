"""Issue #14: every TCP connection of a meshed pod is meshed, IPv4 and IPv6 alike.

A dual-stack lab (tests/e2e/manifests/dualstack.yaml): `ds` is meshed, `outside` is not;
servers listen on [::]. Each test tries a way around the mesh a pod could take (another
address family, the IPv4-mapped form gRPC dials, a link-local address, another socket
protocol, another syscall) and checks it is meshed, or refused, but never lets a
connection past mTLS and policy. Unmodified clients: curl, Debian's grpcio, Python sockets.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
import yaml
from meshagent.lab.paths import POD_NET_OCTET, RUN_DIR

from tests.e2e.conftest import APPS, meshlab, render_manifest
from tests.e2e.test_mtls import _capture
from tests.waiting import wait_until

MANIFEST = Path(__file__).resolve().parent / "manifests" / "dualstack.yaml"
SYSTEM_PYTHON = "/usr/bin/python3"  # the one Debian's python3-grpcio is installed for

# dualstack.yaml places pods in file order: on node-2 server .10, grpc .11; on node-1
# server-local .10, grpc-local .11, client .12. IPv6 addresses follow (lab/topology.py).
SERVER = f"10.{POD_NET_OCTET}.2.10"
SERVER6 = f"fd00:10:{POD_NET_OCTET}:2::a"
LOCAL = f"10.{POD_NET_OCTET}.1.10"
LOCAL6 = f"fd00:10:{POD_NET_OCTET}:1::a"
CLIENT_ID = "spiffe://cluster.local/ns/ds/sa/client"


@pytest.fixture(scope="module")
def ds_lab(lab_factory, tmp_path_factory):
    return lab_factory(render_manifest(MANIFEST, tmp_path_factory.mktemp("ds")), nodes=2)


def _vips(service: str) -> tuple[str, str]:
    """(IPv4 VIP, IPv6 VIP) of a dual-stack Service, as the pods' /etc/hosts has them."""
    out = meshlab("exec", "ds/client", "--", "getent", "ahosts", f"{service}.ds").stdout
    addresses = {line.split()[0] for line in out.splitlines()}
    v4 = next(a for a in addresses if "." in a and not a.startswith("::ffff:"))
    v6 = next(a for a in addresses if ":" in a and not a.startswith("::ffff:"))
    return v4, v6


def _targets(pod_ip: str, pod_ip6: str, service: str) -> list[str]:
    """Every way to name a server: pod IP and VIP, each as IPv4, IPv4-mapped and IPv6."""
    vip, vip6 = _vips(service)
    return [
        f"http://{pod_ip}:8080/",
        f"http://[::ffff:{pod_ip}]:8080/",
        f"http://[{pod_ip6}]:8080/",
        f"http://{vip}:8080/",
        f"http://[::ffff:{vip}]:8080/",
        f"http://[{vip6}]:8080/",
    ]


IPV6_SOCKET_TARGETS = 4  # of each _targets list, those dialled on an IPv6 socket


def _counters(lab, node: str = "node-1") -> dict:
    return lab.status(node)["datapath"]["counters"]


def _server_log(pod: str) -> str:
    return (RUN_DIR / "logs" / f"pod-ds-{pod}.log").read_text(errors="replace")


def _apply(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / f"{doc['kind']}-{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    meshlab("apply", "-f", str(path))
    return path


def _link_local(pod: str) -> str:
    out = meshlab(
        "exec", pod, "--", "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"
    )
    return re.search(r"inet6 (fe80::[0-9a-f:]+)/", out.stdout).group(1)


def test_every_family_to_pod_and_vip_goes_through_the_proxy(ds_lab, tmp_path):
    targets = _targets(SERVER, SERVER6, "server") + _targets(LOCAL, LOCAL6, "local")
    before = _counters(ds_lab)
    marker = uuid.uuid4().hex

    def requests() -> None:
        for url in targets:
            code, body = ds_lab.curl("ds/client", f"{url}?marker={marker}")
            assert code == "200", (url, body)
            assert "Directory listing" in body

    pcap = _capture(30, requests, tmp_path)
    after = _counters(ds_lab)
    assert after["redirected"] - before["redirected"] == len(targets)
    assert after["redirected_ipv6"] - before["redirected_ipv6"] == 2 * IPV6_SOCKET_TARGETS
    assert after["established"] - before["established"] == len(targets)
    # the six cross-node requests crossed the underlay, in TLS only
    assert pcap, "the capture saw nothing"
    assert marker.encode() not in pcap
    assert b"Directory listing" not in pcap
    # the server saw every request, from the node proxy (the mesh), not from the client pod
    log = _server_log("server")
    assert log.count(marker) == len(targets) // 2


def test_a_vip_reaches_endpoints_of_its_own_family(ds_lab):
    """As kube-proxy: the IPv6 VIP is served by the pod's IPv6 address, the IPv4 VIP by its
    IPv4 one (the server's log names who called: node-2's proxy, in that family). Through
    the L4 port, where every connection is dialled anew (HTTP reuses pooled connections)."""
    vip, vip6 = _vips("server-tcp")
    for dialled, caller in (
        (vip6, f"fd00:10:{POD_NET_OCTET}:2::1"),
        (vip, f"::ffff:10.{POD_NET_OCTET}.2.1"),
    ):
        marker = uuid.uuid4().hex
        host = f"[{dialled}]" if ":" in dialled else dialled
        assert ds_lab.curl("ds/client", f"http://{host}:8081/?family={marker}")[0] == "200"
        line = next(x for x in _server_log("server").splitlines() if marker in x)
        assert line.startswith(f"{caller} "), (dialled, line)


def test_getpeername_returns_the_dialled_address(ds_lab):
    vip, vip6 = _vips("server")
    dialled = [f"{vip}:8080", f"[{vip6}]:8080", f"[::ffff:{vip}]:8080", f"{SERVER}:8080"]
    before = _counters(ds_lab)["peer_restored"]
    proc = meshlab("exec", "ds/client", "--", SYSTEM_PYTHON, str(APPS / "peername.py"), *dialled)
    peers = json.loads(proc.stdout)
    assert peers == {
        f"{vip}:8080": [vip, 8080],
        f"[{vip6}]:8080": [vip6, 8080],
        f"[::ffff:{vip}]:8080": [f"::ffff:{vip}", 8080],
        f"{SERVER}:8080": [SERVER, 8080],
    }
    assert _counters(ds_lab)["peer_restored"] - before >= len(dialled)
    # curl names the address it dialled, not the node proxy
    proc = meshlab(
        "exec", "ds/client", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{remote_ip}",
        "--max-time", "5", f"http://[{vip6}]:8080/",
    )  # fmt: skip
    assert proc.stdout == vip6


def test_deny_holds_for_every_family_same_and_cross_node(ds_lab, tmp_path):
    deny = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client", "namespace": "ds"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principals": [CLIENT_ID.removeprefix("spiffe://")]}}]}]},
    }  # fmt: skip
    targets = _targets(SERVER, SERVER6, "server") + _targets(LOCAL, LOCAL6, "local")
    path = _apply(tmp_path, deny)
    try:
        wait_until(
            lambda: ds_lab.curl("ds/client", targets[0], timeout=2)[0],
            lambda code: code != "200",
            what="the DENY reaches node-2's proxy",
        )
        logs_before = _server_log("server") + _server_log("server-local")
        before = _counters(ds_lab)
        marker = uuid.uuid4().hex

        def denied_requests() -> None:
            for url in targets:
                code, body = ds_lab.curl("ds/client", f"{url}?denied={marker}", timeout=3)
                assert code != "200", (url, code, body)
                assert "Directory listing" not in body, url

        pcap = _capture(60, denied_requests, tmp_path)
        assert pcap, "the capture saw nothing"
        assert marker.encode() not in pcap  # the cross-node attempts crossed in TLS only
        after = _counters(ds_lab)
        assert after["redirected"] - before["redirected"] == len(targets)
        assert marker not in _server_log("server") + _server_log("server-local")
        assert len(_server_log("server") + _server_log("server-local")) == len(logs_before)
        # gRPC over IPv6 sockets, by name and VIP: refused too, and the server saw no call
        grpc_log = _server_log("grpc")
        for target in ("grpc.ds:50051", "grpc-local.ds:50051", f"{_vips('grpc')[0]}:50051"):
            result = _grpc_call(target)
            assert "error" in result, (target, result)
        assert _server_log("grpc") == grpc_log
    finally:
        meshlab("delete", "-f", str(path))
    wait_until(
        lambda: ds_lab.curl("ds/client", targets[0], timeout=2)[0],
        lambda code: code == "200",
        what="the deleted DENY no longer applies",
    )


def _grpc_call(target: str, size: int = 16) -> dict:
    proc = meshlab(
        "exec", "ds/client", "--", SYSTEM_PYTHON, str(APPS / "grpc_echo.py"), "call", target,
        str(size), timeout=60,
    )  # fmt: skip
    return json.loads(proc.stdout)


@pytest.mark.parametrize("service", ["grpc", "grpc-local"], ids=["cross-node", "same-node"])
def test_stock_grpc_client_passes_through_the_mesh(ds_lab, service):
    vip, vip6 = _vips(service)
    before = _counters(ds_lab)
    targets = (f"{service}.ds:50051", f"{vip}:50051", f"[{vip6}]:50051")
    for target in targets:
        result = _grpc_call(target, size=3 * 1024 * 1024)
        assert result == {"unary_intact": True, "stream_messages": 1000, "stream_intact": True}, (
            target,
            result,
        )
    after = _counters(ds_lab)
    # gRPC's C core dials from IPv6 sockets: each channel was steered by connect6
    assert after["redirected_ipv6"] - before["redirected_ipv6"] >= len(targets)


def test_link_local_connects_of_a_meshed_pod_are_refused(ds_lab):
    """A link-local address names a pod only on one link: the proxy could not apply the
    destination's policy, so the kernel refuses the connect (EPERM) instead of letting it by."""
    before = _counters(ds_lab)
    fe80 = _link_local("ds/server-local")  # on the client's node: one link away
    proc = meshlab(
        "exec", "ds/client", "--", "curl", "-s", "--max-time", "3", f"http://[{fe80}%eth0]:8080/",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 7 and "Directory listing" not in proc.stdout  # couldn't connect
    assert _counters(ds_lab)["refused"] - before["refused"] == 1
    # an unmeshed pod on the same link is not affected
    code, _ = ds_lab.curl("outside/probe1", f"http://[{fe80}%eth0]:8080/")
    assert code == "200"


def test_mptcp_connects_are_meshed(ds_lab):
    """An MPTCP socket: the kernel runs the connect hooks for its TCP subflow, which is steered
    like any other; the server sees the node proxy, not the client pod."""
    vip, _ = _vips("server")
    marker = uuid.uuid4().hex
    mptcp = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_MPTCP)\n"
        "s.settimeout(5)\n"
        f"s.connect(('{vip}', 8080))\n"
        f"s.sendall(b'GET /?mptcp={marker} HTTP/1.0\\r\\n\\r\\n')\n"
        "print(s.recv(100).split(b'\\r\\n')[0].decode())\n"
    )
    before = _counters(ds_lab)
    proc = meshlab("exec", "ds/client", "--", SYSTEM_PYTHON, "-c", mptcp)
    # the status line is the server's own at the default `observe` level (HTTP/1.0 here)
    assert proc.stdout.split()[1:2] == ["200"], proc.stdout
    assert _counters(ds_lab)["redirected"] - before["redirected"] == 1
    line = next(x for x in _server_log("server").splitlines() if marker in x)
    # node-2's proxy, over a connection of either family (HTTP reuses pooled ones)
    node2_proxy = {f"::ffff:10.{POD_NET_OCTET}.2.1", f"fd00:10:{POD_NET_OCTET}:2::1"}
    assert line.split()[0] in node2_proxy, line


def test_tcp_fast_open_is_meshed_too(ds_lab):
    """sendto(MSG_FASTOPEN) connects without connect(): the connect hooks still see it."""
    vip, _ = _vips("server")
    marker = uuid.uuid4().hex
    tfo = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
        f"request = b'GET /?tfo={marker} HTTP/1.0\\r\\n\\r\\n'\n"
        f"s.sendto(request, socket.MSG_FASTOPEN, ('{vip}', 8080))  # blocking: connects\n"
        "s.settimeout(5)\n"
        "print(s.recv(100).split(b'\\r\\n')[0].decode())\n"
    )
    before = _counters(ds_lab)
    proc = meshlab("exec", "ds/client", "--", SYSTEM_PYTHON, "-c", tfo)
    assert proc.stdout.split()[1:2] == ["200"], proc.stdout
    assert _counters(ds_lab)["redirected"] - before["redirected"] == 1


def test_strict_drops_plaintext_over_ipv4_ipv6_and_link_local(ds_lab, tmp_path):
    strict = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "ds"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }
    fe80 = _link_local("ds/server")
    plaintext = [  # from an unmeshed pod on the server's node: one link away
        f"http://{SERVER}:8080/",
        f"http://[{SERVER6}]:8080/",
        f"http://[{fe80}%eth0]:8080/",
    ]
    for url in plaintext:  # PERMISSIVE (no policy): plaintext gets in
        assert ds_lab.curl("outside/probe2", url)[0] == "200", url
    path = _apply(tmp_path, strict)
    try:
        wait_until(
            lambda: ds_lab.curl("outside/probe2", plaintext[0], timeout=1)[0],
            lambda code: code == "000",
            what="STRICT reaches node-2's kernel",
        )
        before = _counters(ds_lab, "node-2")["strict_dropped"]
        for url in plaintext:
            code, body = ds_lab.curl("outside/probe2", url, timeout=2)
            assert code == "000" and "Directory listing" not in body, url
        assert _counters(ds_lab, "node-2")["strict_dropped"] > before
        # the node itself (kubelet probes, its proxy) still reaches the pod, either family
        for url in plaintext[:2]:
            proc = meshlab(
                "exec", "--node", "node-2", "--", "curl", "-s", "-o", "/dev/null", "-w",
                "%{http_code}", "--max-time", "3", url,
            )  # fmt: skip
            assert proc.stdout == "200", url
        # and meshed clients, over IPv6 too
        for url in (f"http://[{SERVER6}]:8080/", f"http://[::ffff:{SERVER}]:8080/"):
            assert ds_lab.curl("ds/client", url)[0] == "200", url
    finally:
        meshlab("delete", "-f", str(path))
    wait_until(
        lambda: ds_lab.curl("outside/probe2", plaintext[1], timeout=1)[0],
        lambda code: code == "200",
        what="PERMISSIVE again once STRICT is deleted",
    )


def test_status_and_metrics_count_ipv6_connections(ds_lab):
    _, vip6 = _vips("server")
    before = _counters(ds_lab)
    for url in (f"http://[{vip6}]:8080/", f"http://[{SERVER6}]:8080/"):
        assert ds_lab.curl("ds/client", url)[0] == "200"
    after = _counters(ds_lab)
    assert after["redirected_ipv6"] - before["redirected_ipv6"] == 2
    proc = meshlab(
        "exec", "--node", "node-1", "--", "curl", "-s", "--max-time", "3",
        "http://127.0.0.1:15020/metrics",
    )  # fmt: skip
    assert re.search(r"^meshagent_datapath_redirects_ipv6_total (\d+)", proc.stdout, re.M)
    value = int(re.search(r"^meshagent_datapath_redirects_ipv6_total (\d+)", proc.stdout, re.M)[1])
    assert value >= after["redirected_ipv6"]
    # the proxy's own figures: both connections accepted, by the destination they dialled
    status = wait_until(
        lambda: ds_lab.status("node-1")["agent"]["proxy"]["by_destination"],
        lambda by: by.get(f"{SERVER6}:8080", 0) >= 1,
        what="node-1's proxy reports a connection to the server's IPv6 address",
    )
    assert status[f"{SERVER6}:8080"] >= 1
