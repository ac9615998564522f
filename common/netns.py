"""Entering a network namespace from one thread, and leaving it again.

setns(CLONE_NEWNET) moves only the calling thread, so callers run this in a
worker thread (trio.to_thread) and the thread is always moved back before the
context exits. Sockets opened inside stay in that namespace after leaving it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
import struct
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def entered(netns_path: str) -> Iterator[None]:
    """Run the body with this thread in the namespace at `netns_path`
    (/run/netns/NAME or /proc/PID/ns/net)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns_path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def socket_netns_cookie(sock: socket.socket) -> int:
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


def netns_cookie(netns_path: str) -> int:
    """The cookie of a namespace (what bpf_get_netns_cookie returns for it)."""
    with entered(netns_path), socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return socket_netns_cookie(s)
