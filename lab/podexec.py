"""`meshlab exec`: run a command in a lab pod or on a lab node, as cheaply as a call can be.

Tests and users run commands in many pods, so this is the lab's hot path. The full CLI imports
click, pyroute2, the kube client and the agent's modules (about 0.2 s before anything runs);
this module needs only the standard library and the lab's path and topology tables. It reads
the state file, moves itself into the pod's cgroup and *replaces* itself with the command
(`ip netns exec` for a pod, so the pod's /etc/hosts is bound; `nsenter --net` for a node), so
the command's exit status, signals and output are the caller's directly. `entry.main` takes
this path for a plain `meshlab exec`; help and usage errors go through the click CLI.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from meshagent.lab import cgroups
from meshagent.lab.paths import NETNS_DIR, RUN_DIR, STATE_FILE
from meshagent.lab.topology import (
    CONTROLLER_METRICS_PORT,
    UNDERLAY_BRIDGE_IP,
    LabPlan,
    PlanError,
    PodPlan,
    make_nodes,
)

BIN_DIR = Path(sys.executable).parent  # the venv's bin: meshagent, meshctl


class LabError(RuntimeError):
    """Something the user should see: a lab already up, none up, a pod not found..."""


def load_state() -> dict:
    try:
        return json.loads(STATE_FILE.read_text())
    except FileNotFoundError:
        raise LabError("no lab is up (run `meshlab up -f FILE`)") from None


def load_plan() -> LabPlan:
    data = load_state()
    plan = LabPlan(nodes=make_nodes(data["nodes"]))
    for p in data.get("pods") or []:
        pod = PodPlan(
            p["namespace"], p["name"], p["node"], p["ip"], p["manifest"], p["probed"], p["uid"]
        )
        plan.pods[pod.key] = pod
    return plan


def agent_config_path(node: str) -> Path:
    return RUN_DIR / node / "agent.json"


def parse_exec_args(args: Sequence[str]) -> tuple[str | None, str | None, list[str]] | None:
    """(node, pod, command) of `meshlab exec` arguments, or None for anything but the plain
    forms (`POD [--] CMD...`, `--node NODE [--] CMD...`): help and mistakes go to click."""
    rest = list(args)
    node = None
    if rest and rest[0] == "--node" and len(rest) > 1:
        node, rest = rest[1], rest[2:]
    elif rest and rest[0].startswith("--node="):
        node, rest = rest[0].split("=", 1)[1], rest[1:]
    pod = None
    if node is None:
        if not rest or rest[0].startswith("-"):
            return None
        pod, rest = rest[0], rest[1:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest or not (node or pod):
        return None
    return node, pod, rest


def pod_command(plan: LabPlan, target: str, argv: list[str]) -> tuple[list[str], dict, Path]:
    """(argv, environment, cgroup) that run `argv` inside pod `target`."""
    pod = plan.pods.get(target)
    if pod is None:
        raise LabError(f"no pod {target!r} (pods: {', '.join(sorted(plan.pods))})")
    cgroup = cgroups.pod_cgroup(pod.node, pod.namespace, pod.name)
    return ["ip", "netns", "exec", pod.netns, *argv], {**os.environ, **pod.env}, cgroup


def node_command(plan: LabPlan, node_name: str, argv: list[str]) -> tuple[list[str], dict]:
    """(argv, environment) that run `argv` in node `node_name`'s network namespace, with the
    node's agent config and controller address set for `meshagent` and `meshctl`."""
    node = plan.node(node_name)
    env = {
        **os.environ,
        "PATH": f"{BIN_DIR}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "MESHAGENT_CONFIG": str(agent_config_path(node.name)),
        "MESHCTL_CONTROLLER": f"{UNDERLAY_BRIDGE_IP}:{CONTROLLER_METRICS_PORT}",
    }
    return ["nsenter", f"--net={NETNS_DIR / node.netns}", "--", *argv], env


def exec_command(node: str | None, pod: str | None, argv: list[str]) -> None:
    """Become `argv` run in the pod (its netns and cgroup) or on the node; never returns.
    Raises LabError or PlanError (nothing has changed then)."""
    plan = load_plan()
    if node is not None:
        command, env = node_command(plan, node, argv)
    else:
        assert pod is not None
        command, env, cgroup = pod_command(plan, pod, argv)
        cgroups.create(cgroup)
        cgroups.joiner(cgroup)()  # this process, hence the command it becomes
    sys.stdout.flush()
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        raise LabError(f"cannot run {command[0]}: {exc}") from None


def run_plain_exec(args: Sequence[str]) -> None:
    """The hot path: a plain `meshlab exec` becomes its command; returns (having done nothing)
    when the arguments need the click CLI."""
    parsed = parse_exec_args(args)
    if parsed is None:
        return
    try:
        exec_command(*parsed)
    except (LabError, PlanError) as exc:
        print(f"meshlab: {exc}", file=sys.stderr)
        sys.exit(1)
