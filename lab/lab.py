"""Brings the lab up and down: network, cgroups, a Kubernetes control plane, the controller,
agents and pods.

`up` builds the network and cgroups, starts etcd, kube-apiserver and kube-controller-manager
(lab/kubecontrol.py) in the lab's underlay namespace, registers the nodes as Node objects,
installs the mesh's namespace, RBAC and CRDs (daemonset/), starts the lab kubelet
(lab/kubelet.py: runs the Pods bound to the nodes), the controller (`meshctl serve
--kubernetes` as its own service account) and one agent per node (authenticated by a
service-account token bound to its agent Pod), then creates the manifests' objects through
the API and returns once every agent serves the current snapshot and every pod is Ready.
Daemons run detached, each in a lab cgroup. `down` removes everything by naming convention
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
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from meshagent.agent.config import AgentConfig
from meshagent.agent.datapath import loader
from meshagent.agent.handover import POD_NAME_ENV, POD_UID_ENV
from meshagent.agent.workers.launch import WORKER_ALLOCATOR
from meshagent.lab import cgroups, net, placement, probe
from meshagent.lab.kubeapi import ApiError, KubeApi, UnknownKind
from meshagent.lab.paths import (
    BPFFS_DIR,
    ETC_NETNS,
    INSTANCE,
    KUBE_DIR,
    LOG_DIR,
    NETNS_DIR,
    NETNS_PREFIX,
    POD_NET_OCTET,
    RUN_DIR,
    STATE_FILE,
    lab_cgroup,
)
from meshagent.lab.podexec import (
    BIN_DIR,
    LabError,
    agent_config_path,
    load_plan,
    load_state,
)
from meshagent.lab.topology import (
    APISERVER_PORT,
    CONTROLLER_METRICS_PORT,
    CONTROLLER_PORT,
    SERVICE_CIDRS,
    UNDERLAY_BRIDGE_IP,
    UNDERLAY_NETNS,
    LabPlan,
    NodePlan,
    PodPlan,
    add_objects,
    make_nodes,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DAEMONSET_DIR = REPO_ROOT / "daemonset"
READY_TIMEOUT = 60.0
CONTROL_PLANE_TIMEOUT = 90.0
UNDERLAY_NETNS_PATH = str(NETNS_DIR / UNDERLAY_NETNS)
HOST_PORTS = range(17443, 17543)  # kubectl's way in, 127.0.0.1:<port>: one per lab instance
HOST_KUBECONFIG = KUBE_DIR / "host.kubeconfig"  # what `meshlab kubeconfig` prints
MESH_NAMESPACE = "meshagent-system"
AGENT_SERVICE_ACCOUNT = "meshagent"
CONTROLLER_SERVICE_ACCOUNT = "meshctl"
CONTROLLER_POD_NAME = "meshctl-lab"
TOKEN_AUDIENCE = "meshagent-controller"
TOKEN_SECONDS = 7 * 24 * 3600
DEFAULT_IMAGE = "meshlab/process"  # Pods must name an image; the lab runs their command
NOT_READY_TAINT = "node.kubernetes.io/not-ready"  # the apiserver taints a new Node with it
# What the lab's `apply` ignores: the apiserver serves these, but nothing in the lab runs them.
# (Deployments and the like do run: kube-controller-manager makes their Pods.)


# -- state --------------------------------------------------------------------------
# state.json: {"nodes": N, "api_host_port": P, "controller_replicas": R, "pods": [...]};
# `pods` is written by the lab
# kubelet (the pods it runs), the rest by `up`. Writers hold RUN_DIR/lock.


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUN_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_state(data: dict) -> None:
    tmp = STATE_FILE.with_name(f".state.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, STATE_FILE)


def save_state(**fields) -> None:
    with _state_lock():
        data = json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else {"pods": []}
        data.update(fields)
        _write_state(data)


def save_pods(pods: list[PodPlan]) -> None:
    """The pods the lab kubelet runs (lab/kubelet.py is the only writer)."""
    records = [
        {
            "namespace": p.namespace,
            "name": p.name,
            "node": p.node,
            "ip": p.ip,
            "manifest": p.manifest,
            "probed": p.probed,
            "uid": p.uid,
        }
        for p in sorted(pods, key=lambda p: (p.node, p.key))
    ]
    with _state_lock():
        data = json.loads(STATE_FILE.read_text())
        data["pods"] = records
        _write_state(data)


def write_hosts(pod: PodPlan, text: str) -> None:
    """The pod's /etc/hosts (`ip netns exec` binds it), replaced atomically."""
    folder = ETC_NETNS / pod.netns
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".hosts.{os.getpid()}.{time.monotonic_ns()}"
    tmp.write_text(text)
    os.replace(tmp, folder / "hosts")


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


