"""Which connections the proxy joins in the kernel (agent/proxy/kjoin.py `joinable`): plain TCP
on both sides to a pod of this node, nothing tunnelled or wrapped in TLS by the proxy."""

from __future__ import annotations

import socket

import pytest
import trio
from meshagent.agent.proxy.kjoin import joinable
from meshagent.agent.proxy.upstream import Upstream
from meshagent.common.snapshot import Workload

NODE = "node-1"
LOCAL = Workload(uid="u1", namespace="shop", name="db", node=NODE, ips=["10.0.0.5"], meshed=True)
REMOTE = Workload(uid="u2", namespace="shop", name="db2", node="node-2", ips=["10.0.1.5"])


@pytest.fixture
def streams():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pair = (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )
    yield pair
    a.close()
    b.close()


def test_a_plain_connection_to_a_pod_of_this_node_is_joined(streams):
    client, server = streams
    assert joinable(client, Upstream(server, "mutual_tls", LOCAL), NODE)


@pytest.mark.parametrize(
    ("peer", "tunnelled"),
    [(REMOTE, False), (None, False), (LOCAL, True)],
    ids=["other-node", "unknown-peer", "tunnelled"],
)
def test_other_connections_stay_in_user_space(streams, peer, tunnelled):
    client, server = streams
    assert not joinable(client, Upstream(server, "none", peer, tunnelled=tunnelled), NODE)


class _Wrapped(trio.abc.HalfCloseableStream):
    """Stands for a stream the proxy wraps (TLS origination, an HBONE stream)."""

    async def send_all(self, data) -> None: ...
    async def wait_send_all_might_not_block(self) -> None: ...
    async def send_eof(self) -> None: ...
    async def receive_some(self, max_bytes=None) -> bytes:
        return b""

    async def aclose(self) -> None: ...


def test_a_wrapped_stream_is_not_joined(streams):
    client, _ = streams
    assert not joinable(client, Upstream(_Wrapped(), "none", LOCAL), NODE)
    assert not joinable(_Wrapped(), Upstream(streams[1], "none", LOCAL), NODE)
