"""The upstream pool's idle handling: streams without a socket (HBONE tunnel streams) are
watched from the first sweep on, not from every release; sockets the server closed are closed
at the next sweep; a key dedicated to one downstream connection tells it and ends with it; what
a burst left idle over `max_idle` is closed at the next sweep."""

from __future__ import annotations

import trio
import trio.testing
from meshagent.agent.proxy.http import open_connection_pool, wire
from meshagent.agent.proxy.http.memstream import memory_stream_pair
from meshagent.agent.proxy.http.pool import SWEEP_INTERVAL
from meshagent.agent.proxy.lb import ClusterState
from meshagent.agent.proxy.routing import ClusterKey, ClusterSpec, UpstreamEndpoint
from meshagent.common.snapshot import Endpoint

from tests.waiting import await_until


def _cluster() -> ClusterState:
    endpoint = Endpoint(ip="10.0.0.1", node="n", workload_uid="w", ports={80: 80})
    return ClusterState(ClusterSpec(ClusterKey("h", 80), (UpstreamEndpoint(endpoint, 80),)))


def _memory_connect(servers: list[trio.abc.Stream], pair=trio.testing.memory_stream_pair):
    """A `Connect` opening in-memory streams (`pair`), their server ends kept in `servers`."""

    async def connect(endpoint: Endpoint, port: int, _spec=None) -> trio.abc.HalfCloseableStream:
        client, server = pair()
        servers.append(server)
        return client

    return connect


def _exchange(conn) -> None:
    """A request and its response, as the engine would run them (the codec only)."""
    conn.codec.send(wire.Request(method=b"GET", target=b"/", headers=[(b"host", b"h")]))
    conn.codec.send(wire.EndOfMessage())
    conn.codec.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert isinstance(conn.codec.next_event(), wire.Response)
    assert isinstance(conn.codec.next_event(), wire.EndOfMessage)


async def test_idle_socketless_connection_is_watched_after_a_sweep_and_dropped_on_close(
    autojump_clock,
):
    servers: list[trio.abc.Stream] = []
    connect = _memory_connect(servers)

    cluster = _cluster()
    ep = cluster.endpoints[0]
    async with open_connection_pool(connect) as pool:
        conn = await pool.acquire(cluster, ep)
        _exchange(conn)
        pool.release(conn, True)
        assert pool.idle_count() == 1 and conn.watch_scope is None  # no task per release
        assert await pool.acquire(cluster, ep) is conn  # taken again at once
        _exchange(conn)
        pool.release(conn, True)
        await trio.sleep(SWEEP_INTERVAL + 0.5)
        assert conn.watch_scope is not None  # idle through a sweep: watched
        await servers[0].aclose()  # the server closes it while idle
        await await_until(
            lambda: conn.closed and pool.idle_count() == 0,
            what="the pool drops the idle connection its server closed",
        )
        fresh = await pool.acquire(cluster, ep)
        assert fresh is not conn and len(servers) == 2


