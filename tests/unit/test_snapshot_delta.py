"""Issue #19: deltas. Any sequence of cluster changes, sent as deltas and applied by the agent's
store, gives exactly the snapshot the controller compiled (same content version), also when the
push server coalesces several changes into one version; a delta the
agent cannot apply is NACKed, leaves it on its version, and the controller sends the whole
snapshot next; a resumed stream converges."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meshagent.agent.state import SnapshotRejected, SnapshotStore, Tables
from meshagent.common import snapshotdelta
from meshagent.common.configwire import MessageStream
from meshagent.common.snapshot import Snapshot
from meshagent.controller.compiler import compile_shared
from meshagent.controller.model import ClusterModel
from meshagent.controller.push import AgentSession, PushServer

from tests.certs import TestCA

NODES = ("node-1", "node-2")
NAMESPACES = ("shop", "batch")
SVCS = ("svc0", "svc1", "svc2")
BUNDLES = {"root-1": TestCA("root 1").pem, "root-2": TestCA("root 2").pem, None: None}


def _pod(name: str, ns: str, node: str, app: str, version: str) -> dict:
    index = int(name.split("-")[1])
    return {
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": f"uid-{ns}-{name}",
            "labels": {"app": app, "version": version},
        },
        "spec": {"nodeName": node, "serviceAccountName": app},
        "status": {
            "phase": "Running",
            "podIP": f"10.244.{NODES.index(node) + 1}.{index + 10}",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def _service(name: str, ns: str) -> dict:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "clusterIP": f"10.96.{NAMESPACES.index(ns)}.{int(name[-1]) + 10}",
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }


def _deny(name: str, ns: str) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]},
    }


def _cluster() -> ClusterModel:
    model = ClusterModel()
    meshed = {"meshagent.io/mesh": "enabled"}
    model.replace(
        "Namespace",
        [
            {"kind": "Namespace", "metadata": {"name": "shop", "labels": meshed}},
            {"kind": "Namespace", "metadata": {"name": "batch"}},
        ],
    )
    model.replace(
        "Node",
        [
            {
                "kind": "Node",
                "metadata": {"name": n},
                "status": {"addresses": [{"type": "InternalIP", "address": f"172.30.0.{11 + i}"}]},
            }
            for i, n in enumerate(NODES)
        ],
    )
    model.replace("Pod", [_pod("p-0", "shop", "node-1", "svc0", "v1")])
    model.replace("Service", [_service("svc0", "shop")])
    return model


# one change to the cluster: (kind, action, arguments)
changes = st.one_of(
    st.tuples(
        st.just("pod"),
        st.integers(0, 7),
        st.sampled_from(NAMESPACES),
        st.sampled_from(NODES),
        st.sampled_from(SVCS),
        st.sampled_from(("v1", "v2")),
    ),
    st.tuples(st.just("delete-pod"), st.integers(0, 7), st.sampled_from(NAMESPACES)),
    st.tuples(st.just("service"), st.sampled_from(SVCS), st.sampled_from(NAMESPACES)),
    st.tuples(st.just("delete-service"), st.sampled_from(SVCS), st.sampled_from(NAMESPACES)),
    st.tuples(st.just("deny"), st.sampled_from(("a", "b")), st.sampled_from(NAMESPACES)),
    st.tuples(st.just("delete-deny"), st.sampled_from(("a", "b")), st.sampled_from(NAMESPACES)),
    st.tuples(st.just("bundle"), st.sampled_from(tuple(BUNDLES))),
)


model_changes = changes.filter(lambda change: change[0] != "bundle")


def _ref(name: str, ns: str) -> dict:
    return {"metadata": {"name": name, "namespace": ns}}


def _change(model: ClusterModel, change: tuple) -> None:
    """Apply one change to the model (trust bundle changes are the caller's)."""
    kind = change[0]
    if kind == "pod":
        _, i, ns, node, app, version = change
        model.upsert("Pod", _pod(f"p-{i}", ns, node, app, version))
    elif kind == "delete-pod":
        model.delete("Pod", _ref(f"p-{change[1]}", change[2]))
    elif kind == "service":
        model.upsert("Service", _service(change[1], change[2]))
    elif kind == "delete-service":
        model.delete("Service", _ref(change[1], change[2]))
    elif kind == "deny":
        model.upsert("AuthorizationPolicy", _deny(change[1], change[2]))
    elif kind == "delete-deny":
        model.delete("AuthorizationPolicy", _ref(change[1], change[2]))


def replay(
    folder: Path, steps: list[tuple], node: str, change: Callable[[ClusterModel, tuple], None]
) -> Iterator[tuple[SnapshotStore, Snapshot, dict, Tables]]:
    """Each step applied to a cluster model and sent to one node's store as the delta from the
    version it holds: yields, after each delta the store applied, the store, the full
    snapshot the controller compiled, the delta (as JSON) and the view it replaced. ``change``
    applies a step to the model (trust bundle steps are this function's)."""
    model = _cluster()
    bundle = BUNDLES["root-1"]
    store = SnapshotStore(node, folder / node)
    held = compile_shared(model, bundle).for_node(node)
    store.apply(held.model_dump(mode="json"))
    for step in steps:
        if step[0] == "bundle":
            bundle = BUNDLES[step[1]]
        else:
            change(model, step)
        new = compile_shared(model, bundle).for_node(node)
        changes = snapshotdelta.diff(held, new, (*snapshotdelta.SHARED_FIELDS, "local_workloads"))
        if new.version == held.version:
            assert changes == {}
            continue
        previous = store.tables
        assert previous is not None
        store.apply_delta(held.version, new.version, json.loads(json.dumps(changes)))
        yield store, new, changes, previous
        held = new


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(changes, min_size=1, max_size=12), node=st.sampled_from(NODES))
def test_deltas_applied_by_the_agent_equal_the_full_snapshot(tmp_path, steps, node):
    for store, new, _, _ in replay(tmp_path, steps, node, _change):
        assert store.tables is not None
        applied = store.tables.snapshot
        assert applied.version == new.version
        assert applied.model_dump(mode="json") == new.model_dump(mode="json")


