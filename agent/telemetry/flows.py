"""The flow tap: access-log entries as they happen, for `meshagent observe`.

What flows through: every process that proxies (the agent, each proxy worker) has one
`FlowTap`. While nobody watches, the access log asks it one attribute (`watched`) per entry and
nothing else happens; no line is formatted that would not be written anyway. While someone
watches, each entry's JSON line (the access log's, plus ``policy_reason``: why the decision
went that way, which names the policies checked when none matched) is put, without waiting, on
every watcher's bounded queue; a watcher that falls behind loses lines (counted, and told in a
``{"dropped": n}`` line) rather than slowing the proxy.

Watchers connect to a UNIX socket per process, ``<state_dir>/flows/agent.sock`` and
``worker-<i>.sock`` (mode 0600: the flows name workloads and paths; only root on the node reads
them, as the access log), and read newline-delimited JSON. `serve_flow_tap` serves one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import trio

log = logging.getLogger(__name__)

__all__ = ["QUEUE_LINES", "FlowTap", "flow_socket", "flows_dir", "serve_flow_tap"]

QUEUE_LINES = 4096  # per watcher


def flows_dir(state_dir: Path) -> Path:
    return state_dir / "flows"


def flow_socket(state_dir: Path, worker: int | None = None) -> Path:
    """The tap socket of the agent (`worker` None) or of proxy worker `worker`."""
    return flows_dir(state_dir) / ("agent.sock" if worker is None else f"worker-{worker}.sock")


class FlowTap:
    """Fan-out of access-log lines to the watchers of this process."""

    def __init__(self) -> None:
        self._watchers: list[_Watcher] = []

    @property
    def watched(self) -> bool:
        return bool(self._watchers)

    def publish(self, line: bytes, reason: str | None) -> None:
        """One access-log line (JSON object, ending in a newline) and its decision's reason."""
        if reason is not None:
            line = line[:-2] + b',"policy_reason":' + json.dumps(reason).encode() + b"}\n"
        for watcher in self._watchers:
            watcher.offer(line)


class _Watcher:
    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[bytes](QUEUE_LINES)
        self.dropped = 0

    def offer(self, line: bytes) -> None:
        try:
            self.send.send_nowait(line)
        except trio.WouldBlock:
            self.dropped += 1


async def _serve_watcher(tap: FlowTap, stream: trio.SocketStream) -> None:
    watcher = _Watcher()
    tap._watchers.append(watcher)
    try:
        async with stream:
            await stream.send_all(b"\n")  # hello: every flow from now on reaches this watcher
            async for line in watcher.receive:
                if watcher.dropped:
                    line = b'{"dropped":%d}\n' % watcher.dropped + line
                    watcher.dropped = 0
                await stream.send_all(line)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the watcher went away
    finally:
        tap._watchers.remove(watcher)


async def serve_flow_tap(
    tap: FlowTap, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve `tap` on the UNIX socket `path` (replacing a stale one) until cancelled."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_watcher, tap, stream)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        path.unlink(missing_ok=True)
