"""A DaemonSet rolling upgrade of one node's agent, done the kubelet's way in the lab.

With ``maxSurge: 1, maxUnavailable: 0`` the kubelet starts the new agent pod next to the
old one, waits until it is ready (plus ``minReadySeconds``), then stops the old pod: its
preStop hook (`meshagent uninstall --unless-handed-over`) and SIGTERM, and SIGKILL after
the grace period. `surge` and `retire` are those two halves, so that tests can look in
between; `upgrade` is both.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

from meshagent.agent.handover import POD_UID_ENV, read_registration, registry_dir
from meshagent.lab import lab
from meshagent.lab.paths import NETNS_DIR
from meshagent.lab.topology import LabPlan

GRACE_PERIOD = 30.0  # the DaemonSet's terminationGracePeriodSeconds


@dataclass(frozen=True)
class Retired:
    name: str
    pre_stop: str  # what the preStop hook printed
    exit_after_s: float  # from SIGTERM to exit
    killed: bool  # the grace period ran out


def _registry(plan: LabPlan, node: str):
    return registry_dir(lab.agent_config(plan.node(node)).state_dir)


def surge(plan: LabPlan, node: str, timeout: float = lab.READY_TIMEOUT) -> dict:
    """Start a new agent pod on ``node`` and wait until it serves (ready, registered)."""
    lab.start_agent(plan.node(node), new_pod=True)
    pod = lab.agent_pods(node)[-1]
    path = _registry(plan, node) / f"{pod['uid']}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        registration = read_registration(path)
        if registration is not None and registration.serving:
            return pod
        if not _alive(pod["pid"]):
            raise lab.LabError(f"the new agent {pod['name']} exited (log in {lab.LOG_DIR})")
        time.sleep(0.1)
    raise lab.LabError(f"the new agent {pod['name']} is not serving after {timeout:.0f}s")


def retire(plan: LabPlan, node: str, grace: float = GRACE_PERIOD) -> list[Retired]:
    """Stop every agent pod on ``node`` but the newest: preStop hook, SIGTERM, SIGKILL."""
    pods = lab.agent_pods(node)
    done = []
    for pod in pods[:-1]:
        hook = _pre_stop(plan, node, pod["uid"])
        started = time.monotonic()
        _signal(pod["pid"], "TERM")
        while _alive(pod["pid"]) and time.monotonic() - started < grace:
            time.sleep(0.05)
        killed = _alive(pod["pid"])
        if killed:
            _signal(pod["pid"], "KILL")
        done.append(Retired(pod["name"], hook, round(time.monotonic() - started, 2), killed))
    lab.save_agent_pods(node, pods[-1:])
    return done


def _pre_stop(plan: LabPlan, node: str, pod_uid: str) -> str:
    argv = [str(lab.BIN_DIR / "meshagent"), "uninstall", "--unless-handed-over"]
    proc = subprocess.run(
        ["nsenter", f"--net={NETNS_DIR / plan.node(node).netns}", "--", *argv],
        env={
            **os.environ,
            "MESHAGENT_CONFIG": str(lab.agent_config_path(node)),
            POD_UID_ENV: pod_uid,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (proc.stdout + proc.stderr).strip()


def _signal(pid: int, sig: str) -> None:
    subprocess.run(["kill", f"-{sig}", str(pid)], check=False, capture_output=True)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its reparented parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