class _Agent:
    """One node's agent as the push server sees it (a session) and as it is (its store)."""

    def __init__(self, server: PushServer, node: str, folder) -> None:
        self.server, self.session = server, AgentSession(node=node, peer="test")
        self.store = SnapshotStore(node, folder)
        first = server._current().for_node(node)
        self.held = self.store.apply(first.model_dump(mode="json"), save=False)
        self.session.held, self.session.acked_version = first, first.version

    def push(self) -> None:
        """The published version's delta, as the server encodes it, applied by the store."""
        snap = self.server._current().for_node(self.session.node)
        if snap.version == self.session.acked_version:
            return
        encoded = self.server._delta_for(self.session, snap)
        assert encoded is not None
        message = json.loads(encoded)
        assert (message["type"], message["base"]) == ("delta", self.session.acked_version)
        self.held = self.store.apply_delta(message["base"], message["version"], message["changes"])
        self.session.held, self.session.acked_version = snap, snap.version


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(st.tuples(model_changes, st.booleans()), min_size=1, max_size=12))
def test_a_coalesced_version_equals_the_changes_applied_one_by_one(tmp_path, steps):
    """The push server publishes a burst of changes as one version (`_settle`): its delta,
    applied by each node's store, gives what publishing and applying every change one by
    one gives, and the full snapshot of the model. (A server's trust bundle is its CA's,
    fixed for its life: the other property test changes bundles.)"""
    servers = {
        way: PushServer(_cluster(), authenticator=NodeNameAuthenticator())
        for way in ("one_by_one", "coalesced")
    }
    agents = {
        way: {node: _Agent(server, node, tmp_path / way / node) for node in NODES}
        for way, server in servers.items()
    }
    for i, (step, publish) in enumerate(steps):
        for server in servers.values():
            _change(server.model, step)
        servers["one_by_one"]._publish()
        for agent in agents["one_by_one"].values():
            agent.push()
        if not publish and i < len(steps) - 1:
            continue  # still in the window: the coalesced server publishes later
        coalesced = servers["coalesced"]
        coalesced._publish()
        for node, agent in agents["coalesced"].items():
            agent.push()
            full = compile_shared(coalesced.model, coalesced.trust_bundle).for_node(node)
            one_by_one = agents["one_by_one"][node].held
            assert agent.held.version == one_by_one.version == full.version
            assert agent.held.model_dump(mode="json") == one_by_one.model_dump(mode="json")
            assert agent.held.model_dump(mode="json") == full.model_dump(mode="json")


