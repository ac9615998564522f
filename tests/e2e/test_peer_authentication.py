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