async def test_a_socket_the_server_closed_while_pooled_is_closed_and_its_dedicated_owner_told(
    autojump_clock,
):
    """nginx closes an idle keep-alive connection: the pool closes its end at the next sweep
    (no CLOSE-WAIT socket left behind) and tells the downstream the key is dedicated to."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def connect(endpoint: Endpoint, _port: int, _spec=None) -> trio.SocketStream:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        accepted.append(await listener.accept())
        return client

    told: list[str] = []
    cluster = _cluster()
    ep = cluster.endpoints[0]
    async with open_connection_pool(connect) as pool:
        end = pool.dedicate("tunnel-1", lambda: told.append("tunnel-1"))
        conn = await pool.acquire(cluster, ep, key="tunnel-1")
        _exchange(conn)
        pool.release(conn, True)
        assert pool.idle_count() == 1
        await accepted[0].aclose()  # the server ends the keep-alive connection
        await await_until(
            lambda: conn.closed and pool.idle_count() == 0,
            what="the pool closes the connection its server closed",
        )
        await trio.testing.wait_all_tasks_blocked()
        assert conn.stream.socket.fileno() == -1  # closed on our side too: no CLOSE-WAIT
        assert told == ["tunnel-1"]
        end()
    await listener.aclose()


async def test_ending_a_dedicated_key_closes_its_pooled_connections_only():
    servers: list[trio.abc.Stream] = []
    connect = _memory_connect(servers)

    cluster = _cluster()
    ep = cluster.endpoints[0]
    told: list[str] = []
    async with open_connection_pool(connect) as pool:
        end = pool.dedicate("mine", lambda: told.append("mine"))
        mine = await pool.acquire(cluster, ep, key="mine")
        other = await pool.acquire(cluster, ep, key="other")
        for conn in (mine, other):
            _exchange(conn)
            pool.release(conn, True)
        end()  # the downstream connection ended
        assert mine.closed and not other.closed
        assert pool.idle_count() == 1
        assert told == []  # its own end is no news to it


async def test_an_acquire_cancelled_while_taking_a_watched_connection_closes_it(autojump_clock):
    """The connection was out of the pool and not yet handed out: it used to be held open
    (and its tunnel stream counted) until the process ended."""
    servers: list[trio.abc.Stream] = []
    connect = _memory_connect(servers)

    cluster = _cluster()
    ep = cluster.endpoints[0]
    async with open_connection_pool(connect) as pool:
        conn = await pool.acquire(cluster, ep)
        _exchange(conn)
        pool.release(conn, True)
        await trio.sleep(SWEEP_INTERVAL + 0.5)
        assert conn.watch_scope is not None  # idle through a sweep: watched
        with trio.CancelScope() as scope:
            scope.cancel()  # e.g. the client went away as its request began
            await pool.acquire(cluster, ep)
        assert conn.closed and pool.idle_count() == 0
        await await_until(
            lambda: servers[0].receive_some(1),
            lambda data: data == b"",
            what="the server sees the connection closed",
        )


async def test_idle_connections_a_burst_left_over_max_idle_close_at_the_next_sweep(
    autojump_clock,
):
    """A burst of 10 concurrent requests leaves 10 idle connections: with max_idle 3, the 7
    oldest are closed at the next sweep (memory returns after the burst), and the 3 kept
    (the most recently used) serve the next request."""
    opened: list[trio.abc.Stream] = []
    cluster = _cluster()
    ep = cluster.endpoints[0]
    async with open_connection_pool(_memory_connect(opened), max_idle=3) as pool:
        burst = [await pool.acquire(cluster, ep) for _ in range(10)]
        for conn in burst:
            _exchange(conn)
            pool.release(conn, True)
        assert pool.idle_count() == 10
        await trio.sleep(SWEEP_INTERVAL * 2 + 0.5)
        assert pool.idle_count() == 3
        assert [c.closed for c in burst] == [True] * 7 + [False] * 3  # the oldest went
        again = await pool.acquire(cluster, ep)
        assert again is burst[-1] and len(opened) == 10  # the kept ones serve the next request


async def test_a_socketless_connection_the_server_closed_is_not_reused_even_unwatched():
    """Before any sweep (not watched yet), a same-node pair or tunnel stream whose far end
    closed says so (`readable_now`): a request takes a fresh connection, not the closed one
    (where a POST would fail 503 UC)."""
    servers: list[trio.abc.Stream] = []
    connect = _memory_connect(servers, memory_stream_pair)

    cluster = _cluster()
    ep = cluster.endpoints[0]
    async with open_connection_pool(connect) as pool:
        conn = await pool.acquire(cluster, ep)
        _exchange(conn)
        pool.release(conn, True)
        assert conn.watch_scope is None  # no sweep yet
        await servers[0].aclose()  # the far end closes the idle connection
        fresh = await pool.acquire(cluster, ep)
        assert fresh is not conn and conn.closed and len(servers) == 2
