"""Issue #16 item 1: the lab runs on a real control plane (kube-apiserver, etcd,
kube-controller-manager; lab/kubelet.py runs the Pods).

- `kubectl get pods -A -o wide` with `meshlab kubeconfig` lists the lab's pods Running and
  Ready with their IPs;
- a Pod created with `kubectl apply` (no node named: the lab's scheduler binds it) starts
  and is meshed (its node's redirect counter moves for its curl); one whose nodeSelector no
  node has stays Pending with kube-scheduler's `PodScheduled=False`/`Unschedulable` condition;
- a meshed pod reaches https://kubernetes.default.svc/version through the mesh (the lab's
  EndpointSlice for the `kubernetes` Service points at the apiserver);
- a pod deleted with a 10 s grace period whose server keeps serving meanwhile: no new
  request through its Service reaches it after the delete, its open connection completes,
  and it is gone once the grace period is over.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from meshagent.lab import lab as lablib
from meshagent.lab.paths import KUBE_DIR, LOG_DIR, NETNS_DIR, NETNS_PREFIX, POD_NET_OCTET

from tests.e2e.conftest import EXAMPLES, meshlab
from tests.waiting import wait_until

APPS = Path(__file__).resolve().parent / "apps"
GRACE = 10
GRACEFUL = f"""
apiVersion: v1
kind: Pod
metadata: {{name: drain-1, namespace: shop, labels: {{app: drain}}}}
spec:
  nodeName: node-2
  terminationGracePeriodSeconds: {GRACE}
  containers:
    - name: s
      image: python
      command: [/usr/bin/python3, {APPS}/graceful_server.py, "8080"]
      readinessProbe: {{tcpSocket: {{port: 8080}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: drain-2, namespace: shop, labels: {{app: drain}}}}
spec:
  nodeName: node-2
  terminationGracePeriodSeconds: {GRACE}
  containers:
    - name: s
      image: python
      command: [/usr/bin/python3, {APPS}/graceful_server.py, "8080"]
      readinessProbe: {{tcpSocket: {{port: 8080}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: drain, namespace: shop}}
spec:
  selector: {{app: drain}}
  ports: [{{name: tcp-web, port: 8080, targetPort: 8080}}]
"""
KUBECTL_POD = """
apiVersion: v1
kind: Pod
metadata: {name: kubectl-made, namespace: shop, labels: {app: kubectl-made}}
spec:
  serviceAccountName: frontend
  containers:
    - name: c
      image: debian
      command: [sleep, infinity]
"""

UNFIT_POD = """
apiVersion: v1
kind: Pod
metadata: {name: nowhere, namespace: shop}
spec:
  nodeSelector: {disktype: ssd}
  containers:
    - name: c
      image: debian
      command: [sleep, infinity]
"""


@pytest.fixture(scope="module")
def kube_lab(lab_factory):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (Debian: kubernetes-client)")
    return lab_factory(EXAMPLES / "demo.yaml", nodes=2)


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> str:
    config = meshlab("kubeconfig").stdout.strip()
    proc = subprocess.run(
        ["kubectl", "--kubeconfig", config, "--request-timeout=20s", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def kubectl_apply(manifest: str) -> None:
    # Debian's kubectl 1.32 cannot read this server's OpenAPI for client-side validation
    kubectl("apply", "--server-side", "--validate=false", "-f", "-", stdin=manifest)


def pod_json(namespace: str, name: str) -> dict | None:
    out = kubectl("get", "pod", "-n", namespace, name, "-o", "json", check=False)
    return json.loads(out) if out.strip() else None


def test_kubectl_lists_the_labs_pods_running_and_ready_with_their_ips(kube_lab):
    assert meshlab("kubeconfig").stdout.strip() == str(KUBE_DIR / "host.kubeconfig")
    rows = {}
    for line in kubectl("get", "pods", "-A", "-o", "wide", "--no-headers").splitlines():
        namespace, name, ready, status, _restarts, _age, ip, node, *_ = line.split()
        rows[f"{namespace}/{name}"] = (ready, status, ip, node)
    expected = {
        "shop/reviews-v1": ("node-2", f"10.{POD_NET_OCTET}.2.10"),  # file order, as before
        "shop/frontend": ("node-1", f"10.{POD_NET_OCTET}.1.10"),
        "shop/batch": ("node-1", f"10.{POD_NET_OCTET}.1.11"),
        "legacy/client": ("node-1", f"10.{POD_NET_OCTET}.1.12"),
        "shop/intruder": ("node-2", f"10.{POD_NET_OCTET}.2.11"),
    }
    for key, (node, ip) in expected.items():
        assert rows[key] == ("1/1", "Running", ip, node), (key, rows)
    # both families in the status, as kube-controller-manager's EndpointSlices need them
    reviews = pod_json("shop", "reviews-v1")
    assert [p["ip"] for p in reviews["status"]["podIPs"]] == [
        f"10.{POD_NET_OCTET}.2.10",
        f"fd00:10:{POD_NET_OCTET}:2::a",
    ]
    nodes = json.loads(kubectl("get", "nodes", "-o", "json"))["items"]
    assert {n["metadata"]["name"] for n in nodes} == {"node-1", "node-2"}
    # the agents are the DaemonSet's pods, on their nodes' addresses
    assert rows["meshagent-system/meshagent-node-1"][:3] == ("1/1", "Running", "172.30.0.11")


def test_a_pod_made_with_kubectl_starts_and_is_meshed(kube_lab):
    kubectl_apply(KUBECTL_POD)
    try:
        kubectl("wait", "-n", "shop", "pod/kubectl-made", "--for=condition=Ready", "--timeout=30s")
        node = pod_json("shop", "kubectl-made")["spec"]["nodeName"]
        assert node in ("node-1", "node-2")  # bound by the lab's scheduler

        def meshed_curl() -> bool:
            before = kube_lab.counters(node)["redirected"]
            code, _ = kube_lab.curl("shop/kubectl-made", "http://reviews.shop:9080/")
            return code == "200" and kube_lab.counters(node)["redirected"] == before + 1

        wait_until(meshed_curl, what=f"kubectl-made's curl is redirected by {node}'s datapath")
    finally:
        kubectl("delete", "-n", "shop", "pod/kubectl-made", "--grace-period=1", check=False)
    assert pod_json("shop", "kubectl-made") is None


def test_a_pod_no_node_fits_stays_pending_and_says_why(kube_lab):
    kubectl_apply(UNFIT_POD)
    try:
        kubectl(
            "wait", "-n", "shop", "pod/nowhere", "--for=condition=PodScheduled=False",
            "--timeout=30s",
        )  # fmt: skip
        pod = pod_json("shop", "nowhere")
        assert pod["status"]["phase"] == "Pending"
        assert not pod["spec"].get("nodeName")
        (condition,) = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
        assert condition["reason"] == "Unschedulable"
        assert "0/2 nodes are available" in condition["message"], condition
        assert "nodeSelector" in condition["message"], condition
    finally:
        kubectl("delete", "-n", "shop", "pod/nowhere", "--grace-period=1", check=False)


def test_a_meshed_pod_reaches_the_apiserver_through_the_mesh(kube_lab):
    before = kube_lab.counters("node-1")["redirected"]
    code, body = kube_lab.curl(
        "shop/frontend",
        "https://kubernetes.default.svc/version",
        "--cacert",
        str(KUBE_DIR / "pki" / "ca.crt"),
    )
    assert code == "200", body
    assert json.loads(body)["gitVersion"].startswith("v1.36")
    assert kube_lab.counters("node-1")["redirected"] == before + 1


HANDMADE = """
apiVersion: v1
kind: Service
metadata: {name: handmade, namespace: shop}
spec:
  ports: [{name: http, port: 8088, targetPort: 9080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: handmade-1
  namespace: shop
  labels: {kubernetes.io/service-name: handmade}
addressType: IPv4
ports: [{name: http, port: 9080, protocol: TCP}]
endpoints:
  - addresses: ["@IP@"]
    conditions: {ready: true}
"""


def test_a_selector_less_service_with_a_hand_made_endpointslice_is_reached_through_the_mesh(
    kube_lab,
):
    reviews_ip = pod_json("shop", "reviews-v1")["status"]["podIP"]
    kubectl_apply(HANDMADE.replace("@IP@", reviews_ip))
    try:
        vip = kubectl(
            "get", "service", "-n", "shop", "handmade", "-o", "jsonpath={.spec.clusterIP}"
        )
        wait_until(
            lambda: kube_lab.endpoints("node-1", "shop", "handmade"),
            lambda ips: ips == {reviews_ip},
            what="node-1 holds the hand-made slice's endpoint",
        )
        before = kube_lab.counters("node-1")["redirected"]
        code, body = kube_lab.curl("shop/frontend", f"http://{vip}:8088/")
        assert code == "200", body
        assert kube_lab.counters("node-1")["redirected"] == before + 1
    finally:
        kubectl("delete", "-n", "shop", "service/handmade", "endpointslice/handmade-1", check=False)


def _answered_by(kube_lab, url: str) -> str:
    code, body = kube_lab.curl("shop/frontend", url)
    assert code == "200", (url, code, body)
    return body.strip()


def test_a_deleted_pod_gets_no_new_requests_and_finishes_its_open_one(kube_lab, tmp_path):
    manifest = tmp_path / "drain.yaml"
    manifest.write_text(GRACEFUL)
    meshlab("apply", "-f", str(manifest))
    try:
        url = "http://drain.shop:8080/"
        wait_until(
            lambda: {_answered_by(kube_lab, url) for _ in range(12)},
            lambda answered: answered == {"drain-1", "drain-2"},
            what="both drain pods answer through the Service",
        )
        drain_1 = pod_json("shop", "drain-1")["status"]["podIP"]
        log = LOG_DIR / "pod-shop-drain-1.log"
        # an open connection to drain-1, through the mesh: it answers after 5 s
        slow = subprocess.Popen(
            [
                str(lablib.BIN_DIR / "meshlab"),
                *("exec", "shop/frontend", "--", "curl", "-s", "--max-time", "20"),
                f"http://{drain_1}:8080/slow?seconds=5",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: "slow request started" in log.read_text(), what="the slow request")
        deleted = time.monotonic()
        kubectl("delete", "-n", "shop", "pod/drain-1", f"--grace-period={GRACE}", "--wait=false")
        # the mesh learns it (the kubelet marks it not Ready, the EndpointSlice terminating):
        # frontend's node holds drain's endpoints without drain-1 (a new snapshot alone may be
        # the pod's own change, before its EndpointSlice's)
        wait_until(
            lambda: kube_lab.endpoints("node-1", "shop", "drain"),
            lambda ips: ips and drain_1 not in ips,
            what="node-1's snapshot drops drain-1 from drain's endpoints",
        )
        answered = [_answered_by(kube_lab, url) for _ in range(20)]
        assert set(answered) == {"drain-2"}, answered
        assert "SIGTERM: serving on" in log.read_text()  # it was still running meanwhile
        out, _ = slow.communicate(timeout=30)
        assert slow.returncode == 0 and out.strip() == "drain-1", out
        assert time.monotonic() - deleted < GRACE
        # gone once the grace period is over (SIGKILL: the server ignores SIGTERM)
        wait_until(
            lambda: pod_json("shop", "drain-1") is None,
            what="drain-1 removed after its grace period",
            timeout=GRACE + 10,
        )
        assert time.monotonic() - deleted >= GRACE - 1
        assert not (NETNS_DIR / f"{NETNS_PREFIX}pod-shop-drain-1").exists()  # its network too
    finally:
        meshlab("delete", "-f", str(manifest), check=False, timeout=60)
