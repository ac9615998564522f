"""Joining two of the proxy's sockets in the kernel: the maps of bpf/join.c, from user space.

A same-node L4 connection has two sockets in the node proxy: the one it accepted from the
client pod and the one it dialled to the server pod. `SocketJoin.join` writes each one's
partner into ``join_peer``, then puts both (their fds) into the ``sock_join`` sockhash, whose
stream-verdict program from then on sends every byte that arrives on one out of the other.

Why this order, and the kick at the end: the partner entries exist before a socket enters the
hash, so its first batch is already redirected (never passed up to a proxy that would have to
forward it out of order); bytes that arrived before the insert are still in the socket's
receive queue, which the verdict path only reads when new data comes. Setting SO_RCVLOWAT
calls the socket's data-ready hook (tcp_set_rcvlowat), so those bytes go through the program,
in order, at once: a client that sent its request before the proxy accepted is not left
waiting.

`part` takes both out and returns the bytes the program counted per socket; closing a socket
takes it out of the hash too (the kernel's sockmap close hook), so a proxy that dies leaves no
socket behind. The process opens the maps once from their pins and keeps them: a datapath
rebuilt meanwhile (datapath/swap.py) leaves this process's connections in the maps they were
joined in, whose program stays attached to them until the last fd goes.
"""

from __future__ import annotations

import ctypes
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from meshagent.agent.datapath import bpfsys
from meshagent.agent.datapath.maps import MAP_JOIN_PEER, MAP_SOCK_JOIN, MeshJoin, PinnedMap

log = logging.getLogger(__name__)

SO_COOKIE = 57  # getsockopt: the socket's cookie, what bpf_get_socket_cookie() answers


def socket_cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


@dataclass(frozen=True)
class Joined:
    """One joined connection: the cookies of its two sockets."""

    a: int
    b: int


class SocketJoin:
    """The ``sock_join`` and ``join_peer`` maps of one process (module doc)."""

    def __init__(self, pin_dir: Path) -> None:
        self.sockets = PinnedMap(pin_dir / MAP_SOCK_JOIN, ctypes.c_uint64, ctypes.c_uint32)
        try:
            self.peers = PinnedMap(pin_dir / MAP_JOIN_PEER, ctypes.c_uint64, MeshJoin)
        except OSError:
            self.sockets.close()
            raise

    def close(self) -> None:
        self.sockets.close()
        self.peers.close()

    def join(self, a: socket.socket, b: socket.socket) -> Joined:
        """Join ``a`` and ``b`` both ways (module doc); raises OSError, leaving nothing."""
        joined = Joined(socket_cookie(a), socket_cookie(b))
        self.peers.update(ctypes.c_uint64(joined.a), MeshJoin(partner=joined.b))
        self.peers.update(ctypes.c_uint64(joined.b), MeshJoin(partner=joined.a))
        try:
            self.sockets.update(ctypes.c_uint64(joined.a), ctypes.c_uint32(a.fileno()))
            self.sockets.update(ctypes.c_uint64(joined.b), ctypes.c_uint32(b.fileno()))
        except OSError:
            self.part(joined)
            raise
        for sock in (a, b):  # the kick: bytes queued before the insert go through now
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return joined

    def counted(self, joined: Joined) -> tuple[int, int]:
        """Bytes the kernel sent on so far: (arrived on a, arrived on b)."""
        return self._bytes(joined.a), self._bytes(joined.b)

    def _bytes(self, cookie: int) -> int:
        value = self.peers.lookup(ctypes.c_uint64(cookie))
        return value.bytes if value is not None else 0

    def part(self, joined: Joined) -> tuple[int, int]:
        """Take both sockets out (if still in) and forget them; the final `counted`."""
        for cookie in (joined.a, joined.b):
            self.sockets.delete(ctypes.c_uint64(cookie))
        out = []
        for cookie in (joined.a, joined.b):
            value = self.peers.pop(ctypes.c_uint64(cookie))
            out.append(value.bytes if value is not None else 0)
        return out[0], out[1]

    def joined_sockets(self) -> int:
        """Sockets in the hash now (for status and tests)."""
        return sum(1 for _ in self.sockets.iter_keys())


def open_socket_join(pin_dir: Path) -> SocketJoin | None:
    """The process's joiner, or None where the datapath has no join maps (an older build):
    same-node connections are then relayed in user space, as with kernel_join off."""
    try:
        return SocketJoin(pin_dir)
    except bpfsys.BpfError as exc:
        log.warning("kernel_join: no join maps at %s (%s); relaying in user space", pin_dir, exc)
        return None