# The lab's certificate authority (DESIGN.md section 4) and the agents' credentials.
CA_FILE = RUN_DIR / "ca" / "ca.pem"  # root certificate and key, 0600, the controller's only
ROOT_FILE = RUN_DIR / "ca" / "root.pem"  # the trust bundle agents check the controller with


# -- the control plane and the API ------------------------------------------------------------


def control_plane():
    """The lab's `ControlPlane` (not started): in the underlay namespace at
    172.30.0.1:16443, dual-stack Service ranges, its files in KUBE_DIR."""
    from meshagent.lab.kubecontrol import ControlPlane

    return ControlPlane(
        KUBE_DIR,
        secure_port=APISERVER_PORT,
        address=UNDERLAY_BRIDGE_IP,
        service_cidr=SERVICE_CIDRS,
        ready_timeout=CONTROL_PLANE_TIMEOUT,
    )


def admin_api() -> KubeApi:
    """The API as the lab's admin (system:masters), from the host's network namespace."""
    return KubeApi.from_kubeconfig(KUBE_DIR / "admin.kubeconfig", netns=UNDERLAY_NETNS_PATH)


def _host_port() -> int:
    """A free port for kubectl's forwarder, tried first at this instance's own offset (as
    unique as its pod network): the lab kubelet binds it seconds later, so labs started
    together that each took the lowest free port bound the same one, and one lab's kubectl
    reached the other's apiserver."""
    own = 0 if not INSTANCE else POD_NET_OCTET - 99  # the default lab's pod octet is 244
    for port in [*HOST_PORTS[own:], *HOST_PORTS[:own]]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise LabError(f"no free port in 127.0.0.1:{HOST_PORTS.start}-{HOST_PORTS.stop - 1}")


def start_control_plane() -> subprocess.Popen:
    """etcd, kube-apiserver and kube-controller-manager, started by a helper in the underlay
    namespace (kubecontrol checks readiness from where it listens), all in the cgroup
    system/kube; the helper exits once the apiserver is ready."""
    cgroup = cgroups.system_cgroup("kube")
    cgroups.create(cgroup)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOG_DIR / "control-plane.log", "ab") as logf:
        return subprocess.Popen(
            [
                "nsenter",
                f"--net={UNDERLAY_NETNS_PATH}",
                "--",
                sys.executable,
                "-m",
                "meshagent.lab.kubelet",
                "control-plane",
            ],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            preexec_fn=cgroups.joiner(cgroup),
            start_new_session=True,
        )


def wait_control_plane(helper: subprocess.Popen) -> None:
    try:
        code = helper.wait(timeout=CONTROL_PLANE_TIMEOUT + 15)
    except subprocess.TimeoutExpired:
        helper.kill()
        code = -1
    if code != 0:
        tail = (LOG_DIR / "control-plane.log").read_text(errors="replace")[-3000:]
        raise LabError(f"the control plane did not start:\n{tail}")


