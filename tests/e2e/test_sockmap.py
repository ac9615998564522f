"""Issue #18 item 2: same-node L4 connections joined in the kernel (sockhash + sk_skb verdict).

One node, a client pod and two servers beside it behind `tcp-` Service ports. 1 GiB passes
client -> server with the same sha256 at both ends, and the server's answer comes back after
the client's half-close; the bytes show in istio_tcp_*_bytes_total as before, and the
kernel's own count (meshagent_kernel_joined_bytes_total, counted by the verdict program as
it sends each batch on) says the proxy's user-space relay did not carry them. A client's reset
ends a joined connection on both sides; a DENY applied while one is open closes it within 2 s.
Closing leaves no socket in the sockhash; `meshlab down` leaves neither the pin nor the program.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from meshagent.agent.datapath import bpfsys
from meshagent.agent.datapath.join import SocketJoin
from meshagent.lab.paths import BPFFS_DIR
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import APPS, BIN, lab_env, meshlab, render_manifest
from tests.e2e.test_live_policy import CLOSE_BOUND, Holder
from tests.waiting import wait_until

MANIFEST = Path(__file__).parent / "manifests" / "sockmap.yaml"
NODE = "node-1"
SYSTEM_PYTHON = "/usr/bin/python3"
GIB = 1 << 30
SEND_TIMEOUT = 300  # s: 1 GiB on a busy 2-core machine, both ends hashing in Python
JOIN_PROGRAM = "prog_mesh_join_verdict"

DENY_CLIENT = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-client", "namespace": "shop"},
    "spec": {
        "selector": {"matchLabels": {"app": "echo"}},
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}],
    },
}


@pytest.fixture(scope="module")
def sockmap_lab(lab_factory, tmp_path_factory):
    with lab_env("MESHLAB_AGENT_SETTINGS", json.dumps({"kernel_join": True})):  # off by default
        return lab_factory(render_manifest(MANIFEST, tmp_path_factory.mktemp("sockmap")), nodes=1)


def scrape() -> dict[str, list]:
    """node-1's 15020 /metrics as a user scrapes it: family name -> samples."""
    page = meshlab("exec", "--node", NODE, "--", "curl", "-s", "127.0.0.1:15020/metrics").stdout
    return {f.name: f.samples for f in text_string_to_metric_families(page)}


def total(samples: dict[str, list], family: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples.get(family, [])
        if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items())
    )


def joined_sockets() -> int:
    join = SocketJoin(BPFFS_DIR / NODE)
    try:
        return join.joined_sockets()
    finally:
        join.close()


def wait_ready(lab) -> None:
    for service in ("bulk", "echo"):
        wait_until(
            lambda s=service: lab.endpoints(NODE, "shop", s),
            bool,
            what=f"{service} has a ready endpoint",
            timeout=60,
        )


