"""A DaemonSet rolling upgrade of one node's agent, done the kubelet's way in the lab.

With ``maxSurge: 1, maxUnavailable: 0`` the kubelet starts the new agent pod next to the
old one, waits until it is ready (plus ``minReadySeconds``), then stops the old pod: its
preStop hook (`meshagent uninstall --unless-handed-over`) and SIGTERM, and SIGKILL after
the grace period. `surge` and `retire` are those two halves, so that tests can look in
between; `upgrade` is both.

As with the kubelet, a rollout does not wait for the old pod to exit: the old agent drains
the connections it holds for up to its ``drain_timeout_s`` (an hour) while the DaemonSet
moves on. ``retire(wait=False)`` (what `upgrade` does) sends SIGTERM and leaves a detached
watcher (its own session, in the lab cgroup ``system/retired-<node>``, so `meshlab down`
kills it too) that SIGKILLs the old agent at its grace deadline unless it exits first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

from meshagent.agent.handover import POD_UID_ENV, read_registration, registry_dir
from meshagent.lab import cgroups, lab
from meshagent.lab.paths import NETNS_DIR
from meshagent.lab.topology import LabPlan

GRACE_PERIOD = 3660.0  # the DaemonSet's terminationGracePeriodSeconds


@dataclass(frozen=True)
class Retired:
    name: str
    pid: int
    pre_stop: str  # what the preStop hook printed
    exit_after_s: float | None  # from SIGTERM to exit (None: not waited for, still draining)
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


def retire(
    plan: LabPlan, node: str, grace: float = GRACE_PERIOD, *, wait: bool = True
) -> list[Retired]:
    """Stop every agent pod on ``node`` but the newest: preStop hook, SIGTERM, SIGKILL after
    ``grace`` s. ``wait``: until each has exited (or was killed); else return once each got
    SIGTERM, a detached watcher killing it at its deadline (the kubelet's way: a rollout
    moves on while the old pod terminates). Either way the node's pod list forgets them."""
    pods = lab.agent_pods(node)
    done = []
    for pod in pods[:-1]:
        hook = _pre_stop(plan, node, pod["uid"])
        started = time.monotonic()
        start_time = _start_time(pod["pid"])
        _signal(pod["pid"], "TERM")
        if not wait:
            if start_time is not None:
                _watch(node, pod["pid"], start_time, grace)
            done.append(Retired(pod["name"], pod["pid"], hook, None, False))
            continue
        while _alive(pod["pid"]) and time.monotonic() - started < grace:
            time.sleep(0.05)
        killed = _alive(pod["pid"])
        if killed:
            _signal(pod["pid"], "KILL")
        elapsed = round(time.monotonic() - started, 2)
        done.append(Retired(pod["name"], pod["pid"], hook, elapsed, killed))
    lab.save_agent_pods(node, pods[-1:])
    return done


def upgrade(plan: LabPlan, node: str, min_ready: float = 1.0) -> tuple[dict, list[Retired]]:
    """The DaemonSet's rollout on ``node``: surge, ``min_ready`` s of serving
    (minReadySeconds), then retire the old pods without waiting for them to exit."""
    pod = surge(plan, node)
    time.sleep(min_ready)
    return pod, retire(plan, node, wait=False)


# The watcher: stdlib only, polls the pid (the same process: its start time) once a second.
_WATCHER = r"""
import os, signal, sys, time
pid, start, deadline = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
def same():
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X") and fields[19] == start
while same():
    if time.time() >= deadline:
        print(f"pid {pid}: grace period over, SIGKILL", flush=True)
        os.kill(pid, signal.SIGKILL)
        break
    time.sleep(1.0)
"""


def _watch(node: str, pid: int, start_time: str, grace: float) -> None:
    """A detached process that SIGKILLs ``pid`` at ``grace`` s from now unless it exits."""
    cgroup = cgroups.create(cgroups.system_cgroup(f"retired-{node}"))
    lab.LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(lab.LOG_DIR / f"retired-{node}.log", "ab") as logf:
        subprocess.Popen(
            [sys.executable, "-c", _WATCHER, str(pid), start_time, str(time.time() + grace)],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            preexec_fn=cgroups.joiner(cgroup),
            start_new_session=True,
        )


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/<pid>/stat), to tell it from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


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
