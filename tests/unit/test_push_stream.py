"""The agent stream end to end on loopback: the real controller push server, the real config
client and `ControllerSigner`, real TLS and node tokens, a model changed in place."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cryptography import x509
from meshagent.agent.configclient import (
    ControllerLink,
    controller_tls_context,
    serve_config_client,
)
from meshagent.agent.identity import build_csr, new_key
from meshagent.agent.identity.controller_signer import (
    ControllerSigner,
    SigningRefusedByController,
)
from meshagent.agent.state import SnapshotStore
from meshagent.common.configwire import MessageStream
from meshagent.common.spiffe import Identity, identity_from_certificate
from meshagent.controller.ca import CertificateAuthority
from meshagent.controller.model import ClusterModel
from meshagent.controller.push import (
    AUTH_FAILURES,
    PushServer,
    StreamCertificate,
    TokenFileAuthenticator,
    controller_identity,
)
from meshagent.controller.signing import CSR_REFUSED, NodeTokenAuthenticator

from tests.certs import TestCA

TIMEOUT = 10


def pod(name: str, node: str, sa: str, phase: str = "Running", **labels: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": sa},
        "status": {"phase": phase, "podIP": f"10.1.{node[-1]}.{len(name)}"},
    }


@dataclass
class Controller:
    model: ClusterModel
    server: PushServer
    port: int
    ca: CertificateAuthority
    root: Path  # the trust bundle, as the lab writes it for agents
    tokens: dict[str, str]  # node -> its bootstrap token


@asynccontextmanager
async def running_controller(
    tmp_path: Path, *, names: tuple[str, ...] = ("127.0.0.1",)
) -> AsyncIterator[Controller]:
    ca_file = tmp_path / "ca" / "ca.pem"
    ca = CertificateAuthority.load_or_create(ca_file)
    root = tmp_path / "ca" / "root.pem"
    root.write_text(ca.trust_bundle_pem)
    token_file = tmp_path / "node-tokens.json"
    issuer = NodeTokenAuthenticator(token_file)
    tokens = {node: issuer.issue(node) for node in ("node-1", "node-2")}
    model = ClusterModel()
    model.replace(
        "Pod", [pod("frontend", "node-1", "frontend"), pod("reviews", "node-2", "reviews")]
    )
    identity = controller_identity("cluster.local", "meshagent-system")
    certificate = StreamCertificate(ca_file.read_bytes(), identity, names)
    server = PushServer(
        model, authenticator=TokenFileAuthenticator(token_file), ca=ca, tls=certificate.context
    )
    async with trio.open_nursery() as nursery:
        sockets = await nursery.start(server.serve, "127.0.0.1", 0)
        port = sockets[0].socket.getsockname()[1]
        yield Controller(model, server, port, ca, root, tokens)
        nursery.cancel_scope.cancel()


@dataclass
class Agent:
    store: SnapshotStore
    link: ControllerLink
    signer: ControllerSigner


@asynccontextmanager
async def running_agent(
    tmp_path: Path, controller: Controller, node: str, *, token: str | None = None, root=None
) -> AsyncIterator[Agent]:
    agent = Agent(SnapshotStore(node, tmp_path / node), ControllerLink("test"), ControllerSigner())
    tls = controller_tls_context(root or controller.root)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_config_client(
                agent.store,
                "127.0.0.1",
                controller.port,
                controller.tokens[node] if token is None else token,
                agent.link,
                tls=tls,
                signer=agent.signer,
                task_status=task_status,
            )
        )
        yield agent
        nursery.cancel_scope.cancel()


async def until(predicate: Callable[[], object], what: str) -> None:
    with trio.move_on_after(TIMEOUT):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


def counter(metric, **labels: str) -> float:
    return metric.labels(**labels)._value.get()


async def sign(agent: Agent, identity: Identity) -> x509.Certificate:
    key = new_key()
    with trio.fail_after(TIMEOUT):
        chain = await agent.signer.sign(build_csr(key, identity), identity)
    return chain.leaf()


FRONTEND = Identity("cluster.local", "shop", "frontend")
REVIEWS = Identity("cluster.local", "shop", "reviews")


async def test_agent_gets_its_snapshot_over_tls_and_the_session_is_its_authenticated_node(
    tmp_path,
):
    async with (
        running_controller(tmp_path) as controller,
        running_agent(tmp_path, controller, "node-1") as agent,
    ):
        await until(lambda: agent.store.version, "a snapshot")
        session = controller.server.sessions["node-1"]
        await until(lambda: session.acked_version == agent.store.version, "the ACK")
        assert agent.link.connected and agent.link.tls and session.tls
        snapshot = agent.store.tables.snapshot
        assert snapshot.node == "node-1"
        assert snapshot.trust_bundle == controller.ca.trust_bundle_pem


async def test_a_model_change_is_pushed_and_acked(tmp_path):
    async with (
        running_controller(tmp_path) as controller,
        running_agent(tmp_path, controller, "node-1") as agent,
    ):
        await until(lambda: agent.store.version, "a snapshot")
        first = agent.store.version
        controller.model.upsert("Pod", pod("frontend", "node-1", "frontend", tier="web"))
        await until(lambda: agent.store.version != first, "the new snapshot")
        session = controller.server.sessions["node-1"]
        await until(lambda: session.acked_version == agent.store.version, "its ACK")


async def test_a_bad_token_is_refused_with_a_reason_and_counted(tmp_path):
    before = counter(AUTH_FAILURES, reason="invalid_token")
    async with (
        running_controller(tmp_path) as controller,
        running_agent(tmp_path, controller, "node-1", token="not-a-token") as agent,
    ):
        await until(lambda: "refused by the controller" in agent.link.last_error, "refusal")
        assert "authentication failed" in agent.link.last_error
        assert agent.store.version == ""
        assert "node-1" not in controller.server.sessions
        assert counter(AUTH_FAILURES, reason="invalid_token") == before + 1
        assert controller.server.status()["auth_failures"] == 1


async def test_a_hello_claiming_another_node_is_refused(tmp_path):
    before = counter(AUTH_FAILURES, reason="node_mismatch")
    async with running_controller(tmp_path) as controller:
        token = controller.tokens["node-1"]
        async with running_agent(tmp_path, controller, "node-2", token=token) as agent:
            await until(lambda: agent.link.last_error, "refusal")
            assert "node-1" in agent.link.last_error and "node-2" in agent.link.last_error
            assert controller.server.sessions == {}
            assert counter(AUTH_FAILURES, reason="node_mismatch") == before + 1


async def test_an_agent_trusting_another_root_does_not_talk_to_the_controller(tmp_path):
    other = tmp_path / "other-root.pem"
    other.write_bytes(TestCA().pem)
    async with (
        running_controller(tmp_path) as controller,
        running_agent(tmp_path, controller, "node-1", root=other) as agent,
    ):
        await until(lambda: agent.link.last_error, "a failed connection")
        assert "certificate verify failed" in agent.link.last_error
        assert controller.server.sessions == {}


async def test_the_controller_certificate_must_name_the_address_dialled(tmp_path):
    async with (
        running_controller(tmp_path, names=("meshctl.example",)) as controller,
        running_agent(tmp_path, controller, "node-1") as agent,
    ):
        await until(lambda: agent.link.last_error, "a failed connection")
        assert "IP address mismatch" in agent.link.last_error


async def test_plaintext_agents_cannot_talk_to_a_tls_controller(tmp_path):
    async with running_controller(tmp_path) as controller:
        stream = await trio.open_tcp_stream("127.0.0.1", controller.port)
        wire = MessageStream(stream)
        await wire.send({"type": "hello", "node": "node-1", "token": controller.tokens["node-1"]})
        received = b""
        with trio.fail_after(TIMEOUT):
            try:
                while data := await stream.receive_some(1000):
                    received += data
            except trio.BrokenResourceError:
                pass  # reset: as good as closed
        assert b"snapshot" not in received
        assert controller.server.sessions == {}


async def test_the_stream_certificate_names_the_controller_and_its_address(tmp_path):
    async with running_controller(tmp_path) as controller:
        context = ssl.create_default_context(cafile=str(controller.root))
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", controller.port, ssl_context=context
        )
        await stream.do_handshake()
        leaf = x509.load_der_x509_certificate(stream.getpeercert(binary_form=True))
        await stream.aclose()
        assert identity_from_certificate(leaf).uri == (
            "spiffe://cluster.local/ns/meshagent-system/sa/meshctl"
        )


async def test_csrs_for_pods_on_the_node_are_signed_on_the_same_stream(tmp_path):
    async with (
        running_controller(tmp_path) as controller,
        running_agent(tmp_path, controller, "node-1") as agent,
    ):
        leaf = await sign(agent, FRONTEND)
        assert identity_from_certificate(leaf) == FRONTEND
        leaf.verify_directly_issued_by(controller.ca.certificate)
        assert controller.server.sessions["node-1"].csr_signed == 1


async def test_csr_for_a_pod_on_another_node_is_refused_and_counted(tmp_path):
    before = counter(CSR_REFUSED, reason="not_on_node")
    async with (
        running_controller(tmp_path) as controller,
        running_agent(tmp_path, controller, "node-1") as agent,
    ):
        with pytest.raises(SigningRefusedByController, match="not_on_node"):
            await sign(agent, REVIEWS)
        session = controller.server.sessions["node-1"]
        assert session.csr_refused == 1
        assert REVIEWS.uri in session.last_csr_refusal
        assert counter(CSR_REFUSED, reason="not_on_node") == before + 1
        assert agent.link.connected  # a refusal does not end the stream


async def test_a_finished_pod_gives_its_node_no_identity(tmp_path):
    async with (
        running_controller(tmp_path) as controller,
        running_agent(tmp_path, controller, "node-1") as agent,
    ):
        controller.model.upsert("Pod", pod("frontend", "node-1", "frontend", phase="Succeeded"))
        with pytest.raises(SigningRefusedByController, match="not_on_node"):
            await sign(agent, FRONTEND)


async def test_a_csr_waits_for_the_stream_and_many_overlap_with_snapshot_pushes(tmp_path):
    async with running_controller(tmp_path) as controller:
        signer = ControllerSigner()
        leaves: list[x509.Certificate] = []

        async def one() -> None:
            key = new_key()
            chain = await signer.sign(build_csr(key, FRONTEND), FRONTEND)
            leaves.append(chain.leaf())

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
            await trio.sleep(0.1)
            assert leaves == []  # no stream yet: requests wait for one
            store, link = SnapshotStore("node-1", tmp_path / "n1"), ControllerLink("test")
            nursery.start_soon(
                lambda: serve_config_client(
                    store,
                    "127.0.0.1",
                    controller.port,
                    controller.tokens["node-1"],
                    link,
                    tls=controller_tls_context(controller.root),
                    signer=signer,
                )
            )
            for i in range(5):
                controller.model.upsert("Pod", pod("frontend", "node-1", "frontend", n=str(i)))
                await trio.sleep(0.01)
            with trio.fail_after(TIMEOUT):
                while len(leaves) < 10:
                    await trio.sleep(0.01)
            session = controller.server.sessions["node-1"]
            await until(
                lambda: session.acked_version == controller.server.snapshot_for("node-1").version,
                "ack",
            )
            nursery.cancel_scope.cancel()
        assert len({leaf.serial_number for leaf in leaves}) == 10


async def test_the_token_file_is_read_again_when_the_lab_issues_a_new_token(tmp_path):
    async with running_controller(tmp_path) as controller:
        fresh = NodeTokenAuthenticator(tmp_path / "node-tokens.json").issue("node-3")
        assert await controller.server.authenticator.authenticate(fresh) == "node-3"


async def test_a_second_stream_of_a_node_closing_leaves_the_node_connected(tmp_path):
    async with (
        running_controller(tmp_path) as controller,
        running_agent(tmp_path, controller, "node-1") as agent,
    ):
        await until(lambda: agent.store.version, "the agent's snapshot")
        context = controller_tls_context(controller.root)
        extra = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", controller.port, ssl_context=context
        )
        wire = MessageStream(extra)
        await wire.send({"type": "hello", "node": "node-1", "token": controller.tokens["node-1"]})
        assert (await wire.receive())["type"] == "snapshot"
        second = controller.server.sessions["node-1"]
        await extra.aclose()
        await until(lambda: not second.connected, "the second stream to close")
        session = controller.server.sessions["node-1"]
        assert session is not second and session.connected


async def test_a_hello_without_a_token_is_refused_and_garbage_only_closes_that_stream(tmp_path):
    before = counter(AUTH_FAILURES, reason="missing_token")
    async with running_controller(tmp_path) as controller:
        context = controller_tls_context(controller.root)
        refusal = {
            "type": "error",
            "error": "authentication failed: the hello carries no node token",
        }
        for line, expected in (
            (b'{"type": "hello", "node": "node-1"}\n', refusal),
            (b"\x00garbage\n", None),  # not a message at all: just closed
        ):
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", controller.port, ssl_context=context
            )
            await stream.send_all(line)
            with trio.fail_after(TIMEOUT):
                assert await MessageStream(stream).receive() == expected
            await stream.aclose()
        assert counter(AUTH_FAILURES, reason="missing_token") == before + 1
        async with running_agent(tmp_path, controller, "node-1") as agent:
            await until(lambda: agent.store.version, "a snapshot for a good agent")
