"""Same-node HTTP through one engine (issue 18, item 3), over real loopback sockets.

The source's HTTP/1.1 engine, the real `Connector` and the node's `InboundProxy` (its
`Destination` duties), a real pod (an h11 server) and a keep-alive client: the request is parsed
by one engine only, goes on a connection straight to the pod, and still gets every check and
report the destination gives a tunnelled request (a denial, a policy changed on a pooled
connection, the `reporter=destination` metrics with the hop's security); the same for gRPC calls
through the HTTP/2 engine.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace

import h2.events
import pytest
import trio
from meshagent.agent.proxy.http import (
    ConnectionPool,
    HttpContext,
    RequestRecord,
    h2proxy,
    h2wire,
    open_connection_pool,
    proxy_http1,
    proxy_http2,
)
from meshagent.agent.proxy.http import proxy as engine
from meshagent.agent.proxy.http.h2proxy import H2Peer
from meshagent.agent.proxy.http.memstream import memory_stream_pair
from meshagent.agent.proxy.inbound import Destination, InboundProxy
from meshagent.agent.proxy.inputs import ProxyInputs
from meshagent.agent.proxy.lb import Clusters
from meshagent.agent.proxy.routing import RouteTable, compile_routes
from meshagent.agent.proxy.upstream import Connector
from meshagent.agent.state import Tables
from meshagent.common.snapshot import Endpoint, Service, ServicePort, Snapshot, Workload

from benchmarks.h2_calls import MESSAGE
from benchmarks.h2_calls import _server as h2_server
from tests.unit.test_http_proxy import HOST, NS, PORT, Backend, Client

NODE = "n1"
SERVER_IP, CLIENT_IP = "127.0.0.1", "127.0.0.2"


class Metrics:
    """What the proxy counts, kept in lists (a fake of ProxyMetrics' HTTP part)."""

    def __init__(self) -> None:
        self.requests: list[tuple[object, int, str]] = []
        self.decisions: list[object] = []

    def http_request(self, labels, status, flags, *_args, **_kw) -> None:
        self.requests.append((labels, status, flags))

    def policy_decision(self, decision) -> None:
        self.decisions.append(decision)


def deny(*paths: str) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-paths", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "reviews"}},
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": list(paths)}}]}],
        },
    }


def snapshot(backend: Backend, *resources: dict) -> Snapshot:
    workloads = [
        Workload(
            uid="uid-reviews",
            namespace=NS,
            name="reviews",
            node=NODE,
            ips=[SERVER_IP],
            labels={"app": "reviews"},
            meshed=True,
        ),
        Workload(
            uid="uid-client", namespace=NS, name="client", node=NODE, ips=[CLIENT_IP], meshed=True
        ),
    ]
    endpoint = Endpoint(
        ip=SERVER_IP, node=NODE, workload_uid="uid-reviews", ports={PORT: backend.port}
    )
    service = Service(
        namespace=NS,
        name="reviews",
        vips=["10.96.0.10"],
        ports=[ServicePort(name="http", port=PORT, target_port=9080)],
        endpoints=[endpoint],
    )
    return Snapshot(
        node=NODE, workloads=workloads, services=[service], istio_resources=list(resources)
    ).with_version()


@dataclass
class _Node:
    """A node's proxy over one snapshot: the source's side (routes, clusters, the connector)
    and the destination's (the InboundProxy the connector hands same-node connections to)."""

    store: SimpleNamespace
    metrics: Metrics
    table: RouteTable
    clusters: Clusters
    connector: Connector
    source: Workload
    records: list[RequestRecord] = field(default_factory=list)  # the source's, as reported


def _node(snap: Snapshot, nursery: trio.Nursery, pool: ConnectionPool | None) -> _Node:
    store = SimpleNamespace(tables=Tables.build(snap))
    metrics = Metrics()
    inputs = ProxyInputs(store=store, node=NODE, trust_domain="cluster.local", metrics=metrics)
    table = compile_routes(snap)
    clusters = Clusters(rng=random.Random(1))
    clusters.sync(table)
    inbound = InboundProxy(inputs, pool)
    connector = Connector(inputs, pool=None, identities=None)
    connector.attach_local(inbound, nursery)
    inbound.connector = connector
    source = store.tables.workload_by_ip[CLIENT_IP]
    return _Node(store, metrics, table, clusters, connector, source)


async def _http1_client(
    nursery: trio.Nursery, node: _Node, pool: ConnectionPool, engine: bool
) -> Client:
    """A keep-alive client of the source's HTTP/1.1 engine; ``engine``: same-node requests
    go to the pod from that engine (False: through the destination's own engine)."""

    async def connect(ep, pod_port, _spec):
        return await node.connector.open(
            node.source, ep.ip, pod_port, CLIENT_IP, "http1", connect_timeout=math.inf,
            engine=engine,
        )  # fmt: skip

    ctx = HttpContext(
        routes=lambda: node.table.http_routes(HOST, PORT),
        clusters=node.clusters,
        pool=pool,
        connect=connect,
        pool_key=node.source.uid,
        on_request_done=node.records.append,
        peer=CLIENT_IP,
        source=node.source,
    )
    (listener,) = await nursery.start(
        partial(trio.serve_tcp, partial(proxy_http1, ctx=ctx), 0, host="127.0.0.1")
    )
    return Client(listener.socket.getsockname()[1])


