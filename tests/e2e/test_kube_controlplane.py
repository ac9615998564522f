"""A real Kubernetes control plane (lab/kubecontrol.py: etcd, kube-apiserver and
kube-controller-manager v1.36.2 on loopback) with kubectl, and the controller against it.

- kubectl reaches it; a Namespace, Service, Node and Pod created with kubectl are served;
- kube-controller-manager makes the Service's EndpointSlice once the Pod's status (podIP,
  Ready), written with the node's own credential as a kubelet does, says it is ready;
- two `meshctl serve --kubernetes` replicas run as the `meshctl` service account with the
  RBAC of daemonset/base/controller-rbac.yaml (a token from the TokenRequest API), an agent
  stream authenticates by TokenReview with a pod-bound token; SIGTERM to the leader: the
  follower holds the Lease within 3 s, the agent is told goodbye, the old leader exits 0;
  no traceback and no per-request HTTP lines in either replica's default-level log;
- Lease times written on a whole second keep six fractional digits (the server refuses less).

Needs root (like every e2e test), the binaries `scripts/install.sh` provides and kubectl;
under CI=true a missing one fails instead of skipping.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from lightkube import ApiError, KubeConfig
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from meshagent.common import snapshotdelta
from meshagent.controller import leader as leader_module
from meshagent.controller.leader import LeaderElector
from meshagent.controller.sources.kubernetes import open_kube_client
from meshagent.lab.kubecontrol import (
    ControlPlane,
)

from tests.e2e.conftest import BIN
from tests.e2e.kubetest import free_port, own_control_plane

REPO = Path(__file__).resolve().parents[2]
RBAC = REPO / "daemonset" / "base" / "controller-rbac.yaml"
NAMESPACE_YAML = REPO / "daemonset" / "base" / "namespace.yaml"
CRDS = REPO / "daemonset" / "crds"
NS = "meshagent-system"
TAKEOVER_LIMIT = 3.0  # seconds from SIGTERM to the follower holding the Lease
EXIT_LIMIT = 15.0  # the controller's grace (10 s) plus margin
KUBECTL_TIMEOUT = 30


def _without_timestamps(log: str) -> str:
    """A log without its lines' leading `YYYY-MM-DD HH:MM:SS,mmm` (whose digits are no status)."""
    return re.sub(r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "", log)


