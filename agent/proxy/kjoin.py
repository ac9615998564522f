"""Same-node L4 connections relayed in the kernel instead of by the proxy (issue #18 item 2).

Once the outbound proxy has authorized a connection whose client and server pods are both on
this node, and it would relay plain bytes (a `tcp-*` port, a passthrough, no TLS origination),
`relay_joined` joins its two sockets in the kernel (agent/datapath/join.py, bpf/join.c): from
then on each byte that arrives on one goes out of the other without coming up to Python, and
the kernel counts the bytes per socket. The proxy keeps what only it can do:

- the end of the connection: a redirect carries bytes, not FIN or RST. Each socket is watched
  (one epoll set per connection, woken by its state changes, not by its data); when one side
  ends its sending (EOF), the proxy waits until every byte the kernel counted from it is in
  the other socket's send queue (its TCP_INFO bytes_acked plus SIOCOUTQ), then shuts that
  socket's write half, as the user-space relay does; a reset or an error ends both;
- the counts: read every second for the progress of istio_tcp_*_bytes_total and the idle
  timeout, and once more when the connection ends (the access log and the final metrics);
- policy: the relay runs inside `live.track` like the user-space one, so a snapshot that no
  longer allows the connection cancels the wait and the caller closes both sockets (closing
  a socket takes it out of the sockhash).

Joined connections of an agent being replaced go on until they end or the old agent's drain
deadline, as plain ones do: the sockets and the maps they are in belong to the old agent's
processes.

The switch is the agent config's ``kernel_join``, off by default, for one reason measured on
this kernel (6.18): a stream verdict that redirects to a socket's egress has no backpressure.
The kernel takes each batch off the receiving socket at once (its receive window never closes)
and queues it on the partner's psock until the partner can send, so toward a receiver slower
than its sender the kernel holds whatever the sender manages to send (256 MiB sent at memory
speed to a reader of 80 MiB/s: ~250 MiB held at once). The user-space relay holds at most a
pipe (1 MiB) per direction. A bound needs the partner's progress in the verdict (e.g. its
bytes_acked through a sockhash lookup and bpf_tcp_sock, where the kernel offers them to sk_skb
programs) or an sk_msg design on the pods' own sockets; neither is here yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import select
import socket
import struct
import termios
from typing import TYPE_CHECKING

import trio
from meshagent.agent.datapath.join import Joined, SocketJoin
from meshagent.agent.proxy.relay import RelayResult
from prometheus_client import Counter

if TYPE_CHECKING:
    from meshagent.agent.proxy.upstream import Upstream

log = logging.getLogger(__name__)

JOINED = Counter(
    "meshagent_kernel_joined_connections",
    "Same-node L4 connections whose bytes the kernel relayed (sockhash + sk_skb verdict).",
)
JOINED_BYTES = Counter(
    "meshagent_kernel_joined_bytes",
    "Bytes of kernel-joined connections, both ways: moved without entering the proxy.",
)

POLL = 1.0  # s between count reads while nothing ends (progress, idle timeout)
# s between checks that a side's last bytes reached its partner's send queue (doubling up to
# the max while they do not move)
DRAIN_STEP = 0.002
DRAIN_STEP_MAX = 0.1
_TCP_INFO_LEN = 128
_BYTES_ACKED = struct.Struct("=Q")  # struct tcp_info: tcpi_bytes_acked at offset 120
_BYTES_ACKED_AT = 120
_MSG_PEEK_NOWAIT = socket.MSG_PEEK | socket.MSG_DONTWAIT


def joinable(client: trio.abc.Stream, upstream: Upstream, node: str) -> bool:
    """Whether a connection can be joined: plain TCP on both sides (no tunnel, no TLS this
    proxy originates) to a pod of this node (the client pod is one by construction)."""
    peer = upstream.peer
    return (
        type(client) is trio.SocketStream
        and type(upstream.stream) is trio.SocketStream
        and not upstream.tunnelled
        and peer is not None
        and peer.node == node
    )


def _written(sock: socket.socket) -> int:
    """Bytes ever queued for sending on ``sock``: acked, plus still in its send queue. Acked is
    read first, so a concurrent ACK can only make this smaller (the caller waits longer)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    acked = _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)[0]
    outq = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return acked + outq


