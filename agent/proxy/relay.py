"""Copies bytes both ways between two streams, honouring half-close.

When one side finishes sending (EOF), the other side's write half is shut
(send_eof) and the opposite direction keeps flowing until it ends too; an
error on either side aborts both. Returns the bytes moved each way, counted as they move, so
a relay that ends in a reset, an error or a cancellation still reports every byte it passed.

Between two TCP sockets (the same-node path, and plain TCP to a pod) the bytes never
come up to Python: each direction ``splice(2)``s them from one socket into a pipe and
from the pipe into the other socket, so the kernel moves pages instead of copying them
twice through a Python bytes object, and one Python round trip moves up to a pipe's
worth (1 MiB) rather than one read. The pipe is made on the first byte, so an idle
connection holds none. Other streams (an HBONE tunnel) go through `receive_some` /
`send_all`, and so does a relay with a `Tap` (the `observe` level's parser), which is shown
each batch as it goes out (a request always before its response).

Idle connections are most of a proxy's connections, so until either side has something
to read the relay waits in the caller's task alone, as cheaply as trio allows: no
nursery, no task per direction, one cancel scope (the idle timeout's), one bare
`wait_task_rescheduled`. Its sockets sit in one epoll set shared by every idle relay of the
process, watched by one system task (`_IdleWatcher`), which wakes the relay when a socket turns
readable; a tunnel stream's arrivals (data, EOF, reset) wake it directly. Only then do the two
directions get a task each.

An idle timeout (Envoy tcp_proxy's `idle_timeout`, 1 h by default) ends a relay through which
no byte moved either way for that long: one cancel scope per relay, its deadline moved on as
bytes go out (per batch, at most once a second), so a peer cannot hold a connection, and what
the proxy keeps for it, forever. `RelayResult.idle_timed_out` tells.

A relay of two TCP sockets can be paused for a hand-off to another process (`Pause`, issue
#17: agent/proxy/handoff.py): each direction stops where its pipe is empty (before its next
read), so nothing of the connection is held in user space or in a pipe, and the relay returns
with `RelayResult.paused`; its `done` says which directions had already ended, and `relay`
given such a result resumes the connection (in the other process) with the others only.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import select
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio
from meshagent.agent import sockio
from meshagent.agent.hbone.connection import TunnelStream

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
# What a read asks for until one brings at least this much: a socket read allocates what it
# asks for, and under the workers' allocator (agent/workers/launch.py) 64 KiB or more is a map
# and an unmap per call, calls that find nothing included (here 17-51 µs against 1.5 µs for
# 32 KiB), two per small message. Bulk reads bring more and go on with CHUNK.
SMALL_READ = 32 * 1024
# How much one splice round moves at most: the pipe is grown to this (Linux's default
# pipe-max-size; a smaller limit just leaves the pipe at what the kernel allows) once a round
# filled the pipe's default size, so a short connection spends no system call on it.
PIPE_SIZE = 1024 * 1024
_DEFAULT_PIPE_SIZE = 64 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_CAN_SPLICE = hasattr(os, "splice")


# While bytes flow, a connection's counters are brought up to date at most this often (a
# long transfer shows in istio_tcp_*_bytes_total as it goes, not only when it ends).
PROGRESS_INTERVAL = 5.0
Progress = Callable[[int, int], None]  # (sent, received) since the last report
# An idle deadline is moved on at most this often (s; an eighth of a shorter timeout): a busy
# relay does not touch trio's deadline heap for every batch.
IDLE_RESOLUTION = 1.0


@dataclass(slots=True)  # one per open connection: no __dict__
class RelayResult:
    sent: int = 0  # client -> upstream
    received: int = 0  # upstream -> client
    # Told the bytes moved since its last call, at most every PROGRESS_INTERVAL while bytes
    # move (checked as each batch goes out: an idle relay costs nothing).
    on_progress: Progress | None = None
    _reported_sent: int = field(default=0, repr=False)
    _reported_received: int = field(default=0, repr=False)
    _next_progress: float = field(default=0.0, repr=False)
    idle_timed_out: bool = False  # the relay ended because nothing moved for its idle timeout
    paused: bool = False  # stopped by its `Pause` with nothing in flight: it can be handed on
    # (client -> upstream, upstream -> client) directions that ended (EOF passed on)
    done: tuple[bool, bool] = (False, False)
    _idle: trio.CancelScope | None = field(default=None, repr=False)
    _idle_timeout: float = field(default=math.inf, repr=False)

    def add_sent(self, moved: int) -> None:
        self.sent += moved
        self._moved()

    def add_received(self, moved: int) -> None:
        self.received += moved
        self._moved()

    def _moved(self) -> None:
        if self._idle is None and self.on_progress is None:
            return
        now = trio.current_time()  # once per batch, for both
        if self._idle is not None:
            deadline = now + self._idle_timeout
            if deadline - self._idle.deadline >= min(IDLE_RESOLUTION, self._idle_timeout / 8):
                self._idle.deadline = deadline
        if self.on_progress is not None:
            self._progress(now)

    def unreported(self) -> tuple[int, int]:
        """The bytes (sent, received) not yet given to `on_progress`; from now on, given."""
        sent, received = self.sent - self._reported_sent, self.received - self._reported_received
        self._reported_sent, self._reported_received = self.sent, self.received
        return sent, received

    def _progress(self, now: float) -> None:
        if not self._next_progress:
            self._next_progress = now + PROGRESS_INTERVAL
        elif now >= self._next_progress:
            self._next_progress = now + PROGRESS_INTERVAL
            assert self.on_progress is not None
            self.on_progress(*self.unreported())


Count = Callable[[int], None]  # told each batch of bytes once it went out


class Pause:
    """Asks a relay of two sockets to stop where nothing is in flight (module doc). `request`
    wakes the relay if it is idle, and cancels a direction's scope (one per direction for the
    whole relay) only while that direction waits for its next bytes with its pipe empty; a
    direction that finds it requested between batches stops too. Nothing is made per wait."""

    __slots__ = ("_parked", "_waiting", "requested")

    def __init__(self) -> None:
        self.requested = False
        self._waiting: list[trio.CancelScope] = []  # directions waiting for bytes now (<= 2)
        self._parked: _IdleWait | None = None  # the idle relay, parked in the watcher

    def request(self) -> None:
        self.requested = True
        for scope in self._waiting:
            scope.cancel()
        if self._parked is not None:
            _watcher().wake(self._parked)

    def reset(self) -> None:
        """Relay on (the hand-off did not happen)."""
        self.requested = False


async def _pipe(
    src: trio.abc.ReceiveStream,
    dst: trio.abc.SendStream,
    count: Count,
    seen: Callable[[bytes], None] | None = None,
    ended: Callable[[], None] | None = None,
) -> None:
    """One direction through Python; a tap's `seen` is shown each batch just before it goes
    out, `ended` its end. A TCP socket on either side goes through
    `sockio`: after a read that came back short (the socket drained) the next waits for
    readiness first, and a write the socket takes whole is one system call."""
    size = SMALL_READ
    drained = False
    sink = isinstance(src, TunnelStream) and type(dst) is trio.SocketStream
    if sink:
        src.sink = _Sink(dst.socket, count, seen)  # type: ignore[union-attr]
    try:
        while True:
            data = await sockio.receive_some(src, size, drained)
            if not data:
                break
            if seen is not None:
                # Shown before it goes out: once it is out, the answer it causes may come
                # back (through the other direction, or the tunnel reader's `_Sink`) before
                # this task runs again, and the tap must see a request before its response.
                seen(data)
            await sockio.send_all(dst, data)
            count(len(data))
            drained = len(data) < size
            size = CHUNK if len(data) >= SMALL_READ else SMALL_READ
    finally:
        if sink:
            src.sink = None  # type: ignore[union-attr]
    if ended is not None:
        ended()
    if isinstance(dst, trio.abc.HalfCloseableStream):
        await dst.send_eof()


class _Sink:
    """A tunnel stream's bytes written to the relay's socket by the connection's reader
    while the relay waits for them (`TunnelStream.sink`): a small message then costs no wake
    of the relay's task. Counted and shown to the tap as the relay would; a write the socket
    does not take whole, or an error, leaves the rest to the relay (which meets the error)."""

    __slots__ = ("count", "seen", "sock")

    def __init__(
        self, sock: trio.socket.SocketType, count: Count, seen: Callable[[bytes], None] | None
    ) -> None:
        self.sock = sock
        self.count = count
        self.seen = seen

    def __call__(self, data: bytes) -> int:
        try:
            taken = sockio.write_now(self.sock, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return 0
        if taken:
            # This runs in the tunnel connection's reader, which carries every other stream
            # of the connection: a bug in a counter or a tap ends nothing but is logged.
            try:
                self.count(taken)
                if self.seen is not None:
                    self.seen(data if taken == len(data) else data[:taken])
            except Exception:
                log.exception("counting or tapping relayed bytes failed")
        return taken


def _grow_pipe(w: int) -> None:
    with contextlib.suppress(OSError):  # EPERM above pipe-max-size: keep the default
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)


async def _readable(
    sock: trio.socket.SocketType, pause: Pause | None, stop: trio.CancelScope | None
) -> bool:
    """Wait until ``sock`` is readable; False if a pause was asked for before. A pause asked
    for meanwhile cancels ``stop`` (the direction's scope), which this wait sits in."""
    if pause is None:
        await trio.lowlevel.wait_readable(sock)
        return True
    if pause.requested:
        return False
    assert stop is not None
    pause._waiting.append(stop)
    try:
        await trio.lowlevel.wait_readable(sock)
    finally:
        pause._waiting.remove(stop)
    return True


async def _splice_pipe(
    src: trio.SocketStream, dst: trio.SocketStream, count: Count, pause: Pause | None = None
) -> bool:
    """One direction socket -> pipe -> socket in the kernel; `count` told what went out.
    True once it ended (EOF passed on), False if it stopped for ``pause`` (the pipe empty)."""
    if pause is None:
        return await _splice(src, dst, count, None, None)
    with trio.CancelScope() as stop:  # cancelled by the pause only while no byte is in flight
        return await _splice(src, dst, count, pause, stop)
    return False


async def _splice(
    src: trio.SocketStream,
    dst: trio.SocketStream,
    count: Count,
    pause: Pause | None,
    stop: trio.CancelScope | None,
) -> bool:
    src_sock, dst_sock = src.socket, dst.socket
    src_fd, dst_fd = src_sock.fileno(), dst_sock.fileno()
    pipe_r = pipe_w = -1
    try:
        # The pipe is made once the first byte is there, so that an idle connection holds none.
        if not sockio.readable_now((src_fd,)) and not await _readable(src_sock, pause, stop):
            return False
        pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        grown = False
        while True:
            if pause is not None and pause.requested:
                return False  # between batches: the pipe is empty
            # Fill: the pipe is empty here (it is drained below before the next fill), so
            # EAGAIN can only mean the socket has nothing to read yet.
            try:
                moved = os.splice(src_fd, pipe_w, PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                if not await _readable(src_sock, pause, stop):
                    return False
                continue
            if moved == 0:
                break  # EOF
            # Drain: everything in the pipe goes out before reading more.
            pending = moved
            while pending:
                try:
                    out = os.splice(pipe_r, dst_fd, pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst_sock)
                    continue
                pending -= out
                count(out)
            if not grown and moved >= _DEFAULT_PIPE_SIZE:  # a bulk transfer: bigger rounds
                _grow_pipe(pipe_w)
                grown = True
            await trio.lowlevel.checkpoint()
    finally:
        for fd in (pipe_r, pipe_w):
            if fd != -1:
                os.close(fd)
    await dst.send_eof()
    return True


def can_pause(a: trio.abc.Stream, b: trio.abc.Stream) -> bool:
    """Whether a relay of ``a`` and ``b`` can be paused for a hand-off (two TCP sockets)."""
    return _can_splice(a, b)


def _can_splice(a: trio.abc.Stream, b: trio.abc.Stream) -> bool:
    return (
        _CAN_SPLICE
        and type(a) is trio.SocketStream
        and type(b) is trio.SocketStream
        and a.socket.type == b.socket.type == trio.socket.SOCK_STREAM
    )


class _IdleWait:
    """One idle relay waiting: its task, its sockets' fds, and whether it was woken."""

    __slots__ = ("fds", "task", "watcher", "woken")

    def __init__(self, watcher: _IdleWatcher, task: trio.lowlevel.Task, fds: list[int]) -> None:
        self.watcher = watcher
        self.task = task
        self.fds = fds
        self.woken = False

    def abort(self, _: object) -> trio.lowlevel.Abort:
        """Cancelled while parked (a method, not a closure made per wait)."""
        self.watcher.forget(self)
        return trio.lowlevel.Abort.SUCCEEDED


class _IdleWatcher:
    """One epoll set for the idle relays' sockets of a trio run, and the task watching it."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.waits: dict[int, _IdleWait] = {}  # fd -> its relay's wait

    async def run(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self.epoll.fileno())
                for fd, _events in self.epoll.poll(0):
                    wait = self.waits.get(fd)
                    if wait is not None:
                        self.wake(wait)
                    else:  # not ours any more (already woken): stop reporting it
                        with contextlib.suppress(OSError):
                            self.epoll.unregister(fd)
        finally:
            self.epoll.close()

    def add(self, wait: _IdleWait) -> None:
        for fd in wait.fds:
            self.waits[fd] = wait
            self.epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)

    def forget(self, wait: _IdleWait) -> None:
        wait.woken = True
        for fd in wait.fds:
            if self.waits.get(fd) is wait:
                del self.waits[fd]
                with contextlib.suppress(OSError, ValueError):  # ValueError: epoll closed
                    self.epoll.unregister(fd)

    def wake(self, wait: _IdleWait) -> None:
        if not wait.woken:
            self.forget(wait)
            trio.lowlevel.reschedule(wait.task)


_WATCHER: trio.lowlevel.RunVar[_IdleWatcher] = trio.lowlevel.RunVar("relay_idle_watcher")


def _watcher() -> _IdleWatcher:
    try:
        return _WATCHER.get()
    except LookupError:
        watcher = _IdleWatcher()
        _WATCHER.set(watcher)
        trio.lowlevel.spawn_system_task(watcher.run, name="relay idle watcher")
        return watcher


async def _park(
    socks: Sequence[trio.socket.SocketType],
    tunnel: TunnelStream | None,
    pause: Pause | None = None,
) -> None:
    """Wait until a socket is readable, the tunnel has news or ``pause`` is requested; one
    bare trio wait."""
    fds = [sock.fileno() for sock in socks]
    if (tunnel is not None and tunnel.readable_now()) or sockio.readable_now(fds):
        await trio.lowlevel.checkpoint()
        return
    watcher = _watcher()
    wait = _IdleWait(watcher, trio.lowlevel.current_task(), fds)
    watcher.add(wait)
    if pause is not None:
        pause._parked = wait
    if tunnel is not None:
        tunnel.on_readable = lambda: watcher.wake(wait)
    try:
        await trio.lowlevel.wait_task_rescheduled(wait.abort)
    finally:
        if tunnel is not None:
            tunnel.on_readable = None
        if pause is not None:
            pause._parked = None


async def _wait_either(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
    """Return once either stream has something to read (data, EOF or an error), waiting in
    this task only; at once for streams it cannot watch without reading."""
    a_socket, b_socket = type(a) is trio.SocketStream, type(b) is trio.SocketStream
    if a_socket and b_socket:
        await _park((a.socket, b.socket), None)  # type: ignore[attr-defined]
    elif b_socket and isinstance(a, TunnelStream):
        await _park((b.socket,), a)  # type: ignore[attr-defined]
    elif a_socket and isinstance(b, TunnelStream):
        await _park((a.socket,), b)  # type: ignore[attr-defined]
    else:
        await trio.lowlevel.checkpoint()


async def _both_ways(
    client: trio.abc.Stream, upstream: trio.abc.Stream, result: RelayResult
) -> None:
    pipe = _splice_pipe if _can_splice(client, upstream) else _pipe
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipe, client, upstream, result.add_sent)
        nursery.start_soon(pipe, upstream, client, result.add_received)


async def _pausable(
    client: trio.SocketStream, upstream: trio.SocketStream, result: RelayResult, pause: Pause
) -> None:
    """Both directions in the kernel, each to its end or to the pause (`result.paused`)."""
    if not pause.requested:  # idle: nothing allocated yet; the pause wakes it
        await _park((client.socket, upstream.socket), None, pause)
    if pause.requested:
        result.paused = True
        return
    done = list(result.done)

    async def one(index: int, src: trio.SocketStream, dst: trio.SocketStream, count: Count):
        done[index] = await _splice_pipe(src, dst, count, pause)

    async with trio.open_nursery() as nursery:
        if not done[0]:
            nursery.start_soon(one, 0, client, upstream, result.add_sent)
        if not done[1]:
            nursery.start_soon(one, 1, upstream, client, result.add_received)
    result.done = (done[0], done[1])
    result.paused = not all(done)


class Tap(Protocol):
    """Told a copy of what a relay moves, each direction in order, as it goes out, so that
    a request is seen before its response (the `observe` level's parser,
    agent/proxy/http/observer.py). Must not raise."""

    def request_data(self, data: bytes) -> None: ...
    def response_data(self, data: bytes) -> None: ...
    def request_eof(self) -> None: ...
    def response_eof(self) -> None: ...


async def _tapped_both_ways(
    client: trio.abc.Stream, upstream: trio.abc.Stream, result: RelayResult, tap: Tap
) -> None:
    async with trio.open_nursery() as nursery:
        # no splice: the bytes must come up to Python to be seen
        nursery.start_soon(
            _pipe, client, upstream, result.add_sent, tap.request_data, tap.request_eof
        )
        nursery.start_soon(
            _pipe, upstream, client, result.add_received, tap.response_data, tap.response_eof
        )


async def relay(
    client: trio.abc.Stream,
    upstream: trio.abc.Stream,
    result: RelayResult | None = None,
    *,
    idle_timeout: float = math.inf,
    tap: Tap | None = None,
    pause: Pause | None = None,
) -> RelayResult:
    """Relay until both directions end, or no byte moved for `idle_timeout` s (then
    `result.idle_timed_out`); `result` (given by a caller that reports in a `finally`) holds
    the bytes moved so far even if the relay is cancelled. `tap` sees a copy of the bytes.
    ``pause`` (two TCP sockets, no tap: `can_pause`) may stop it for a hand-off
    (`result.paused`); a ``result`` whose ``done`` says a direction ended relays the other
    only (a resumed connection)."""
    result = RelayResult() if result is None else result
    result.paused = False
    with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as idle:
        if idle_timeout < math.inf:
            result._idle, result._idle_timeout = idle, idle_timeout
        try:
            if pause is not None:
                await _pausable(client, upstream, result, pause)  # type: ignore[arg-type]
            else:
                await _wait_either(client, upstream)  # idle: nothing else is allocated yet
                if tap is None:
                    await _both_ways(client, upstream, result)
                else:
                    await _tapped_both_ways(client, upstream, result, tap)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # a reset on either side ends the relay; both are closed by the caller
    result._idle = None
    result.idle_timed_out = idle.cancelled_caught
    return result
