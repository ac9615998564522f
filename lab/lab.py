"""Brings the lab up and down: network, cgroups, controller, agents and pods.

`up` builds everything, starts the daemons detached (each in a lab cgroup) and
returns once every agent serves the current snapshot and every pod with a
readiness probe answers. `down` removes everything by naming convention
(cgroup subtree, `meshlab-*` namespaces, pins, files; see paths.py), so it works with no
state file and after a crash or kill -9 of anything, and can run twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from meshagent.agent.config import AgentConfig
from meshagent.agent.datapath import loader
from meshagent.agent.handover import POD_NAME_ENV, POD_UID_ENV
from meshagent.controller.signing import NodeTokenAuthenticator
from meshagent.lab import cgroups, net, probe
from meshagent.lab.paths import (
    BPFFS_DIR,
    CLUSTER_DIR,
    ETC_NETNS,
    LOG_DIR,
    NETNS_DIR,
    NETNS_PREFIX,
    RUN_DIR,
    STATE_FILE,
    lab_cgroup,
)
from meshagent.lab.topology import (
    CONTROLLER_METRICS_PORT,
    CONTROLLER_PORT,
    UNDERLAY_BRIDGE_IP,
    UNDERLAY_NETNS,
    LabPlan,
    NodePlan,
    PodPlan,
    add_objects,
    cluster_objects,
    hosts_file,
    make_nodes,
    remove_objects,
)

log = logging.getLogger(__name__)

BIN_DIR = Path(sys.executable).parent  # the venv's bin: meshagent, meshctl
READY_TIMEOUT = 60.0


class LabError(RuntimeError):
    """Something the user should see: a lab already up, none up, a pod not found..."""


# -- state --------------------------------------------------------------------------


def save_plan(plan: LabPlan) -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    data = {
        "nodes": len(plan.nodes),
        "namespaces": list(plan.namespaces.values()),
        "pods": [
            {
                "namespace": p.namespace,
                "name": p.name,
                "node": p.node,
                "ip": p.ip,
                "manifest": p.manifest,
                "probed": p.probed,
            }
            for p in plan.pods.values()
        ],
        "services": list(plan.services.values()),
        "others": plan.others,
    }
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, STATE_FILE)


def load_plan() -> LabPlan:
    try:
        data = json.loads(STATE_FILE.read_text())
    except FileNotFoundError:
        raise LabError("no lab is up (run `meshlab up -f FILE`)") from None
    plan = LabPlan(nodes=make_nodes(data["nodes"]))
    plan.namespaces = {n["metadata"]["name"]: n for n in data["namespaces"]}
    for p in data["pods"]:
        pod = PodPlan(p["namespace"], p["name"], p["node"], p["ip"], p["manifest"], p["probed"])
        plan.pods[pod.key] = pod
    plan.services = {
        f"{s['metadata'].get('namespace', 'default')}/{s['metadata']['name']}": s
        for s in data["services"]
    }
    plan.others = data["others"]
    return plan


def write_cluster(plan: LabPlan) -> None:
    """Publish the lab's cluster to the controller's folder (atomically) and the pods' hosts."""
    CLUSTER_DIR.mkdir(parents=True, exist_ok=True)
    tmp = CLUSTER_DIR / ".cluster.yaml.tmp"
    tmp.write_text(yaml.safe_dump_all(cluster_objects(plan), sort_keys=False))
    os.replace(tmp, CLUSTER_DIR / "cluster.yaml")
    for pod in plan.pods.values():
        folder = ETC_NETNS / pod.netns
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text(hosts_file(plan, pod))


# -- processes ----------------------------------------------------------------------


def _spawn(
    name: str,
    argv: list[str],
    cgroup: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    cgroups.create(cgroup)
    with open(LOG_DIR / f"{name}.log", "ab") as logf:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            preexec_fn=cgroups.joiner(cgroup),
            start_new_session=True,
            env={
                **os.environ,
                "PATH": f"{BIN_DIR}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                **(env or {}),
            },
            cwd=cwd,
        )
    return proc.pid


# The lab's certificate authority and node credentials (DESIGN.md section 4).
CA_FILE = RUN_DIR / "ca" / "ca.pem"  # root certificate and key, 0600, the controller's only
ROOT_FILE = RUN_DIR / "ca" / "root.pem"  # the trust bundle agents check the controller with
NODE_TOKENS_FILE = RUN_DIR / "node-tokens.json"  # token digests the controller checks