def _manifests(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def _kustomized(folder: Path) -> list[dict]:
    listing = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return [obj for name in listing.get("resources") or [] for obj in _manifests(folder / name)]


def _untaint_ready(api: KubeApi, node: dict) -> None:
    """Remove the ``node.kubernetes.io/not-ready`` taint the apiserver puts on a new Node,
    now that it is Ready: the node lifecycle controller's part, disabled in the lab (it
    would want kubelet heartbeats). With the taint no DaemonSet gets a pod on the node."""
    taints = (node.get("spec") or {}).get("taints") or []
    kept = [t for t in taints if t.get("key") != NOT_READY_TAINT]
    if len(kept) != len(taints):
        api.merge_patch(f"/api/v1/nodes/{node['metadata']['name']}", {"spec": {"taints": kept}})


def bootstrap(api: KubeApi, plan: LabPlan) -> None:
    """What a cluster with the mesh installed has before any app: the Nodes, the mesh's
    namespace, RBAC and CRDs, the agents' Pods and service accounts, the controller's
    kubeconfig, an EndpointSlice for the `kubernetes` Service (at the apiserver)."""
    plane = control_plane()
    for node in plan.nodes:
        stored = api.apply(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": node.name,
                    "labels": {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux"},
                },
                "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr, node.pod_cidr6]},
            }
        )
        api.merge_patch(
            f"/api/v1/nodes/{node.name}/status",
            {
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": node.underlay_ip},
                        {"type": "InternalIP", "address": node.underlay_ip6},
                        {"type": "Hostname", "address": node.name},
                    ],
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                }
            },
        )
        _untaint_ready(api, stored)
        plane.kubeconfig_for(f"system:node:{node.name}", groups=["system:nodes"])
    for obj in [
        *_manifests(DAEMONSET_DIR / "base" / "namespace.yaml"),
        *_manifests(DAEMONSET_DIR / "base" / "controller-rbac.yaml"),
        *_kustomized(DAEMONSET_DIR / "crds"),
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": AGENT_SERVICE_ACCOUNT, "namespace": MESH_NAMESPACE},
            "automountServiceAccountToken": False,
        },
        _kubernetes_endpoints(),
    ]:
        api.apply(obj)
    for node in plan.nodes:
        api.apply(_agent_pod(node))
    token = request_token(api, CONTROLLER_SERVICE_ACCOUNT)
    plane.kubeconfig_for(f"system:serviceaccount:{MESH_NAMESPACE}:meshctl", token=token)
    kubeconfig = yaml.safe_load((KUBE_DIR / "admin.kubeconfig").read_text())
    kubeconfig["clusters"][0]["cluster"]["server"] = (
        f"https://127.0.0.1:{load_state()['api_host_port']}"
    )
    HOST_KUBECONFIG.write_text(yaml.safe_dump(kubeconfig, sort_keys=False))
    HOST_KUBECONFIG.chmod(0o600)


def controller_kubeconfig() -> Path:
    return KUBE_DIR / "kubeconfigs" / f"system_serviceaccount_{MESH_NAMESPACE}_meshctl.kubeconfig"


def _kubernetes_endpoints() -> dict:
    """The `kubernetes` Service's endpoint: the apiserver (it keeps none itself here)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {
                "kubernetes.io/service-name": "kubernetes",
                "endpointslice.kubernetes.io/managed-by": "meshlab",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [UNDERLAY_BRIDGE_IP], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": APISERVER_PORT, "protocol": "TCP"}],
    }


def agent_pod_name(node: str) -> str:
    return f"meshagent-{node}"


def _agent_pod(node: NodePlan) -> dict:
    """The node's agent as the DaemonSet's Pod: the lab runs it (`start_agent`); the object
    is what its token is bound to, and what says which node it is on."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": agent_pod_name(node.name),
            "namespace": MESH_NAMESPACE,
            "labels": {"app.kubernetes.io/name": "meshagent"},
            "annotations": {"meshlab.io/runs": "agent"},
        },
        "spec": {
            "nodeName": node.name,
            "hostNetwork": True,
            "serviceAccountName": AGENT_SERVICE_ACCOUNT,
            "automountServiceAccountToken": False,
            "containers": [{"name": "agent", "image": "meshagent"}],
        },
    }


def request_token(api: KubeApi, account: str, pod: dict | None = None) -> str:
    """A token of ``account`` (TokenRequest); bound to ``pod`` and addressed to the
    controller when given, as the agents' projected token."""
    spec: dict = {"expirationSeconds": TOKEN_SECONDS}
    if pod is not None:
        spec["audiences"] = [TOKEN_AUDIENCE]
        spec["boundObjectRef"] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod["metadata"]["name"],
            "uid": pod["metadata"]["uid"],
        }
    answer = api.create(
        f"/api/v1/namespaces/{MESH_NAMESPACE}/serviceaccounts/{account}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
    )
    return answer["status"]["token"]


def node_token_path(node: str) -> Path:
    return RUN_DIR / node / "token"


def issue_node_token(node: str, api: KubeApi | None = None) -> Path:
    """The node agent's token file (0600): a `meshagent` service-account token bound to the
    node's agent Pod, issued on first use and kept after."""
    path = node_token_path(node)
    if not path.exists():
        api = api or admin_api()
        pod = api.get(f"/api/v1/namespaces/{MESH_NAMESPACE}/pods/{agent_pod_name(node)}")
        token = request_token(api, AGENT_SERVICE_ACCOUNT, pod)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    return path


