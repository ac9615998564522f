"""Issue #19 item 4: the agent forwards each delta it applied to its proxy workers, which
build their next view from their own with the same code; a worker that holds another version
(started later, or its base differs) gets the snapshot whole, and one that cannot apply a
delta asks for it whole (``resync``) and serves what it holds meanwhile."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import trio
import trio.testing
from meshagent.agent.config import AgentConfig
from meshagent.agent.state import SnapshotStore
from meshagent.agent.workers.pool import WorkerPool, _Process
from meshagent.agent.workers.worker import Worker
from meshagent.common import snapshotdelta
from meshagent.common.configwire import MessageStream
from meshagent.controller.compiler import compile_shared

from tests.unit.test_snapshot_delta import _change, _cluster

FIELDS = (*snapshotdelta.SHARED_FIELDS, "local_workloads")


def _pool(store: SnapshotStore) -> WorkerPool:
    # the pool's feeding logic only: no fork server, no identities to watch
    identities = SimpleNamespace(on_change=lambda callback: None, current=lambda: [])
    launch = SimpleNamespace(metrics_dir=None)
    return WorkerPool(AgentConfig(), 1, store, identities, launch)  # type: ignore[arg-type]


def _process(pool: WorkerPool, pid: int) -> tuple[_Process, trio.MemoryReceiveChannel]:
    """A worker process as the pool sees it, with its outbox (what the pool posts it)."""
    p = _Process(pid)
    p.outbox, outbox = trio.open_memory_channel(math.inf)
    for message in pool._initial_messages(p):
        p.post(message)
    pool.workers[0].retiring.append(p)  # fed like any process of the pool
    return p, outbox


def _posted(outbox: trio.MemoryReceiveChannel) -> list[dict]:
    out = []
    while True:
        try:
            message = outbox.receive_nowait()
        except trio.WouldBlock:
            return out
        out.append(json.loads(message) if isinstance(message, bytes) else message)


async def test_workers_get_the_delta_the_agent_applied_and_build_the_same_view(tmp_path):
    model = _cluster()
    agent = SnapshotStore("node-1", tmp_path / "agent")
    pool = _pool(agent)
    held = compile_shared(model).for_node("node-1")
    agent.apply(held.model_dump(mode="json"), save=False)
    early, early_out = _process(pool, 1)

    worker_side, agent_side = trio.testing.memory_stream_pair()
    worker = Worker(AgentConfig(node_name="node-1", state_dir=tmp_path / "w"), None, 0)  # type: ignore[arg-type]
    worker.channel = MessageStream(worker_side)
    from_worker = MessageStream(agent_side)

    async with trio.open_nursery() as nursery:
        worker.nursery = nursery
        for message in _posted(early_out):
            if message["type"] in ("snapshot", "delta"):
                worker._handle(message)
        assert worker.store.version == agent.version

        for i, step in enumerate(
            [("pod", 1, "shop", "node-1", "svc0", "v2"), ("pod", 2, "shop", "node-2", "svc1", "v1")]
        ):
            _change(model, step)
            new = compile_shared(model).for_node("node-1")
            delta = json.loads(json.dumps(snapshotdelta.diff(held, new, FIELDS)))
            if i == 1:
                late, late_out = _process(pool, 2)  # started now, from the version in force
            agent.apply_delta(held.version, new.version, delta, save=False)
            posted = _posted(early_out)
            assert [(m["type"], m["base"], m["version"]) for m in posted] == [
                ("delta", held.version, new.version)
            ]
            assert posted[0]["changes"] == delta
            worker._handle(posted[0])
            assert worker.store.version == agent.version
            held = new
        # the late one got the snapshot whole when it started, then the delta
        assert [m["type"] for m in _posted(late_out)] == ["snapshot", "certs", "delta"]
        assert late.holds == agent.version == early.holds
        assert worker.store.tables is not None and agent.tables is not None
        assert worker.store.tables.workload_by_ip == agent.tables.workload_by_ip
        assert worker.store.tables.service_by_endpoint == agent.tables.service_by_endpoint

        # a delta the worker cannot apply (its base is not what it holds): it asks once for
        # the snapshot whole, ignores deltas until it comes, then follows again
        _change(model, ("pod", 3, "shop", "node-1", "svc2", "v1"))
        new = compile_shared(model).for_node("node-1")
        delta = json.loads(json.dumps(snapshotdelta.diff(held, new, FIELDS)))
        before = worker.store.version
        worker._handle({"type": "delta", "base": "other", "version": new.version, "changes": delta})
        worker._handle({"type": "delta", "base": before, "version": "x", "changes": {}})
        assert worker.store.version == before
        with trio.fail_after(5):
            asked = await from_worker.receive()
        assert asked == {"type": "resync", "version": before}
        agent.apply_delta(held.version, new.version, delta, save=False)
        _posted(early_out)  # the delta the pool sent before it read the worker's ask
        early.holds = "stale"  # what a worker that missed one looks like to the pool
        pool_side = pool.workers[0]
        assert early in pool_side.processes
        # the pool answers the ask with the snapshot whole
        await _answer(pool, early, asked)
        (whole,) = _posted(early_out)
        assert whole["type"] == "snapshot"
        worker._handle(whole)
        assert worker.store.version == agent.version == early.holds
        nursery.cancel_scope.cancel()


async def _answer(pool: WorkerPool, p: _Process, message: dict) -> None:
    """The pool's receive loop reading ``message`` from worker ``p``."""
    to_pool, from_test = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool._receive_loop, MessageStream(to_pool), pool.workers[0], p)
        await MessageStream(from_test).send(message)
        await from_test.aclose()