@asynccontextmanager
async def _engine_to(
    pod: Callable[[trio.SocketStream], Awaitable[None]], name: str, engine: bool
) -> AsyncIterator[tuple[_Node, Client]]:
    """A node whose Service's one endpoint is ``pod`` (a handler served on loopback), and a
    keep-alive client of the source's HTTP/1.1 engine (`_http1_client`)."""
    backend = Backend(name)  # only its port and the snapshot's names are used
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, pod, 0, host="127.0.0.1"))
        backend.port = listener.socket.getsockname()[1]
        async with open_connection_pool() as pool:
            node = _node(snapshot(backend), nursery, pool)
            client = await _http1_client(nursery, node, pool, engine)
            yield node, client
            await client.close()
        nursery.cancel_scope.cancel()


async def test_a_same_node_request_is_parsed_once_and_checked_by_the_destination(monkeypatch):
    sessions: list[object] = []

    class Counted(engine._Session):
        def __init__(self, *args, **kw) -> None:
            sessions.append(self)
            super().__init__(*args, **kw)

    monkeypatch.setattr(engine, "_Session", Counted)
    backend = Backend("reviews-1")
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        snap = snapshot(backend, deny("/admin"))
        async with open_connection_pool() as pool:
            node = _node(snap, nursery, pool)
            store, metrics, records = node.store, node.metrics, node.records
            client = await _http1_client(nursery, node, pool, engine=True)
            with trio.fail_after(10):
                ok = await client.request("/")
                while not records:  # reported just after the response went
                    await trio.sleep(0.001)
                pod_port = records[0].upstream_info.stream.socket.getpeername()[1]
                denied = await client.request("/admin")
                store.tables = Tables.build(snapshot(backend, deny("/admin", "/")))
                after_change = await client.request("/")
            await client.close()
        nursery.cancel_scope.cancel()

    # one engine: one HTTP session (the client's); the upstream is the pod's own socket,
    # carrying the destination's duties
    assert len(sessions) == 1
    upstream = records[0].upstream_info
    assert isinstance(upstream.duties, Destination)
    assert isinstance(upstream.stream, trio.SocketStream) and pod_port == backend.port
    assert upstream.security == "mutual_tls"
    # the pod saw the allowed request only, on one connection kept for the next ones
    assert (ok.status, ok.text) == (200, "reviews-1")
    assert backend.served == 1 and backend.connections == 1
    # a denial by the destination's policy: its 403, no flag on the source's side
    assert (denied.status, denied.body) == (403, b"RBAC: access denied")
    assert [r.status for r in records] == [200, 403, 403]
    assert [r.flag_string for r in records] == ["-", "-", "-"]
    # a policy change applies to the next request on the same pooled pod connection
    assert (after_change.status, after_change.body) == (403, b"RBAC: access denied")
    assert [d.allowed for d in metrics.decisions] == [True, False, False]
    # the destination reports each request, as it would for a tunnelled one
    assert [(labels.reporter, status, flags) for labels, status, flags in metrics.requests] == [
        ("destination", 200, "-"),
        ("destination", 403, "RBAC"),
        ("destination", 403, "RBAC"),
    ]
    labels = metrics.requests[0][0]
    assert labels.connection_security_policy == "mutual_tls"
    assert labels.service.name == "reviews"


GRPC_CALL = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", HOST.encode()),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


async def _grpc_call(client: H2Peer, method: str) -> bytes | None:
    """One unary call on `client`; its grpc-status."""
    sid = client.conn.get_next_available_stream_id()
    inbox = client.open_inbox(sid)
    client.queue_headers(sid, [*GRPC_CALL[:3], (b":path", method.encode()), *GRPC_CALL[3:]])
    await client.send_data(sid, MESSAGE, end=True)
    status = None
    while not isinstance(event := await inbox.receive.receive(), h2.events.StreamEnded):
        if isinstance(event, h2.events.DataReceived):
            client.ack(sid, event.flow_controlled_length)
        elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            status = dict(event.headers).get(b"grpc-status", status)
        elif event is None or isinstance(event, h2.events.StreamReset):
            raise AssertionError(f"call {sid} failed: {event!r}")
    client.close_inbox(sid)
    return status


