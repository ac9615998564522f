"""Handing open connections to another proxy process instead of draining them (issue #17).

A connection whose two proxy-side sockets are plain TCP (a same-node L4 relay: client pod ->
node proxy -> server pod on this node, no TLS) carries nothing the proxy must keep: the kernel
holds both sockets, and a relay paused between batches (agent/proxy/relay.py `Pause`) holds no
byte of it. Such a connection can move to another process: its two file descriptors go over a
Unix socket with SCM_RIGHTS, with what the successor needs to go on as if it had relayed it
from the start (`HandedConnection`: its report labels, the bytes counted so far so that
``istio_tcp_*`` stay exact, when it opened, which directions ended, its idle timeout and the
facts its policy was checked on, so that a later DENY still closes it).

Where: every proxy process (each worker, or the agent's own data plane) listens on
``<state-dir>/handoff/<agent pod uid>/<pid>.sock`` (``local`` without ``$POD_UID``; paths in
agent/handover.py) until it drains. A worker replaced in its slot (agent/workers/recycle.py)
hands its connections to its replacement (the pool names its socket); an agent that drains
behind a successor (an upgrade) hands them to the successor's processes, found through the
hand-over registry. A process that drains holds on to what it could not hand (TLS, HBONE,
`observe`/`full` connections, kernel-joined ones, a connection whose relay never reached a
pause point) until they end or its drain deadline, as before.

What the taker does not carry over: the idle timeout counts from the hand-off (not from the
connection's last byte), and the connection does not count toward the taker's per-source
connection limit or a DestinationRule's circuit breaker (they bound what a source opens; it
was admitted where it opened).

The exchange, one Unix SOCK_SEQPACKET connection per handed connection: the sender sends one
message (the JSON record, the two fds attached); the receiver answers ``ok`` once it decoded it
and only then relays. No answer (timeout, error, the receiver gone) means not taken: the sender
shuts its end down first, so a late ``ok`` is either read then or never sent, and the two
processes never both relay one connection.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio
from meshagent.agent.proxy import live
from meshagent.agent.proxy.relay import Pause
from meshagent.agent.telemetry import ConnectionLabels
from meshagent.agent.telemetry.labels import Peer, ServiceRef
from meshagent.common.spiffe import Identity
from prometheus_client import Counter

log = logging.getLogger(__name__)

MAX_MESSAGE = 16 * 1024  # one record's JSON is well under 2 KiB
ACK = b"ok"
EXCHANGE_TIMEOUT = 5.0  # s for one connection's exchange with the receiver
VERSION = 1

HANDED = Counter(
    "meshagent_connections_handed",
    "Open connections handed to another proxy process (direction out) or taken from one"
    " (direction in) over SCM_RIGHTS at a drain: a worker replaced, an agent upgraded.",
    ("direction",),
)


class HandoffError(ValueError):
    """A hand-off message that cannot be taken (says what is wrong with it)."""


@dataclass(frozen=True)
class PolicyFacts:
    """What the proxy let the connection through on (agent/proxy/live.py's checks): the client
    pod (``source_uid``: it must stay in the mesh) and, for a meshed destination pod, its
    address and the client's identity (its AuthorizationPolicies must still allow it)."""

    source_uid: str | None
    source_name: str
    source_namespace: str
    source_identity: str | None
    source_ip: str
    ip: str
    port: int
    destination: bool  # check the destination pod's policy

    def check(self, node: str, trust_domain: str) -> live.Check:
        source = (
            live.source_left_check(self.source_uid, self.source_namespace, self.source_name)
            if self.source_uid is not None
            else None
        )
        destination = (
            live.destination_check(
                node,
                trust_domain,
                source=Identity.parse(self.source_identity) if self.source_identity else None,
                source_ip=self.source_ip,
                ip=self.ip,
                port=self.port,
            )
            if self.destination
            else None
        )
        return live.all_of(source, destination)


@dataclass(frozen=True)
class HandedConnection:
    """One connection as it moves: enough to relay, check and report it on."""

    labels: ConnectionLabels
    client: str  # the client's address (access log)
    upstream: str  # the endpoint's "ip:port" (access log)
    start: float  # wall-clock time it was accepted
    age: float  # s it had been open when handed
    sent: int  # bytes client -> upstream so far, all reported in the metrics
    received: int  # bytes upstream -> client so far, likewise
    done: tuple[bool, bool]  # (client -> upstream, upstream -> client) ended
    idle_timeout: float
    policy: PolicyFacts | None


def encode(conn: HandedConnection) -> bytes:
    labels = conn.labels
    record: dict[str, Any] = {
        "version": VERSION,
        "labels": {
            "reporter": labels.reporter,
            "source": asdict(labels.source),
            "destination": asdict(labels.destination),
            "service": asdict(labels.service),
            "request_protocol": labels.request_protocol,
            "connection_security_policy": labels.connection_security_policy,
        },
        "client": conn.client,
        "upstream": conn.upstream,
        "start": conn.start,
        "age": conn.age,
        "sent": conn.sent,
        "received": conn.received,
        "done": list(conn.done),
        "idle_timeout": None if conn.idle_timeout == float("inf") else conn.idle_timeout,
        "policy": asdict(conn.policy) if conn.policy is not None else None,
    }
    return json.dumps(record, separators=(",", ":")).encode()


def decode(data: bytes) -> HandedConnection:
    """The record in ``data``; raises HandoffError naming what is wrong."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HandoffError(f"hand-off message is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise HandoffError("hand-off message is not a JSON object")
    if record.get("version") != VERSION:
        raise HandoffError(f"hand-off message version {record.get('version')!r}, not {VERSION}")
    try:
        labels = record["labels"]
        policy = record["policy"]
        timeout = record["idle_timeout"]
        done = record["done"]
        if not (isinstance(done, list) and len(done) == 2):
            raise TypeError(f"done is {done!r}, not two booleans")
        return HandedConnection(
            labels=ConnectionLabels(
                labels["reporter"],
                Peer(**labels["source"]),
                Peer(**labels["destination"]),
                ServiceRef(**labels["service"]),
                labels["request_protocol"],
                labels["connection_security_policy"],
            ),
            client=str(record["client"]),
            upstream=str(record["upstream"]),
            start=float(record["start"]),
            age=float(record["age"]),
            sent=_count(record["sent"], "sent"),
            received=_count(record["received"], "received"),
            done=(bool(done[0]), bool(done[1])),
            idle_timeout=float("inf") if timeout is None else float(timeout),
            policy=PolicyFacts(**policy) if policy is not None else None,
        )
    except KeyError as exc:
        raise HandoffError(f"hand-off message lacks {exc}") from None
    except (TypeError, ValueError) as exc:
        raise HandoffError(f"hand-off message is malformed: {exc}") from None


def _count(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} is {value!r}, not a byte count")
    return value


# -- the exchange -----------------------------------------------------------------------------


async def send_connection(
    target: Path,
    conn: HandedConnection,
    fds: tuple[int, int],
    timeout: float = EXCHANGE_TIMEOUT,
) -> bool:
    """Give ``conn`` (its client and upstream socket fds) to the process listening at
    ``target``. True once it took it (the caller then closes its own fds, which leaves the
    connection open); False if it did not (nothing changed)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with sock:
        try:
            with trio.fail_after(timeout):
                await sock.connect(str(target))
                rights = array.array("i", fds)
                await sock.sendmsg([encode(conn)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
                return await sock.recv(len(ACK) + 1) == ACK
        except (OSError, trio.TooSlowError) as exc:
            log.info("hand-off to %s: %s", target, exc or "no answer in time")
        # not answered: shut down so no answer can come any more, then look for one that did
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        try:  # shut down for reading: returns at once, with an answer sent before or nothing
            return await sock.recv(len(ACK) + 1) == ACK
        except OSError:
            return False


Take = Callable[[HandedConnection, trio.SocketStream, trio.SocketStream], None]


async def receive_connection(sock: trio.socket.SocketType, take: Take, timeout: float) -> None:
    """Read one hand-off from ``sock`` (an accepted connection); ``take`` gets the connection
    once it is acknowledged. A bad message is logged and its fds closed."""
    try:
        with trio.fail_after(timeout):
            data, ancdata, flags, _ = await sock.recvmsg(
                MAX_MESSAGE, socket.CMSG_SPACE(2 * array.array("i").itemsize)
            )
    except (OSError, trio.TooSlowError) as exc:
        log.warning("hand-off: reading a message: %s", exc or "timeout")
        return
    fds = _fds(ancdata)
    try:
        if (uid := _peer_uid(sock)) != os.getuid():
            raise HandoffError(f"hand-off from uid {uid}, not this proxy's ({os.getuid()})")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise HandoffError("hand-off message or its fds truncated")
        if len(fds) != 2:
            raise HandoffError(f"hand-off message with {len(fds)} fd(s), not 2")
        conn = decode(data)
        for fd in fds:
            _check_tcp(fd)
    except (HandoffError, OSError) as exc:
        log.error("hand-off refused: %s", exc)
        for fd in fds:
            os.close(fd)
        return
    streams = [
        trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd))) for fd in fds
    ]
    try:
        await sock.send(ACK)
    except OSError as exc:  # the sender gave up: it relays on itself
        log.warning("hand-off: the sender went away before the answer: %s", exc)
        for stream in streams:
            stream.socket.close()
        return
    HANDED.labels("in").inc()
    take(conn, streams[0], streams[1])


