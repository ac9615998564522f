"""The agent's side of its proxy workers: start them, feed them, watch them, restart them,
and replace one that a burst left grown (recycle.py), which hands its plain same-node relays
to its replacement (agent/proxy/handoff.py).

Each worker is a child of the fork server (launch.py) with a private socket pair to the
agent. The agent sends the snapshot (whole to a new worker, then each delta the agent
applied, which the worker applies to its own view; each encoded once for all), every
certificate change and accept/stop and drain; a worker that exits unasked is started again
(with a back-off) and fed the current state. A slot's worker that grew is replaced: a fresh
one is forked for the slot, and once it listens the old one drains (it serves what it holds,
then exits). `WorkerPool` offers the agent what a `DataPlane` in its own process does:
serve, accept on/off, drain, open connections and status.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import trio
from meshagent.agent.config import AgentConfig
from meshagent.agent.handover import handoff_socket, own_handoff_folder
from meshagent.agent.identity.manager import IdentityManager
from meshagent.agent.state import SnapshotStore
from meshagent.agent.telemetry import worker_exited
from meshagent.agent.workers.launch import (
    ForkServerGone,
    Launched,
    WorkerLaunch,
    WorkerProcess,
)
from meshagent.agent.workers.recycle import MemoryWatch, RecyclePolicy, cpu_seconds, rss_bytes
from meshagent.agent.workers.wire import (
    certs_message,
    delta_message,
    merge_status,
    snapshot_message,
)
from meshagent.common.configwire import MessageStream, WireError

log = logging.getLogger(__name__)

RESTART_INITIAL = 0.5
RESTART_MAX = 10.0
READY_TIMEOUT = 60.0
RECYCLE_CHECK_S = 1.0


def _open_in(status: dict[str, Any]) -> int:
    """Open connections in one worker's status (`DataPlane.status`)."""
    proxy, inbound = status.get("proxy", {}), status.get("inbound", {})
    return proxy.get("active_connections", 0) + inbound.get("active", 0)


class _Process:
    """One worker process: its outbox, its last status and its memory watch."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ready = trio.Event()
        self.exited = trio.Event()
        self.status: dict[str, Any] = {}
        self.view: dict[str, Any] = {}  # the snapshot version it serves, how many it applied
        self.outbox: trio.MemorySendChannel | None = None
        self.left_open: int | None = None  # connections still open when its drain ended
        self.holds = ""  # the snapshot version it holds once it has read what was posted
        self.watch: MemoryWatch | None = None  # from when it listens
        self.peak = 0  # most connections (15001, 15008) open at once since the watch looked

    def post(self, message: dict[str, Any] | bytes) -> None:
        if self.outbox is not None:
            self.outbox.send_nowait(message)


class _Worker:
    """One worker slot: the process that serves it now, and any it replaced still draining."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.current: _Process | None = None
        self.retiring: list[_Process] = []
        self.ready = trio.Event()  # its first process listens
        self.recycle = trio.Event()  # replace the current process
        self.restarts = 0
        self.recycled = 0

    @property
    def pid(self) -> int:
        return self.current.pid if self.current else 0

    @property
    def processes(self) -> list[_Process]:
        return ([self.current] if self.current else []) + self.retiring

    def post(self, message: dict[str, Any] | bytes) -> None:
        if self.current is not None:
            self.current.post(message)