def node_token_path(node: str) -> Path:
    return RUN_DIR / node / "token"


def issue_node_token(node: str) -> Path:
    """The node's bootstrap token file (0600), issued on first use and kept after."""
    path = node_token_path(node)
    if not path.exists():
        token = NodeTokenAuthenticator(NODE_TOKENS_FILE).issue(node)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    return path


def agent_config(node: NodePlan) -> AgentConfig:
    # MESHLAB_PROXY_WORKERS: proxy processes per agent (default: one per core, as a node).
    workers = int(os.environ.get("MESHLAB_PROXY_WORKERS", "0"))
    return AgentConfig(
        proxy_workers=workers,
        node_name=node.name,
        controller=f"{UNDERLAY_BRIDGE_IP}:{CONTROLLER_PORT}",
        proxy_ip=node.gateway,
        proxy_ip6=node.gateway6,
        cgroup_path=cgroups.node_cgroup(node.name),
        pin_dir=BPFFS_DIR / node.name,
        state_dir=RUN_DIR / node.name / "state",
        worker_metrics_dir=RUN_DIR / node.name / "metrics",
        token_file=node_token_path(node.name),
        controller_ca_file=ROOT_FILE,
    )


def agent_config_path(node: str) -> Path:
    return RUN_DIR / node / "agent.json"


def start_controller() -> int:
    argv = [
        str(BIN_DIR / "meshctl"),
        "serve",
        "--files",
        str(CLUSTER_DIR),
        "--listen",
        f"{UNDERLAY_BRIDGE_IP}:{CONTROLLER_PORT}",
        "--metrics",
        f"{UNDERLAY_BRIDGE_IP}:{CONTROLLER_METRICS_PORT}",
        "--ca-file",
        str(CA_FILE),
        "--trust-bundle-out",
        str(ROOT_FILE),
        "--server-name",
        UNDERLAY_BRIDGE_IP,
        "--node-tokens",
        str(NODE_TOKENS_FILE),
    ]
    # Short-lived workload certificates for renewal tests, e.g. MESHLAB_CERT_LIFETIME=60s.
    if os.environ.get("MESHLAB_CERT_LIFETIME"):
        argv += ["--cert-lifetime", os.environ["MESHLAB_CERT_LIFETIME"]]
    return _spawn(
        "controller",
        ["nsenter", f"--net={NETNS_DIR / UNDERLAY_NETNS}", "--", *argv],
        cgroups.system_cgroup("controller"),
    )


def agent_pods_path(node: str) -> Path:
    return RUN_DIR / node / "agent-pods.json"


def agent_pods(node: str) -> list[dict]:
    """The node's agent "pods" ({uid, name, pid}), oldest first, as the DaemonSet would run
    them: a restart keeps the pod (and its hand-over registration), an upgrade adds one."""
    path = agent_pods_path(node)
    return json.loads(path.read_text()) if path.exists() else []


def save_agent_pods(node: str, pods: list[dict]) -> None:
    path = agent_pods_path(node)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(pods))
    os.replace(tmp, path)


def start_agent(node: NodePlan, *, new_pod: bool = False) -> int:
    """Start the node's agent: the newest agent pod's container again, or (``new_pod``, and
    for the first) a new agent pod next to the others, as a surge upgrade does."""
    issue_node_token(node.name)
    config = agent_config(node)
    path = agent_config_path(node.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.model_dump_json(indent=1))
    pods = agent_pods(node.name)
    if new_pod or not pods:
        generation = int(pods[-1]["uid"].rsplit("-", 1)[1]) + 1 if pods else 1
        uid = f"{node.name}-{generation}"
        pods.append({"uid": uid, "name": f"meshagent-{uid}", "pid": 0})
    pod = pods[-1]
    argv = [str(BIN_DIR / "meshagent"), "run", "--config", str(path)]
    pod["pid"] = _spawn(
        f"agent-{node.name}",
        ["nsenter", f"--net={NETNS_DIR / node.netns}", "--", *argv],
        cgroups.system_cgroup(f"agent-{node.name}"),
        env={POD_UID_ENV: pod["uid"], POD_NAME_ENV: pod["name"]},
    )
    save_agent_pods(node.name, pods)
    return pod["pid"]


