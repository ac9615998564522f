"""DestinationRule `connectionPool` settings beyond the limits (issue #21): `tcp.tcpKeepalive`
(socket options on the upstream socket the proxy dials), `tcp.idleTimeout` and
`http.idleTimeout` (0s: never), as Istio documents them; what the schema refuses; and the
HTTP/1.1 pool closing a cluster's idle connection after its own idleTimeout."""

from __future__ import annotations

import math
import socket

import pytest
import trio
from meshagent.agent.proxy.http import open_connection_pool
from meshagent.agent.proxy.http.pool import SWEEP_INTERVAL
from meshagent.agent.proxy.lb import ClusterState
from meshagent.agent.proxy.routing import (
    ClusterKey,
    ClusterSpec,
    Keepalive,
    TrafficPolicy,
    UpstreamEndpoint,
    merge_policy,
)
from meshagent.agent.proxy.upstream import set_keepalive
from meshagent.common.istio import ResourceError, parse_resource
from meshagent.common.istio.support import warnings
from meshagent.common.snapshot import Endpoint

from tests.unit.test_http_pool import _exchange, _memory_connect


def dr(pool: dict):
    return parse_resource(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {"host": "reviews", "trafficPolicy": {"connectionPool": pool}},
        }
    )


def policy_of(pool: dict) -> TrafficPolicy:
    return merge_policy(dr(pool).spec.traffic_policy, None, 9080)


# (connectionPool as written, what the proxy's policy holds)
POLICIES = [
    # Istio's reference example (bookinfo-redis): time and interval, probes left to the kernel
    (
        {"tcp": {"tcpKeepalive": {"time": "7200s", "interval": "75s"}}},
        {"keepalive": Keepalive(time=7200, interval=75, probes=None)},
    ),
    (
        {"tcp": {"tcpKeepalive": {"probes": 3, "time": "2m", "interval": "10s"}}},
        {"keepalive": Keepalive(time=120, interval=10, probes=3)},
    ),
    ({"tcp": {"tcpKeepalive": {}}}, {"keepalive": Keepalive()}),  # SO_KEEPALIVE, kernel times
    ({"tcp": {"maxConnections": 5}}, {"keepalive": None, "tcp_idle_timeout": None}),
    ({"tcp": {"idleTimeout": "30s"}}, {"tcp_idle_timeout": 30.0, "http_idle_timeout": None}),
    ({"tcp": {"idleTimeout": "0s"}}, {"tcp_idle_timeout": math.inf}),  # Istio: 0s disables it
    ({"http": {"idleTimeout": "1.5s"}}, {"http_idle_timeout": 1.5, "tcp_idle_timeout": None}),
    ({"http": {"idleTimeout": "0s"}}, {"http_idle_timeout": math.inf}),
    # h2UpgradePolicy: UPGRADE sends HTTP/1.1 requests on as HTTP/2, unless useClientProtocol
    ({"http": {"h2UpgradePolicy": "UPGRADE"}}, {"h2_upgrade": True}),
    ({"http": {"h2UpgradePolicy": "UPGRADE", "useClientProtocol": True}}, {"h2_upgrade": False}),
    ({"http": {"h2UpgradePolicy": "DO_NOT_UPGRADE"}}, {"h2_upgrade": False}),
    ({"tcp": {"maxConnections": 5}}, {"h2_upgrade": False}),
]


@pytest.mark.parametrize(("pool", "expected"), POLICIES)
def test_the_proxy_policy_holds_what_istio_documents(pool, expected):
    policy = policy_of(pool)
    assert {name: getattr(policy, name) for name in expected} == expected


REFUSED = [
    ({"tcp": {"tcpKeepalive": {"time": "500ms"}}}, "tcp.tcpKeepalive.time", "whole seconds"),
    ({"tcp": {"tcpKeepalive": {"interval": "1.5s"}}}, "tcp.tcpKeepalive.interval", "whole"),
    ({"tcp": {"tcpKeepalive": {"time": "10h"}}}, "tcp.tcpKeepalive.time", "32767"),
    ({"tcp": {"tcpKeepalive": {"probes": 0}}}, "tcp.tcpKeepalive.probes", "greater than"),
    ({"tcp": {"tcpKeepalive": {"probes": 200}}}, "tcp.tcpKeepalive.probes", "less than"),
    ({"tcp": {"idleTimeout": "1us"}}, "tcp.idleTimeout", "invalid duration"),
    ({"http": {"idleTimeout": "-1s"}}, "http.idleTimeout", "invalid duration"),
]


@pytest.mark.parametrize(("pool", "field", "fragment"), REFUSED)
def test_values_the_kernel_or_istio_would_not_take_are_refused(pool, field, fragment):
    with pytest.raises(ResourceError) as caught:
        dr(pool)
    assert caught.value.path == f"spec.trafficPolicy.connectionPool.{field}"
    assert fragment in caught.value.message