class WorkerPool:
    def __init__(
        self,
        config: AgentConfig,
        count: int,
        store: SnapshotStore,
        identities: IdentityManager,
        launch: WorkerLaunch,
        on_recycled: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.config = config
        self.store = store
        self.identities = identities
        self.launch = launch  # the workers `meshagent run` asked for are taken first
        self.metrics_dir = launch.metrics_dir
        self.workers = [_Worker(i) for i in range(count)]
        self.accepting = True
        self.stopping = False
        self._drain_timeout = 0.0  # once stopping
        self.recycle_policy = RecyclePolicy(
            config.worker_recycle_growth, config.worker_recycle_max_open
        )
        self.on_recycled = on_recycled  # a worker was replaced (its reason: "memory")
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

    def _statuses(self) -> list[tuple[int, dict[str, Any]]]:
        return [(w.index, p.status) for w in self.workers for p in w.processes if p.status]

    def open_connections(self) -> int:
        """As the workers last reported (every second), those draining included."""
        return sum(_open_in(status) for _, status in self._statuses())

    def status(self) -> dict[str, Any]:
        merged = merge_status([_tag_tunnels(status, index) for index, status in self._statuses()])
        merged["workers"] = [
            {
                "index": w.index,
                "pid": w.pid,
                "restarts": w.restarts,
                "recycled": w.recycled,
                "retiring_pids": [p.pid for p in w.retiring],
                "outbound_accepted": _current(w).get("proxy", {}).get("accepted_connections", 0),
                "inbound_accepted": _current(w).get("inbound", {}).get("accepted", 0),
                # the snapshot it serves, and how many it applied whole and as deltas
                "snapshot_version": w.current.view.get("version", "") if w.current else "",
                "snapshots_applied": w.current.view.get("applied", {}) if w.current else {},
            }
            for w in self.workers
        ]
        return merged

    async def drain(self, timeout: float, handoff_to: Sequence[os.PathLike] = ()) -> int:
        """Every worker stops accepting, hands what it can to the processes listening at
        ``handoff_to`` (a successor agent's: agent/proxy/handoff.py) and exits once its other
        connections end (or at ``timeout``); returns the connections still open when the last
        one exited."""
        self.stopping, self._drain_timeout = True, timeout
        everyone = [p for w in self.workers for p in w.processes]
        targets = [str(path) for path in handoff_to]
        for w in self.workers:
            w.post({"type": "drain", "timeout": timeout, "handoff": targets})
        with trio.move_on_after(timeout + 5):
            for p in everyone:
                await p.exited.wait()
        # what each worker said when it finished; its last status if it never said
        return sum(p.left_open if p.left_open is not None else _open_in(p.status) for p in everyone)

    # -- feeding -------------------------------------------------------------------------------

    def _on_snapshot(self, tables) -> None:
        """Each worker gets the delta the store applied if it holds the version the delta
        starts from (it builds its next view from its own), else the snapshot whole."""
        self._snapshot = None  # encoded when a worker needs it whole
        delta, encoded = self.store.last_delta, None
        for w in self.workers:
            for p in w.processes:  # a draining one still relays under the snapshot in force
                if delta is not None and p.holds == delta[0]:
                    encoded = encoded or delta_message(*delta)
                    p.post(encoded)
                else:
                    p.post(self._whole())
                p.holds = self.store.version

    def _whole(self) -> bytes:
        """The snapshot in force as a ``snapshot`` message, encoded once per version."""
        if self._snapshot is None:
            document = self.store.document_json()
            assert document is not None  # asked for only once the store holds one
            self._snapshot = snapshot_message(document)
        return self._snapshot

    def _on_certs(self) -> None:
        message = certs_message(self.identities.current())
        for w in self.workers:
            for p in w.processes:
                p.post(message)

    def _initial_messages(self, p: _Process) -> list[dict[str, Any] | bytes]:
        out: list[dict[str, Any] | bytes] = []
        if self.store.tables is not None:
            out.append(self._whole())
            p.holds = self.store.version
        out.append(certs_message(self.identities.current()))
        if not self.accepting:
            out.append({"type": "accepting", "on": False})
        if self.stopping:  # started while the pool drains (a replacement under way)
            out.append({"type": "drain", "timeout": self._drain_timeout})
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
            if self.recycle_policy.enabled:
                nursery.start_soon(self._watch_memory)
            task_status.started()

    async def _supervise(self, w: _Worker) -> None:
        delay = RESTART_INITIAL
        async with trio.open_nursery() as nursery:
            while True:
                started = trio.current_time()
                launched = await self._spawn(w.index)
                process, replaced = _Process(launched.process.pid), w.current
                w.current, w.recycle = process, trio.Event()
                nursery.start_soon(self._run_once, w, process, launched)
                if replaced is not None:
                    # retiring from this step on: no status read or memory watch sees the old
                    # one in neither list while its _retire task waits to be scheduled
                    w.retiring.append(replaced)
                    nursery.start_soon(self._retire, w, replaced, process)
                async with trio.open_nursery() as either:  # it exits, or it is to be replaced
                    either.start_soon(_set_then_cancel, process.exited, either.cancel_scope)
                    either.start_soon(_set_then_cancel, w.recycle, either.cancel_scope)
                if not process.exited.is_set():
                    continue  # recycled: a fresh one next, this one retires once it listens
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
        launch, delay = self.launch, RESTART_INITIAL
        async with self._spawning:
            if index not in launch.asked and index not in launch.started:
                launch.request(index)
            while (launched := launch.take(index)) is None:
                if launch.control is None:
                    launch.restart()
                assert launch.control is not None
                await trio.lowlevel.wait_readable(launch.control)
                try:
                    launch.receive()
                except ForkServerGone as exc:
                    log.error("%s; starting it again in %.1fs", exc, delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, RESTART_MAX)
        return launched

    async def _run_once(self, w: _Worker, p: _Process, launched: Launched) -> None:
        process, ours = launched.process, launched.channel
        send, receive = trio.open_memory_channel[dict[str, Any] | bytes](math.inf)
        p.outbox = send
        for message in self._initial_messages(p):
            send.send_nowait(message)
        channel = MessageStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_loop, channel, receive)
                nursery.start_soon(self._receive_loop, channel, w, p)
                await _exited(process)
                nursery.cancel_scope.cancel()
        finally:
            p.outbox = None
            with trio.CancelScope(shield=True):
                if not process.exited():
                    process.kill()
                    await _exited(process)
                process.close()
                await channel.stream.aclose()
            worker_exited(p.pid, self.metrics_dir)
            log.info("proxy worker %d (pid %d) exited", w.index, p.pid)
            if w.current is p:
                w.current = None
            p.exited.set()

    async def _retire(self, w: _Worker, old: _Process, new: _Process) -> None:
        """``old`` (already in ``w.retiring``) drains once ``new`` listens in its slot (or has
        died trying: the slot is then started again as after any exit, and ``old`` drains all
        the same)."""
        try:
            async with trio.open_nursery() as either:
                either.start_soon(_set_then_cancel, new.ready, either.cancel_scope)
                either.start_soon(_set_then_cancel, new.exited, either.cancel_scope)
                either.start_soon(_set_then_cancel, old.exited, either.cancel_scope)
            # its plain same-node relays go on in the new one (agent/proxy/handoff.py)
            target = handoff_socket(own_handoff_folder(self.config.state_dir), new.pid)
            handoff_to = [str(target)] if new.ready.is_set() else []
            old.post(
                {"type": "drain", "timeout": self.config.drain_timeout_s, "handoff": handoff_to}
            )
            await old.exited.wait()
        finally:
            w.retiring.remove(old)

    async def _watch_memory(self) -> None:
        """Replace a worker that grew (recycle.py), one slot at a time."""
        policy = self.recycle_policy
        while True:
            await trio.sleep(RECYCLE_CHECK_S)
            if self.stopping or not self.accepting or any(w.retiring for w in self.workers):
                continue
            now = trio.current_time()
            for w in self.workers:
                p = w.current
                if p is None or p.watch is None or (rss := rss_bytes(p.pid)) is None:
                    continue
                clients, accepted = _clients_in(p.status)
                cpu = cpu_seconds(p.pid) or 0.0
                peak, p.peak = p.peak, 0
                opened = _open_in(p.status)
                if p.watch.grown(
                    policy, now, rss, clients, accepted, cpu, open_all=opened, peak=peak
                ):
                    log.info(
                        "proxy worker %d (pid %d) holds %.0f MiB (%.0f MiB fresh, %.0f MiB"
                        " before a burst), %d client connection(s) open: replacing it with a"
                        " fresh one (it drains)",
                        w.index,
                        p.pid,
                        rss / 2**20,
                        (p.watch.fresh or 0) / 2**20,
                        p.watch.baseline / 2**20,
                        clients,
                    )
                    w.recycled += 1
                    self.on_recycled("memory")
                    w.recycle.set()
                    break

    def recycle_all(self, reason: str = "asked") -> int:
        """Replace every worker now, each as a grown one is (a fresh one forked for its slot,
        the old one drains once it listens): what the admin port's `POST /workers/recycle`
        asks, so an operator or a test can see that a replacement cuts nothing. Returns how
        many are being replaced (none while the pool stops or does not accept)."""
        if self.stopping or not self.accepting:
            return 0
        replaced = 0
        for w in self.workers:
            if w.current is not None and not w.recycle.is_set():
                log.info("proxy worker %d (pid %d): replacing it, as asked", w.index, w.pid)
                w.recycled += 1
                self.on_recycled(reason)
                w.recycle.set()
                replaced += 1
        return replaced

    async def _send_loop(self, channel: MessageStream, outbox: trio.MemoryReceiveChannel) -> None:
        async for message in outbox:
            try:
                if isinstance(message, bytes):
                    await channel.send_encoded(message)
                else:
                    await channel.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _receive_loop(self, channel: MessageStream, w: _Worker, p: _Process) -> None:
        while True:
            try:
                message = await channel.receive()
            except (WireError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.error("proxy worker %d: bad channel: %s", w.index, exc)
                return
            if message is None:
                return
            if message["type"] == "ready":
                p.watch = MemoryWatch(ready_at=trio.current_time())
                p.ready.set()
                w.ready.set()
            elif message["type"] == "status":
                p.status = message["status"]
                p.view = message.get("view") or {}
                p.peak = max(p.peak, int(message.get("peak", 0)))
            elif message["type"] == "drained":
                p.left_open = int(message["left"])
            elif message["type"] == "resync" and self.store.tables is not None:
                log.warning(
                    "proxy worker %d could not apply a delta (it holds %r): sending the"
                    " snapshot whole",
                    w.index,
                    message.get("version"),
                )
                p.post(self._whole())
                p.holds = self.store.version


def _clients_in(status: dict[str, Any]) -> tuple[int, int]:
    """Client connections open on 15001, and connections accepted so far (15001 and 15008)."""
    proxy, inbound = status.get("proxy", {}), status.get("inbound", {})
    accepted = proxy.get("accepted_connections", 0) + inbound.get("accepted", 0)
    return proxy.get("active_connections", 0), accepted


def _current(w: _Worker) -> dict[str, Any]:
    return w.current.status if w.current else {}


def _tag_tunnels(status: dict[str, Any], worker: int) -> dict[str, Any]:
    """A worker's status with its index on each tunnel: each worker pools its own."""
    tunnels = [{**t, "worker": worker} for t in status.get("tunnels", [])]
    return {**status, "tunnels": tunnels}


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _exited(process: WorkerProcess) -> None:
    """Wait for ``process`` to end (its pidfd turns readable; the fork server reaps it)."""
    await trio.lowlevel.wait_readable(process.pidfd)
