"""Issue #16 item 6: the image (daemonset/Containerfile) built here and its agent run in the lab.

`scripts/build-image.sh` builds it with Debian's podman (the base from mmdebstrap when podman's
store lacks it; podman's layer cache makes a rebuild of unchanged sources take seconds). Then
node-1's agent of a lab is replaced by the image's, run the way the DaemonSet runs it: in the
node's network namespace (hostNetwork) and the host PID namespace (hostPID), with the
DaemonSet's capabilities (BPF, NET_ADMIN, SYS_ADMIN, SYS_PTRACE, SYS_RESOURCE; not privileged),
AppArmor unconfined, a read-only root, and the node's bpffs, cgroup file system, /lib/modules
and /usr/src mounted. The lab's node datapath is removed first (`meshagent uninstall`, from the
image), so the container compiles and attaches the programs itself, as on a new node. A
meshed pod's request then goes through the container's proxy, its preStop hook
(`meshagent uninstall --unless-handed-over`) removes the datapath again, and SIGTERM ends it
with status 0. A second container, without the node's headers mounted, compiles against the
image's own (the fallback for nodes that have none) and serves meshed traffic as well.

Everything found about the node goes through the meshlab CLI (`meshlab exec --node`): its
network namespace (by inode among /run/netns) and its agent config ($MESHAGENT_CONFIG).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import DATAPATH_PROGRAMS, EXAMPLES, Lab, _require_root, meshlab
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-image.sh"
CONTAINERS_CONF = ROOT / "build" / "image" / "containers.conf"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"meshagent:{VERSION}"
TOOLS = ("podman", "buildah", "runc", "mmdebstrap")
# Here: ~100 s from nothing (base ~25 s, image ~75 s), ~70 s after a source change (the
# project's layers), a few seconds when nothing changed. The bound leaves room for a slow
# mirror.
BUILD_TIMEOUT = 900
READY_TIMEOUT = 90  # bcc compiles the programs at start (~1 s here; clang is the peak)
CONTAINER = f"meshagent-e2e-{os.environ.get('MESHLAB_INSTANCE') or 'default'}-node-1"
NODE = "node-1"
# The DaemonSet's container: daemonset/base/agent.yaml.
CAPABILITIES = ("BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "SYS_RESOURCE")


def _require_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        message = f"the image test needs {', '.join(missing)} (scripts/install.sh installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def podman(*args: str, check: bool = True, timeout: float = 120, netns: Path | None = None):
    argv = ["podman", *args]
    if netns is not None:
        # Not `ip netns exec`: it remounts /sys, which would hide the bpffs and cgroup2
        # mounts from the container.
        argv = ["nsenter", f"--net={netns}", *argv]
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


def node_netns(node: str) -> Path:
    """The node's network namespace file in /run/netns, found by its inode."""
    inode = int(
        meshlab("exec", "--node", node, "--", "stat", "-L", "-c", "%i", "/proc/self/ns/net").stdout
    )
    for path in Path("/run/netns").iterdir():
        if path.stat().st_ino == inode:
            return path
    raise AssertionError(f"no /run/netns entry for {node}'s network namespace (inode {inode})")


def node_config(node: str) -> Path:
    out = meshlab("exec", "--node", node, "--", "printenv", "MESHAGENT_CONFIG").stdout.strip()
    assert out, f"{node} names no agent config (MESHAGENT_CONFIG)"
    return Path(out)


def run_options(config: Path, node_headers: bool = True) -> list[str]:
    """`podman run` options for the agent as the DaemonSet runs it (daemonset/base/agent.yaml)."""
    settings = json.loads(config.read_text())
    # The lab keeps the node's config, token, CA, state and metrics under one folder; it
    # stands in for the DaemonSet's state hostPath, token and mesh-root volumes.
    files = [config] + [
        Path(settings[key])
        for key in ("token_file", "controller_ca_file", "state_dir", "worker_metrics_dir")
        if settings.get(key)
    ]
    lab_dir = Path(os.path.commonpath([str(f) for f in files]))
    assert lab_dir != Path("/"), f"the node's files share no folder: {files}"
    headers = ["--volume=/lib/modules:/lib/modules:ro", "--volume=/usr/src:/usr/src:ro"]
    return [
        "--network=host",  # hostNetwork (in the node's namespace, see podman(netns=))
        "--pid=host",  # hostPID: the agent finds pods' namespaces in /proc
        "--cap-drop=ALL",
        *(f"--cap-add={cap}" for cap in CAPABILITIES),
        "--security-opt=apparmor=unconfined",
        "--read-only",  # readOnlyRootFilesystem (podman adds a /tmp tmpfs: the tmp emptyDir)
        "--volume=/sys/fs/bpf:/sys/fs/bpf:rslave",  # mountPropagation: HostToContainer
        "--volume=/sys/fs/cgroup:/sys/fs/cgroup:ro",
        *(headers if node_headers else []),
        f"--volume={lab_dir}:{lab_dir}",
        f"--env=MESHAGENT_CONFIG={config}",
    ]