def _ended(sock: socket.socket) -> bool | None:
    """True at EOF, False on a reset or error, None while open (or while its last bytes are
    still on their way through the program)."""
    try:
        data = sock.recv(1, _MSG_PEEK_NOWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return False
    return True if not data else None


class _Side:
    """One socket of the pair and what the watch knows of it."""

    def __init__(self, stream: trio.SocketStream) -> None:
        # a plain socket on a dup of the fd, for the synchronous calls (peek, TCP_INFO); the
        # stream keeps owning the socket and closes it
        self.sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self.fd = self.sock.fileno()
        self.eof = False


async def _shut_after_drain(src_bytes: int, dst: _Side, already: int, stall: float) -> None:
    """Shut ``dst``'s write half once the ``src_bytes`` the kernel took from its partner are
    all queued on it (``already``: what was queued on it before the join). The kernel may
    hold many of them still (module doc: it buffers toward a slow receiver), so this waits as
    long as they keep moving; ``stall`` s without progress gives up (the receiver stopped
    reading: the connection's idle timeout)."""
    last, moved_at, step = -1, trio.current_time(), DRAIN_STEP
    while (written := _written(dst.sock) - already) < src_bytes:
        now = trio.current_time()
        if written != last:
            last, moved_at, step = written, now, DRAIN_STEP
        elif now - moved_at >= stall:
            log.warning(
                "joined connection: %d of %d bytes never reached their socket",
                src_bytes - written,
                src_bytes,
            )
            break
        await trio.sleep(step)
        step = min(step * 2, DRAIN_STEP_MAX)
    with contextlib.suppress(OSError):
        dst.sock.shutdown(socket.SHUT_WR)


async def relay_joined(
    join: SocketJoin,
    client: trio.SocketStream,
    upstream: trio.SocketStream,
    result: RelayResult,
    *,
    idle_timeout: float = math.inf,
) -> bool:
    """Relay ``client`` <-> ``upstream`` in the kernel until both ends finish, one resets, or
    no byte moved for ``idle_timeout`` s (``result.idle_timed_out``); the bytes go into
    ``result`` as the user-space relay's do. False (nothing done) if the sockets could not be
    joined: the caller relays them itself."""
    a, b = _Side(client), _Side(upstream)
    try:
        before = (_written(a.sock), _written(b.sock))
        try:
            joined = join.join(a.sock, b.sock)
        except OSError as exc:
            log.warning("could not join a same-node connection in the kernel: %s", exc)
            return False
        JOINED.inc()
        try:
            await _watch(join, joined, a, b, before, result, idle_timeout)
        finally:
            _account(result, join.part(joined))
        return True
    finally:
        for side in (a, b):
            side.sock.detach()  # shutdown() acted on the socket; the fd dup goes here
            os.close(side.fd)


def _account(result: RelayResult, counted: tuple[int, int]) -> None:
    """Bring ``result`` up to the kernel's counts (a: from the client, b: to it)."""
    sent, received = counted
    if sent > result.sent:
        JOINED_BYTES.inc(sent - result.sent)
        result.add_sent(sent - result.sent)
    if received > result.received:
        JOINED_BYTES.inc(received - result.received)
        result.add_received(received - result.received)


async def _watch(
    join: SocketJoin,
    joined: Joined,
    a: _Side,
    b: _Side,
    before: tuple[int, int],
    result: RelayResult,
    idle_timeout: float,
) -> None:
    """Wait for the ends of both sides (module doc); return when both ended and their last
    bytes are through, at once on a reset or the idle timeout."""
    epoll = select.epoll()
    try:
        for side in (a, b):  # woken by ends and errors, never by data
            epoll.register(side.fd, select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP)
        moved_at, last = trio.current_time(), (0, 0)
        async with trio.open_nursery() as nursery:
            while not (a.eof and b.eof):
                with trio.move_on_after(POLL):
                    await trio.lowlevel.wait_readable(epoll.fileno())
                woken = bool(epoll.poll(0))
                counted = join.counted(joined)
                _account(result, counted)
                now = trio.current_time()
                if counted != last:
                    moved_at, last = now, counted
                elif now - moved_at >= idle_timeout:
                    result.idle_timed_out = True
                    nursery.cancel_scope.cancel()
                    return
                pending = False
                for side, other, index in ((a, b, 0), (b, a, 1)):
                    if side.eof:
                        continue
                    ended = _ended(side.sock)
                    if ended is False:  # reset or error: both end now (the caller closes)
                        nursery.cancel_scope.cancel()
                        return
                    if ended is None:
                        pending = True
                        continue
                    side.eof = True
                    epoll.unregister(side.fd)
                    total = join.counted(joined)[index]
                    nursery.start_soon(
                        _shut_after_drain, total, other, before[1 - index], idle_timeout
                    )
                if woken and pending:  # an end seen before its last bytes left: look again soon
                    await trio.sleep(DRAIN_STEP)
    finally:
        epoll.close()
