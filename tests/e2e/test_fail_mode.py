"""Fail mode per namespace (issue #17 item 2), on the real kernel: a node's agent is killed
with SIGKILL (all its processes, workers too; the pinned programs and maps stay), and the
connect programs, seeing its heartbeat go stale, let the pods of a `fail-mode: open`
namespace (and a pod whose own label says open) reach their destination directly, while a
`closed` pod's connects are refused at once; started again, the agent meshes everything
again. A surge upgrade never lets the heartbeat lapse.

Timings are read from inside the pods (tests/e2e/apps/connect_probe.py timestamps every
attempt), so they measure the data path, not the CLI that starts the clients.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import APPS, BIN, DATAPATH_PROGRAMS, meshlab, render_manifest
from tests.waiting import wait_until

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifests" / "fail_mode.yaml"
SYSTEM_PYTHON = "/usr/bin/python3"
PORT = 8080
CLIENTS = ("relaxed/opener", "shop/frontend", "shop/override")
MODES = {"relaxed/opener": "open", "shop/frontend": "closed", "shop/override": "open"}


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory):
    manifest = render_manifest(MANIFEST, tmp_path_factory.mktemp("fail_mode"))
    return lab_factory(manifest, nodes=2)


class Probe:
    """connect_probe.py in a pod: one attempt every 50 ms, each a JSON line collected here."""

    def __init__(self, pod: str, target: str, duration: float = 120) -> None:
        self.pod = pod
        self.proc = subprocess.Popen(
            [
                str(BIN / "meshlab"),
                "exec",
                pod,
                "--",
                SYSTEM_PYTHON,
                str(APPS / "connect_probe.py"),
                "--duration",
                str(duration),
                target,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.attempts: list[dict] = []
        self.other: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.attempts.append(json.loads(line))
            except ValueError:
                self.other.append(line.rstrip())

    def since(self, t: float) -> list[dict]:
        return [a for a in list(self.attempts) if a["t"] >= t]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def curl(pod: str, url: str) -> tuple[str, str, float, str]:
    """(HTTP code or 000, body, curl's own time_total, curl's error) of one GET from ``pod``."""
    proc = meshlab(
        "exec", pod, "--", "curl", "-sS", "--max-time", "5", "-w", "\n%{http_code} %{time_total}",
        url, check=False,
    )  # fmt: skip
    body, _, tail = proc.stdout.rpartition("\n")
    code, _, seconds = tail.partition(" ")
    return code, body, float(seconds or "nan"), proc.stderr.strip()


def pods_by_name(status: dict) -> dict[str, dict]:
    return {f"{p['namespace']}/{p['name']}": p for p in status["pods"]}


def test_kill9_fail_open_goes_direct_fail_closed_is_refused_restart_meshes_again(lab):
    node1 = wait_until(
        lambda: lab.status("node-1"),
        lambda s: len(s["pods"]) == 3 and s["datapath"]["heartbeat"]["agent_alive"],
        what="node-1 meshes its three pods and beats",
    )
    pods = pods_by_name(node1)
    assert {name: p["fail_mode"] for name, p in pods.items()} == MODES
    assert {p["in_force"] for p in pods.values()} == {"meshed"}
    # Only root may write the heartbeat (no program writes it; a pod cannot beat for the agent).
    assert (Path(node1["datapath"]["pin_dir"]) / "heartbeat").stat().st_mode & 0o777 == 0o600
    ip = {name: p["ip"] for name, p in pods.items()}
    whoami = pods_by_name(lab.status("node-2"))["shop/whoami"]["ip"]
    (vip,) = next(s["vips"] for s in node1["services"] if s["name"] == "whoami")
    target = f"{whoami}:{PORT}"

    # Meshed: whoami sees node-2's proxy, never the client pod.
    for pod in CLIENTS:
        for url in (f"http://{target}/", f"http://{vip}/"):
            code, body, _, err = curl(pod, url)
            assert code == "200" and body and body != ip[pod], (pod, url, body, err)

    probes = {pod: Probe(pod, target) for pod in CLIENTS}
    try:
        for pod, probe in probes.items():
            wait_until(
                lambda probe=probe: probe.attempts,
                lambda a, pod=pod: any(x["ok"] and x["body"] != ip[pod] for x in a),
                what=f"{pod} reaches whoami through the mesh",
                timeout=30,
            )

        # `killed_at` is taken before the CLI starts; by `gone_at` every agent process is dead
        # (the command waits for that).
        killed_at = time.time()
        meshlab("agent", "stop", "node-1")  # SIGKILL to every process in its cgroup
        gone_at = time.time()
        down = lab.status("node-1")
        assert down["agent"]["running"] is False
        assert {p["name"] for p in down["datapath"]["programs"]} >= DATAPATH_PROGRAMS
        assert {p["fail_mode"] for p in down["pods"]} == {"open", "closed"}  # maps outlive it

        # fail-open pods: straight to the destination (whoami sees the pod's own IP) in 2 s.
        for pod in ("relaxed/opener", "shop/override"):
            direct = wait_until(
                lambda pod=pod: [a for a in probes[pod].since(killed_at) if a["ok"]],
                lambda ok, pod=pod: any(a["body"] == ip[pod] for a in ok),
                what=f"{pod} reaches whoami directly with its agent dead",
                timeout=15,
            )
            first = min(a["t"] for a in direct if a["body"] == ip[pod])
            # From its last connection through the mesh (the agent was alive then), timed in
            # the pod: the data path's delay, not the CLI's start-up.
            last_meshed = max(
                a["t"]
                for a in probes[pod].attempts
                if a["t"] < first and a["ok"] and a["body"] != ip[pod]
            )
            assert first - last_meshed < 2.0, (pod, first - last_meshed, first - killed_at)

        # fail-closed: every connect once the agent is gone fails at once (no hang), refused
        # by the kernel once the heartbeat is stale (EPERM), by the dead listener before (RST).
        closed = probes["shop/frontend"]
        stale = gone_at + 1.1  # the last beat came before the kill; it is 1 s old by now
        wait_until(
            lambda: closed.since(stale),
            lambda a: len(a) >= 5,
            what="shop/frontend keeps trying after the heartbeat went stale",
            timeout=15,
        )
        after = closed.since(killed_at)
        assert not any(a["ok"] for a in closed.since(gone_at)), closed.since(gone_at)[:3]
        took = sorted(a["seconds"] for a in after)
        assert took[len(took) // 2] < 0.05 and took[-1] < 1.0, took[-3:]  # never a hang
        assert {a["error"] for a in closed.since(stale)} == {"EPERM"}

        # What a user sees with curl.
        code, _, seconds, err = curl("shop/frontend", f"http://{target}/")
        assert code == "000" and seconds < 0.5 and "Couldn't connect" in err, (code, seconds, err)
        code, body, _, err = curl("relaxed/opener", f"http://{target}/")
        assert (code, body) == ("200", ip["relaxed/opener"]), err
        # A Service VIP needs the proxy (the lab has no kube-proxy): with the agent dead a
        # fail-open pod's connect to it goes out as dialled and fails at once (no route).
        code, _, seconds, err = curl("relaxed/opener", f"http://{vip}/")
        assert code == "000" and seconds < 0.5 and "Couldn't connect" in err, (code, seconds, err)

        down = lab.status("node-1")
        assert down["datapath"]["heartbeat"]["agent_alive"] is False
        assert {n: p["in_force"] for n, p in pods_by_name(down).items()} == {
            "relaxed/opener": "open: direct",
            "shop/frontend": "closed: refused",
            "shop/override": "open: direct",
        }
        counters = down["datapath"]["counters"]
        assert counters["fail_open"] > 0 and counters["fail_closed"] > 0, counters
        screen = meshlab("exec", "--node", "node-1", "--", "meshagent", "status").stdout
        assert "Heartbeat:   STALE" in screen and "closed (IN FORCE: closed: refused)" in screen

        # Back: everything meshed again, the closed pod served again.
        restarted_at = time.time()
        meshlab("agent", "start", "node-1")
        for pod, probe in probes.items():
            wait_until(
                lambda probe=probe: probe.since(restarted_at),
                lambda a, pod=pod: any(x["ok"] and x["body"] not in ("", ip[pod]) for x in a),
                what=f"{pod} reaches whoami through the mesh again",
                timeout=15,
            )
    finally:
        for probe in probes.values():
            probe.stop()
    for pod in CLIENTS:
        code, body, _, err = curl(pod, f"http://{vip}/")
        assert code == "200" and body != ip[pod], (pod, body, err)
    back = lab.status("node-1")
    assert back["datapath"]["heartbeat"]["agent_alive"] is True
    assert {p["in_force"] for p in back["pods"]} == {"meshed"}


def test_heartbeat_never_lapses_through_a_surge_upgrade(lab):
    """The new agent beats from the moment it serves, before the old one stops: no connect of
    either mode sees the agent as down, and every one goes through the mesh."""
    node1 = wait_until(
        lambda: lab.status("node-1"),
        lambda s: s["agent"]["running"] and s["datapath"]["heartbeat"]["agent_alive"],
        what="node-1's agent serves",
        timeout=30,
    )
    ip = {name: p["ip"] for name, p in pods_by_name(node1).items()}
    whoami = pods_by_name(lab.status("node-2"))["shop/whoami"]["ip"]
    before = node1["datapath"]["counters"]
    probes = {pod: Probe(pod, f"{whoami}:{PORT}") for pod in ("relaxed/opener", "shop/frontend")}
    try:
        for pod, probe in probes.items():
            wait_until(
                lambda probe=probe: probe.attempts,
                lambda a: any(x["ok"] for x in a),
                what=f"{pod} reaches whoami",
                timeout=30,
            )
        started = time.time()
        meshlab("agent", "upgrade", "node-1", timeout=180)
        ended = time.time()
        for pod, probe in probes.items():
            wait_until(
                lambda probe=probe: probe.since(ended),
                what=f"{pod} tried after the upgrade",
            )
    finally:
        for probe in probes.values():
            probe.stop()
    for pod, probe in probes.items():
        during = [a for a in probe.attempts if started <= a["t"] <= ended + 0.5]
        assert len(during) > 10, (pod, len(during))
        bad = [a for a in during if not a["ok"] or a["body"] == ip[pod]]
        assert not bad, (
            pod,
            [(round(a["t"] - started, 2), a["error"], a["body"]) for a in bad][:8],
        )
    after = lab.status("node-1")["datapath"]["counters"]
    assert after["fail_open"] == before["fail_open"]
    assert after["fail_closed"] == before["fail_closed"]


def test_a_label_change_reaches_the_datapath(lab, tmp_path):
    """`kubectl label` of the namespace, through the API and the controller, to the pod's
    map entry: `relaxed` turns closed; the pod that says `open` itself stays open."""

    def modes() -> dict[str, str]:
        return {n: p["fail_mode"] for n, p in pods_by_name(lab.status("node-1")).items()}

    relabel = tmp_path / "relaxed-closed.yaml"
    relabel.write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: relaxed\n  labels:\n"
        "    meshagent.io/mesh: enabled\n    meshagent.io/fail-mode: closed\n"
    )
    meshlab("apply", "-f", str(relabel))
    wait_until(
        modes,
        lambda m: m == {**MODES, "relaxed/opener": "closed"},
        what="node-1 writes relaxed/opener's new fail mode into the datapath",
    )
