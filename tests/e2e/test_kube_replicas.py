"""Two `meshctl serve --kubernetes` replicas on a real kube-apiserver both serve agents.

Four agents' config clients (the real `serve_config_client`, TLS against the published mesh
root, pod-bound tokens checked by TokenReview) are given both replicas' addresses; each starts
at the replica its node name hashes to, so two land on each. Each replica, leader or not,
signs its agents' CSRs with the CA from the shared Secret. An AuthorizationPolicy created
with kubectl reaches all four. Then the replica two of them use is killed (SIGKILL, no
goodbye): those two move to the other replica, and a policy created after the kill reaches
every agent. Setup as tests/e2e/test_kube_controlplane.py (the RBAC of daemonset/).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
from cryptography import x509
from meshagent.agent.configclient import (
    ControllerLink,
    controller_tls_context,
    replica_order,
    serve_config_client,
)
from meshagent.agent.identity import build_csr, new_key
from meshagent.agent.identity.controller_signer import ControllerSigner
from meshagent.agent.state import SnapshotStore
from meshagent.common.spiffe import Identity
from meshagent.lab.kubecontrol import ControlPlane

from tests.e2e.kubetest import own_control_plane
from tests.e2e.test_kube_controlplane import (
    CRDS,
    NAMESPACE_YAML,
    NS,
    RBAC,
    apply,
    controller_status,
    get_json,
    kubectl,
    lease_holder,
    replicas,
)

NODES = ("node-1", "node-2", "node-3", "node-5")  # two hash to each of two replicas
CONVERGE = 30.0  # seconds for a change to reach every agent (generous: 2 shared cores)


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    with own_control_plane("kube-replicas", 16543) as cp:
        yield cp


def policy(name: str) -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/frontend]}}}}]}}]
"""


def setup_cluster(plane: ControlPlane) -> Path:
    """Namespace, RBAC, CRDs, the nodes with an agent pod each and a meshed namespace; returns
    the kubeconfig of the `meshctl` service account."""
    admin = plane.kubeconfig
    apply(plane, NAMESPACE_YAML)
    apply(plane, RBAC)
    kubectl(admin, "apply", "--server-side", "--validate=false", "-k", str(CRDS))
    kubectl(admin, "wait", "--for=condition=established", "crd", "--all", "--timeout=30s")
    docs = [
        f"apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: meshagent, namespace: {NS}}}",
        "apiVersion: v1\nkind: Namespace\n"
        "metadata: {name: shop, labels: {meshagent.io/mesh: enabled}}",
    ]
    for node in NODES:
        docs.append(f"apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}")
        docs.append(
            f"""apiVersion: v1
kind: Pod
metadata: {{name: meshagent-{node}, namespace: {NS}}}
spec:
  nodeName: {node}
  serviceAccountName: meshagent
  containers: [{{name: agent, image: meshagent}}]"""
        )
    apply(plane, "\n---\n".join(docs))
    token = kubectl(admin, "create", "token", "meshctl", "-n", NS, "--duration=1h").stdout.strip()
    return plane.kubeconfig_for(f"system:serviceaccount:{NS}:meshctl", token=token)


def agent_token(plane: ControlPlane, node: str) -> str:
    return kubectl(
        plane.kubeconfig,
        *("create", "token", "meshagent", "-n", NS, "--audience=meshagent-controller"),
        *("--bound-object-kind=Pod", f"--bound-object-name=meshagent-{node}"),
    ).stdout.strip()


def policies(store: SnapshotStore) -> set[str]:
    if store.tables is None:
        return set()
    return {
        r["metadata"]["name"]
        for r in store.tables.snapshot.istio_resources
        if r.get("kind") == "AuthorizationPolicy"
    }


async def until(predicate: Callable[[], object], what: str, timeout: float) -> None:
    with trio.move_on_after(timeout):
        while not await trio.to_thread.run_sync(predicate):
            await trio.sleep(0.2)
        return
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def connected_nodes(replica) -> set[str]:
    status = controller_status(replica)
    return {a["node"] for a in (status or {}).get("agents", []) if a["connected"]}


