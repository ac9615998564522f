"""Issue #16 item 2: EndpointSlice churn is coalesced (a burst compiles once) and pushes only
the nodes whose snapshot version changed. Agents are in-memory streams on a virtual clock."""

from __future__ import annotations

import itertools

import trio
import trio.testing
from meshagent.common.configwire import MessageStream
from meshagent.controller import push
from meshagent.controller.model import ClusterModel
from meshagent.controller.push import PushServer

WINDOW = 0.5


class NodeNameAuthenticator:
    async def authenticate(self, token: str) -> str:
        return token  # the token is the node's name


def pod(name: str, node: str, ns: str, **labels: str) -> dict:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": labels},
        "spec": {"nodeName": node},
        "status": {"phase": "Running", "podIP": f"10.244.{node[-1]}.{len(name)}"},
    }


def endpoint_slice(ready_ips: list[str], generation: int) -> dict:
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "name": "db-1",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "db"},
            "resourceVersion": str(generation),  # what changes on every write
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ready_ips],
        "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
    }


def cluster() -> ClusterModel:
    model = ClusterModel()
    model.replace(
        "Namespace",
        [
            {
                "kind": "Namespace",
                "metadata": {"name": "shop", "labels": {"meshagent.io/mesh": "enabled"}},
            },
            {"kind": "Namespace", "metadata": {"name": "batch"}},
        ],
    )
    model.replace("Pod", [pod("web", "node-1", "shop"), pod("job", "node-1", "batch", v="1")])
    model.replace(
        "Service",
        [
            {
                "kind": "Service",
                "metadata": {"name": "db", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.5", "ports": [{"name": "pg", "port": 5432}]},
            }
        ],
    )
    model.replace("EndpointSlice", [endpoint_slice(["192.168.5.1"], 1)])
    return model


async def test_a_burst_compiles_once_and_pushes_only_changed_nodes(autojump_clock, monkeypatch):
    compiles = []
    real_compile = push.IncrementalCompiler.compile

    def counting(self, model, trust_bundle=None):
        compiles.append(model.generation)
        return real_compile(self, model, trust_bundle)

    monkeypatch.setattr(push.IncrementalCompiler, "compile", counting)
    model = cluster()
    server = PushServer(model, authenticator=NodeNameAuthenticator(), coalesce=WINDOW)
    received: dict[str, list[str]] = {"node-1": [], "node-2": []}

    async def agent(node: str, stream: trio.abc.Stream) -> None:
        wire = MessageStream(stream)
        await wire.send({"type": "hello", "node": node, "token": node, "version": ""})
        while (message := await wire.receive()) is not None:
            assert message["type"] in ("snapshot", "delta")  # a delta after the first ACK
            received[node].append(message["version"])
            await wire.send({"type": "ack", "version": message["version"]})

    async def quiet() -> None:
        """Until everything in flight is delivered (the clock jumps when all tasks wait)."""
        await trio.sleep(WINDOW * 4)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._settle)
        for node in received:
            agent_side, server_side = trio.testing.memory_stream_pair()
            nursery.start_soon(server._handle, server_side)
            nursery.start_soon(agent, node, agent_side)
        await quiet()
        assert [len(v) for v in received.values()] == [1, 1]
        first = {node: versions[-1] for node, versions in received.items()}

        # 1. a burst of 30 EndpointSlice events, 5 ms apart: one compile, one push per node,
        # of the final state (no intermediate version reaches anyone)
        compiles.clear()
        for i in range(30):
            model.upsert(
                "EndpointSlice",
                endpoint_slice([f"192.168.5.{j + 1}" for j in range(i % 4 + 1)], 100 + i),
            )
            await trio.sleep(0.005)
        await quiet()
        assert len(compiles) == 1
        final = server.snapshot_for("node-1")
        (db,) = [s for s in final.services if s.name == "db"]
        assert [e.ip for e in db.endpoints] == ["192.168.5.1", "192.168.5.2"]  # 29 % 4 + 1
        for node, versions in received.items():
            assert versions == [first[node], server.snapshot_for(node).version]
        second = {node: versions[-1] for node, versions in received.items()}

        # 2. a burst that ends where it began (only resourceVersions move): compiled once,
        # every node's version is unchanged, nobody receives anything
        compiles.clear()
        for i in range(10):
            model.upsert("EndpointSlice", endpoint_slice(["192.168.5.1", "192.168.5.2"], 200 + i))
            await trio.sleep(0.005)
        await quiet()
        assert len(compiles) == 1
        assert {node: versions[-1] for node, versions in received.items()} == second
        assert [len(v) for v in received.values()] == [2, 2]

        # 3. a change only node-1 needs (its unmeshed pod no Service selects): node-2 gets
        # nothing
        model.upsert("Pod", pod("job", "node-1", "batch", v="2"))
        await quiet()
        assert len(received["node-1"]) == 3 and received["node-1"][-1] != second["node-1"]
        assert received["node-2"] == [first["node-2"], second["node-2"]]
        assert server.sessions["node-1"].acked_version == received["node-1"][-1]
        # both nodes hold the cluster as it is now: node-1 by its ACK, node-2 because its
        # snapshot did not change (what benchmarks.push_latency --churn measures by)
        for node in received:
            assert server.sessions[node].acked_generation == model.generation
        nursery.cancel_scope.cancel()


