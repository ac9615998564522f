"""Issue #16 item 2 against a real control plane (lab/kubecontrol.py: etcd, kube-apiserver and
kube-controller-manager v1.36.2 on loopback, dual-stack Service ranges): what `meshctl serve
--kubernetes` compiles from EndpointSlices, seen by an agent stream (TLS checked against the
published mesh root, TokenReview with a pod-bound token), snapshot by snapshot:

- `kubernetes.default` (its EndpointSlice written by hand, as the lab does: the apiserver
  here runs with `--endpoint-reconciler-type=none`) reaches the API server's address on its
  secure port; the endpoint is no pod (`address:<ip>`, no node);
- a selector-less dual-stack Service with a hand-made IPv4 and IPv6 slice: both addresses;
- a Service with a selector and a named target port: kube-controller-manager makes its slice
  from the pods' status (written with the node's credential, as a kubelet does); each pod is
  one endpoint, named by its uid, on the port its container names;
- a graceful delete (the pod keeps `deletionTimestamp` until force-deleted: there is no
  kubelet): kube-controller-manager marks it terminating and the agent's next snapshot leaves
  it out; once every pod is terminating, the serving ones are endpoints again (kube-proxy's
  ProxyTerminatingEndpoints).

Needs root, the control-plane binaries (`scripts/install.sh`) and kubectl; under CI=true a
missing one fails instead of skipping. The apiserver listens on 127.0.0.1:16543 or the next
free port; everything lives in a temporary folder removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from meshagent.lab.kubecontrol import (
    ControlPlane,
)

from tests.e2e.conftest import BIN
from tests.e2e.kubetest import free_port, own_control_plane
from tests.e2e.test_kube_controlplane import (
    NAMESPACE_YAML,
    NODE,
    AgentStream,
    apply,
    as_user,
    get_json,
    kubectl,
    until,
)

NS = "meshagent-system"
APISERVER_ENDPOINT = "172.30.0.1"  # where pods reach the API server (the lab's underlay)
SNAPSHOT_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    with own_control_plane(
        "kube-endpoints", 16543, service_cidr="10.96.0.0/16,fd00:10:96::/112"
    ) as cp:
        yield cp


@contextlib.contextmanager
def controller(plane: ControlPlane) -> Iterator[tuple[subprocess.Popen, Path, int]]:
    """One `meshctl serve --kubernetes` replica (the admin's kubeconfig: RBAC is
    test_kube_controlplane's subject), killed at the end whatever happens."""
    stream, metrics = free_port(), free_port()
    log = plane.workdir / "meshctl.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [
                str(BIN / "meshctl"),
                *("serve", "--kubernetes", "--kubeconfig", str(plane.kubeconfig)),
                *("--ca-secret", "meshagent-ca"),
                *("--listen", f"127.0.0.1:{stream}", "--metrics", f"127.0.0.1:{metrics}"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "POD_NAME": "meshctl-e2e", "POD_NAMESPACE": NS},
            start_new_session=True,
        )
    try:
        yield proc, log, stream
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


class Snapshots:
    """The snapshots an agent stream receives, acknowledged as `meshagent run` does."""

    def __init__(self, stream: AgentStream) -> None:
        self.stream = stream
        self.count = 0
        self.last: dict | None = None

    def wait_for(self, predicate: Callable[[dict], bool], what: str) -> dict:
        deadline = time.monotonic() + SNAPSHOT_TIMEOUT
        while self.last is None or not predicate(self.last):
            if time.monotonic() > deadline:
                raise AssertionError(f"no snapshot with {what}; the last: {self.last}")
            try:
                snapshot = self.stream.next_snapshot()
            except TimeoutError:
                continue
            assert snapshot is not None, "the controller closed the stream"
            self.count += 1
            self.last = snapshot
        return self.last


def endpoints(snapshot: dict, namespace: str, name: str) -> list[tuple] | None:
    for svc in snapshot["services"]:
        if (svc["namespace"], svc["name"]) == (namespace, name):
            return sorted(
                (e["ip"], e["workload_uid"], e["node"], {int(k): v for k, v in e["ports"].items()})
                for e in svc["endpoints"]
            )
    return None


def vips(snapshot: dict, namespace: str, name: str) -> list[str]:
    return next(
        s["vips"] for s in snapshot["services"] if (s["namespace"], s["name"]) == (namespace, name)
    )


def pod_status(ip: str) -> dict:
    return {
        "status": {
            "phase": "Running",
            "hostIP": "172.30.0.11",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
            ],
        }
    }