def test_agents_spread_over_two_replicas_and_move_on_when_one_dies(
    plane: ControlPlane, tmp_path: Path
) -> None:
    kubeconfig = setup_cluster(plane)
    with replicas(plane, kubeconfig, ["meshctl-a", "meshctl-b"]) as running:
        a, b = running["meshctl-a"], running["meshctl-b"]

        def serving() -> bool:
            states = [controller_status(r) for r in (a, b)]
            return all(s is not None and s["source"]["complete"] for s in states)

        async def scenario() -> None:
            await until(serving, "both replicas serving", 60)
            root = get_json(plane, f"/api/v1/namespaces/{NS}/configmaps/meshagent-root")
            (tmp_path / "root.pem").write_text(root["data"]["root.pem"])
            tls = controller_tls_context(tmp_path / "root.pem")
            addresses = [("127.0.0.1", a.stream_port), ("127.0.0.1", b.stream_port)]
            home = {
                node: {a.stream_port: a, b.stream_port: b}[replica_order(addresses, node)[0][1]]
                for node in NODES
            }
            assert {r.name for r in home.values()} == {"meshctl-a", "meshctl-b"}
            stores = {node: SnapshotStore(node, tmp_path / node) for node in NODES}
            links = {node: ControllerLink("") for node in NODES}
            signers = {node: ControllerSigner() for node in NODES}
            (host, port), *more = addresses
            async with trio.open_nursery() as nursery:
                for node in NODES:
                    token = await trio.to_thread.run_sync(agent_token, plane, node)
                    follow = partial(serve_config_client, tls=tls, more=more, signer=signers[node])
                    nursery.start_soon(follow, stores[node], host, port, token, links[node])

                def spread() -> bool:
                    return all(node in connected_nodes(home[node]) for node in NODES)

                await until(spread, "each agent on the replica its node hashes to", CONVERGE)

                # Every replica signs (the agent pods' identity, scheduled on every node).
                issuer = x509.load_pem_x509_certificate(root["data"]["root.pem"].encode())
                agent_identity = Identity("cluster.local", NS, "meshagent")
                for node in NODES:
                    with trio.fail_after(CONVERGE):
                        csr = build_csr(new_key(), agent_identity)
                        chain = await signers[node].sign(csr, agent_identity)
                    chain.leaf().verify_directly_issued_by(issuer)
                for r in (a, b):  # two agents each: two certificates each
                    ca = (await trio.to_thread.run_sync(controller_status, r))["ca"]
                    assert ca["signed"] == 2, (r.name, ca)

                def everywhere(name: str) -> Callable[[], bool]:
                    return lambda: all(name in policies(s) for s in stores.values())

                await trio.to_thread.run_sync(apply, plane, policy("first"))
                await until(everywhere("first"), "the first policy on every agent", CONVERGE)

                # Kill the leader (a): its agents move to b and converge on a later change.
                assert lease_holder(plane) in ("meshctl-a", "meshctl-b")
                a.proc.send_signal(signal.SIGKILL)
                a.proc.wait(timeout=10)
                moved = [node for node in NODES if home[node] is a]
                await until(
                    lambda: all(node in connected_nodes(b) for node in NODES),
                    "every agent on meshctl-b",
                    CONVERGE,
                )
                assert all(links[n].address == f"127.0.0.1:{b.stream_port}" for n in moved)
                await trio.to_thread.run_sync(apply, plane, policy("second"))
                await until(everywhere("second"), "the second policy on every agent", CONVERGE)
                versions = {s.version for s in stores.values()}
                status = controller_status(b)
                nursery.cancel_scope.cancel()
            assert status is not None
            agents = {x["node"]: x for x in status["agents"]}
            for node in NODES:
                assert agents[node]["acked_version"] == stores[node].version, agents[node]
            print(f"moved {moved} from meshctl-a; agents at {len(versions)} node versions")

        trio.run(scenario)
    assert "Traceback" not in b.output(), b.output()[-3000:]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s", "-q"]))
