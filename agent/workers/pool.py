"""The agent's side of its proxy workers: start them, feed them, watch them, restart them.

Each worker is a child process with a private socket pair to the agent. The agent sends the
snapshot (encoded once for all), every certificate change and accept/stop and drain; a
worker that exits unasked is started again (with a back-off) and fed the current state.
`WorkerPool` offers the agent what a `DataPlane` in its own process does: serve, accept
on/off, drain, open connections and status.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio
from meshagent.agent.config import AgentConfig
from meshagent.agent.identity.manager import IdentityManager
from meshagent.agent.state import SnapshotStore
from meshagent.agent.telemetry import worker_exited
from meshagent.agent.workers.launch import Launched, WorkerLaunch, WorkerProcess
from meshagent.agent.workers.wire import certs_message, merge_status, snapshot_message
from meshagent.common.configwire import MessageStream, WireError

log = logging.getLogger(__name__)

RESTART_INITIAL = 0.5
RESTART_MAX = 10.0
READY_TIMEOUT = 60.0


def _open_in(status: dict[str, Any]) -> int:
    """Open connections in one worker's status (`DataPlane.status`)."""
    proxy, inbound = status.get("proxy", {}), status.get("inbound", {})
    return proxy.get("active_connections", 0) + inbound.get("active", 0)


