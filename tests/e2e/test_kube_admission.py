"""Admission and the debug endpoints on a real control plane (lab/kubecontrol.py: etcd,
kube-apiserver and kube-controller-manager v1.36.2 on loopback), the controller running as
its own service account with daemonset/'s RBAC, CRDs and ValidatingWebhookConfiguration:

- the controller patches the configuration's caBundle itself (its CA); `kubectl apply` of an
  AuthorizationPolicy with an unknown field then fails naming `spec.foo`, a valid one is
  accepted;
- with the configuration deleted, an invalid DENY gets in: the controller fails closed, its
  snapshot (seen on an agent stream authenticated by TokenReview) carries a deny-all for the
  workloads the DENY selects, which the agents' evaluator enforces; `/status` and the metric
  `meshagent_controller_unenforceable_policies` say so;
- from another network namespace (a pod's view), 15014 serves /metrics but refuses /status and
  /debug/config without a token (401) and with an application's token (403), and serves them
  to the agents' token (TokenReview).

The API server reaches the webhook at ``clientConfig.url: https://127.0.0.1:<port>/validate``
(there is no Service routing here); a cluster uses the Service reference of
daemonset/base/webhook.yaml. Needs root and the control-plane binaries, like
test_kube_controlplane.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from meshagent.common import authz
from meshagent.common.istio import parse_resource
from meshagent.lab.kubecontrol import ControlPlane

from tests.e2e.conftest import BIN
from tests.e2e.kubetest import free_port, own_control_plane
from tests.e2e.test_kube_controlplane import (
    CRDS,
    NAMESPACE_YAML,
    NODE,
    RBAC,
    AgentStream,
    apply,
    as_user,
    get_json,
    kubectl,
    until,
)

REPO = Path(__file__).resolve().parents[2]
WEBHOOK_YAML = REPO / "daemonset" / "base" / "webhook.yaml"
NS = "meshagent-system"
SECURE_PORT = 16643
# A veth pair between this namespace and a test one, on a private link-local /30.
HOST_IP, POD_IP = "169.254.231.1", "169.254.231.2"


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    with own_control_plane("kube-admission", 16643) as cp:
        yield cp


APP = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {meshagent.io/mesh: enabled}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: frontend, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-1, namespace: shop, labels: {app: reviews}}
spec:
  nodeName: node-1
  containers: [{name: app, image: reviews}]
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-1, namespace: shop, labels: {app: ratings}}
spec:
  nodeName: node-1
  containers: [{name: app, image: ratings}]
"""

AGENT = f"""
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
"""


def policy(name: str, spec: dict) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": spec,
        }
    )


UNKNOWN_FIELD = policy("typo", {"action": "ALLOW", "rules": [{}], "foo": "bar"})
VALID = policy(
    "allow-frontend",
    {
        "selector": {"matchLabels": {"app": "ratings"}},
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}],
    },
)
# Telemetry (issue #22): a metric name Istio does not have is refused naming the field.
BAD_TELEMETRY = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: trim, namespace: shop}
spec:
  metrics:
    - overrides:
        - match: {metric: REQUEST_COUNTS}
          tagOverrides: {request_protocol: {operation: REMOVE}}