def stop_agent(node: str, sig: str = "KILL") -> None:
    """Kill a node's agents (as a crash would): its pins and attachments stay."""
    cg = cgroups.system_cgroup(f"agent-{node}")
    for pid in cgroups.pids(cg):
        subprocess.run(["kill", f"-{sig}", str(pid)], check=False)
    deadline = time.monotonic() + 5
    while cgroups.pids(cg) and time.monotonic() < deadline:
        time.sleep(0.05)


def start_pod(pod: PodPlan) -> int | None:
    if not pod.command:
        return None
    workdir = RUN_DIR / "pods" / pod.netns
    workdir.mkdir(parents=True, exist_ok=True)
    argv = ["ip", "netns", "exec", pod.netns, *pod.command]
    return _spawn(
        f"pod-{pod.namespace}-{pod.name}",
        argv,
        cgroups.pod_cgroup(pod.node, pod.namespace, pod.name),
        env=pod.env,
        cwd=workdir,
    )


# -- readiness ----------------------------------------------------------------------


def agent_view(node: NodePlan) -> dict | None:
    try:
        return probe.http_get_json(node.netns, "127.0.0.1", 15000, "/status")
    except (OSError, ValueError):
        return None


def wait_pods_ready(plan: LabPlan, pods: list[PodPlan], timeout: float = READY_TIMEOUT) -> None:
    """Probe pods like a kubelet: mark each ready once its readiness port accepts."""
    deadline = time.monotonic() + timeout
    waiting = [p for p in pods if not p.ready]
    while waiting:
        for pod in list(waiting):
            if probe.tcp_open(plan.node(pod.node).netns, pod.ip, pod.readiness_port, 0.5):
                pod.probed = True
                waiting.remove(pod)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(p.key for p in waiting)
            raise LabError(f"pods not ready after {timeout:.0f}s: {names} (logs in {LOG_DIR})")
        if waiting:
            time.sleep(0.05)


def wait_ready(plan: LabPlan, timeout: float = READY_TIMEOUT) -> None:
    """Until every agent serves a snapshot with all its meshed pods found, and every
    pod with a readiness probe answers on it."""
    deadline = time.monotonic() + timeout
    pending: list[str] = []
    while time.monotonic() < deadline:
        pending = []
        for node in plan.nodes:
            view = agent_view(node)
            if not view or not view["ready"] or not view["snapshot_version"]:
                pending.append(f"agent on {node.name}")
            elif view["waiting_pods"]:
                pending.append(f"meshing of {', '.join(view['waiting_pods'])} on {node.name}")
        for pod in plan.pods.values():
            port = pod.readiness_port
            if port and not probe.tcp_open(plan.node(pod.node).netns, pod.ip, port, 0.5):
                pending.append(f"pod {pod.key} on port {port}")
        if not pending:
            return
        time.sleep(0.2)
    raise LabError(
        "lab not ready after {:.0f}s; waiting for: {} (logs in {})".format(
            timeout, "; ".join(pending), LOG_DIR
        )
    )


# -- up and down --------------------------------------------------------------------


def up(objects: list[dict], nodes: int) -> LabPlan:
    if STATE_FILE.exists() or net.lab_namespaces():
        raise LabError("a lab is already up (or left over): run `meshlab down` first")
    plan = LabPlan(nodes=make_nodes(nodes))
    add_objects(plan, objects)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    save_plan(plan)
    cgroups.create(lab_cgroup())
    net.create_underlay()
    for node in plan.nodes:
        net.create_node(node, plan)
        cgroups.create(cgroups.node_cgroup(node.name))
    for pod in plan.pods.values():
        net.create_pod(pod, plan.node(pod.node))
    for pod in plan.pods.values():
        start_pod(pod)
    wait_pods_ready(plan, list(plan.pods.values()))
    save_plan(plan)
    write_cluster(plan)
    start_controller()
    for node in plan.nodes:
        start_agent(node)
    wait_ready(plan)
    return plan


