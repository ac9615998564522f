"""Agents over several controller replicas on loopback: the real push servers (one CA, one
token file, as replicas share the CA Secret), the real config client and TLS. An agent starts
at the replica its node hashes to, moves on when that one says goodbye or dies, and resumes
from its version there (nothing resent if current, else a whole snapshot)."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from meshagent.agent.config import AgentConfig
from meshagent.agent.configclient import (
    ControllerLink,
    controller_tls_context,
    replica_order,
    serve_config_client,
)
from meshagent.agent.state import SnapshotStore
from meshagent.controller.ca import CertificateAuthority
from meshagent.controller.model import ClusterModel
from meshagent.controller.push import (
    PushServer,
    StreamCertificate,
    TokenFileAuthenticator,
    controller_identity,
)
from meshagent.controller.signing import NodeTokenAuthenticator
from meshagent.controller.webhook import keep_ca_bundle

from tests.unit.test_admission_webhook import _config
from tests.unit.test_push_stream import pod, until

TIMEOUT = 10


def test_agents_spread_evenly_and_stably_over_replicas() -> None:
    replicas = [("10.0.0.1", 15012), ("10.0.0.2", 15012), ("10.0.0.3", 15012)]
    first = Counter(replica_order(replicas, f"node-{i}")[0] for i in range(300))
    assert set(first) == set(replicas)
    assert min(first.values()) > 300 / 3 * 0.7, first  # roughly even
    order = replica_order(replicas, "node-7")
    assert sorted(order) == sorted(replicas)  # every replica, each once
    assert replica_order(replicas, "node-7") == order  # the same at every start


def test_the_agent_config_lists_several_controllers() -> None:
    config = AgentConfig(controller="10.0.0.1:15012, meshctl-b.ns.svc:15013")
    assert config.controller_addrs == [("10.0.0.1", 15012), ("meshctl-b.ns.svc", 15013)]
    assert config.controller_addr == ("10.0.0.1", 15012)
    with pytest.raises(ValueError, match="'meshctl-b' is not host:port"):
        AgentConfig(controller="10.0.0.1:15012,meshctl-b")


@asynccontextmanager
async def replica(
    ca_file: Path, token_file: Path, pods: list[dict], port: int = 0
) -> AsyncIterator[tuple[PushServer, int]]:
    """One replica's push server with its own copy of the model (as each watches the API)."""
    ca = CertificateAuthority.load_or_create(ca_file)
    model = ClusterModel()
    model.replace("Pod", pods)
    identity = controller_identity("cluster.local", "meshagent-system")
    certificate = StreamCertificate(ca_file.read_bytes(), identity, ("127.0.0.1",))
    server = PushServer(
        model, authenticator=TokenFileAuthenticator(token_file), ca=ca, tls=certificate.context
    )
    async with trio.open_nursery() as nursery:
        sockets = await nursery.start(server.serve, "127.0.0.1", port)
        yield server, sockets[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def _cluster(tmp_path: Path) -> tuple[Path, Path, Path, str, list[dict]]:
    """(CA file, its root, token file, node-1's token, pods) the replicas share."""
    ca_file = tmp_path / "ca" / "ca.pem"
    ca = CertificateAuthority.load_or_create(ca_file)
    root = tmp_path / "root.pem"
    root.write_text(ca.trust_bundle_pem)
    token_file = tmp_path / "node-tokens.json"
    token = NodeTokenAuthenticator(token_file).issue("node-1")
    pods = [pod("frontend", "node-1", "frontend"), pod("reviews", "node-2", "reviews")]
    return ca_file, root, token_file, token, pods


async def test_an_agent_moves_to_the_other_replica_and_converges(tmp_path: Path) -> None:
    ca_file, root, token_file, token, pods = _cluster(tmp_path)
    store, link = SnapshotStore("node-1", tmp_path / "state"), ControllerLink("test")
    with trio.fail_after(TIMEOUT * 2):
        async with (
            replica(ca_file, token_file, pods) as (a, a_port),
            replica(ca_file, token_file, pods) as (b, b_port),
            trio.open_nursery() as nursery,
        ):
            ports = {a_port: a, b_port: b}
            order = replica_order([("127.0.0.1", a_port), ("127.0.0.1", b_port)], "node-1")
            first, second = ports[order[0][1]], ports[order[1][1]]
            nursery.start_soon(
                lambda: serve_config_client(
                    store,
                    "127.0.0.1",
                    a_port,
                    token,
                    link,
                    tls=controller_tls_context(root),
                    more=[("127.0.0.1", b_port)],
                )
            )
            await until(lambda: store.version, "the first snapshot")
            assert "node-1" in first.sessions and "node-1" not in second.sessions
            assert first.snapshot_for("node-1").version == second.snapshot_for("node-1").version

            # The replica says goodbye (a rolling update): the agent goes to the other at once
            # and, holding the current version, is sent nothing again.
            await first.close_streams("controller a is shutting down")
            await until(
                lambda: "node-1" in second.sessions and second.sessions["node-1"].connected,
                "the agent on the other replica",
            )
            assert link.address == f"127.0.0.1:{order[1][1]}"
            assert second.sessions["node-1"].full_sent == 0

            # A change made after the move reaches the agent: a whole snapshot (this stream
            # has no history to send a delta from).
            for server in (a, b):
                server.model.upsert("Pod", pod("frontend", "node-1", "frontend", v="2"))
            wanted = second.snapshot_for("node-1").version
            await until(lambda: store.version == wanted, "the change after the move")
            assert second.sessions["node-1"].full_sent == 1
            nursery.cancel_scope.cancel()


class _Elector:
    """Stands in for `LeaderElector`'s view (is_leader, wait_changed)."""

    def __init__(self) -> None:
        self.is_leader = False
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def lead(self) -> None:
        self.is_leader = True
        self._changed.set()


class _WebhookClient:
    """Records what `keep_ca_bundle` asks of the API (the configuration lacks its caBundle)."""

    def __init__(self) -> None:
        self.patches: list[dict] = []

    async def get(self, _kind, _name):
        return _config(None)

    async def patch(self, _kind, _name, patch, *, patch_type) -> None:
        self.patches.append(patch)


async def test_only_the_leading_replica_writes_the_webhook_ca_bundle() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    client, elector = _WebhookClient(), _Elector()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(keep_ca_bundle, leader=elector, retry=0.01, recheck=0.01),
                client,
                pem,
                "meshagent-validation",
            )
            await trio.sleep(0.2)  # a follower for a while: many chances to write
            assert client.patches == []
            elector.lead()
            await until(lambda: client.patches, "the leader's caBundle patch")
            nursery.cancel_scope.cancel()


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_an_agent_goes_back_to_its_own_replica_once_it_is_up(tmp_path: Path) -> None:
    ca_file, root, token_file, token, pods = _cluster(tmp_path)
    store, link = SnapshotStore("node-1", tmp_path / "state"), ControllerLink("test")
    ports = [_unused_port(), _unused_port()]
    own, other = (p for _, p in replica_order([("127.0.0.1", p) for p in ports], "node-1"))
    with trio.fail_after(TIMEOUT * 2):
        async with (
            replica(ca_file, token_file, pods, other) as (away, _),
            trio.open_nursery() as nursery,
        ):
            follow = partial(
                serve_config_client,
                tls=controller_tls_context(root),
                more=[("127.0.0.1", ports[1])],
                rebalance_after=0.5,
            )
            nursery.start_soon(follow, store, "127.0.0.1", ports[0], token, link)
            await until(lambda: "node-1" in away.sessions, "the agent on the other replica")
            async with replica(ca_file, token_file, pods, own) as (home, _):
                await until(
                    lambda: "node-1" in home.sessions and home.sessions["node-1"].connected,
                    "the agent back on its own replica",
                )
                assert link.address == f"127.0.0.1:{own}"
                assert home.sessions["node-1"].full_sent == 0  # it held the current version
                assert not away.sessions["node-1"].connected
            nursery.cancel_scope.cancel()
