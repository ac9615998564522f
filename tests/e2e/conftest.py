"""End-to-end tests: the real kernel, real eBPF, the lab, unmodified curl and servers.

They drive the lab through its CLI, as a user would. They need root; under CI
(CI=true) a missing prerequisite fails the run instead of skipping it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshagent.lab.paths import LOG_DIR

from tests.waiting import wait_until

BIN = Path(sys.executable).parent
EXAMPLES = Path(__file__).resolve().parents[2] / "lab" / "examples"
# The programs a node's datapath attaches (names as the kernel truncates them, 15 characters).
DATAPATH_PROGRAMS = frozenset(
    {
        "mesh_connect4",
        "mesh_connect6",
        "mesh_peername4",
        "mesh_peername6",
        "mesh_sockops",
        "mesh_ingress",
    }
)
APPS = Path(__file__).resolve().parent / "apps"  # the small servers and clients pods run


def render_manifest(source: Path, folder: Path, **placeholders: str | Path) -> Path:
    """`source` written into `folder` with @APPS@ (and each @KEY@ of `placeholders`) filled
    in: manifests name the test apps by absolute path."""
    text = source.read_text().replace("@APPS@", str(APPS))
    for key, value in placeholders.items():
        text = text.replace(f"@{key}@", str(value))
    out = folder / source.name
    out.write_text(text)
    return out


def _require_root() -> None:
    if os.geteuid() != 0:
        message = "e2e tests need root (eBPF, network namespaces, cgroups)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def meshlab(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "meshlab"), *args], capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"meshlab {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


class Lab:
    """A running lab, seen through `meshlab exec` and `meshagent status`."""

    def curl(self, pod: str, url: str, *extra: str, timeout: float = 5) -> tuple[str, str]:
        """(HTTP status code or '000', body) of one curl in a pod."""
        proc = meshlab(
            "exec",
            pod,
            "--",
            "curl",
            "-s",
            "--max-time",
            str(timeout),
            "-w",
            "\n%{http_code}",
            *extra,
            url,
            check=False,
        )
        body, _, code = proc.stdout.rpartition("\n")
        return code.strip(), body

    def status(self, node: str) -> dict:
        proc = meshlab("exec", "--node", node, "--", "meshagent", "status", "--json")
        return json.loads(proc.stdout)

    def counters(self, node: str) -> dict:
        return self.status(node)["datapath"]["counters"]

    def wait_answer(
        self, pod: str, url: str, *extra: str, code: str = "200", what: str, timeout: float = 30
    ) -> str:
        """curl ``url`` from ``pod`` until it answers ``code``; returns the body. A failure shows
        the last answer's body (the mesh's reason) and what each node's agent says."""
        try:
            answer = wait_until(
                lambda: self.curl(pod, url, *extra),
                lambda answer: answer[0] == code,
                what=what,
                timeout=timeout,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.mesh_report()}") from None
        return answer[1]

    def mesh_report(self) -> str:
        """Each node's agent as a failed wait needs it: pods and their certificates, services
        and their endpoints, the end of its log."""
        lines = []
        for log in sorted(LOG_DIR.glob("agent-*.log")):
            node = log.stem.removeprefix("agent-")
            try:
                view = self.status(node)
            except (AssertionError, ValueError) as exc:
                view = None
                lines.append(f"{node}: no status: {exc}")
            if view:
                agent = view["agent"]
                lines.append(
                    f"{node}: ready={agent.get('ready')} phase={agent.get('phase')} "
                    f"snapshot={agent.get('snapshot_version')} workers={agent.get('workers')}"
                )
                for pod in view.get("pods") or []:
                    cert = (pod.get("certificate") or {}).get("state")
                    lines.append(
                        f"  pod {pod['namespace']}/{pod['name']} {pod['ip']} "
                        f"{pod.get('in_force')} certificate={cert}"
                    )
                for service in view.get("services") or []:
                    ips = [e["ip"] for e in service.get("endpoints") or []]
                    lines.append(f"  service {service['namespace']}/{service['name']} {ips}")
            lines += [f"  | {line}" for line in log.read_text(errors="replace").splitlines()[-40:]]
        return "\n".join(lines)

    def endpoints(self, node: str, namespace: str, service: str) -> set[str]:
        """The endpoint IPs of Service `namespace/service` in `node`'s snapshot in force, as
        `meshagent status --services` lists them."""
        return {
            e["ip"]
            for s in self.status(node)["services"]
            if (s["namespace"], s["name"]) == (namespace, service)
            for e in s["endpoints"]
        }


@contextlib.contextmanager
def lab_env(name: str, value: str) -> Iterator[None]:
    """`meshlab` commands run inside see ``name=value`` (lab.agent_config reads
    MESHLAB_PROXY_WORKERS and MESHLAB_AGENT_SETTINGS when it starts an agent)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def proxy_workers(count: int) -> contextlib.AbstractContextManager[None]:
    """Labs brought up inside run ``count`` proxy processes per node (default: one per core)."""
    return lab_env("MESHLAB_PROXY_WORKERS", str(count))


@pytest.fixture(scope="module")
def lab_factory() -> Iterator:
    """Bring a lab up from manifests; always take it down at the end of the module."""
    _require_root()
    meshlab("down", check=False)

    def up(*files: Path, nodes: int = 2) -> Lab:
        args = ["up", "--nodes", str(nodes)]
        for f in files:
            args += ["-f", str(f)]
        meshlab(*args)
        return Lab()

    try:
        yield up
    finally:
        meshlab("down", check=False)


@pytest.fixture(scope="module")
def demo_lab(lab_factory) -> Lab:
    return lab_factory(EXAMPLES / "demo.yaml", nodes=2)