def down() -> list[str]:
    """Remove everything the lab made; returns what it removed (for the user)."""
    removed: list[str] = []
    cg = lab_cgroup()
    if cg.exists():
        cgroups.kill_tree(cg)
        node_dirs = [p for p in cg.iterdir() if p.is_dir() and p.name.startswith("node-")]
        for folder in node_dirs:  # detach explicitly; removing the cgroup would too
            settings = loader.DatapathSettings(BPFFS_DIR / folder.name, folder, "0.0.0.0")
            loader.uninstall(settings)
        cgroups.remove_tree(cg)
        removed.append(f"cgroup {cg}")
    if BPFFS_DIR.exists():
        shutil.rmtree(BPFFS_DIR, ignore_errors=True)
        removed.append(f"pins {BPFFS_DIR}")
    removed += [f"netns {n}" for n in net.delete_all()]
    if ETC_NETNS.exists():
        for folder in ETC_NETNS.glob(NETNS_PREFIX + "*"):
            shutil.rmtree(folder, ignore_errors=True)
    if RUN_DIR.exists():
        shutil.rmtree(RUN_DIR, ignore_errors=True)
        removed.append(f"state {RUN_DIR}")
    return removed


def leftovers() -> list[str]:
    """What of the lab is still on this machine (empty after a clean `down`)."""
    out = [f"netns {n}" for n in net.lab_namespaces()]
    if lab_cgroup().exists():
        out.append(f"cgroup {lab_cgroup()}")
    if BPFFS_DIR.exists():
        out.append(f"pins {BPFFS_DIR}")
    out += (
        [f"/etc/netns/{p.name}" for p in ETC_NETNS.glob(NETNS_PREFIX + "*")]
        if ETC_NETNS.exists()
        else []
    )
    if RUN_DIR.exists():
        out.append(f"state {RUN_DIR}")
    return out


# -- changes at run time ----------------------------------------------------------------


@contextlib.contextmanager
def _locked() -> Iterator[LabPlan]:
    """Load the plan under an exclusive lock, so concurrent applies do not race."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUN_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield load_plan()


def apply(objects: list[dict]) -> tuple[list[str], list[str]]:
    """Create or update objects in the running lab; new pods are built and started.
    Returns (pods started, objects updated)."""
    with _locked() as plan:
        before = set(plan.pods)
        add_objects(plan, objects)
        new = [plan.pods[k] for k in plan.pods if k not in before]
        for pod in new:
            net.create_pod(pod, plan.node(pod.node))
        save_plan(plan)
        write_cluster(plan)  # new pods appear (not yet ready), labels change, ...
        for pod in new:
            start_pod(pod)
        if any(not p.ready for p in new):
            wait_pods_ready(plan, new)
            save_plan(plan)
            write_cluster(plan)
    return [p.key for p in new], [
        f"{o['kind']} {o.get('metadata', {}).get('name')}" for o in objects
    ]


def stop_pod(pod: PodPlan) -> None:
    cg = cgroups.pod_cgroup(pod.node, pod.namespace, pod.name)
    cgroups.kill_tree(cg)
    cgroups.remove_tree(cg)
    net.delete_pod(pod)
    shutil.rmtree(ETC_NETNS / pod.netns, ignore_errors=True)


def delete(objects: list[dict]) -> list[str]:
    """Remove objects from the running lab; their pods are stopped and their namespaces removed."""
    with _locked() as plan:
        removed = remove_objects(plan, objects)
        save_plan(plan)
        write_cluster(plan)
    for pod in removed:
        stop_pod(pod)
    return [p.key for p in removed]


def stop_controller() -> None:
    cgroups.kill_tree(cgroups.system_cgroup("controller"))


# -- exec ---------------------------------------------------------------------------


def exec_in_pod(plan: LabPlan, target: str, argv: list[str]) -> int:
    pod = plan.pods.get(target)
    if pod is None:
        raise LabError(f"no pod {target!r} (pods: {', '.join(sorted(plan.pods))})")
    cg = cgroups.pod_cgroup(pod.node, pod.namespace, pod.name)
    cgroups.create(cg)
    proc = subprocess.run(
        ["ip", "netns", "exec", pod.netns, *argv],
        preexec_fn=cgroups.joiner(cg),
        env={**os.environ, **pod.env},
    )
    return proc.returncode


def exec_on_node(plan: LabPlan, node_name: str, argv: list[str]) -> int:
    node = plan.node(node_name)
    env = {
        **os.environ,
        "PATH": f"{BIN_DIR}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "MESHAGENT_CONFIG": str(agent_config_path(node.name)),
        "MESHCTL_CONTROLLER": f"{UNDERLAY_BRIDGE_IP}:{CONTROLLER_METRICS_PORT}",
    }
    proc = subprocess.run(["nsenter", f"--net={NETNS_DIR / node.netns}", "--", *argv], env=env)
    return proc.returncode