def agent_config(node: NodePlan) -> AgentConfig:
    # MESHLAB_PROXY_WORKERS: proxy processes per agent (default: one per core, as a node).
    workers = int(os.environ.get("MESHLAB_PROXY_WORKERS", "0"))
    # MESHLAB_AGENT_SETTINGS: more agent settings as a JSON object, for tests that need short
    # timeouts or low limits, e.g. '{"http_request_headers_timeout_s": 2}'.
    extra = json.loads(os.environ.get("MESHLAB_AGENT_SETTINGS") or "{}")
    extra.setdefault("proxy_workers", workers)
    return AgentConfig(
        **extra,
        node_name=node.name,
        controller=",".join(
            f"{UNDERLAY_BRIDGE_IP}:{controller_ports(r)[0]}" for r in range(controller_replicas())
        ),
        proxy_ip=node.gateway,
        proxy_ip6=node.gateway6,
        cgroup_path=cgroups.node_cgroup(node.name),
        pin_dir=BPFFS_DIR / node.name,
        state_dir=RUN_DIR / node.name / "state",
        worker_metrics_dir=RUN_DIR / node.name / "metrics",
        token_file=node_token_path(node.name),
        controller_ca_file=ROOT_FILE,
    )


# MESHLAB_CONTROLLER_REPLICAS at `meshlab up`: how many controller replicas (default 1).
# Every replica serves agents (each agent is given them all and starts at the one its node
# hashes to); one leads. Replica r listens REPLICA_PORT_STEP * r above 15012 and 15014.
MAX_CONTROLLER_REPLICAS = 3
REPLICA_PORT_STEP = 100


def controller_replicas() -> int:
    """The lab's controller replicas: from its state once up, else MESHLAB_CONTROLLER_REPLICAS."""
    if STATE_FILE.exists() and "controller_replicas" in load_state():
        return int(load_state()["controller_replicas"])
    value = os.environ.get("MESHLAB_CONTROLLER_REPLICAS") or "1"
    if not value.isdigit() or not 1 <= int(value) <= MAX_CONTROLLER_REPLICAS:
        raise LabError(
            f"MESHLAB_CONTROLLER_REPLICAS must be 1 to {MAX_CONTROLLER_REPLICAS}, got {value!r}"
        )
    return int(value)


def controller_ports(replica: int) -> tuple[int, int]:
    """(agent stream, status/metrics) ports of replica ``replica`` (0 is the first)."""
    step = REPLICA_PORT_STEP * replica
    return CONTROLLER_PORT + step, CONTROLLER_METRICS_PORT + step


def controller_cgroup(replica: int = 0) -> Path:
    return cgroups.system_cgroup("controller" if replica == 0 else f"controller-{replica + 1}")


def start_controllers() -> None:
    """Every replica; the first writes the CA file, the others wait for it."""
    for replica in range(controller_replicas()):
        start_controller(replica)
        if replica == 0 and controller_replicas() > 1:
            _wait_file(ROOT_FILE)