WARNED = [
    ({"tcp": {"tcpKeepalive": {"time": "60s"}}}, "tcp.tcpKeepalive", "on another node"),
    ({"tcp": {"idleTimeout": "0s"}}, "tcp.idleTimeout", "3600s"),
    ({"tcp": {"idleTimeout": "2h"}}, "tcp.idleTimeout", "3600s"),
    ({"http": {"idleTimeout": "0s"}}, "http.idleTimeout", "300s"),
    ({"http": {"idleTimeout": "10m"}}, "http.idleTimeout", "300s"),
]


@pytest.mark.parametrize(("pool", "field", "fragment"), WARNED)
def test_what_a_far_node_cuts_short_is_said(pool, field, fragment):
    found = dict(warnings(dr(pool)))
    assert fragment in found[f"spec.trafficPolicy.connectionPool.{field}"]


@pytest.mark.parametrize(
    "pool", [{"tcp": {"idleTimeout": "60s"}}, {"http": {"idleTimeout": "60s"}}]
)
def test_idle_timeouts_every_node_honours_warn_nothing(pool):
    assert warnings(dr(pool)) == []


def _options(sock: socket.socket) -> tuple[int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


async def test_keepalive_options_land_on_a_real_socket():
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        kernel = _options(stream.socket)
        set_keepalive(stream, None)
        assert _options(stream.socket) == kernel and kernel[0] == 0  # untouched
        set_keepalive(stream, Keepalive(time=37, interval=11, probes=4))
        assert _options(stream.socket) == (1, 37, 11, 4)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        set_keepalive(stream, Keepalive(time=90))  # the others stay the kernel's
        assert _options(stream.socket) == (1, 90, kernel[2], kernel[3])
    listener.close()


def _cluster(policy: TrafficPolicy) -> ClusterState:
    endpoint = Endpoint(ip="10.0.0.1", node="n", workload_uid="w", ports={80: 80})
    key = ClusterKey("h", 80)
    return ClusterState(ClusterSpec(key, (UpstreamEndpoint(endpoint, 80),), policy))


async def test_a_clusters_http_idle_timeout_closes_its_pooled_connection(autojump_clock):
    """The pool's own idle timeout is 300 s; a cluster with `http.idleTimeout: 2s` has its idle
    connection closed at the first sweep after 2 s, another cluster's stays."""
    opened: list[trio.abc.Stream] = []
    short = _cluster(policy_of({"http": {"idleTimeout": "2s"}}))
    default = _cluster(TrafficPolicy())
    async with open_connection_pool(_memory_connect(opened)) as pool:
        conns = []
        for cluster in (short, default):
            conn = await pool.acquire(cluster, cluster.endpoints[0])
            _exchange(conn)
            pool.release(conn, True)
            conns.append(conn)
        await trio.sleep(SWEEP_INTERVAL + 0.5)
        assert [c.closed for c in conns] == [True, False]
        assert short.connections == 0 and default.connections == 1


async def test_idle_timeout_zero_keeps_a_pooled_connection(autojump_clock):
    opened: list[trio.abc.Stream] = []
    never = _cluster(policy_of({"http": {"idleTimeout": "0s"}}))
    async with open_connection_pool(_memory_connect(opened), idle_timeout=10) as pool:
        conn = await pool.acquire(never, never.endpoints[0])
        _exchange(conn)
        pool.release(conn, True)
        await trio.sleep(60)
        assert not conn.closed and await pool.acquire(never, never.endpoints[0]) is conn


async def test_a_shortened_idle_timeout_reaches_an_already_watched_connection(autojump_clock):
    """A connection idle through a sweep is watched with the timeout then in force (300 s); a
    snapshot that gives its cluster `http.idleTimeout: 2s` afterwards (the worker got the
    DestinationRule after serving) closes it at the next sweep, not 300 s later."""
    opened: list[trio.abc.Stream] = []
    cluster = _cluster(TrafficPolicy())
    async with open_connection_pool(_memory_connect(opened)) as pool:
        conn = await pool.acquire(cluster, cluster.endpoints[0])
        _exchange(conn)
        pool.release(conn, True)
        await trio.sleep(SWEEP_INTERVAL + 0.5)
        assert conn.watch_scope is not None and not conn.closed  # watched, 300 s to go
        cluster.update(
            ClusterSpec(
                cluster.spec.key, cluster.spec.endpoints, policy_of({"http": {"idleTimeout": "2s"}})
            )
        )
        await trio.sleep(SWEEP_INTERVAL)
        assert conn.closed and cluster.connections == 0 and pool.idle_count() == 0