def test_one_gib_passes_in_the_kernel_with_matching_sha256_and_counts(sockmap_lab):
    wait_ready(sockmap_lab)
    before = scrape()
    proc = subprocess.run(
        [
            str(BIN / "meshlab"),
            "exec",
            "shop/client",
            "--",
            SYSTEM_PYTHON,
            str(APPS / "bulk_hash.py"),
            "send",
            "bulk.shop:9000",
            str(GIB),
        ],
        capture_output=True,
        text=True,
        timeout=SEND_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sent = re.search(r"^sent (\d+) (\w+)$", proc.stdout, re.M)
    got = re.search(r"^got (\d+) (\w+)$", proc.stdout, re.M)
    assert sent and got, proc.stdout + proc.stderr
    assert int(sent[1]) == GIB and int(got[1]) == GIB, proc.stdout  # the answer came back
    assert got[2] == sent[2], "the server read other bytes than the client sent"

    # Istio's byte counters (the proxy reads the kernel's counts when the connection ends)
    service = {"destination_service": "bulk.shop.svc.cluster.local"}

    def grown() -> tuple[float, float, float]:
        now = scrape()
        return tuple(
            total(now, family, **labels) - total(before, family, **labels)
            for family, labels in (
                ("istio_tcp_received_bytes", service),
                ("meshagent_kernel_joined_bytes", {}),
                ("meshagent_kernel_joined_connections", {}),
            )
        )

    received, kernel, _joined = wait_until(
        grown,
        lambda g: g[0] >= GIB * 0.99 and g[2] >= 1,
        what="istio_tcp_received_bytes_total of bulk grew by 1 GiB, one connection joined",
        timeout=30,
    )
    assert abs(received - GIB) <= GIB * 0.01, received
    # what the verdict program sent on covers all of it: the user-space relay carried ~nothing
    assert kernel >= GIB * 0.99, f"the kernel moved {kernel:.0f} of {GIB} bytes"
    wait_until(  # the workers report to the agent every second
        lambda: sockmap_lab.status(NODE)["connections"]["outbound"],
        lambda outbound: outbound["kernel_joined"] >= 1,
        what="meshagent status counts the joined connection",
        timeout=10,
    )
    # closed: both proxy sockets left the sockhash
    wait_until(joined_sockets, lambda n: n == 0, what="the sockhash is empty again")


def test_a_reset_ends_a_joined_connection_on_both_sides(sockmap_lab):
    """The client resets (SO_LINGER 0) after its bytes came back: the kernel carries no RST,
    so the proxy must see it, close the server side, count the bytes and forget both."""
    wait_ready(sockmap_lab)
    service = {"destination_service": "echo.shop.svc.cluster.local"}
    before = scrape()
    size = 1 << 20
    proc = meshlab(
        "exec", "shop/client", "--", SYSTEM_PYTHON, str(APPS / "reset_client.py"),
        "echo.shop:7000", str(size),
    )  # fmt: skip
    assert proc.stdout.split() == [str(size), str(size)], proc.stdout + proc.stderr

    def grown() -> tuple[float, float]:
        now = scrape()
        return tuple(
            total(now, family, **labels) - total(before, family, **labels)
            for family, labels in (
                ("meshagent_kernel_joined_connections", {}),
                ("istio_tcp_received_bytes", service),
            )
        )

    wait_until(
        grown,
        lambda g: g[0] >= 1 and g[1] >= size,
        what="the reset connection was joined, closed and its bytes counted",
    )
    wait_until(joined_sockets, lambda n: n == 0, what="the sockhash is empty again")
    wait_until(
        lambda: sockmap_lab.status(NODE)["connections"]["outbound"]["active"],
        lambda active: active == 0,
        what="the proxy holds no connection any more",
    )


def test_a_deny_closes_a_joined_connection(sockmap_lab, tmp_path):
    wait_ready(sockmap_lab)
    joined_before = total(scrape(), "meshagent_kernel_joined_connections")
    holder = Holder("shop/client", "echo.shop:7000")
    try:
        wait_until(holder.started, lambda n: n >= 3, what=f"{holder.name} passes data", timeout=30)
        assert total(scrape(), "meshagent_kernel_joined_connections") >= joined_before + 1
        assert joined_sockets() == 2  # the two proxy sockets of the open connection
        path = tmp_path / "deny.yaml"
        path.write_text(yaml.safe_dump(DENY_CLIENT))
        meshlab("apply", "-f", str(path))
        applied = time.time()
        closed = wait_until(
            holder.closed_at, lambda at: at is not None, what=f"{holder.name} is closed"
        )
        assert closed - applied < CLOSE_BOUND, f"closed {closed - applied:.2f}s after the DENY"
        wait_until(joined_sockets, lambda n: n == 0, what="the sockhash is empty again")
    finally:
        holder.stop()
        meshlab("delete", "-f", str(tmp_path / "deny.yaml"), check=False)


def test_down_leaves_no_pin_and_no_program(sockmap_lab):
    pin = BPFFS_DIR / NODE / JOIN_PROGRAM
    fd = bpfsys.obj_get(str(pin))
    try:
        prog_id = bpfsys.prog_info(fd).id
    finally:
        os.close(fd)
    meshlab("down")
    assert not pin.exists() and not (BPFFS_DIR / NODE).exists()

    def program_gone() -> bool:
        try:
            os.close(bpfsys.prog_fd_by_id(prog_id))
        except OSError:
            return True
        return False

    wait_until(program_gone, bool, what=f"the join program (id {prog_id}) is freed", timeout=10)