def _wait_file(path: Path, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise LabError(f"{path} not written after {timeout:.0f}s (see the controller's log)")
        time.sleep(0.1)


def start_controller(replica: int = 0) -> int:
    """`meshctl serve --kubernetes` as the `meshctl` service account (the DaemonSet's RBAC),
    in the underlay namespace; the mesh CA in a file every replica reads."""
    if not 0 <= replica < controller_replicas():
        raise LabError(f"the lab has {controller_replicas()} controller replica(s)")
    port, metrics_port = controller_ports(replica)
    argv = [
        str(BIN_DIR / "meshctl"),
        "serve",
        "--kubernetes",
        "--kubeconfig",
        str(controller_kubeconfig()),
        "--listen",
        f"{UNDERLAY_BRIDGE_IP}:{port}",
        "--metrics",
        f"{UNDERLAY_BRIDGE_IP}:{metrics_port}",
        "--ca-file",
        str(CA_FILE),
        "--trust-bundle-out",
        str(ROOT_FILE),
        "--server-name",
        UNDERLAY_BRIDGE_IP,
        "--agent-service-account",
        f"{MESH_NAMESPACE}/{AGENT_SERVICE_ACCOUNT}",
    ]
    # Short-lived workload certificates for renewal tests, e.g. MESHLAB_CERT_LIFETIME=60s.
    if os.environ.get("MESHLAB_CERT_LIFETIME"):
        argv += ["--cert-lifetime", os.environ["MESHLAB_CERT_LIFETIME"]]
    cgroup = controller_cgroup(replica)
    return _spawn(
        cgroup.name,
        ["nsenter", f"--net={UNDERLAY_NETNS_PATH}", "--", *argv],
        cgroup,
        env={
            "POD_NAME": CONTROLLER_POD_NAME if replica == 0 else f"{CONTROLLER_POD_NAME}-{replica}",
            "POD_NAMESPACE": MESH_NAMESPACE,
        },
    )


def start_kubelet() -> int:
    """The lab kubelet (lab/kubelet.py), detached, in the cgroup system/kubelet."""
    return _spawn(
        "kubelet",
        [sys.executable, "-m", "meshagent.lab.kubelet", "run"],
        cgroups.system_cgroup("kubelet"),
    )


def _exited(pid: int) -> bool:
    """True once our child ``pid`` has exited (reaped here)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return False


def wait_kubelet(pid: int, timeout: float = 30.0) -> None:
    """Until the lab kubelet (our child ``pid``) watches every node's pods (so it numbers
    them in order); one that exits first fails at once, with its log."""
    from meshagent.lab.kubelet import READY_FILE

    deadline = time.monotonic() + timeout
    while not READY_FILE.exists():
        exited = _exited(pid)
        if exited or time.monotonic() > deadline:
            tail = (LOG_DIR / "kubelet.log").read_text(errors="replace")[-2000:]
            what = "exited" if exited else f"is not running after {timeout:.0f}s"
            raise LabError(f"the lab kubelet {what}:\n{tail}")
        time.sleep(0.05)


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


def start_agent(node: NodePlan, *, new_pod: bool = False, api: KubeApi | None = None) -> int:
    """Start the node's agent: the newest agent pod's container again, or (``new_pod``, and
    for the first) a new agent pod next to the others, as a surge upgrade does."""
    issue_node_token(node.name, api)
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
        # the workers' allocator for the agent too: it can then fork their fork server
        # after importing what both need (agent/workers/launch.py), as the DaemonSet sets it
        env={POD_UID_ENV: pod["uid"], POD_NAME_ENV: pod["name"], **WORKER_ALLOCATOR},
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


def start_pod(pod: PodPlan) -> None:
    """The pod's process (its first container's command and args) in its network namespace
    and cgroup, detached from the caller (`setsid -f`: the lab kubelet is not its parent, so
    nothing has to reap it), logging to logs/pod-<ns>-<name>.log."""
    if not pod.command:
        return
    workdir = RUN_DIR / "pods" / pod.netns
    workdir.mkdir(parents=True, exist_ok=True)
    argv = ["setsid", "-f", "ip", "netns", "exec", pod.netns, *pod.command]
    cgroup = cgroups.pod_cgroup(pod.node, pod.namespace, pod.name)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    cgroups.create(cgroup)
    with open(LOG_DIR / f"pod-{pod.namespace}-{pod.name}.log", "ab") as logf:
        subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            preexec_fn=cgroups.joiner(cgroup),
            env={
                **os.environ,
                "PATH": f"{BIN_DIR}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                **pod.env,
            },
            cwd=workdir,
            check=False,
        )


# -- readiness ----------------------------------------------------------------------


def agent_view(node: NodePlan) -> dict | None:
    try:
        return probe.http_get_json(node.netns, "127.0.0.1", 15000, "/status")
    except (OSError, ValueError):
        return None


def _ready_in_api(pod: dict) -> bool:
    """The Pod object's Ready condition is True (what its EndpointSlices follow)."""
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def not_ready_in_api(api: KubeApi, keys: dict[str, str]) -> list[str]:
    """The pods of ``keys`` ({ns/name: uid}) whose Pod object is not (yet) Ready."""
    pods = {_key(p): p for p in api.get("/api/v1/pods").get("items") or []}
    return [
        k
        for k, uid in keys.items()
        if k not in pods or pods[k]["metadata"].get("uid") != uid or not _ready_in_api(pods[k])
    ]


