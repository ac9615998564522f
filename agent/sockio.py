"""Reading and writing a TCP socket stream with fewer trips through trio's scheduler.

trio's socket calls try first and wait after: a read of a socket that has nothing yet
raises EAGAIN (an exception with its message, and a system call for nothing) before every
wait, and each call that succeeds is a checkpoint (a round through the scheduler). On the
proxy's per-request path that was, per message and per socket, a failed read and two rounds.

Here a caller that expects to wait (a read after the socket drained, the next request head
on a keep-alive connection) waits for readiness first, and reads and writes are single
system calls (os.read, os.write) on the socket's descriptor. A read that did not wait is a
checkpoint (so a busy loop of reads stays fair); a write the socket takes whole is not (its
caller waits for the answer next), and one it does not take waits as trio's does.

Other streams (a tunnel stream, in-memory pairs in tests) take their own calls. The HBONE
TLS stream reads and writes its ciphertext with `read_ready` and `write_now`.

Opening and closing, the same way: `connect` dials an IP address without what
`trio.open_tcp_stream` does for a host name (an address lookup, a nursery and a task per
attempt: ~100 us more per connection here), and `close` closes a socket stream without the
Cancelled that `trio.aclose_forcefully` raises and catches in its checkpoint (~25 us).
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

__all__ = [
    "close",
    "connect",
    "read_ready",
    "readable_now",
    "receive_some",
    "send_all",
    "write_now",
]

A = TypeVar("A")
R = TypeVar("R")


async def connect(ip: str, port: int) -> trio.SocketStream:
    """A TCP stream to ``ip:port`` (an IPv4 or IPv6 address, not a name: it is not looked
    up). Raises OSError as `trio.open_tcp_stream` does; the socket is closed on any failure,
    a cancellation included."""
    sock = trio.socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    try:
        await sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def close(stream: trio.abc.AsyncResource) -> None:
    """Close ``stream`` at once, without a graceful goodbye (as `trio.aclose_forcefully`)."""
    if type(stream) is trio.SocketStream:
        stream.socket.close()
    else:
        await trio.aclose_forcefully(stream)


def readable_now(fds: Sequence[int]) -> bool:
    """Whether any of ``fds`` has bytes, an EOF or an error to read now (one poll(2)): a new
    connection's first bytes are often there already, and need no trip through epoll nor a
    deadline armed for a wait."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN | select.POLLRDHUP)
    return bool(poller.poll(0))


def _error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """An OSError of a socket call as trio's `SocketStream` raises it."""
    if exc.errno in (errno.EBADF, errno.ENOTSOCK):
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket error: {exc}")


async def read_ready(
    sock: trio.socket.SocketType,
    read: Callable[[int, A], R],
    arg: A,
    wait_first: bool,
) -> tuple[R, bool]:
    """``read(fd, arg)`` (``os.read`` with a size, ``os.readv`` with buffers) once the socket
    has something, and whether it waited. ``wait_first``: the socket is probably empty (it
    drained, or the peer waits for our answer), so wait for it to be readable before reading.
    Not a checkpoint unless it waited."""
    waited = wait_first
    if wait_first:
        await trio.lowlevel.wait_readable(sock)
    while True:
        try:
            return read(sock.fileno(), arg), waited
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            waited = True
        except OSError as exc:
            raise _error(exc) from exc


async def receive_some(stream: trio.abc.ReceiveStream, size: int, wait_first: bool) -> bytes:
    """Up to ``size`` bytes of ``stream`` (b"" at EOF), as `read_ready` reads them; a
    checkpoint either way."""
    if type(stream) is not trio.SocketStream:
        return await stream.receive_some(size)
    data, waited = await read_ready(stream.socket, os.read, size, wait_first)
    if not waited:
        await trio.lowlevel.checkpoint()
    return data


def write_now(sock: trio.socket.SocketType, data: bytes | bytearray | memoryview) -> int:
    """What the socket takes of ``data`` now, without waiting (0 if it is full)."""
    try:
        return os.write(sock.fileno(), data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise _error(exc) from exc


async def send_all(stream: trio.abc.SendStream, data: bytes | bytearray | memoryview) -> None:
    """All of ``data`` to ``stream``: at once if the socket takes it, else waiting for room."""
    if type(stream) is not trio.SocketStream:
        await stream.send_all(data)
        return
    sent = write_now(stream.socket, data)
    if sent < len(data):
        await stream.send_all(memoryview(data)[sent:])