async def test_without_a_window_every_change_still_reaches_the_agent(autojump_clock):
    model = cluster()
    server = PushServer(model, authenticator=NodeNameAuthenticator(), coalesce=0.0)
    versions: list[str] = []

    async def agent(stream: trio.abc.Stream) -> None:
        wire = MessageStream(stream)
        await wire.send({"type": "hello", "node": "node-1", "token": "node-1", "version": ""})
        while (message := await wire.receive()) is not None:
            versions.append(message["version"])
            await wire.send({"type": "ack", "version": message["version"]})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._settle)
        agent_side, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(server._handle, server_side)
        nursery.start_soon(agent, agent_side)
        await trio.sleep(1)
        model.upsert("EndpointSlice", endpoint_slice(["192.168.5.9"], 2))
        await trio.sleep(1)
        assert versions == [versions[0], server.snapshot_for("node-1").version]
        assert versions[0] != versions[1]
        nursery.cancel_scope.cancel()


async def _agents(
    server: PushServer, nursery: trio.Nursery, delays: dict[str, float]
) -> dict[str, list[tuple[float, str]]]:
    """One in-memory agent per node that ACKs each message `delays[node]` seconds after it
    arrives (inf: never); returns what each received, with the (virtual) time it arrived."""
    received: dict[str, list[tuple[float, str]]] = {node: [] for node in delays}

    async def agent(node: str, stream: trio.abc.Stream) -> None:
        wire = MessageStream(stream)
        await wire.send({"type": "hello", "node": node, "token": node, "version": ""})
        while (message := await wire.receive()) is not None:
            received[node].append((trio.current_time(), message["version"]))
            await trio.sleep(delays[node])
            await wire.send({"type": "ack", "version": message["version"]})

    for node in delays:
        agent_side, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(server._handle, server_side)
        nursery.start_soon(agent, node, agent_side)
    return received


async def _label_pod_every(model: ClusterModel, period: float, count: int) -> None:
    """Churn: the meshed pod `web` (every node lists it) relabelled `count` times."""
    for i in range(count):
        model.upsert("Pod", pod("web", "node-1", "shop", round=str(i)))
        await trio.sleep(period)


async def test_under_churn_the_window_grows_while_a_version_is_in_flight(autojump_clock):
    """node-2 answers each message 0.4 s after it arrives: the changes made meanwhile wait
    for its answer and are published as one version, not one per 0.1 s window."""
    model = cluster()
    server = PushServer(model, authenticator=NodeNameAuthenticator(), coalesce=0.1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._settle)
        received = await _agents(server, nursery, {"node-1": 0.0, "node-2": 0.4})
        await trio.sleep(1)  # both synced
        start = trio.current_time()
        await _label_pod_every(model, 0.05, 40)  # 2 s of changes, 20 per second
        await trio.sleep(2)
        pushes = [t for t, _ in received["node-1"] if t >= start]
        # one version per round of node-2 (0.4 s to answer), not one per 0.1 s window
        assert 4 <= len(pushes) <= 6, pushes
        assert all(b - a > 0.4 - 1e-6 for a, b in itertools.pairwise(pushes)), pushes
        # the last change still reached both agents
        final = {node: server.snapshot_for(node).version for node in received}
        assert {node: seen[-1][1] for node, seen in received.items()} == final
        nursery.cancel_scope.cancel()


async def test_an_agent_that_never_answers_holds_versions_back_at_most_coalesce_max(
    autojump_clock,
):
    model = cluster()
    server = PushServer(
        model, authenticator=NodeNameAuthenticator(), coalesce=0.1, coalesce_max=0.5
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._settle)
        received = await _agents(server, nursery, {"node-1": 0.0, "node-2": float("inf")})
        await trio.sleep(1)
        start = trio.current_time()
        await _label_pod_every(model, 0.05, 40)
        await trio.sleep(1)
        pushes = [t for t, _ in received["node-1"] if t >= start]
        assert 3 <= len(pushes) <= 5, pushes  # one per 0.5 s, despite node-2
        assert all(b - a > 0.5 - 1e-6 for a, b in itertools.pairwise(pushes)), pushes
        assert received["node-1"][-1][1] == server.snapshot_for("node-1").version
        assert len(received["node-2"]) == 1  # still waiting to answer its first snapshot
        nursery.cancel_scope.cancel()


async def test_a_straggler_among_many_agents_holds_no_version_back(autojump_clock):
    """One agent in 100 that never answers is a straggler (`push.STRAGGLERS`): the others get
    a version per window, as if it were not there."""
    model = cluster()
    server = PushServer(model, authenticator=NodeNameAuthenticator(), coalesce=0.1)
    delays = {f"node-{i}": 0.0 for i in range(1, 100)} | {"node-100": float("inf")}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._settle)
        received = await _agents(server, nursery, delays)
        await trio.sleep(1)
        start = trio.current_time()
        await _label_pod_every(model, 0.05, 20)  # 1 s of changes
        await trio.sleep(1)
        pushes = [t for t, _ in received["node-1"] if t >= start]
        assert len(pushes) >= 6, pushes  # one per window (0.1 s and the next change)
        assert received["node-1"][-1][1] == server.snapshot_for("node-1").version
        assert len(received["node-100"]) == 1
        nursery.cancel_scope.cancel()