"""
# A DENY on /admin* for reviews with `pathz` for `paths`: refused by the controller.
BROKEN_DENY = policy(
    "deny-admin",
    {
        "selector": {"matchLabels": {"app": "reviews"}},
        "action": "DENY",
        "rules": [{"to": [{"operation": {"pathz": ["/admin*"]}}]}],
    },
)


def kubectl_apply(plane: ControlPlane, manifest: str) -> subprocess.CompletedProcess:
    return kubectl(
        plane.kubeconfig,
        *("apply", "--server-side", "--validate=false", "-f", "-"),
        stdin=manifest,
        check=False,
    )


def webhook_configuration(port: int) -> str:
    """daemonset's configuration, pointed at the controller's address instead of the
    Service (no Service routing here)."""
    config = yaml.safe_load(WEBHOOK_YAML.read_text())
    for webhook in config["webhooks"]:
        webhook["clientConfig"] = {"url": f"https://127.0.0.1:{port}/validate"}
    return yaml.safe_dump(config)


@contextlib.contextmanager
def controller(plane: ControlPlane, kubeconfig: Path, ports: dict[str, int]) -> Iterator[Path]:
    log = plane.workdir / "meshctl-admission.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [
                str(BIN / "meshctl"),
                *("serve", "--kubernetes", "--kubeconfig", str(kubeconfig)),
                *("--ca-secret", "meshagent-ca", "--server-name", "127.0.0.1"),
                *("--listen", f"127.0.0.1:{ports['stream']}"),
                *("--metrics", f"0.0.0.0:{ports['metrics']}"),
                *("--webhook", f"127.0.0.1:{ports['webhook']}"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "POD_NAME": "meshctl-adm", "POD_NAMESPACE": NS},
            start_new_session=True,
        )
    try:
        yield log
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def local_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def local_status(port: int) -> dict | None:
    code, body = local_get(port, "/status")
    return json.loads(body) if code == 200 else None


@contextlib.contextmanager
def other_netns() -> Iterator[str]:
    """A network namespace joined to this one by a veth pair only (a pod's position)."""
    name = f"mhadm{os.getpid() % 100000}"
    host_if, ns_if = f"{name}h", f"{name}p"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=10)  # noqa: E731
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)
    try:
        run("ip", "netns", "add", name)
        run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        run("ip", "link", "set", ns_if, "netns", name)
        run("ip", "addr", "add", f"{HOST_IP}/30", "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        run("ip", "-n", name, "addr", "add", f"{POD_IP}/30", "dev", ns_if)
        run("ip", "-n", name, "link", "set", ns_if, "up")
        run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def curl_from(netns: str, url: str, token: str | None = None) -> tuple[int, str]:
    argv = ["ip", "netns", "exec", netns, "curl", "-s", "-m", "5", "-w", "\n%{http_code}", url]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=15).stdout
    body, _, code = out.rpartition("\n")
    return int(code or 0), body


def decide(snapshot: dict, app: str) -> authz.Decision:
    policies = [
        parse_resource(r) for r in snapshot["istio_resources"] if r["kind"] == "AuthorizationPolicy"
    ]
    request = authz.Request(
        source_principal="cluster.local/ns/shop/sa/frontend",
        source_namespace="shop",
        source_ip="10.244.1.9",
        destination_ip="10.244.1.5",
        destination_port=9080,
    )
    return authz.PolicySet(policies).evaluate(authz.Workload("shop", {"app": app}), request)


