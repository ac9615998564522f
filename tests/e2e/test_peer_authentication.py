"""Issue #4: PeerAuthentication STRICT is enforced in the kernel; PERMISSIVE lets plaintext in;
a mode switch takes effect within 2 seconds."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from meshagent.lab.paths import POD_NET_OCTET

from tests.e2e.conftest import meshlab
from tests.waiting import wait_until

REVIEWS = f"10.{POD_NET_OCTET}.2.10"  # demo.yaml: reviews-v1, first pod on node-2
DEADLINE = 2.0


def _peer_auth(tmp_path: Path, mode: str) -> float:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "shop"},
        "spec": {"mtls": {"mode": mode}},
    }
    path = tmp_path / f"pa-{mode}.yaml"
    path.write_text(yaml.safe_dump(doc))
    meshlab("apply", "-f", str(path))
    return time.monotonic()


def _plaintext_ok(lab) -> bool:
    code, _ = lab.curl("legacy/client", f"http://{REVIEWS}:9080/", timeout=1)
    return code == "200"


def _wait(predicate, deadline: float, what: str) -> None:
    """`predicate()` until true, at the latest by `deadline` (monotonic): DEADLINE after the
    change was applied."""
    wait_until(
        predicate,
        what=f"{what} (within {DEADLINE}s of the change)",
        timeout=deadline - time.monotonic(),
        interval=0.05,
    )


def test_strict_drops_plaintext_and_permissive_admits_it(demo_lab, tmp_path):
    assert _plaintext_ok(demo_lab)  # no policy: PERMISSIVE, Istio's default

    applied = _peer_auth(tmp_path, "STRICT")
    _wait(lambda: not _plaintext_ok(demo_lab), applied + DEADLINE, "STRICT refuses plaintext")
    status = demo_lab.status("node-2")
    assert {"ip": REVIEWS, "port": 0, "mode": "STRICT"} in status["datapath"]["peer_auth"]
    assert status["datapath"]["counters"]["strict_dropped"] > 0
    # the node itself (kubelet probes, its proxy) still reaches the pod
    proc = meshlab(
        "exec",
        "--node",
        "node-2",
        "--",
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "2",
        f"http://{REVIEWS}:9080/",
    )
    assert proc.stdout == "200"

    applied = _peer_auth(tmp_path, "PERMISSIVE")
    _wait(lambda: _plaintext_ok(demo_lab), applied + DEADLINE, "PERMISSIVE admits plaintext")
    assert demo_lab.status("node-2")["datapath"]["peer_auth"] == []


TWO_PORTS = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "two-ports", "namespace": "shop", "labels": {"app": "two-ports"}},
    "spec": {
        "nodeName": "node-2",
        "containers": [
            {
                "name": "s",
                "command": [
                    "sh",
                    "-c",
                    "python3 -m http.server 9090 & exec python3 -m http.server 9080",
                ],
                "readinessProbe": {"tcpSocket": {"port": 9080}},
            }
        ],
    },
}


def _port_level(mode: str, ports: dict[int, str]) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "two-ports", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "two-ports"}},
            "mtls": {"mode": mode},
            "portLevelMtls": {str(port): {"mode": m} for port, m in ports.items()},
        },
    }


def test_port_level_mtls_is_decided_per_destination_port(demo_lab, tmp_path):
    """Issue #21: portLevelMtls. The kernel of the pod's node judges each new connection by its
    destination port: a plaintext (non-mesh) client gets through on the PERMISSIVE or DISABLE
    port and is dropped on the STRICT one, while meshed clients reach both."""
    pod = tmp_path / "two-ports.yaml"
    pod.write_text(yaml.safe_dump(TWO_PORTS))
    policy = tmp_path / "pa-two-ports.yaml"
    meshlab("apply", "-f", str(pod))
    try:
        addresses = meshlab("exec", "shop/two-ports", "--", "hostname", "-I").stdout.split()
        ip = next(a for a in addresses if "." in a)  # its IPv4 address

        def reached(client: str) -> dict[int, bool]:
            return {
                port: demo_lab.curl(client, f"http://{ip}:{port}/", timeout=1)[0] == "200"
                for port in (9080, 9090)
            }

        for mode, ports, expected in (
            ("STRICT", {9090: "DISABLE"}, {9080: False, 9090: True}),
            ("PERMISSIVE", {9080: "STRICT"}, {9080: False, 9090: True}),
            ("DISABLE", {9090: "STRICT"}, {9080: True, 9090: False}),
        ):
            policy.write_text(yaml.safe_dump(_port_level(mode, ports)))
            meshlab("apply", "-f", str(policy))
            wait_until(
                lambda: reached("legacy/client"),
                lambda got, expected=expected: got == expected,
                what=f"plaintext per port under {mode} with {ports}",
            )
            assert reached("shop/frontend") == {9080: True, 9090: True}
        status = demo_lab.status("node-2")
        assert {"ip": ip, "port": 9090, "mode": "STRICT"} in status["datapath"]["peer_auth"]
    finally:
        meshlab("delete", "-f", str(policy), check=False)
        meshlab("delete", "-f", str(pod))