def _peer_uid(sock: trio.socket.SocketType) -> int:
    """The uid of the process at the other end (the kernel's SO_PEERCRED): only another proxy
    process (the same user) may hand connections, with labels and policy facts it states."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def _check_tcp(fd: int) -> None:
    """Raises HandoffError unless ``fd`` is a TCP socket (left open either way)."""
    sock = socket.socket(fileno=fd)
    try:
        tcp = sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)
    finally:
        sock.detach()
    if not tcp:
        raise HandoffError(f"hand-off fd {fd} is not a TCP socket")


async def serve_handoff(
    path: Path,
    take: Take,
    *,
    timeout: float = EXCHANGE_TIMEOUT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Take connections handed to this process at ``path`` until cancelled (the socket file
    is removed then). Says started once it listens."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        await listener.bind(str(path))
        listener.listen(64)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(_receive_and_close, sock, take, timeout)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


async def _receive_and_close(sock: trio.socket.SocketType, take: Take, timeout: float) -> None:
    with sock:
        await receive_connection(sock, take, timeout)


class HandoffSender:
    """The relays of one proxy process that could be handed on, and where to, once it drains.

    A relay that may move registers with `pausable` for as long as it runs; `start` names the
    targets and pauses every one of them (and any that registers later); `send` gives one
    paused connection to a target, trying each in turn; once no target takes one, the rest
    stay here (they drain)."""

    def __init__(self) -> None:
        self.targets: list[Path] = []
        self._pauses: set[Pause] = set()
        self._next = 0
        self.handed = 0

    def __len__(self) -> int:
        return len(self._pauses)

    def pausable(self) -> _Pausable:
        """A relay's `Pause`, registered while inside (paused at once during a drain)."""
        return _Pausable(self)

    def start(self, targets: list[Path]) -> int:
        """Hand on to ``targets`` from now; returns the relays asked to pause."""
        self.targets = list(targets)
        if self.targets:
            for pause in self._pauses:
                pause.request()
        return len(self._pauses) if self.targets else 0

    async def send(self, conn: HandedConnection, fds: tuple[int, int]) -> bool:
        for _ in range(len(self.targets)):
            target = self.targets[self._next % len(self.targets)]
            self._next += 1
            if await send_connection(target, conn, fds):
                HANDED.labels("out").inc()
                self.handed += 1
                return True
            log.warning("hand-off: %s did not take %s -> %s", target, conn.client, conn.upstream)
        if self.targets:
            log.warning("hand-off: no process took a connection; the rest drain here")
        self.targets = []
        return False


class _Pausable:
    """`HandoffSender.pausable`: a class rather than a generator context manager, as every
    same-node L4 relay holds one while open."""

    __slots__ = ("pause", "sender")

    def __init__(self, sender: HandoffSender) -> None:
        self.sender = sender
        self.pause = Pause()

    def __enter__(self) -> Pause:
        if self.sender.targets:
            self.pause.request()
        self.sender._pauses.add(self.pause)
        return self.pause

    def __exit__(self, *_exc: object) -> None:
        self.sender._pauses.discard(self.pause)
