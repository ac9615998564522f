"""Issues #3 and #4, the controller's side in the lab: agents on the authenticated stream with
their acked versions, a malformed resource reported everywhere while the valid one beside it
reaches agents, and a node refused a certificate for another node's pod."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from pathlib import Path

import yaml
from cryptography import x509
from meshagent.agent.identity import build_csr, new_key
from meshagent.common.netns import entered
from meshagent.common.spiffe import Identity, identity_from_certificate
from meshagent.lab.lab import ROOT_FILE, node_token_path
from meshagent.lab.paths import LOG_DIR, NETNS_DIR, NETNS_PREFIX, RUN_DIR
from meshagent.lab.topology import CONTROLLER_METRICS_PORT, CONTROLLER_PORT, UNDERLAY_BRIDGE_IP

from tests.e2e.conftest import BIN, meshlab
from tests.waiting import wait_until

DEADLINE = 5.0
WEIGHT_PATH = "spec.http[0].route[0].weight"
FRONTEND = Identity("cluster.local", "shop", "frontend")  # runs on node-1
REVIEWS = Identity("cluster.local", "shop", "reviews")  # runs on node-2 only


def _controller_status() -> dict:
    proc = meshlab("exec", "--node", "node-1", "--", "meshctl", "status", "--json")
    return json.loads(proc.stdout)


def _saved_snapshot(node: str) -> dict:
    return json.loads((RUN_DIR / node / "state" / "snapshot.json").read_text())


def _until(predicate, what: str, deadline: float = DEADLINE):
    return wait_until(predicate, what=what, timeout=deadline)


def _controller_log() -> str:
    return (LOG_DIR / "controller.log").read_text()


def _virtual_service(name: str, weight: object) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "hosts": ["reviews"],
            "http": [{"route": [{"destination": {"host": "reviews"}, "weight": weight}]}],
        },
    }


def test_status_lists_both_agents_connected_with_the_versions_they_hold(demo_lab):
    def converged() -> dict | None:
        status = _controller_status()
        agents = {a["node"]: a for a in status["agents"]}
        held = {n: _saved_snapshot(n)["version"] for n in ("node-1", "node-2")}
        acked = {n: a["acked_version"] for n, a in agents.items() if a["connected"]}
        return status if acked == held else None

    status = _until(converged, "both agents connected with their versions acked")
    assert status["source"]["type"] == "kubernetes"  # the lab's kube-apiserver
    assert status["stream"]["tls"] is True
    assert {a["node"] for a in status["agents"]} == {"node-1", "node-2"}
    assert all(a["tls"] for a in status["agents"])
    text = meshlab("exec", "--node", "node-1", "--", "meshctl", "status").stdout
    assert "node-1" in text and "node-2" in text and "connected" in text
    # CA state: the lab's self-made root, and the workload certificates it signed
    ca = status["ca"]
    assert ca["root"] is True and ca["signed"] >= 2  # frontend on node-1, reviews on node-2
    assert "CA: " in text and "root" in text


def test_a_malformed_virtual_service_is_reported_and_the_valid_one_reaches_agents(
    demo_lab, tmp_path: Path
):
    manifest = tmp_path / "routes.yaml"
    manifest.write_text(
        # 150 passes the CRD's schema (the API server stores it), not the controller's check
        yaml.safe_dump_all(
            [_virtual_service("reviews-ok", 100), _virtual_service("reviews-bad", 150)]
        )
    )
    meshlab("apply", "-f", str(manifest))
    try:

        def accepted() -> set[str]:
            resources = _saved_snapshot("node-1")["istio_resources"]
            return {r["metadata"]["name"] for r in resources if r["kind"] == "VirtualService"}

        assert _until(accepted, "the valid VirtualService in node-1's snapshot") == {"reviews-ok"}

        validate = subprocess.run(
            [str(BIN / "meshctl"), "validate", "-f", str(manifest)], capture_output=True, text=True
        )
        assert validate.returncode == 1
        assert "ok VirtualService shop/reviews-ok" in validate.stdout
        assert "shop/reviews-bad" in validate.stdout and WEIGHT_PATH in validate.stdout

        rejected = {r["resource"]: r for r in _controller_status()["rejected"]}
        assert rejected["VirtualService shop/reviews-bad"]["path"] == WEIGHT_PATH
        text = meshlab("exec", "--node", "node-1", "--", "meshctl", "status").stdout
        assert "VirtualService shop/reviews-bad" in text and f"{WEIGHT_PATH}:" in text

        wait_until(
            lambda: [line for line in _controller_log().splitlines() if "shop/reviews-bad" in line],
            lambda lines: any(WEIGHT_PATH in line for line in lines),
            what=f"the controller logs shop/reviews-bad with {WEIGHT_PATH}",
        )
    finally:
        meshlab("delete", "-f", str(manifest))


def _ask_controller(identities: list[Identity]) -> dict[str, dict]:
    """Ask for certificates as node-1's agent would (its token, from inside its network
    namespace); returns the controller's answer per identity URI."""
    token = node_token_path("node-1").read_text().strip()
    with entered(str(NETNS_DIR / f"{NETNS_PREFIX}node-1")):
        raw = socket.create_connection((UNDERLAY_BRIDGE_IP, CONTROLLER_PORT), timeout=10)
    context = ssl.create_default_context(cafile=str(ROOT_FILE))
    with (
        context.wrap_socket(raw, server_hostname=UNDERLAY_BRIDGE_IP) as tls,
        tls.makefile("rwb") as stream,
    ):

        def send(message: dict) -> None:
            stream.write(json.dumps(message).encode() + b"\n")
            stream.flush()

        send({"type": "hello", "node": "node-1", "token": token, "version": ""})
        for request_id, identity in enumerate(identities, 1):
            csr = build_csr(new_key(), identity).decode()
            send({"type": "csr", "id": request_id, "identity": identity.uri, "csr": csr})
        answers: dict[str, dict] = {}
        while len(answers) < len(identities):
            message = json.loads(stream.readline())
            assert message["type"] != "error", message
            if message["type"] in ("certificate", "csr_refused"):
                answers[identities[message["id"] - 1].uri] = message
        # While this stream is the node's newest, status shows its signing counts.
        session = wait_until(
            lambda: next(a for a in _controller_status()["agents"] if a["node"] == "node-1"),
            lambda s: s["csr_signed"] >= 1 and s["csr_refused"] >= 1,
            what="the controller's status counts this stream's signed and refused CSRs",
        )
        assert (session["csr_signed"], session["csr_refused"]) == (1, 1)
        assert REVIEWS.uri in session["last_csr_refusal"]
    return answers