def setup_cluster(plane: ControlPlane) -> None:
    apply(plane, NAMESPACE_YAML)
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
---
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{meshagent.io/mesh: enabled}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels: {{kubernetes.io/service-name: kubernetes, endpointslice.kubernetes.io/managed-by: e2e}}
addressType: IPv4
endpoints: [{{addresses: ["{APISERVER_ENDPOINT}"], conditions: {{ready: true}}}}]
ports: [{{name: https, port: {plane.secure_port}, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: shop}}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  ports: [{{name: tcp-pg, port: 5432, targetPort: 5432}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-v4
  namespace: shop
  labels: {{kubernetes.io/service-name: db, endpointslice.kubernetes.io/managed-by: e2e}}
addressType: IPv4
endpoints: [{{addresses: ["172.30.5.10"]}}]
ports: [{{name: tcp-pg, port: 5432, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-v6
  namespace: shop
  labels: {{kubernetes.io/service-name: db, endpointslice.kubernetes.io/managed-by: e2e}}
addressType: IPv6
endpoints: [{{addresses: ["fd00:30::5:10"]}}]
ports: [{{name: tcp-pg, port: 5432, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: shop}}
spec:
  selector: {{app: reviews}}
  ports: [{{name: http, port: 80, targetPort: web}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-1, namespace: shop, labels: {{app: reviews}}}}
spec:
  nodeName: node-1
  terminationGracePeriodSeconds: 300
  containers: [{{name: app, image: reviews, ports: [{{name: web, containerPort: 9080}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-2, namespace: shop, labels: {{app: reviews}}}}
spec:
  nodeName: node-1
  terminationGracePeriodSeconds: 300
  containers: [{{name: app, image: reviews, ports: [{{name: web, containerPort: 9081}}]}}]
""",
    )


def test_the_controller_compiles_endpoints_from_endpointslices(plane: ControlPlane) -> None:
    setup_cluster(plane)
    admin = plane.kubeconfig
    kubelet = plane.kubeconfig_for("system:node:node-1", groups=["system:nodes"])
    for name, ip in (("reviews-1", "10.244.1.5"), ("reviews-2", "10.244.1.6")):
        code, body = as_user(
            kubelet, "PATCH", f"/api/v1/namespaces/shop/pods/{name}/status", pod_status(ip)
        )
        assert code == 200, body
    uid = {
        name: get_json(plane, f"/api/v1/namespaces/shop/pods/{name}")["metadata"]["uid"]
        for name in ("reviews-1", "reviews-2")
    }
    api_port = plane.secure_port

    with controller(plane) as (proc, log, stream_port):

        def published_root() -> str | None:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            status, body = plane.get(f"/api/v1/namespaces/{NS}/configmaps/meshagent-root")
            return json.loads(body)["data"]["root.pem"] if status == 200 else None

        root = until(published_root, "the controller to publish the mesh root", timeout=30)
        agent_token = kubectl(
            admin,
            *("create", "token", "meshagent", "-n", NS, "--audience=meshagent-controller"),
            *("--bound-object-kind=Pod", "--bound-object-name=meshagent-node-1"),
        ).stdout.strip()
        agent = AgentStream(stream_port, root, agent_token, "node-1")
        try:
            snapshots = Snapshots(agent)
            both = sorted(
                [
                    ("10.244.1.5", uid["reviews-1"], "node-1", {80: 9080}),
                    ("10.244.1.6", uid["reviews-2"], "node-1", {80: 9081}),
                ]
            )
            snap = snapshots.wait_for(
                lambda s: endpoints(s, "shop", "reviews") == both,
                "both reviews pods, each on its named port",
            )
            # kubernetes.default: the API server's address, 443 -> its secure port; no pod
            assert vips(snap, "default", "kubernetes") == ["10.96.0.1"]
            assert endpoints(snap, "default", "kubernetes") == [
                (APISERVER_ENDPOINT, f"address:{APISERVER_ENDPOINT}", "", {443: api_port})
            ]
            # the selector-less dual-stack Service: both hand-made slices
            assert len(vips(snap, "shop", "db")) == 2
            assert endpoints(snap, "shop", "db") == sorted(
                [
                    ("172.30.5.10", "address:172.30.5.10", "", {5432: 5432}),
                    ("fd00:30::5:10", "address:fd00:30::5:10", "", {5432: 5432}),
                ]
            )

            # A graceful delete: kube-controller-manager marks reviews-1 terminating (no
            # kubelet here finishes the delete) and the next snapshot leaves it out.
            deleted_at = time.monotonic()
            kubectl(admin, "delete", "pod", "-n", "shop", "reviews-1", "--wait=false")
            snapshots.wait_for(
                lambda s: endpoints(s, "shop", "reviews") == [both[1]],
                "reviews-1 out once terminating",
            )
            print(
                f"terminating pod left the agent's endpoints {time.monotonic() - deleted_at:.2f}s"
            )

            def conditions() -> dict:
                return {
                    e["targetRef"]["name"]: e["conditions"]
                    for eps in get_json(
                        plane,
                        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
                        "?labelSelector=kubernetes.io%2Fservice-name%3Dreviews",
                    )["items"]
                    for e in eps.get("endpoints") or []
                }

            # what kube-controller-manager wrote, read until it has written it (it writes
            # the slice on its own schedule)
            terminating = {"ready": False, "serving": True, "terminating": True}
            until(
                lambda: conditions().get("reviews-1") == terminating,
                "kube-controller-manager's slice shows reviews-1 terminating",
                timeout=SNAPSHOT_TIMEOUT,
            )

            # Every pod terminating: the serving ones take connections again.
            kubectl(admin, "delete", "pod", "-n", "shop", "reviews-2", "--wait=false")
            snapshots.wait_for(
                lambda s: endpoints(s, "shop", "reviews") == both,
                "both terminating pods back, as serving",
            )
            # A hand-made slice removed: the Service has no endpoint of that family any more.
            kubectl(admin, "delete", "endpointslice", "-n", "shop", "db-v6")
            snapshots.wait_for(
                lambda s: (
                    endpoints(s, "shop", "db")
                    == [("172.30.5.10", "address:172.30.5.10", "", {5432: 5432})]
                ),
                "db's IPv6 endpoint gone",
            )
            print(f"{snapshots.count} snapshots received")
        finally:
            agent.close()
            for name in ("reviews-1", "reviews-2"):
                kubectl(
                    admin,
                    *("delete", "pod", "-n", "shop", name, "--grace-period=0", "--force"),
                    check=False,
                )
        output = log.read_text(errors="replace")
        assert "Traceback" not in output, output[-3000:]
