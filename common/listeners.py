"""Listening sockets that several agents (or workers) on one node share, and can pause.

During a DaemonSet surge upgrade two agents run on a node and both must bind 15001, 15008,
15020 and 15021: every listener is opened with ``SO_REUSEPORT`` and the kernel spreads new
connections over the group. An agent that hands the node over (or drains on SIGTERM) closes
its sockets but keeps relaying the connections it already accepted, so a `PausableListener`
stops accepting without ending the server that owns those connections. With
``net.ipv4.tcp_migrate_req`` on, connections still queued on a closed socket move to another
socket of the group instead of being reset (`enable_request_migration`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import trio

log = logging.getLogger(__name__)

BACKLOG = 4096
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def bind_reuseport(host: str, port: int, backlog: int = BACKLOG) -> trio.socket.SocketType:
    """A listening TCP socket on host:port (numeric address) with SO_REUSEPORT set."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


def enable_request_migration(path: Path = MIGRATE_REQ) -> bool:
    """Turn on tcp_migrate_req in this network namespace; False (logged) where it cannot be."""
    try:
        if path.read_text().strip() != "1":
            path.write_text("1\n")
        return True
    except OSError as exc:
        log.warning(
            "cannot enable %s (%s): connections queued on a listener closed at hand-over are "
            "reset instead of moving to the successor",
            path,
            exc,
        )
        return False


class PausableListener(trio.abc.Listener[trio.SocketStream]):
    """A SO_REUSEPORT listener that can close its socket and bind again later.

    While paused, ``accept`` waits (it does not fail), so the server using it keeps running
    and keeps the connections it accepted before.
    """

    def __init__(self, host: str, port: int, backlog: int = BACKLOG) -> None:
        self.host, self.port, self.backlog = host, port, backlog
        self._listener: trio.SocketListener | None = None
        self._opened = trio.Event()
        self._closed = False
        self.resume()

    @property
    def accepting(self) -> bool:
        return self._listener is not None

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (learn the port of ``port=0``); raises while paused."""
        if self._listener is None:
            raise trio.ClosedResourceError("paused")
        return self._listener.socket.getsockname()[:2]

    def resume(self) -> None:
        """Bind again (no-op while accepting). Raises OSError if the port cannot be bound."""
        if self._closed:
            raise trio.ClosedResourceError("listener closed")
        if self._listener is None:
            self._listener = trio.SocketListener(bind_reuseport(self.host, self.port, self.backlog))
            self.port = self.port or self._listener.socket.getsockname()[1]
            self._opened.set()

    def pause(self) -> None:
        """Close the socket: no new connections here; a waiting ``accept`` waits for resume."""
        if self._listener is not None:
            self._listener.socket.close()
            self._listener = None
            self._opened = trio.Event()

    async def accept(self) -> trio.SocketStream:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("listener closed")
            listener = self._listener
            if listener is None:
                await self._opened.wait()
                continue
            try:
                return await listener.accept()
            except trio.ClosedResourceError:
                if self._closed or listener is self._listener:
                    raise
                # paused while waiting: wait for the next socket

    async def aclose(self) -> None:
        self._closed = True
        self.pause()
        self._opened.set()  # wake a waiting accept, which then raises
        await trio.lowlevel.checkpoint()


# accept(2) errors that say the machine is out of something (trio.serve_listeners' list):
# logged, and accepting goes on after a pause.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_CAPACITY_PAUSE = 0.1


class InFlight:
    """Work a draining process must wait for that no connection count covers yet.

    A task started with `start_soon` runs only at the scheduler's next turn, so a connection
    just accepted is not in any handler's count until then; a worker replaced in that moment
    saw nothing open, exited and reset a connection it had taken a millisecond before (gRPC
    channels reconnecting to a worker about to drain). The same holds for the steps a server
    takes before it counts a connection as open (an HBONE handshake, a tunnel's handler
    dialling its pod). ``count`` covers them: from the accept to the handler's first step,
    whatever a server `hold`s, and what it adds itself and takes off in another task (a tunnel
    request, from its arrival until its handler returns)."""

    def __init__(self) -> None:
        self.count = 0

    def start_soon(
        self, nursery: trio.Nursery, fn: Callable[..., Awaitable[object]], *args
    ) -> None:
        """``nursery.start_soon(fn, *args)``, counted until ``fn`` starts."""
        self.count += 1
        nursery.start_soon(self._begin, fn, args)

    async def _begin(self, fn: Callable[..., Awaitable[object]], args: tuple) -> None:
        self.count -= 1  # before any checkpoint: ``fn`` counts what it serves from here on
        await fn(*args)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Counted while inside."""
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


async def serve_owned(
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    listeners: Sequence[trio.abc.Listener[trio.SocketStream]],
    *,
    in_flight: InFlight | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """`trio.serve_listeners` for a handler that closes the stream it is given itself, with
    each connection in ``in_flight`` from its accept until its handler starts.

    trio's closes each stream again after the handler with `trio.aclose_forcefully`, whose
    checkpoint raises and catches a Cancelled: on the proxy's per-connection path that is
    ~150 Python calls for a socket already closed. The listeners are closed on the way out."""
    in_flight = in_flight or InFlight()
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handler, nursery, in_flight)
        task_status.started()
    raise AssertionError("accept loops never return")  # pragma: no cover


async def _accept_loop(
    listener: trio.abc.Listener[trio.SocketStream],
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    nursery: trio.Nursery,
    in_flight: InFlight,
) -> NoReturn:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                log.error("accept failed: %s; retrying in %s s", exc, _CAPACITY_PAUSE)
                await trio.sleep(_CAPACITY_PAUSE)
            else:
                in_flight.start_soon(nursery, handler, stream)
