"""The benchmark lab: lab.yaml and a run folder in; a running 2-node lab (through the `meshlab`
CLI, as a user would drive it) and, for every path, where its client dials and which processes
are its proxies, out.

Import this only after MESHLAB_INSTANCE is set (the lab's names and pod network depend on it;
run.py sets it). Pod IPs are planned with the lab's own planner before `meshlab up` (HAProxy's
configuration needs them) and checked against what `up` reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from meshagent.common.manifests import load_documents
from meshagent.lab import cgroups
from meshagent.lab.paths import LOG_DIR
from meshagent.lab.topology import LabPlan, add_objects, make_nodes

from benchmarks import configs
from benchmarks.certs import write_sidecar_certs

REPO = Path(__file__).resolve().parents[1]
MANIFEST = Path(__file__).with_name("lab.yaml")
PLACEHOLDER = "@BENCH@"
REPO_PLACEHOLDER = "@REPO@"  # where the gRPC server program is (tests/e2e/apps/grpc_echo.py)
MESHLAB = Path(sys.executable).parent / "meshlab"
NODES = 2
UP_TIMEOUT = 300.0
BASE_PATHS = ("direct", "mesh-same-node", "mesh-cross-node", "sidecar-pair")
# issue 18: the same servers at the other L7 levels (the base mesh paths get the default level,
# `observe` on an HTTP/1.1 port), through Services of their own (lab.yaml), for the HTTP/1.1
# scenarios only
LEVEL_PATHS = (
    "mesh-same-node-full",
    "mesh-same-node-l4",
    "mesh-cross-node-full",
    "mesh-cross-node-l4",
    "mesh-cross-node-routed",
)
PATH_NAMES = BASE_PATHS + LEVEL_PATHS
HTTP1_SCENARIOS = frozenset(("http-c1", "http-c16", "http-fixed-rate", "new-connections"))
LEVEL_TIMEOUT = 30.0  # s: the node agent's status shows each level path's level in force
NGINX_PREFIXES = (
    "nginx-plain",
    "nginx-remote",
    "nginx-local",
    "nginx-remote-full",
    "nginx-remote-l4",
    "nginx-remote-routed",
    "nginx-local-full",
    "nginx-local-l4",
)


class LabBusy(RuntimeError):
    """This lab instance is already up (someone else's run): the harness leaves it alone."""


class LabFailed(RuntimeError):
    """`meshlab` failed; carries its output."""


@dataclass(frozen=True)
class BenchPath:
    """One way from a client to the servers, and the proxies on it (their cgroups)."""

    name: str
    client: str  # the pod that runs the load tools
    http: tuple[str, int]
    iperf: tuple[str, int]
    idle: tuple[str, int]  # where idle connections go: opaque TCP to the mesh, end to end
    proxies: tuple[Path, ...]
    h2: tuple[str, int]  # nginx, h2c with prior knowledge
    grpc: tuple[str, int]
    scenarios: frozenset[str] | None = None  # the scenarios it runs (None: all)
    level: tuple[str, str] | None = None  # (Service, L7 level) node-1's status must show first

    def runs(self, scenario: str) -> bool:
        return self.scenarios is None or scenario in self.scenarios


def render_manifest(text: str, run_dir: Path) -> list[dict]:
    """lab.yaml's objects with the run folder and the repository filled in."""
    text = text.replace(PLACEHOLDER, str(run_dir)).replace(REPO_PLACEHOLDER, str(REPO))
    return load_documents(text, str(MANIFEST))


def plan_ips(objects: list[dict]) -> dict[str, str]:
    """Pod IPs as `meshlab up` will give them ({namespace/name: ip})."""
    plan = LabPlan(nodes=make_nodes(NODES))
    add_objects(plan, objects)
    return {key: pod.ip for key, pod in plan.pods.items()}


def bench_paths(ips: dict[str, str]) -> dict[str, BenchPath]:
    agents = tuple(cgroups.system_cgroup(f"agent-node-{i}") for i in range(1, NODES + 1))
    sidecars = (
        cgroups.pod_cgroup("node-1", "bench-plain", "sidecar-a"),
        cgroups.pod_cgroup("node-2", "bench-plain", "sidecar-b"),
    )
    a = ips["bench-plain/sidecar-a"]
    paths = [
        BenchPath(
            "direct",
            "bench-plain/client",
            (ips["bench-plain/http"], configs.HTTP_PORT),
            (ips["bench-plain/iperf"], configs.IPERF_PORT),
            (ips["bench-plain/http"], configs.IDLE_PORT),
            (),
            (ips["bench-plain/http"], configs.H2_PORT),
            (ips["bench-plain/grpc"], configs.GRPC_PORT),
        ),
        BenchPath(
            "mesh-same-node",
            "bench-mesh/client",
            ("http-local.bench-mesh", configs.HTTP_PORT),
            ("iperf-local.bench-mesh", configs.IPERF_PORT),
            ("http-local.bench-mesh", configs.IDLE_PORT),
            agents,
            ("http-local.bench-mesh", configs.H2_PORT),
            ("grpc-local.bench-mesh", configs.GRPC_PORT),
        ),
        BenchPath(
            "mesh-cross-node",
            "bench-mesh/client",
            ("http-remote.bench-mesh", configs.HTTP_PORT),
            ("iperf-remote.bench-mesh", configs.IPERF_PORT),
            ("http-remote.bench-mesh", configs.IDLE_PORT),
            agents,
            ("http-remote.bench-mesh", configs.H2_PORT),
            ("grpc-remote.bench-mesh", configs.GRPC_PORT),
        ),
        BenchPath(
            "sidecar-pair",
            "bench-plain/client",
            (a, configs.SIDECAR_A_HTTP),
            (a, configs.SIDECAR_A_IPERF),
            (a, configs.SIDECAR_A_HTTP),  # HAProxy is in TCP mode on these ports
            sidecars,
            (a, configs.SIDECAR_A_H2),  # and in HTTP mode (h2) on these
            (a, configs.SIDECAR_A_GRPC),
        ),
    ]
    for base in paths[1:3]:
        service = base.http[0].split(".")[0]
        levels = [("full", "full"), ("l4", "l4")]
        if base.name == "mesh-cross-node":  # same node, a route's `full` is the annotation's
            levels.append(("full (pods observe)", "routed"))
        for level, suffix in levels:
            host = f"{service}-{suffix}.bench-mesh"
            paths.append(
                replace(
                    base,
                    name=f"{base.name}-{suffix}",
                    http=(host, configs.HTTP_PORT),
                    scenarios=HTTP1_SCENARIOS,
                    level=(f"{service}-{suffix}", level),
                )
            )
    return {p.name: p for p in paths}


def prepare(run_dir: Path) -> tuple[Path, dict[str, BenchPath]]:
    """Write the run folder (manifest, nginx and HAProxy configurations, fresh certificates);
    returns the manifest to bring up and the paths."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    objects = render_manifest(MANIFEST.read_text(), run_dir)
    ips = plan_ips(objects)
    (run_dir / "nginx.conf").write_text(configs.nginx_conf())
    for prefix in NGINX_PREFIXES:
        (run_dir / prefix).mkdir()
    files = write_sidecar_certs(
        run_dir, {"sidecar-a": "sidecar-a.bench-plain", "sidecar-b": configs.SIDECAR_B_NAME}
    )
    (run_dir / "haproxy-a.cfg").write_text(
        configs.haproxy_a(ips["bench-plain/sidecar-b"], files["sidecar-a"])
    )
    (run_dir / "haproxy-b.cfg").write_text(
        configs.haproxy_b(
            ips["bench-plain/http"],
            ips["bench-plain/iperf"],
            ips["bench-plain/grpc"],
            files["sidecar-b"],
        )
    )
    manifest = run_dir / "lab.yaml"
    manifest.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return manifest, bench_paths(ips)


def _env() -> dict[str, str]:
    # the load tools in benchmarks/ run in pods as `python -m benchmarks.<tool>`; a PYTHONPATH
    # already set (run.py --commit) stays first
    path = [p for p in (os.environ.get("PYTHONPATH", ""), str(REPO)) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def meshlab(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MESHLAB), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=REPO,
    )


@dataclass(frozen=True)
class PodExec:
    """How to run a process in a pod as `meshlab exec` does (in its network namespace and its
    cgroup, so a meshed pod's connections are redirected as its own processes' are), without
    starting the `meshlab` CLI for every tool run (about a second of CPU each time)."""

    argv_prefix: tuple[str, ...]
    cgroup: Path
    env: dict[str, str]

    def popen_args(self, argv: list[str]) -> dict:
        return {
            "args": [*self.argv_prefix, *argv],
            "preexec_fn": cgroups.joiner(self.cgroup),
            "env": {**_env(), **self.env},
            "cwd": REPO,
        }


_pods: dict[str, PodExec] = {}


def load_pods() -> None:
    """Learn the running lab's pods (after `meshlab up`)."""
    from meshagent.lab import lab

    plan = lab.load_plan()
    _pods.clear()
    for key, pod in plan.pods.items():
        cgroup = cgroups.pod_cgroup(pod.node, pod.namespace, pod.name)
        _pods[key] = PodExec(("ip", "netns", "exec", pod.netns), cgroup, pod.env)


def _pod(pod: str) -> PodExec:
    if pod not in _pods:
        raise LabFailed(f"no pod {pod!r} in the running lab (known: {sorted(_pods)})")
    return _pods[pod]


def run_in_pod(pod: str, argv: list[str], timeout: float) -> str:
    """Run a tool in a pod; its stdout, or LabFailed with its output."""
    proc = subprocess.run(
        **_pod(pod).popen_args(argv), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise LabFailed(
            f"{' '.join(argv[:3])} in {pod} exited {proc.returncode}: "
            f"{(proc.stdout + proc.stderr).strip()[-600:]}"
        )
    return proc.stdout


def popen_in_pod(pod: str, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        **_pod(pod).popen_args(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def python_tool(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


def check_ips(up_output: str, planned: dict[str, str]) -> None:
    """Refuse to measure if `meshlab up` gave pods other IPs than planned (the HAProxy
    configurations name them)."""
    got = dict(re.findall(r"^\s+(\S+/\S+)\s+node-\d+\s+(\S+)$", up_output, re.MULTILINE))
    wrong = {k: (v, got.get(k)) for k, v in planned.items() if got.get(k) != v}
    if wrong:
        raise LabFailed(f"pod IPs differ from the plan (planned, got): {wrong}")


@contextlib.contextmanager
def running_lab(manifest: Path, keep_logs: Path) -> Iterator[None]:
    """`meshlab up` the bench lab, and `meshlab down` it at the end whatever happens, keeping
    its logs (controller, agents, pods) in `keep_logs` for a look at what went wrong. A lab of
    this instance that is already up is someone else's: LabBusy, and it is left alone."""
    proc = meshlab("up", "--nodes", str(NODES), "-f", str(manifest), timeout=UP_TIMEOUT)
    if proc.returncode != 0 and "already up" in proc.stderr:
        raise LabBusy(proc.stderr.strip())
    try:
        if proc.returncode != 0:
            raise LabFailed(f"meshlab up failed: {(proc.stdout + proc.stderr).strip()[-1500:]}")
        check_ips(proc.stdout, plan_ips(load_documents(manifest.read_text(), str(manifest))))
        load_pods()
        yield
    finally:
        shutil.rmtree(keep_logs, ignore_errors=True)
        with contextlib.suppress(OSError):
            shutil.copytree(LOG_DIR, keep_logs)
        meshlab("down", timeout=120)


def _levels_shown(node: str) -> dict[str, str]:
    """{Service: L7 level of its HTTP/1.1 port} in bench-mesh, as `meshagent status` on `node`
    shows them, with the level its pods' own node serves where that is lower (``full (pods
    observe)``: a Service `full` only for its routes); empty when the status cannot be read,
    or the commit shows no level."""
    try:
        proc = meshlab("exec", "--node", node, "--", "meshagent", "status", "--json", timeout=60)
        services = json.loads(proc.stdout)["services"]
    except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        return {}
    return {
        svc["name"]: port.get("l7", "unknown")
        + (f" (pods {port['l7_pods']})" if port.get("l7_pods") else "")
        for svc in services
        if svc.get("namespace") == "bench-mesh"
        for port in svc.get("ports", ())
        if port.get("port") == configs.HTTP_PORT
    }


def levels_in_force(
    paths: list[BenchPath], timeout: float = LEVEL_TIMEOUT
) -> tuple[dict[str, str], list[BenchPath]]:
    """The L7 level each meshed path's HTTP Service has on node-1 (the client's node), waiting
    up to `timeout` for the level paths to show theirs (the controller's first push may still
    be on its way). Returns {path: level shown} and the level paths whose level never showed,
    which must not be measured under their name."""
    deadline = time.monotonic() + timeout
    while True:
        shown = _levels_shown("node-1")
        levels = {
            p.name: shown.get(p.http[0].split(".")[0], "not shown")
            for p in paths
            if p.client == "bench-mesh/client"
        }
        wrong = [p for p in paths if p.level and levels[p.name] != p.level[1]]
        if not wrong or time.monotonic() > deadline:
            return levels, wrong
        time.sleep(0.5)
