"""Issue #17 item 1: policy reaches live connections. Open TCP connections through `tcp-`
Service ports, cross-node (closed by node-2's HBONE inbound) and same-node (closed by
node-1's local path); a DENY applied while they are open closes the intruder's within 2 s,
while frontend's, in the same test, stay open and keep passing data."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import APPS, BIN, meshlab, render_manifest
from tests.e2e.test_traffic import _change  # apply/delete, then wait for node-1's new snapshot
from tests.waiting import wait_until

MANIFEST = Path(__file__).parent / "manifests" / "live_policy.yaml"
SYSTEM_PYTHON = "/usr/bin/python3"
INTRUDER = "cluster.local/ns/shop/sa/intruder"
HOLD_SECONDS = 40
CLOSE_BOUND = 2.0  # the bound, from the moment the DENY is in the controller

DENY_INTRUDER = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-intruder", "namespace": "shop"},
    "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principals": [INTRUDER]}}]}]},
}


@pytest.fixture(scope="module")
def live_lab(lab_factory, tmp_path_factory):
    return lab_factory(render_manifest(MANIFEST, tmp_path_factory.mktemp("live")), nodes=2)


class Holder:
    """One `line_echo.py hold` (or `idle`) client in a pod, its output lines collected as they
    come."""

    def __init__(self, pod: str, target: str, mode: str = "hold") -> None:
        self.proc = subprocess.Popen(
            [
                str(BIN / "meshlab"),
                "exec",
                pod,
                "--",
                SYSTEM_PYTHON,
                str(APPS / "line_echo.py"),
                mode,
                target,
                str(HOLD_SECONDS),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.name = f"{pod} -> {target}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def echoes(self) -> int:
        return sum(1 for line in self.lines if line.startswith("ok "))

    def started(self) -> int:
        """`echoes()` while the client runs; fails at once if it ended first: a connection the
        mesh closed at the start (no ready endpoint yet, say) is never retried, so waiting
        longer would only hide why."""
        if self.proc.poll() is not None:
            self._reader.join(timeout=5)  # its last lines say why
            if self.echoes() < 3:
                raise AssertionError(f"{self.name} ended (exit {self.proc.returncode})")
        return self.echoes()

    def closed_at(self) -> float | None:
        for line in self.lines:
            if line.startswith("closed "):
                return float(line.split()[1])
        return None

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def test_a_new_deny_closes_open_connections_it_forbids_and_no_other(live_lab, tmp_path):
    holders = {
        (pod, svc): Holder(f"shop/{pod}", f"{svc}.shop:7000")
        for pod in ("intruder", "frontend")
        for svc in ("echo-remote", "echo-local")
    }
    try:
        for holder in holders.values():
            try:
                wait_until(
                    holder.started,
                    lambda n: n >= 3,
                    what=f"{holder.name} passes data",
                    timeout=30,  # four clients starting at once, on a busy machine
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}; its output: {holder.lines[-5:]}") from None
        path = tmp_path / "deny.yaml"
        path.write_text(yaml.safe_dump(DENY_INTRUDER))
        meshlab("apply", "-f", str(path))
        applied = time.time()

        for svc in ("echo-remote", "echo-local"):
            holder = holders[("intruder", svc)]
            closed = wait_until(
                holder.closed_at, lambda at: at is not None, what=f"{holder.name} is closed"
            )
            assert closed - applied < CLOSE_BOUND, f"{holder.name} closed {closed - applied:.2f}s"

        # The allowed ones never noticed: still open, still echoing, well after the DENY.
        for svc in ("echo-remote", "echo-local"):
            holder = holders[("frontend", svc)]
            before = holder.echoes()
            time.sleep(1.5)
            assert holder.closed_at() is None, holder.lines[-3:]
            assert holder.echoes() >= before + 5, f"{holder.name} stalled"

        # New connections of the intruder are refused too (the ordinary path).
        late = Holder("shop/intruder", "echo-remote.shop:7000")
        try:
            wait_until(
                lambda: late.lines,
                lambda lines: (
                    any(line.startswith("closed") for line in lines) or late.proc.poll() is not None
                ),
                what="a new intruder connection is refused",
            )
            assert late.echoes() == 0
        finally:
            late.stop()
    finally:
        for holder in holders.values():
            holder.stop()
        meshlab("delete", "-f", str(tmp_path / "deny.yaml"), check=False)


def _destination_rule(host: str, tcp: dict) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": host, "namespace": "shop"},
        "spec": {"host": host, "trafficPolicy": {"connectionPool": {"tcp": tcp}}},
    }


def test_destination_rule_keepalive_and_idle_timeout_reach_upstream_connections(live_lab, tmp_path):
    """Issue #21, connectionPool.tcp: `tcpKeepalive` puts SO_KEEPALIVE and its idle time on the
    socket node-1's proxy dials to echo-local (seen with `ss -tnoi` in the node's network
    namespace; the kernel's default would be 7200 s), and `idleTimeout: 2s` closes an idle
    connection to echo-remote (cross node) instead of the agent's 1 h."""
    rules = tmp_path / "pool-rules.yaml"
    rules.write_text(
        yaml.safe_dump_all(
            [
                _destination_rule(
                    "echo-local", {"tcpKeepalive": {"time": "37s", "interval": "11s", "probes": 4}}
                ),
                _destination_rule("echo-remote", {"idleTimeout": "2s"}),
            ]
        )
    )
    _change(live_lab, "apply", rules)
    local_ip = meshlab("exec", "shop/echo-local", "--", "printenv", "POD_IP").stdout.strip()
    holders = [
        Holder("shop/frontend", "echo-local.shop:7000", "idle"),
        Holder("shop/frontend", "echo-remote.shop:7000", "idle"),
    ]
    try:
        for holder in holders:
            wait_until(lambda h=holder: h.lines, lambda lines: "ok 1" in lines, what=holder.name)
        closed = wait_until(
            holders[1].closed_at, what="the idle connection to echo-remote is closed", timeout=20
        )
        assert closed is not None and holders[0].closed_at() is None
        sockets = meshlab(
            "exec", "--node", "node-1", "--", "ss", "-tnoi", "dst", f"{local_ip}:7000"
        ).stdout
        idle = [int(s) for s in re.findall(r"timer:\(keepalive,(\d+)sec", sockets)]
        assert idle and max(idle) <= 37, sockets  # counting down from 37 s, not 7200 s
    finally:
        for holder in holders:
            holder.stop()
        _change(live_lab, "delete", rules)