def wait_pods_ready(
    keys: dict[str, str], api: KubeApi | None = None, timeout: float = READY_TIMEOUT
) -> LabPlan:
    """Until the lab kubelet runs every pod of ``keys`` ({ns/name: uid}) and reports it
    Ready, to the ``api`` too when given (its status write comes a moment after its own
    state; the mesh's endpoints follow the API); the plan then."""
    deadline = time.monotonic() + timeout
    while True:
        plan = load_plan()
        waiting = [
            k
            for k, uid in keys.items()
            if k not in plan.pods or plan.pods[k].uid != uid or not plan.pods[k].ready
        ]
        if not waiting and api is not None:
            waiting = [f"{k} (not Ready in the API)" for k in not_ready_in_api(api, keys)]
        if not waiting:
            return plan
        if time.monotonic() > deadline:
            raise LabError(
                f"pods not ready after {timeout:.0f}s: {', '.join(waiting)} (logs in {LOG_DIR})"
            )
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


def certificates_pending(plan: LabPlan) -> list[str]:
    """Workload identities an answering agent wants and holds no certificate for yet (a pod
    is meshed a moment before its certificate comes: until then its connections fail). None
    while no controller runs: nothing could sign them."""
    if not any(cgroups.pids(controller_cgroup(r)) for r in range(controller_replicas())):
        return []
    pending = []
    for node in plan.nodes:
        view = agent_view(node)
        for row in (view or {}).get("certificates") or []:
            if row.get("state") != "ready":
                pending.append(f"certificate for {row.get('identity')} on {node.name}")
    return pending


def wait_certificates(plan: LabPlan, timeout: float = READY_TIMEOUT) -> None:
    """Until every answering agent holds a certificate for each identity it wants."""
    deadline = time.monotonic() + timeout
    while pending := certificates_pending(plan):
        if time.monotonic() > deadline:
            raise LabError(
                f"certificates not issued in {timeout:.0f}s: {'; '.join(pending)} "
                f"(logs in {LOG_DIR})"
            )
        time.sleep(0.1)