def until(predicate: Callable[[], Any], what: str, timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    started = time.monotonic()
    # 16443 on: clear of the lab's 15012/15014 and a host's 6443
    with own_control_plane("kube-e2e", 16443) as cp:
        print(f"control plane ready in {time.monotonic() - started:.1f}s at {cp.url}")
        yield cp


def kubectl(
    kubeconfig: Path, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "--request-timeout=20s", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def apply(plane: ControlPlane, manifest: str | Path) -> None:
    """Server-side apply without client-side validation: Debian's kubectl 1.32 cannot read
    this server's OpenAPI (`failed to download openapi`); the server still validates."""
    if isinstance(manifest, Path):
        kubectl(plane.kubeconfig, "apply", "--server-side", "--validate=false", "-f", str(manifest))
    else:
        kubectl(
            plane.kubeconfig,
            "apply",
            "--server-side",
            "--validate=false",
            "-f",
            "-",
            stdin=manifest,
        )


def as_user(kubeconfig: Path, method: str, path: str, merge_patch: dict) -> tuple[int, str]:
    """One merge-patch request with the client certificate of ``kubeconfig``, as a kubelet
    sends it (no GET first: a node may patch its pods' status, not read it by that path)."""
    config = yaml.safe_load(kubeconfig.read_text())
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    context = ssl.create_default_context(cafile=cluster["certificate-authority"])
    context.load_cert_chain(user["client-certificate"], user["client-key"])
    host, port = cluster["server"].removeprefix("https://").rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
    try:
        headers = {"Content-Type": "application/merge-patch+json"}
        conn.request(method, path, json.dumps(merge_patch), headers)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def get_json(plane: ControlPlane, path: str) -> dict:
    status, body = plane.get(path)
    assert status == 200, f"GET {path}: HTTP {status}: {body[:300]!r}"
    return json.loads(body)


NODE = """
apiVersion: v1
kind: Node
metadata:
  name: node-1
  labels: {kubernetes.io/hostname: node-1, kubernetes.io/os: linux}
"""


def test_kubectl_reaches_the_apiserver(plane: ControlPlane) -> None:
    assert kubectl(plane.kubeconfig, "get", "--raw", "/readyz").stdout.strip() == "ok"
    version = json.loads(kubectl(plane.kubeconfig, "get", "--raw", "/version").stdout)
    assert version["gitVersion"].startswith("v1.36.2")


def test_controller_manager_makes_endpointslices_from_pod_status(plane: ControlPlane) -> None:
    apply(plane, NODE)
    apply(
        plane,
        """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {meshagent.io/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: 9080}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-1, namespace: shop, labels: {app: reviews}}
spec:
  nodeName: node-1
  containers: [{name: app, image: reviews, ports: [{containerPort: 9080}]}]
""",
    )
    assert kubectl(plane.kubeconfig, "get", "namespace", "shop", "-o", "name").stdout.strip() == (
        "namespace/shop"
    )
    service = json.loads(
        kubectl(plane.kubeconfig, "get", "-n", "shop", "svc/reviews", "-o", "json").stdout
    )
    assert service["spec"]["clusterIP"].startswith("10.96.")

    # The node's own credential writes the status, as its kubelet would (Node authorizer).
    kubelet = plane.kubeconfig_for("system:node:node-1", groups=["system:nodes"])
    status = {
        "status": {
            "phase": "Running",
            "hostIP": "172.30.0.11",
            "podIP": "10.244.1.5",
            "podIPs": [{"ip": "10.244.1.5"}],
            "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
            ],
        }
    }
    started = time.monotonic()
    code, body = as_user(kubelet, "PATCH", "/api/v1/namespaces/shop/pods/reviews-1/status", status)
    assert code == 200, body

    def ready_endpoint() -> dict | None:
        slices = get_json(
            plane,
            "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
            "?labelSelector=kubernetes.io%2Fservice-name%3Dreviews",
        )["items"]
        for eps in slices:
            for endpoint in eps.get("endpoints") or []:
                if endpoint["addresses"] == ["10.244.1.5"] and endpoint["conditions"].get("ready"):
                    return {**endpoint, "ports": eps.get("ports")}
        return None

    endpoint = until(ready_endpoint, "the EndpointSlice with the ready pod", timeout=30)
    print(f"EndpointSlice ready {time.monotonic() - started:.1f}s after the pod status")
    assert endpoint["nodeName"] == "node-1"
    assert endpoint["targetRef"]["name"] == "reviews-1"
    assert endpoint["ports"] == [{"name": "http", "port": 9080, "protocol": "TCP"}]


class _OnTheSecond(datetime):
    """A clock reading whole seconds (once in a million calls, on a real clock)."""

    @classmethod
    def now(cls, tz=None):  # type: ignore[override]
        return datetime(2026, 1, 2, 3, 4, 5, tzinfo=tz or UTC)


def test_lease_times_are_accepted_even_on_a_whole_second(plane: ControlPlane, monkeypatch) -> None:
    """The real server refuses a MicroTime without six fractional digits; ours always has."""
    whole = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    monkeypatch.setattr(leader_module, "datetime", _OnTheSecond)

    async def campaign() -> tuple[str, bool, str]:
        async with open_kube_client(KubeConfig.from_file(plane.kubeconfig)) as client:
            raw = Lease(
                metadata=ObjectMeta(name="raw", namespace="default"),
                spec=LeaseSpec(holderIdentity="x", renewTime=whole),
            )
            try:
                await client.create(raw)
                refused = ""
            except ApiError as exc:
                refused = str(exc)
            elector = LeaderElector(
                client, "default", "e2e", lease_duration=1, renew_deadline=0.6, retry_period=0.1
            )
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    await nursery.start(elector.serve)
                    await trio.sleep(0.3)  # renewals
                    leading = elector.is_leader
                    nursery.cancel_scope.cancel()
            return refused, leading, elector.last_error

    refused, leading, error = trio.run(campaign)
    assert '"2006-01-02T15:04:05.000000Z07:00"' in refused  # the server's own rule
    assert leading and not error, error
    lease = get_json(plane, "/apis/coordination.k8s.io/v1/namespaces/default/leases/meshctl")
    assert lease["spec"]["renewTime"] == "2026-01-02T03:04:05.000001Z"


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen
    log: Path
    stream_port: int
    metrics_port: int

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def replicas(plane: ControlPlane, kubeconfig: Path, names: list[str]) -> Iterator[dict]:
    """`meshctl serve --kubernetes` per name, as the Deployment runs it (CA in the Secret
    `meshagent-ca`, POD_NAME, POD_NAMESPACE), each on its own loopback ports; all killed at
    the end whatever happens."""
    out: dict[str, Replica] = {}
    try:
        for name in names:
            stream, metrics = free_port(), free_port()
            log = plane.workdir / f"{name}.log"
            with open(log, "wb") as f:
                proc = subprocess.Popen(
                    [
                        str(BIN / "meshctl"),
                        *("serve", "--kubernetes", "--kubeconfig", str(kubeconfig)),
                        *("--ca-secret", "meshagent-ca"),
                        *("--listen", f"127.0.0.1:{stream}", "--metrics", f"127.0.0.1:{metrics}"),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "POD_NAME": name, "POD_NAMESPACE": NS},
                    start_new_session=True,
                )
            out[name] = Replica(name, proc, log, stream, metrics)
        yield out
    finally:
        for replica in out.values():
            if replica.proc.poll() is None:
                replica.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                replica.proc.wait(timeout=5)


def controller_status(replica: Replica) -> dict | None:
    try:
        with socket.create_connection(("127.0.0.1", replica.metrics_port), timeout=2) as s:
            s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return json.loads(body) if head.startswith(b"HTTP/1.1 200") else None


def lease_holder(plane: ControlPlane) -> str | None:
    status, body = plane.get(f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/meshctl")
    return json.loads(body)["spec"].get("holderIdentity") if status == 200 else None


class AgentStream:
    """One agent's stream as `meshagent run` opens it: TLS to the controller checked against
    the published mesh root, then the hello with its pod-bound token."""

    def __init__(self, port: int, root_pem: str, token: str, node: str) -> None:
        context = ssl.create_default_context(cadata=root_pem)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")
        hello = {"type": "hello", "node": node, "token": token, "version": ""}
        self.sock.sendall(json.dumps(hello).encode() + b"\n")
        self.held: dict | None = None  # the last snapshot, whole

    def receive(self) -> dict | None:
        line = self.file.readline()
        return json.loads(line) if line else None

    def next_snapshot(self) -> dict | None:
        """The next snapshot the controller pushes, whole (a delta is applied to the last one,
        as the agent does) and ACKed, so the controller sends the next; None at the end of the
        stream. Other messages are passed over. Raises TimeoutError as `receive` does."""
        while (message := self.receive()) is not None:
            if message["type"] == "snapshot":
                self.held = message["snapshot"]
            elif message["type"] == "delta":
                assert self.held is not None and self.held["version"] == message["base"], message
                self.held = {
                    **snapshotdelta.apply(self.held, message["changes"]),
                    "version": message["version"],
                }
            else:
                continue
            ack = {"type": "ack", "version": message["version"]}
            self.sock.sendall(json.dumps(ack).encode() + b"\n")
            return self.held
        return None

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_two_replicas_hand_the_lease_over_on_sigterm(plane: ControlPlane) -> None:
    admin = plane.kubeconfig
    apply(plane, NAMESPACE_YAML)
    apply(plane, RBAC)
    # The Istio CRDs, so the replicas list and watch every kind they read (RBAC included).
    kubectl(admin, "apply", "--server-side", "--validate=false", "-k", str(CRDS))
    kubectl(admin, "wait", "--for=condition=established", "crd", "--all", "--timeout=30s")
    apply(plane, NODE)
    apply(
        plane,
        f"""
apiVersion: v1
kind: ServiceAccount
metadata: {{name: meshagent, namespace: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: meshagent-node-1, namespace: {NS}}}
spec:
  nodeName: node-1
  serviceAccountName: meshagent
  containers: [{{name: agent, image: meshagent}}]
""",
    )
    # The controller's own account and RBAC, as in the Deployment: a token of its own.
    token = kubectl(admin, "create", "token", "meshctl", "-n", NS, "--duration=1h").stdout.strip()
    kubeconfig = plane.kubeconfig_for(f"system:serviceaccount:{NS}:meshctl", token=token)
    who = kubectl(kubeconfig, "auth", "whoami", "-o", "json").stdout
    assert (
        json.loads(who)["status"]["userInfo"]["username"] == f"system:serviceaccount:{NS}:meshctl"
    )

    with replicas(plane, kubeconfig, ["meshctl-a"]) as first:
        a = first["meshctl-a"]
        until(lambda: lease_holder(plane) == "meshctl-a", "meshctl-a to lead", timeout=30)
        root = until(
            lambda: (
                (s := controller_status(a)) is not None
                and s["source"]["complete"]
                and get_json(plane, f"/api/v1/namespaces/{NS}/configmaps/meshagent-root")
            ),
            "meshctl-a serving and the mesh root published",
            timeout=30,
        )["data"]["root.pem"]
        with replicas(plane, kubeconfig, ["meshctl-b"]) as second:
            b = second["meshctl-b"]
            until(
                lambda: (s := controller_status(b)) is not None and s["source"]["complete"],
                "meshctl-b serving as a follower",
                timeout=30,
            )
            assert lease_holder(plane) == "meshctl-a"
            assert controller_status(b)["leader"]["holder"] == "meshctl-a"

            # An agent of node-1, authenticated by TokenReview with a pod-bound token.
            agent_token = kubectl(
                admin,
                *("create", "token", "meshagent", "-n", NS, "--audience=meshagent-controller"),
                *("--bound-object-kind=Pod", "--bound-object-name=meshagent-node-1"),
            ).stdout.strip()
            agent = AgentStream(a.stream_port, root, agent_token, "node-1")
            try:
                first_message = agent.receive()
                assert first_message is not None, a.output()[-2000:]
                assert first_message["type"] == "snapshot", first_message
                assert first_message["snapshot"]["node"] == "node-1"

                sigterm_at = time.monotonic()
                a.proc.send_signal(signal.SIGTERM)
                until(
                    lambda: lease_holder(plane) == "meshctl-b",
                    "meshctl-b to hold the Lease",
                    timeout=TAKEOVER_LIMIT + 5,
                    interval=0.05,
                )
                takeover = time.monotonic() - sigterm_at
                goodbye = agent.receive()
            finally:
                agent.close()
            code = a.proc.wait(timeout=EXIT_LIMIT)
            exited = time.monotonic() - sigterm_at
            print(f"follower led {takeover:.2f}s after SIGTERM, the leader exited {exited:.2f}s")
            assert takeover < TAKEOVER_LIMIT, f"takeover took {takeover:.2f}s"
            assert code == 0, a.output()[-3000:]
            assert goodbye == {"type": "goodbye", "reason": "controller meshctl-a is shutting down"}
            until(lambda: controller_status(b)["leader"]["leader"], "meshctl-b to say it leads", 5)

            # SIGINT (Ctrl-C) ends the other one the same way.
            b.proc.send_signal(signal.SIGINT)
            assert b.proc.wait(timeout=EXIT_LIMIT) == 0, b.output()[-3000:]
            assert lease_holder(plane) == ""

    for replica in (a, b):
        log = replica.output()
        assert "Traceback" not in log, log[-3000:]
        assert "HTTP Request:" not in log, "per-request lines at the default level"
        # RBAC suffices: no 403 from the API (as a status, not inside a timestamp's milliseconds)
        assert not re.search(r"\b403\b(?![,.]\d)", _without_timestamps(log)), log[-3000:]
        assert "forbidden" not in log.lower(), log[-3000:]
        assert "shutting down" in log
    assert "released the lead" in a.output()
    assert "became the leader" in b.output()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s", "-q"]))