def _refusals_counted() -> float:
    proc = meshlab(
        "exec",
        "--node",
        "node-1",
        "--",
        "curl",
        "-s",
        f"http://{UNDERLAY_BRIDGE_IP}:{CONTROLLER_METRICS_PORT}/metrics",
    )
    for line in proc.stdout.splitlines():
        if line.startswith('meshagent_controller_csr_refused_total{reason="not_on_node"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_node_is_refused_certificates_for_another_nodes_pods(demo_lab):
    before = _refusals_counted()
    answers = _ask_controller([FRONTEND, REVIEWS])

    signed = answers[FRONTEND.uri]
    assert signed["type"] == "certificate"
    leaf = x509.load_pem_x509_certificate(signed["chain"][0].encode())
    root = x509.load_pem_x509_certificate(ROOT_FILE.read_bytes())
    leaf.verify_directly_issued_by(root)
    assert identity_from_certificate(leaf) == FRONTEND

    refused = answers[REVIEWS.uri]
    assert refused["type"] == "csr_refused"
    assert "not_on_node" in refused["reason"] and "node-1" in refused["reason"]
    refusals = wait_until(
        _refusals_counted,
        lambda counted: counted >= before + 1,
        what=f"the controller counts the not_on_node refusal (before: {before:g})",
    )
    assert refusals == before + 1
    wait_until(
        lambda: (
            f"refused certificate {REVIEWS.uri} to node node-1: not_on_node" in _controller_log()
        ),
        what="the controller logs the refusal",
    )