class _Worker:
    """One worker slot: the process of the moment, its outbox and its last status."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0
        self.ready = trio.Event()
        self.status: dict[str, Any] = {}
        self.outbox: trio.MemorySendChannel | None = None
        self.restarts = 0
        self.left_open: int | None = None  # connections still open when its drain ended

    def post(self, message: dict[str, Any] | bytes) -> None:
        if self.outbox is not None:
            self.outbox.send_nowait(message)


class WorkerPool:
    def __init__(
        self,
        config: AgentConfig,
        count: int,
        store: SnapshotStore,
        identities: IdentityManager,
        launch: WorkerLaunch,
    ) -> None:
        self.config = config
        self.store = store
        self.identities = identities
        self.launch = launch  # the workers `meshagent run` started early are taken first
        self.metrics_dir = launch.metrics_dir
        self.workers = [_Worker(i) for i in range(count)]
        self.accepting = True
        self.stopping = False
        self._snapshot: bytes | None = None
        self._spawning = trio.Lock()  # one reader of the fork server's answers at a time
        store.on_change(self._on_snapshot)
        identities.on_change(self._on_certs)

    # -- what the agent sees ------------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(1 for w in self.workers if w.pid)

    def pids(self) -> dict[str, int]:
        """Worker index (as text: the ``worker`` label of its process metrics) -> pid, for
        the workers running now."""
        return {str(w.index): w.pid for w in self.workers if w.pid}

    def set_accepting(self, on: bool) -> None:
        self.accepting = on
        for w in self.workers:
            w.post({"type": "accepting", "on": on})

    def open_connections(self) -> int:
        """As the workers last reported (every second)."""
        return sum(_open_in(w.status) for w in self.workers)

    def status(self) -> dict[str, Any]:
        merged = merge_status([_tag_tunnels(w.status, w.index) for w in self.workers if w.status])
        merged["workers"] = [
            {
                "index": w.index,
                "pid": w.pid,
                "restarts": w.restarts,
                "outbound_accepted": w.status.get("proxy", {}).get("accepted_connections", 0),
                "inbound_accepted": w.status.get("inbound", {}).get("accepted", 0),
            }
            for w in self.workers
        ]
        return merged

    async def drain(self, timeout: float) -> int:
        """Every worker stops accepting and exits once its connections end (or at
        ``timeout``); returns the connections still open when the last one exited."""
        self.stopping = True
        for w in self.workers:
            w.post({"type": "drain", "timeout": timeout})
        with trio.move_on_after(timeout + 5):
            while self.running:
                await trio.sleep(0.1)
        # what each worker said when it finished; its last status if it never said
        return sum(
            w.left_open if w.left_open is not None else _open_in(w.status) for w in self.workers
        )

    # -- feeding -------------------------------------------------------------------------------

    def _on_snapshot(self, tables) -> None:
        document = self.store.document_json()
        assert document is not None  # the store tells its listeners after keeping it
        self._snapshot = snapshot_message(document)
        for w in self.workers:
            w.post(self._snapshot)

    def _on_certs(self) -> None:
        message = certs_message(self.identities.current())
        for w in self.workers:
            w.post(message)

    def _initial_messages(self) -> list[dict[str, Any] | bytes]:
        out: list[dict[str, Any] | bytes] = []
        document = self.store.document_json()
        if self._snapshot is None and document is not None:
            self._snapshot = snapshot_message(document)
        if self._snapshot is not None:
            out.append(self._snapshot)
        out.append(certs_message(self.identities.current()))
        if not self.accepting:
            out.append({"type": "accepting", "on": False})
        return out

    # -- running -------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED):
        """Start every worker; says started once all listen. Runs until cancelled."""
        async with trio.open_nursery() as nursery:
            for w in self.workers:
                nursery.start_soon(self._supervise, w)
            with trio.fail_after(READY_TIMEOUT):
                for w in self.workers:
                    await w.ready.wait()
            log.info("%d proxy workers ready", len(self.workers))
            task_status.started()

    async def _supervise(self, w: _Worker) -> None:
        delay = RESTART_INITIAL
        while True:
            started = trio.current_time()
            await self._run_once(w)
            if self.stopping:
                return
            w.restarts += 1
            if trio.current_time() - started > 60:
                delay = RESTART_INITIAL
            log.error("proxy worker %d exited; starting it again in %.1fs", w.index, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)

    async def _spawn(self, index: int) -> Launched:
        """Worker ``index`` from the fork server (asked for now unless `meshagent run` did)."""
        launch = self.launch
        async with self._spawning:
            if index not in launch.asked and index not in launch.started:
                launch.request(index)
            while (launched := launch.take(index)) is None:
                assert launch.control is not None
                await trio.lowlevel.wait_readable(launch.control)
                launch.receive()
        return launched

    async def _run_once(self, w: _Worker) -> None:
        launched = await self._spawn(w.index)
        process, ours = launched.process, launched.channel
        w.pid, w.status = process.pid, {}
        send, receive = trio.open_memory_channel[dict[str, Any] | bytes](math.inf)
        w.outbox = send
        for message in self._initial_messages():
            send.send_nowait(message)
        channel = MessageStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_loop, channel, receive)
                nursery.start_soon(self._receive_loop, channel, w)
                await _exited(process)
                nursery.cancel_scope.cancel()
        finally:
            w.outbox = None
            with trio.CancelScope(shield=True):
                if not process.exited():
                    process.kill()
                    await _exited(process)
                process.close()
                await channel.stream.aclose()
            worker_exited(w.pid, self.metrics_dir)
            log.info("proxy worker %d (pid %d) exited", w.index, w.pid)
            w.pid, w.status = 0, {}

    async def _send_loop(self, channel: MessageStream, outbox: trio.MemoryReceiveChannel) -> None:
        async for message in outbox:
            try:
                if isinstance(message, bytes):
                    await channel.send_encoded(message)
                else:
                    await channel.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _receive_loop(self, channel: MessageStream, w: _Worker) -> None:
        while True:
            try:
                message = await channel.receive()
            except (WireError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.error("proxy worker %d: bad channel: %s", w.index, exc)
                return
            if message is None:
                return
            if message["type"] == "ready":
                w.ready.set()
            elif message["type"] == "status":
                w.status = message["status"]
            elif message["type"] == "drained":
                w.left_open = int(message["left"])


def _tag_tunnels(status: dict[str, Any], worker: int) -> dict[str, Any]:
    """A worker's status with its index on each tunnel: each worker pools its own."""
    tunnels = [{**t, "worker": worker} for t in status.get("tunnels", [])]
    return {**status, "tunnels": tunnels}


async def _exited(process: WorkerProcess) -> None:
    """Wait for ``process`` to end (its pidfd turns readable; the fork server reaps it)."""
    await trio.lowlevel.wait_readable(process.pidfd)