@pytest.fixture(scope="module")
def image() -> str:
    _require_root()
    _require_tools()
    started = time.monotonic()
    proc = subprocess.run(
        [str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    assert proc.returncode == 0, (
        f"build-image.sh failed:\n{proc.stdout[-6000:]}{proc.stderr[-6000:]}"
    )
    assert f"built {IMAGE}" in proc.stdout, proc.stdout[-2000:]
    print(f"image {IMAGE} built in {time.monotonic() - started:.0f} s")
    return IMAGE


class ImageNode:
    """node-1 of a lab, its own agent stopped, ready for agents run from the image."""

    def __init__(self, lab: Lab, image: str) -> None:
        self.lab = lab
        self.image = image
        self.config = node_config(NODE)
        self.netns = node_netns(NODE)
        self.started: list[str] = []

    def start(self, name: str, *, node_headers: bool = True) -> None:
        """Run the agent from the image in a container `name`, on a node without datapath."""
        options = run_options(self.config, node_headers)
        podman("rm", "--force", "--time=0", name, check=False)
        # The datapath a previous agent left attached goes, so the image's agent builds
        # its own (compiles, attaches, pins) as on a new node.
        podman("run", "--rm", *options, self.image, "meshagent", "uninstall", netns=self.netns)
        self.started.append(name)
        podman(
            "run",
            "--detach",
            f"--name={name}",
            # The DaemonSet's downward-API env: register in the node's hand-over registry.
            f"--env=POD_UID={uuid.uuid4()}",
            f"--env=POD_NAME={name}",
            *options,
            self.image,
            "meshagent",
            "run",
            "--config",
            str(self.config),
            netns=self.netns,
        )

    def wait_ready(self, name: str) -> dict:
        """The node's status once the agent is ready, checked to come from container `name`."""
        state = wait_until(
            lambda: self.lab.status(NODE),
            lambda s: s["agent"]["running"] and s["agent"]["ready"],
            what=f"{NODE}'s agent from the image is ready",
            timeout=READY_TIMEOUT,
            interval=0.5,
            retry_on=(AssertionError, json.JSONDecodeError),
        )
        running = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
        assert running == "true", podman("logs", name, check=False).stderr[-3000:]
        # It is the container's agent that answers: its proxy workers live in its cgroup.
        container_id = podman("inspect", "--format", "{{.Id}}", name).stdout.strip()
        workers = [worker["pid"] for worker in state["agent"].get("workers") or []]
        assert workers, state["agent"]
        for pid in workers:
            assert container_id in Path(f"/proc/{pid}/cgroup").read_text(), (pid, container_id)
        # It built the datapath itself, compiling in the container.
        assert state["agent"]["datapath_reused"] is False
        attached = {p["name"] for p in state["datapath"]["programs"]}
        assert attached >= DATAPATH_PROGRAMS, attached
        return state

    def assert_meshed_request(self) -> None:
        before = self.lab.counters(NODE)["redirected"]
        code, body = self.lab.curl("shop/frontend", "http://reviews.shop:9080/")
        assert code == "200", (code, body)
        assert self.lab.counters(NODE)["redirected"] > before
        # the proxy workers report to the agent every second: wait for the report with it
        wait_until(
            lambda: self.lab.status(NODE)["agent"]["proxy"],
            lambda proxy: proxy["mutual_tls"] >= 1 and proxy["http_requests"] >= 1,
            what=f"{NODE}'s proxy counts the request as HTTP over mutual TLS",
        )

    def remove_all(self) -> None:
        for name in self.started:
            logs = podman("logs", name, check=False)
            if logs.returncode == 0:
                print(f"--- {name} log (tail)\n{(logs.stdout + logs.stderr)[-4000:]}")
            podman("rm", "--force", "--time=10", name, check=False)


@pytest.fixture(scope="module")
def image_node(image, lab_factory) -> Iterator[ImageNode]:
    """node-1 of the demo lab with its own agent stopped; every container gone afterwards."""
    lab = lab_factory(EXAMPLES / "demo.yaml", nodes=2)
    node = ImageNode(lab, image)
    try:
        meshlab("agent", "stop", NODE)
        yield node
    finally:
        node.remove_all()


def test_image_agent_serves_meshed_traffic(image_node) -> None:
    """With the node's kernel headers (/lib/modules, /usr/src), as the DaemonSet mounts them."""
    image_node.start(CONTAINER)
    image_node.wait_ready(CONTAINER)
    image_node.assert_meshed_request()
    lab = image_node.lab

    # The DaemonSet's preStop hook with no newer agent on the node removes the datapath;
    # the pod's traffic then flows directly, unmeshed (to the pod: the lab has no
    # kube-proxy, Service VIPs work through the mesh only).
    hook = podman("exec", CONTAINER, "meshagent", "uninstall", "--unless-handed-over")
    assert "removed pins" in hook.stdout, hook.stdout + hook.stderr
    attached = {p["name"] for p in lab.status(NODE)["datapath"]["programs"]}
    assert not attached & DATAPATH_PROGRAMS, attached
    reviews = meshlab("exec", "shop/reviews-v1", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    ip = reviews.stdout.split()[3].split("/")[0]
    code, _ = lab.curl("shop/frontend", f"http://{ip}:9080/")
    assert code == "200", code
    # SIGTERM: the agent drains and exits cleanly.
    podman("stop", "--time=30", CONTAINER, timeout=60)
    exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", CONTAINER).stdout.strip()
    assert exit_code == "0", podman("logs", CONTAINER, check=False).stderr[-3000:]


def test_image_agent_without_node_headers(image_node) -> None:
    """A node without kernel headers: the agent compiles against the image's own
    ($MESHAGENT_KERNEL_HEADERS, Debian's linux-headers of another release) and says so."""
    name = f"{CONTAINER}-own-headers"
    image_node.start(name, node_headers=False)
    image_node.wait_ready(name)
    log = podman("logs", name).stderr
    assert "compiling against /opt/kernel-headers" in log, log[-3000:]
    image_node.assert_meshed_request()