def test_a_delta_from_a_version_the_agent_does_not_hold_is_refused(tmp_path):
    model = _cluster()
    store = SnapshotStore("node-1", tmp_path)
    first = compile_shared(model).for_node("node-1")
    store.apply(first.model_dump(mode="json"), save=False)
    _change(model, ("pod", 1, "shop", "node-1", "svc0", "v2"))
    second = compile_shared(model).for_node("node-1")
    changes = snapshotdelta.diff(first, second, snapshotdelta.SHARED_FIELDS)
    with pytest.raises(SnapshotRejected, match="holds"):
        store.apply_delta("not-my-version", second.version, changes)
    with pytest.raises(SnapshotRejected, match="does not match its content"):
        store.apply_delta(first.version, second.version, {})  # leads elsewhere
    with pytest.raises(SnapshotRejected, match="unknown field"):
        store.apply_delta(first.version, second.version, {"node": "node-2"})
    assert store.version == first.version  # nothing changed


class NodeNameAuthenticator:
    async def authenticate(self, token: str) -> str:
        return token


async def test_a_nacked_delta_is_followed_by_the_whole_snapshot_and_resume_converges(
    autojump_clock, tmp_path
):
    model = _cluster()
    server = PushServer(model, authenticator=NodeNameAuthenticator(), coalesce=0.1)
    store = SnapshotStore("node-1", tmp_path)
    seen: list[str] = []
    refuse_next_delta = [True]

    async def agent(stream: trio.abc.Stream, version: str) -> None:
        wire = MessageStream(stream)
        await wire.send({"type": "hello", "node": "node-1", "token": "node-1", "version": version})
        while (message := await wire.receive()) is not None:
            seen.append(message["type"])
            if message["type"] == "delta" and refuse_next_delta[0]:
                refuse_next_delta[0] = False
                await wire.send({"type": "nack", "version": message["version"], "error": "test"})
                continue
            if message["type"] == "delta":
                store.apply_delta(message["base"], message["version"], message["changes"])
            else:
                store.apply(message["snapshot"], save=False)
            await wire.send({"type": "ack", "version": message["version"]})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._settle)
        agent_side, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(server._handle, server_side)
        nursery.start_soon(agent, agent_side, "")
        await trio.sleep(1)
        assert seen == ["snapshot"]
        before = store.version

        _change(model, ("pod", 1, "shop", "node-1", "svc0", "v2"))
        await trio.sleep(1)
        # the delta was refused: the agent stayed on its version, then got it whole
        assert seen == ["snapshot", "delta", "snapshot"]
        assert store.version == server.snapshot_for("node-1").version != before
        assert server.sessions["node-1"].acked_version == store.version

        _change(model, ("pod", 2, "shop", "node-1", "svc1", "v1"))
        await trio.sleep(1)
        assert seen[-1] == "delta" and store.version == server.snapshot_for("node-1").version
        session = server.sessions["node-1"]
        assert (session.full_sent, session.deltas_sent) == (2, 2)
        nursery.cancel_scope.cancel()

    # a new controller (a restart): the agent resumes from the version it holds
    restarted = PushServer(model, authenticator=NodeNameAuthenticator(), coalesce=0.1)
    seen.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(restarted._settle)
        agent_side, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(restarted._handle, server_side)
        nursery.start_soon(agent, agent_side, store.version)
        await trio.sleep(1)
        assert seen == []  # it holds the current version: nothing to send
        _change(model, ("pod", 3, "shop", "node-1", "svc2", "v1"))
        await trio.sleep(1)
        # the new controller never saw what the agent holds: the whole snapshot, then deltas
        assert seen == ["snapshot"]
        assert store.version == restarted.snapshot_for("node-1").version
        _change(model, ("pod", 3, "shop", "node-1", "svc2", "v2"))
        await trio.sleep(1)
        assert seen == ["snapshot", "delta"]
        assert store.version == restarted.snapshot_for("node-1").version
        nursery.cancel_scope.cancel()