async def test_a_same_node_grpc_call_is_checked_per_call_by_the_destination(monkeypatch):
    """The HTTP/2 engine alone, straight to an h2c pod: a DENY on one method is status 7 for
    that call only, the other method's calls on the same channel reach the pod."""
    sessions: list[object] = []

    class Counted(h2proxy._Session):
        def __init__(self, *args, **kw) -> None:
            sessions.append(self)
            super().__init__(*args, **kw)

    monkeypatch.setattr(h2proxy, "_Session", Counted)
    pod_connections: list[object] = []

    async def pod(stream) -> None:
        pod_connections.append(stream)
        await h2_server(stream)

    backend = Backend("grpc-pod")  # only its port and the snapshot's names are used
    async with trio.open_nursery() as nursery:
        (pod_listener,) = await nursery.start(partial(trio.serve_tcp, pod, 0, host="127.0.0.1"))
        backend.port = pod_listener.socket.getsockname()[1]
        node = _node(snapshot(backend, deny("/meshtest.Echo/Unary")), nursery, None)
        metrics, source = node.metrics, node.source
        upstreams: list[object] = []

        async def connect(ep, pod_port, _spec):
            upstream = await node.connector.open(
                source, ep.ip, pod_port, CLIENT_IP, "http2", connect_timeout=math.inf, engine=True
            )
            upstreams.append(upstream)
            return upstream

        ctx = HttpContext(
            routes=lambda: node.table.http_routes(HOST, PORT),
            clusters=node.clusters,
            pool=None,
            connect=connect,
            peer=CLIENT_IP,
            source=source,
        )
        near, far = memory_stream_pair()
        nursery.start_soon(proxy_http2, far, ctx)
        client = H2Peer(near, h2wire.new_connection(client_side=True))
        nursery.start_soon(client.run, lambda event: False)
        with trio.fail_after(10):
            statuses = [
                await _grpc_call(client, path)
                for path in ("/meshtest.Echo/Who", "/meshtest.Echo/Unary", "/meshtest.Echo/Who")
            ]
        nursery.cancel_scope.cancel()

    assert statuses == [b"0", b"7", b"0"]
    assert len(sessions) == 1  # one HTTP/2 engine: the source's
    (upstream,) = upstreams  # one connection, straight to the pod, with the duties
    assert isinstance(upstream.duties, Destination) and len(pod_connections) == 1
    assert [(labels.reporter, status, flags) for labels, status, flags in metrics.requests] == [
        ("destination", 200, "-"),
        ("destination", 200, "RBAC"),
        ("destination", 200, "-"),
    ]


@pytest.mark.parametrize("one_engine", [True, False], ids=["one-engine", "two-engines"])
async def test_a_pod_that_drops_a_request_is_a_503_from_the_destination_retried(one_engine):
    """A pod that closes the connection on a request before answering: the destination's
    engine answers 503 UC in its place and the source's default retry policy (503) tries
    again; one engine gives the client the same as two (the old path, still there for callers
    that are no engine)."""
    seen: list[bytes] = []

    async def pod(stream: trio.SocketStream) -> None:
        request = await stream.receive_some(65536)
        seen.append(request)
        if len(seen) > 1:
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.aclose()

    async with _engine_to(pod, "dropper", engine=one_engine) as (node, client):
        metrics, records = node.metrics, node.records
        with trio.fail_after(10):
            reply = await client.request("/")
            while not records or len(metrics.requests) < 2:
                await trio.sleep(0.001)

    assert (reply.status, reply.body) == (200, b"ok")
    assert len(seen) == 2
    assert (records[0].status, records[0].attempts, records[0].flag_string) == (200, 2, "-")
    assert [(status, flags) for _, status, flags in metrics.requests] == [(503, "UC"), (200, "-")]


async def test_a_request_sent_again_after_a_stale_pod_connection_is_one_decision():
    """The pod closes a kept-alive connection just as the next request goes on it (before a
    response byte): the engine sends that request again on a new connection, as for any
    stale pooled connection, without running the destination's checks a second time. The
    destination counts one policy decision and one request per request the client made."""
    served: list[int] = []  # the connection (by order of accept) each answered request came on
    accepted = 0

    async def pod(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        connection = accepted
        for request in range(2):
            head = b""
            while b"\r\n\r\n" not in head:
                if not (data := await stream.receive_some(65536)):
                    return
                head += data
            if connection == 1 and request == 1:
                await stream.aclose()  # the second request on the first connection: gone
                return
            served.append(connection)
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.aclose()

    async with _engine_to(pod, "closer", engine=True) as (node, client):
        metrics, records = node.metrics, node.records
        with trio.fail_after(10):
            first = await client.request("/")
            while len(records) < 1:
                await trio.sleep(0.001)
            second = await client.request("/again")
            while len(records) < 2 or len(metrics.requests) < 2:
                await trio.sleep(0.001)

    assert [(r.status, r.body) for r in (first, second)] == [(200, b"ok"), (200, b"ok")]
    assert served == [1, 2]  # the second request went again, on a second connection
    assert [(r.status, r.attempts, r.flag_string) for r in records] == [(200, 1, "-")] * 2
    assert [d.allowed for d in metrics.decisions] == [True, True]  # one per request
    assert [(status, flags) for _, status, flags in metrics.requests] == [(200, "-")] * 2