def test_admission_fail_closed_and_debug_endpoints(plane: ControlPlane) -> None:
    admin = plane.kubeconfig
    apply(plane, NAMESPACE_YAML)
    apply(plane, RBAC)
    kubectl(admin, "apply", "--server-side", "--validate=false", "-k", str(CRDS))
    kubectl(admin, "wait", "--for=condition=established", "crd", "--all", "--timeout=30s")
    apply(plane, NODE)
    apply(plane, APP)
    apply(plane, AGENT)
    kubelet = plane.kubeconfig_for("system:node:node-1", groups=["system:nodes"])
    for i, name in enumerate(["reviews-1", "ratings-1"], start=5):
        status = {"status": {"phase": "Running", "podIP": f"10.244.1.{i}"}}
        code, body = as_user(
            kubelet, "PATCH", f"/api/v1/namespaces/shop/pods/{name}/status", status
        )
        assert code == 200, body

    token = kubectl(admin, "create", "token", "meshctl", "-n", NS, "--duration=1h").stdout.strip()
    kubeconfig = plane.kubeconfig_for(f"system:serviceaccount:{NS}:meshctl", token=token)
    ports = {"stream": free_port(), "metrics": free_port(), "webhook": free_port()}
    apply(plane, webhook_configuration(ports["webhook"]))

    with controller(plane, kubeconfig, ports) as log:
        until(
            lambda: (s := local_status(ports["metrics"])) is not None and s["source"]["complete"],
            "the controller serving with a synced source",
            timeout=30,
        )
        # The controller puts its CA in the configuration (RBAC: get/patch on its name).
        path = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
        until(
            lambda: get_json(plane, f"{path}/meshagent-validation")["webhooks"][0][
                "clientConfig"
            ].get("caBundle"),
            "the controller to set the caBundle",
            timeout=20,
        )

        refused = until(
            lambda: (
                (p := kubectl_apply(plane, UNKNOWN_FIELD)).returncode != 0
                and "denied the request" in p.stderr
                and p
            ),
            "kubectl apply of the invalid policy to be refused by the webhook",
            timeout=20,
            interval=0.5,
        )
        print(refused.stderr.strip())
        assert 'admission webhook "validation.meshagent.io" denied the request' in refused.stderr
        assert "spec.foo: field is not supported by meshagent" in refused.stderr
        got = kubectl(admin, "get", "authorizationpolicies", "-n", "shop", "-o", "name").stdout
        assert "typo" not in got

        accepted = kubectl_apply(plane, VALID)
        assert accepted.returncode == 0, accepted.stderr
        telemetry = kubectl_apply(plane, BAD_TELEMETRY)
        assert telemetry.returncode != 0, telemetry.stdout
        assert "denied the request" in telemetry.stderr, telemetry.stderr
        assert "spec.metrics[0].overrides[0].match.metric" in telemetry.stderr, telemetry.stderr
        fixed = kubectl_apply(plane, BAD_TELEMETRY.replace("REQUEST_COUNTS", "REQUEST_COUNT"))
        assert fixed.returncode == 0, fixed.stderr

        # The webhook off: an invalid DENY gets in, and fails closed.
        kubectl(admin, "delete", "validatingwebhookconfiguration", "meshagent-validation")
        stored = kubectl_apply(plane, BROKEN_DENY)
        assert stored.returncode == 0, stored.stderr

        agent_token = kubectl(
            admin,
            *("create", "token", "meshagent", "-n", NS, "--audience=meshagent-controller"),
            *("--bound-object-kind=Pod", "--bound-object-name=meshagent-node-1"),
        ).stdout.strip()
        root = get_json(plane, f"/api/v1/namespaces/{NS}/configmaps/meshagent-root")["data"][
            "root.pem"
        ]
        agent = AgentStream(ports["stream"], root, agent_token, "node-1")
        try:
            deadline = time.monotonic() + 20
            snapshot = None
            while time.monotonic() < deadline:
                received = agent.next_snapshot()
                assert received is not None, log.read_text()[-2000:]
                names = {r["metadata"]["name"] for r in received["istio_resources"]}
                if "deny-admin.unenforceable" in names:
                    snapshot = received
                    break
            assert snapshot is not None, "no snapshot with the fail-closed policy"
        finally:
            agent.close()
        names = {r["metadata"]["name"] for r in snapshot["istio_resources"]}
        assert names == {"allow-frontend", "deny-admin.unenforceable"}
        denied = decide(snapshot, "reviews")
        assert not denied.allowed and denied.policy == "shop/deny-admin.unenforceable"
        assert decide(
            snapshot, "ratings"
        ).allowed  # its ALLOW admits shop; the DENY does not select it

        status = local_status(ports["metrics"])
        (entry,) = status["unenforceable"]
        assert entry["resource"] == "AuthorizationPolicy shop/deny-admin"
        assert entry["workloads"] == ["shop/reviews-1"]
        assert entry["reason"].startswith("spec.rules[0].to[0].operation.pathz: ")
        assert any(
            r["resource"] == "AuthorizationPolicy shop/deny-admin" for r in status["rejected"]
        )
        meshctl = subprocess.run(
            [str(BIN / "meshctl"), "status", "--controller", f"127.0.0.1:{ports['metrics']}"],
            capture_output=True,
            text=True,
            timeout=20,
            env={k: v for k, v in os.environ.items() if k != "MESHAGENT_CONFIG"},
        )
        assert meshctl.returncode == 0, meshctl.stderr
        assert "UNENFORCEABLE DENY POLICIES" in meshctl.stdout
        assert "now denies: shop/reviews-1" in meshctl.stdout
        _code, metrics = local_get(ports["metrics"], "/metrics")
        assert (
            b'meshagent_controller_unenforceable_policies{name="deny-admin",namespace="shop"} 1.0'
            in metrics
        )

        # From another network namespace: metrics yes, configuration only to the mesh's own.
        app_token = kubectl(
            admin, "create", "token", "frontend", "-n", "shop", "--audience=meshagent-controller"
        ).stdout.strip()
        base = f"http://{HOST_IP}:{ports['metrics']}"
        with other_netns() as netns:
            code, body = curl_from(netns, f"{base}/metrics")
            assert code == 200 and "meshagent_controller_unenforceable_policies" in body
            for route in ("/debug/config", "/status"):
                code, body = curl_from(netns, base + route)
                assert code == 401, body
                assert "reviews" not in body and "deny-admin" not in body
                code, body = curl_from(netns, base + route, app_token)
                assert code == 403, body
                assert "reviews" not in body
            code, body = curl_from(netns, f"{base}/debug/config", agent_token)
            assert code == 200 and "deny-admin.unenforceable" in body

        output = log.read_text()
        assert "Traceback" not in output, output[-3000:]
        assert "set the caBundle of ValidatingWebhookConfiguration meshagent-validation" in output
        assert "cannot be enforced as written" in output