def _selected(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def endpoints_behind(api: KubeApi) -> list[str]:
    """Services whose EndpointSlices do not (yet) list exactly their ready pods' addresses
    (kube-controller-manager writes them a moment after the pods' status)."""
    pods = api.get("/api/v1/pods").get("items") or []
    slices = api.get("/apis/discovery.k8s.io/v1/endpointslices").get("items") or []
    behind = []
    for svc in api.get("/api/v1/services").get("items") or []:
        meta, spec = svc["metadata"], svc.get("spec") or {}
        selector = spec.get("selector") or {}
        if not selector:
            continue
        families = {"IPv6" if ":" in ip else "IPv4" for ip in spec.get("clusterIPs") or []}
        want = {
            ip["ip"]
            for p in pods
            if p["metadata"].get("namespace") == meta["namespace"]
            and not p["metadata"].get("deletionTimestamp")
            and _selected(selector, p["metadata"].get("labels") or {})
            and _ready_in_api(p)
            for ip in (p.get("status") or {}).get("podIPs") or []
            if ("IPv6" if ":" in ip["ip"] else "IPv4") in families
        }
        have = {
            address
            for eps in slices
            if eps["metadata"].get("namespace") == meta["namespace"]
            and (eps["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
            == meta["name"]
            for endpoint in eps.get("endpoints") or []
            if (endpoint.get("conditions") or {}).get("ready")
            for address in endpoint.get("addresses") or []
        }
        if want != have:
            behind.append(f"{meta['namespace']}/{meta['name']}")
    return behind


def controller_view(timeout: float = 5.0, replica: int = 0) -> dict | None:
    """A controller replica's /status (shown to an agent's token, as to `meshctl status` on a
    node), None when it does not answer."""
    try:
        token = node_token_path("node-1").read_text().strip()
        port = controller_ports(replica)[1]
        return probe.http_get_json(
            UNDERLAY_NETNS, UNDERLAY_BRIDGE_IP, port, "/status", timeout, token
        )
    except (OSError, ValueError):
        return None


def wait_synced(api: KubeApi, timeout: float = READY_TIMEOUT) -> None:
    """Until the cluster has settled and the mesh with it: EndpointSlices list the ready
    pods, and the controller's model has not changed for a moment with every connected agent
    holding what it was last sent. Gives up quietly when the controller is not running."""
    deadline = time.monotonic() + timeout
    while endpoints_behind(api):
        if time.monotonic() > deadline:
            raise LabError(f"EndpointSlices behind after {timeout:.0f}s: {endpoints_behind(api)}")
        time.sleep(0.1)
    last = None
    replicas = range(controller_replicas())
    while time.monotonic() < deadline:
        views = [v for r in replicas if (v := controller_view(replica=r)) is not None]
        if not views:
            if not any(cgroups.pids(controller_cgroup(r)) for r in replicas):
                return  # stopped (`meshlab controller stop`): nothing to wait for
            time.sleep(0.2)
            continue
        # each replica lists the agents connected to it; those that are not connected
        # (stopped by a test, say) are not waited for
        agents = {a["node"]: a for v in views for a in v.get("agents") or [] if a["connected"]}
        settled = all((v.get("source") or {}).get("complete") for v in views) and all(
            a["acked_version"] == a["sent_version"] for a in agents.values()
        )
        generations = tuple(v["generation"] for v in views)
        mark = (generations, tuple(sorted((a["sent_version"]) for a in agents.values())))
        if settled and mark == last:
            return
        last = mark if settled else None
        time.sleep(0.3)
    raise LabError(f"the controller and agents did not settle in {timeout:.0f}s")


# -- up and down --------------------------------------------------------------------


def up(objects: list[dict], nodes: int) -> LabPlan:
    if STATE_FILE.exists() or net.lab_namespaces():
        raise LabError("a lab is already up (or left over): run `meshlab down` first")
    plan = LabPlan(nodes=make_nodes(nodes))
    add_objects(LabPlan(nodes=plan.nodes), [dict(o) for o in objects])  # names unknown nodes
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    save_state(nodes=nodes, api_host_port=_host_port(), controller_replicas=controller_replicas())
    cgroups.create(lab_cgroup())
    net.create_underlay()
    helper = start_control_plane()
    for node in plan.nodes:
        net.create_node(node, plan)
        cgroups.create(cgroups.node_cgroup(node.name))
    wait_control_plane(helper)
    api = admin_api()
    bootstrap(api, plan)
    kubelet = start_kubelet()
    start_controllers()
    for node in plan.nodes:
        start_agent(node, api=api)
    wait_kubelet(kubelet)
    created, _ignored = apply_objects(api, objects)
    plan = wait_pods_ready(created, api)
    wait_synced(api)
    wait_ready(plan)
    wait_certificates(plan)
    return plan


def down() -> list[str]:
    """Remove everything the lab made; returns what it removed (for the user)."""
    removed: list[str] = []
    cg = lab_cgroup()
    if cg.exists():
        cgroups.kill_tree(cg)  # control plane, kubelet, controller, agents, pods
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
        shutil.rmtree(RUN_DIR, ignore_errors=True)  # etcd's data and the PKI with it
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


# -- changes at run time, through the API ----------------------------------------------------


def _key(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def _describe(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    return (
        f"{obj.get('kind')} {meta['namespace']}/{name}"
        if meta.get("namespace")
        else (f"{obj.get('kind')} {name}")
    )


def _pod_defaults(obj: dict) -> dict:
    """What the API requires of a Pod and lab manifests leave out: an image and a name per
    container (the lab runs the command; the image is only a label)."""
    obj = json.loads(json.dumps(obj))
    for index, container in enumerate((obj.get("spec") or {}).get("containers") or []):
        container.setdefault("name", f"c{index}" if index else "main")
        container.setdefault("image", DEFAULT_IMAGE)
    return obj


def _wait_served(api: KubeApi, api_version: str, kind: str, timeout: float = 30.0) -> None:
    """A CRD's kind is served a moment after the CRD is created."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            api._resources.pop((api_version, kind), None)
            api.resource(api_version, kind)
            return
        except UnknownKind:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class ApplyError(LabError):
    """Some objects were refused by the API; the others were applied."""


def apply_objects(api: KubeApi, objects: list[dict]) -> tuple[dict[str, str], list[str]]:
    """Server-side apply ``objects`` in order (Namespaces first). Pods without a node are
    placed on the least loaded node their nodeSelector, node affinity and tolerations allow,
    as the lab kubelet's scheduler does. Returns ({ns/name: uid} of the Pods created, the
    objects of kinds the API does not serve, ignored)."""
    from meshagent.lab.kubelet import place

    plan_nodes = make_nodes(load_state()["nodes"])
    node_objects = {n["metadata"]["name"]: n for n in api.get("/api/v1/nodes").get("items") or []}
    existing = {_key(p): p for p in api.get("/api/v1/pods").get("items") or []}
    ordered = [o for o in objects if o.get("kind") == "Namespace"]
    ordered += [o for o in objects if o.get("kind") != "Namespace"]
    created: dict[str, str] = {}
    ignored: list[str] = []
    errors: list[str] = []
    for obj in ordered:
        if obj.get("kind") == "Pod":
            obj = _pod_defaults(obj)
            key = _key(obj)
            spec = obj.setdefault("spec", {})
            old = existing.get(key)
            if old is not None and not old["metadata"].get("deletionTimestamp"):
                spec.setdefault("nodeName", old["spec"].get("nodeName"))
            elif not spec.get("nodeName"):
                node = place(obj, plan_nodes, node_objects, existing.values())
                if node is None:
                    errors.append(f"{_describe(obj)}: {placement.NO_NODE_FITS}")
                    continue
                spec["nodeName"] = node.name
            elif spec["nodeName"] not in {n.name for n in plan_nodes}:
                errors.append(f"{_describe(obj)}: no node {spec['nodeName']!r} in this lab")
                continue
        try:
            stored = api.apply(obj)
        except UnknownKind:
            ignored.append(_describe(obj))
            continue
        except ApiError as exc:
            errors.append(f"{_describe(obj)}: {exc.message}")
            continue
        if obj.get("kind") == "CustomResourceDefinition":
            names = stored["spec"]["names"]
            for version in stored["spec"]["versions"]:
                _wait_served(api, f"{stored['spec']['group']}/{version['name']}", names["kind"])
        if obj.get("kind") == "Pod":
            key = _key(stored)
            old = existing.get(key)
            if old is None or old["metadata"]["uid"] != stored["metadata"]["uid"]:
                created[key] = stored["metadata"]["uid"]
            existing[key] = stored
    if any(o.get("kind") == "Service" for o in objects):
        refresh_hosts(api)
    if errors:
        raise ApplyError("refused by the API server:\n  " + "\n  ".join(errors))
    return created, ignored


def refresh_hosts(api: KubeApi) -> None:
    """Rewrite every running pod's /etc/hosts from the API's Services now (the lab kubelet
    does too, a moment later): a name resolves as soon as `meshlab apply` returns."""
    from meshagent.lab.topology import hosts_for

    services = api.get("/api/v1/services").get("items") or []
    for pod in load_plan().pods.values():
        if (NETNS_DIR / pod.netns).exists():
            write_hosts(pod, hosts_for(pod, services))


def apply(objects: list[dict]) -> tuple[list[str], list[str], list[str]]:
    """Create or update objects in the running lab through the API; waits until new Pods run
    and are Ready. Returns (pods started, objects applied, objects ignored)."""
    load_state()
    api = admin_api()
    created, ignored = apply_objects(api, objects)
    plan = wait_pods_ready(created, api)
    wait_synced(api)
    wait_certificates(plan)
    applied = [_describe(o) for o in objects if _describe(o) not in ignored]
    return sorted(created), applied, ignored


def delete(objects: list[dict], timeout: float = 120.0) -> list[str]:
    """Delete objects through the API; waits until deleted Pods are stopped (their grace
    period honoured) and gone. Returns the pods stopped."""
    load_state()
    api = admin_api()
    pods: dict[str, str] = {}
    for obj in objects:
        try:
            path = api.object_path(obj)
        except UnknownKind:
            continue
        if obj.get("kind") == "Pod":
            current = api.get_or_none(path)
            if current is None:
                continue
            pods[path] = current["metadata"]["uid"]
        api.delete(path)
    deadline = time.monotonic() + timeout
    while pods:
        for path, uid in list(pods.items()):
            current = api.get_or_none(path)
            if current is None or current["metadata"]["uid"] != uid:
                del pods[path]
        if pods and time.monotonic() > deadline:
            raise LabError(f"pods not gone after {timeout:.0f}s: {', '.join(pods)}")
        if pods:
            time.sleep(0.1)
    wait_synced(api)
    return [_key(o) for o in objects if o.get("kind") == "Pod"]


def stop_controller(replica: int = 0) -> None:
    if not 0 <= replica < controller_replicas():
        raise LabError(f"the lab has {controller_replicas()} controller replica(s)")
    cgroups.kill_tree(controller_cgroup(replica))
