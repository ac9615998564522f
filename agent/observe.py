"""`meshagent observe`: the node's flows as they happen, read from the proxies' flow taps.

What flows through: the agent and each proxy worker serve their access-log entries on a UNIX
socket while someone watches (`telemetry.flows`); this module connects to every such socket
of the node (``<state_dir>/flows/*.sock``, looked for again every second, so a restarted
worker is picked up), reads their JSON lines, keeps those the filters let through and formats
them: one line per TCP connection (when it closes) and per HTTP request (when it completes).
"""

from __future__ import annotations

import json
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from meshagent.agent.telemetry.flows import flows_dir

RESCAN_INTERVAL = 1.0
GREETING_TIMEOUT = 5.0  # for every tap found to say hello (an older agent's says none)


@dataclass(frozen=True)
class FlowFilter:
    """Which flows to show: all the given conditions hold. `pod` is a workload name (a bare
    pod's own name, a Deployment pod's Deployment), with or without ``namespace/``."""

    namespace: str | None = None
    pod: str | None = None
    denied: bool = False

    def __call__(self, flow: dict) -> bool:
        ends = (
            (flow.get("source_namespace"), flow.get("source_workload")),
            (flow.get("destination_namespace"), flow.get("destination_workload")),
        )
        if self.namespace is not None and all(ns != self.namespace for ns, _ in ends):
            return False
        if self.pod is not None:
            ns, _, name = self.pod.rpartition("/")
            if not any(w == name and (not ns or n == ns) for n, w in ends):
                return False
        return not self.denied or is_denied(flow)


def is_denied(flow: dict) -> bool:
    return flow.get("policy_decision") == "deny" or flow.get("response_flags") in ("DENY", "RBAC")


def _peer(namespace: str | None, workload: str | None, address: str | None) -> str:
    if workload and workload != "unknown":
        return f"{namespace}/{workload}"
    return address or "unknown"


def render(flow: dict) -> str:
    """One flow as a line of text."""
    at = str(flow.get("start_time", ""))[11:23]  # hh:mm:ss.mmm (UTC)
    source = _peer(flow.get("source_namespace"), flow.get("source_workload"), None)
    if source == "unknown":
        source = str(flow.get("source_address") or "unknown")
    service = flow.get("destination_service")
    target = _peer(
        flow.get("destination_namespace"),
        flow.get("destination_workload"),
        flow.get("destination_address"),
    )
    where = f"{service} ({target})" if service and service != "unknown" else target
    if flow.get("kind") == "http":
        what = f"{flow.get('request_protocol')} {flow.get('method')} {flow.get('path')} "
        what += str(flow.get("response_code"))
    else:
        what = "tcp"
    if is_denied(flow):
        verdict = "DENIED"
    elif flow.get("policy_decision") == "allow":
        verdict = "allowed"
    else:
        verdict = "forwarded"
    if flow.get("policy"):
        verdict += f" by {flow['policy']}"
    elif flow.get("policy_reason") and verdict == "DENIED":
        verdict += f" ({flow['policy_reason']})"
    flags = flow.get("response_flags")
    extra = f" flags={flags}" if flags and flags != "-" else ""
    if flow.get("error"):
        extra += f" error={flow['error']}"
    return (
        f"{at} {source} -> {where} {what} {verdict} {flow.get('duration_ms')}ms"
        f" sent={flow.get('bytes_sent')}B received={flow.get('bytes_received')}B"
        f" [{flow.get('reporter')}]{extra}"
    )


class _Taps:
    """Connections to the node's flow-tap sockets, with partial lines per connection."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.selector = selectors.DefaultSelector()
        self.connected: dict[Path, socket.socket] = {}
        self.partial: dict[socket.socket, bytes] = {}
        self.greeted: set[socket.socket] = set()  # taps that said hello (an empty line)

    def rescan(self) -> None:
        for path in sorted(self.folder.glob("*.sock")) if self.folder.is_dir() else []:
            if path in self.connected:
                continue
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
            except OSError:  # a stale socket: its process is gone
                sock.close()
                continue
            self.connected[path] = sock
            self.partial[sock] = b""
            self.selector.register(sock, selectors.EVENT_READ, path)

    def read(self, timeout: float) -> Iterator[bytes]:
        for key, _ in self.selector.select(timeout):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            data = sock.recv(65536)
            if not data:  # that process exited
                self.selector.unregister(sock)
                del self.connected[key.data]
                del self.partial[sock]
                self.greeted.discard(sock)
                sock.close()
                continue
            *lines, self.partial[sock] = (self.partial[sock] + data).split(b"\n")
            if lines and sock not in self.greeted and lines[0] == b"":
                self.greeted.add(sock)
                lines = lines[1:]
            yield from lines

    def wait_greetings(self, timeout: float, clock: Callable[[], float]) -> list[bytes]:
        """Read until every connected tap said hello (it registered this watcher), at most
        `timeout` s (a tap of an older agent says none); returns the lines read meanwhile."""
        early: list[bytes] = []
        end = clock() + timeout
        while set(self.connected.values()) - self.greeted and clock() < end:
            early += self.read(max(0.0, min(0.1, end - clock())))
        return early

    def close(self) -> None:
        for sock in self.connected.values():
            sock.close()
        self.selector.close()


def follow(
    state_dir: Path,
    keep: Callable[[dict], bool],
    *,
    count: int | None = None,
    duration: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_ready: Callable[[int], None] | None = None,
) -> Iterator[dict]:
    """The node's flows that `keep` accepts, as they happen, until `count` were given or
    `duration` seconds passed (both None: until interrupted). ``{"dropped": n}`` entries (a
    tap's queue overflowed) are always given. `on_ready(taps)` is called once every tap is
    connected: flows from then on are seen. Raises FileNotFoundError when no agent on this
    node serves a tap."""
    taps = _Taps(flows_dir(state_dir))
    taps.rescan()
    if not taps.connected:
        taps.close()
        raise FileNotFoundError(f"no flow tap in {taps.folder}: is the agent running here?")
    early = taps.wait_greetings(GREETING_TIMEOUT, clock)
    if on_ready is not None:
        on_ready(len(taps.connected))
    end = None if duration is None else clock() + duration
    given = 0
    next_scan = clock() + RESCAN_INTERVAL
    try:
        while end is None or clock() < end:
            wait = RESCAN_INTERVAL if end is None else max(0.0, min(RESCAN_INTERVAL, end - clock()))
            lines, early = [*early, *taps.read(wait)], []
            for line in lines:
                if not line:
                    continue  # a hello of a tap found by a later rescan
                flow = json.loads(line)
                if "dropped" in flow or keep(flow):
                    yield flow
                    given += "dropped" not in flow
                    if count is not None and given >= count:
                        return
            if clock() >= next_scan:
                taps.rescan()
                next_scan = clock() + RESCAN_INTERVAL
    finally:
        taps.close()
