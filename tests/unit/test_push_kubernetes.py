"""The controller in Kubernetes mode against the fake API server: agents authenticated by
TokenReview, the CA kept in a Secret, Nodes and Pods from list+watch, status for operators."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import yaml
from click.testing import CliRunner
from lightkube import AsyncClient, KubeConfig
from meshagent.agent.configclient import ControllerLink, controller_tls_context, serve_config_client
from meshagent.agent.state import SnapshotStore
from meshagent.controller import cli
from meshagent.controller.app import Controller, ControllerSettings
from meshagent.controller.push import TOKEN_AUDIENCE, TokenReviewAuthenticator
from meshagent.controller.signing import AuthenticationFailed
from meshagent.controller.sources.kubernetes import open_kube_client

from tests.fakes.kube_apiserver import ISTIO_GROUPS, FakeApiServer, open_fake_apiserver

TIMEOUT = 15
AGENTS = "meshagent-system/meshagent"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with open_fake_apiserver(missing_groups=ISTIO_GROUPS) as server:
        yield server


@asynccontextmanager
async def kube(api: FakeApiServer) -> AsyncIterator[AsyncClient]:
    async with open_kube_client(KubeConfig.from_dict(api.kubeconfig())) as client:
        yield client


async def until(predicate: Callable[[], object]) -> None:
    while not predicate():
        await trio.sleep(0.01)


@pytest.mark.parametrize(
    ("registered", "failure"),
    [
        ({"service_account": AGENTS, "audiences": ["kubernetes"], "node": "node-1"}, "audience"),
        (
            {"service_account": "shop/frontend", "audiences": [TOKEN_AUDIENCE], "node": "node-1"},
            "system:serviceaccount:shop:frontend",
        ),
        ({"service_account": AGENTS, "audiences": [TOKEN_AUDIENCE]}, "not bound to a pod"),
        (None, "invalid bearer token"),
    ],
    ids=["wrong-audience", "other-service-account", "no-node", "unknown"],
)
async def test_token_review_refuses_what_is_not_an_agent_token(api, registered, failure) -> None:
    if registered is not None:
        api.add_token("t", **registered)
    async with kube(api) as client:
        authenticator = TokenReviewAuthenticator(client, AGENTS)
        with pytest.raises(AuthenticationFailed, match=failure):
            await authenticator.authenticate("t")
    assert api.token_reviews == [{"token": "t", "audiences": [TOKEN_AUDIENCE]}]


async def test_token_review_names_the_node_the_agent_pod_runs_on(api) -> None:
    api.add_token("t", service_account=AGENTS, audiences=[TOKEN_AUDIENCE], node="node-2")
    async with kube(api) as client:
        assert await TokenReviewAuthenticator(client, AGENTS).authenticate("t") == "node-2"


def node(name: str, ip: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }


async def test_kubernetes_mode_serves_agents_from_the_cluster(api, tmp_path: Path) -> None:
    api.create(node("node-1", "192.0.2.11"))
    api.create(node("node-2", "192.0.2.12"))
    api.add_token("agent-1", service_account=AGENTS, audiences=[TOKEN_AUDIENCE], node="node-1")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(api.kubeconfig()))
    settings = ControllerSettings(
        listen_host="127.0.0.1",
        listen_port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        kubernetes=True,
        kubeconfig=kubeconfig,
        pod_name="meshctl-0",
        ca_secret="meshagent-ca",
        trust_bundle_out=tmp_path / "root.pem",
    )
    controller = Controller(settings)
    store, link = SnapshotStore("node-1", tmp_path / "state"), ControllerLink("test")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(controller.serve)
            port = controller.stream_sockets[0].socket.getsockname()[1]
            assert [s["metadata"]["name"] for s in api.objects("Secret")] == ["meshagent-ca"]
            assert (tmp_path / "root.pem").read_text() == controller.ca.trust_bundle_pem
            tls = controller_tls_context(tmp_path / "root.pem")
            nursery.start_soon(
                lambda: serve_config_client(store, "127.0.0.1", port, "agent-1", link, tls=tls)
            )
            await until(lambda: store.version)
            assert [(n.name, n.address) for n in store.tables.snapshot.nodes] == [
                ("node-1", "192.0.2.11"),
                ("node-2", "192.0.2.12"),
            ]
            status = json.loads(json.dumps(controller.status()))
            nursery.cancel_scope.cancel()
    assert status["source"]["type"] == "kubernetes" and status["source"]["complete"]
    assert status["source"]["kinds"]["Node"]["synced"]
    assert status["leader"]["leader"] and status["leader"]["holder"] == "meshctl-0"
    assert status["stream"]["tls"] is True
    assert [a["node"] for a in status["agents"]] == ["node-1"]


async def test_a_restarted_controller_keeps_the_ca_from_its_secret(api, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(api.kubeconfig()))
    settings = ControllerSettings(
        listen_host="127.0.0.1",
        listen_port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        kubernetes=True,
        kubeconfig=kubeconfig,
        pod_name="meshctl-0",
        ca_secret="meshagent-ca",
    )
    roots = []
    with trio.fail_after(TIMEOUT):
        for _ in range(2):
            controller = Controller(settings)
            async with trio.open_nursery() as nursery:
                await nursery.start(controller.serve)
                roots.append(controller.ca.trust_bundle_pem)
                nursery.cancel_scope.cancel()
    assert roots[0] == roots[1]


def test_settings_name_what_is_missing() -> None:
    problems = ControllerSettings(ca_secret="ca").problems()
    assert "--ca-secret needs --kubernetes (the Secret lives in the cluster)" in problems
    assert any("--node-tokens" in p for p in problems)
    assert ControllerSettings(kubernetes=True, ca_file=Path("x")).problems() == [
        "--kubernetes needs this replica's name for leader election (POD_NAME)"
    ]


def test_meshctl_status_shows_the_source_leadership_and_stream(monkeypatch) -> None:
    status = {
        "generation": 7,
        "source": {
            "type": "kubernetes",
            "complete": True,
            "kinds": {
                "Pod": {
                    "installed": True,
                    "connected": True,
                    "resource_version": "42",
                    "relists": 1,
                    "last_error": None,
                },
                "VirtualService": {
                    "installed": False,
                    "connected": False,
                    "resource_version": None,
                    "relists": 0,
                    "last_error": None,
                },
            },
        },
        "leader": {
            "lease": "meshagent-system/meshctl",
            "identity": "meshctl-b",
            "leader": False,
            "holder": "meshctl-a",
            "last_error": "",
        },
        "stream": {"tls": True, "auth_failures": 2, "last_auth_failure": "10.0.0.9:4000: bad"},
        "agents": [
            {
                "node": "node-1",
                "connected": True,
                "acked_version": "abc",
                "connected_for_s": 3.0,
                "last_nack": "",
                "csr_signed": 4,
                "csr_refused": 1,
                "last_csr_refusal": "spiffe://cluster.local/ns/shop/sa/x: not_on_node: ...",
            }
        ],
        "rejected": [],
    }

    async def fake_get(host, port, path):
        return 200, json.dumps(status).encode()

    monkeypatch.setattr(cli, "http_get", fake_get)
    output = CliRunner().invoke(cli.main, ["status"]).output
    assert "source: kubernetes (synced)" in output
    assert "Pod" in output and "watching at 42" in output
    assert "VirtualService" in output and "not installed" in output
    assert "meshctl-b is follower (leader: meshctl-a)" in output
    assert "agent stream: TLS, 2 authentication failures (last: 10.0.0.9:4000: bad)" in output
    assert "certs signed=4 refused=1" in output
    assert "last refusal: spiffe://cluster.local/ns/shop/sa/x: not_on_node" in output


@pytest.mark.parametrize(
    ("text", "seconds"), [("60s", 60), ("90", 90), ("24h", 86400), ("7d", 604800)]
)
def test_cert_lifetime_takes_durations(text, seconds) -> None:
    assert cli.Duration().convert(text, None, None).total_seconds() == seconds
