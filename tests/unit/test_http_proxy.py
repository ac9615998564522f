"""The HTTP/1.1 engine end to end in one process, over real loopback sockets.

Each test starts small h11 backends (each answers with its own name, optionally after a delay
or with a fixed status), compiles a snapshot with VirtualService/DestinationRule manifests into
routes, and drives `proxy_http1` behind a loopback listener with a keep-alive h11 client,
checking what a user of the mesh would see: who answered, status codes, response flags,
timings, ejections.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial

import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meshagent.agent.proxy.drain import Drain
from meshagent.agent.proxy.http import (
    ConnectionPool,
    HttpContext,
    HttpSettings,
    LocalResponse,
    RequestInfo,
    RequestRecord,
    UpstreamError,
    open_connection_pool,
    proxy_http1,
)
from meshagent.agent.proxy.lb import Clusters
from meshagent.agent.proxy.limits import Limits
from meshagent.agent.proxy.routing import compile_routes
from meshagent.common.snapshot import Endpoint, Service, ServicePort, Snapshot, Workload
from prometheus_client import REGISTRY

from tests.waiting import await_until

NS = "shop"
HOST = f"reviews.{NS}.svc.cluster.local"
PORT = 9080


# ---------------------------------------------------------------------------------------------
# Backends


@dataclass
class Backend:
    """A tiny keep-alive HTTP/1.1 server answering with its name."""

    name: str
    version: str = "v1"
    status: int = 200
    delay: float = 0.0
    port: int = 0
    served: int = 0
    connections: int = 0
    bodies: list[bytes] = field(default_factory=list)
    rude: bool = False  # closes after each response without saying so
    external: bool = False  # served by the test itself, not by open_mesh
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await _next(conn, stream)
                if not isinstance(event, h11.Request):
                    return
                if conn.they_are_waiting_for_100_continue:
                    await stream.send_all(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                    )
                body = b""
                while True:
                    part = await _next(conn, stream)
                    if isinstance(part, h11.Data):
                        body += part.data
                    else:
                        break
                self.bodies.append(body)
                self.served += 1
                if self.delay:
                    await trio.sleep(self.delay)
                text = self.name.encode()
                if event.target == b"/echo":
                    text = body
                headers = [
                    (b"content-length", str(len(text)).encode()),
                    (b"x-backend", self.name.encode()),
                ]
                await stream.send_all(
                    conn.send(h11.Response(status_code=self.status, headers=headers))
                )
                if event.method != b"HEAD":
                    await stream.send_all(conn.send(h11.Data(data=text)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE or self.rude:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1")
                )
                self.port = listeners[0].socket.getsockname()[1]
                task_status.started()

    def kill(self) -> None:
        """Stop listening and drop every connection (a crashed pod)."""
        self.scope.cancel()


async def _next(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        return event


# ---------------------------------------------------------------------------------------------
# The mesh under test


def _snapshot(backends: list[Backend], resources: list[dict]) -> Snapshot:
    workloads = [
        Workload(
            uid=f"uid-{b.name}",
            namespace=NS,
            name=b.name,
            node="n1",
            ips=["127.0.0.1"],
            labels={"app": "reviews", "version": b.version},
        )
        for b in backends
    ]
    endpoints = [
        Endpoint(ip="127.0.0.1", node="n1", workload_uid=f"uid-{b.name}", ports={PORT: b.port})
        for b in backends
    ]
    service = Service(
        namespace=NS,
        name="reviews",
        vips=["10.96.0.10"],
        ports=[ServicePort(name="http", port=PORT, target_port=9080)],
        endpoints=endpoints,
    )
    return Snapshot(node="n1", workloads=workloads, services=[service], istio_resources=resources)


def _subsets_dr(**policy) -> dict:
    spec = {
        "host": "reviews",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    }
    if policy:
        spec["trafficPolicy"] = policy
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": NS},
        "spec": spec,
    }


def _dr(**policy) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": NS},
        "spec": {"host": "reviews", "trafficPolicy": policy},
    }


def _vs(*http: dict) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": NS},
        "spec": {"hosts": ["reviews"], "http": list(http)},
    }


async def tcp_connect(endpoint: Endpoint, port: int, _spec=None) -> trio.SocketStream:
    try:
        return await trio.open_tcp_stream(endpoint.ip, port)
    except OSError as exc:
        raise UpstreamError("connect-failure", str(exc)) from exc


@dataclass
class Mesh:
    port: int
    clusters: Clusters
    records: list[RequestRecord]
    ctx: HttpContext
    pool: ConnectionPool
    tables: list = field(default_factory=list)
    retired_seen: list = field(default_factory=list)

    def set_table(self, table) -> None:
        """What the agent does on a new snapshot: new routes, clusters synced, pool told."""
        self.tables.append(table)
        retired = self.clusters.sync(table)
        self.retired_seen.extend(retired)
        self.pool.discard(retired)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        client = Client(self.port)
        try:
            yield client
        finally:
            await client.close()


@asynccontextmanager
async def open_mesh(
    backends: list[Backend],
    resources: list[dict] = (),
    *,
    request_filter=None,
    seed: int = 7,
    drain: Drain | None = None,
    settings: HttpSettings | None = None,
    limits: Limits | None = None,
) -> AsyncIterator[Mesh]:
    async with trio.open_nursery() as nursery:
        for b in backends:
            if not b.external:
                await nursery.start(b.serve)
        table = compile_routes(_snapshot(backends, list(resources)))
        assert not table.problems, table.problems
        clusters = Clusters(rng=random.Random(seed))
        clusters.sync(table)
        records: list[RequestRecord] = []
        tables = [table]
        async with open_connection_pool(tcp_connect) as pool:
            ctx = HttpContext(
                routes=lambda: tables[-1].http_routes(HOST, PORT),
                clusters=clusters,
                pool=pool,
                request_filter=request_filter,
                on_request_done=records.append,
                peer="127.0.0.1:1",
                rng=random.Random(seed),
                drain=drain,
                settings=settings or HttpSettings(),
                limits=limits,
            )
            listeners = await nursery.start(
                partial(trio.serve_tcp, partial(proxy_http1, ctx=ctx), 0, host="127.0.0.1")
            )
            yield Mesh(listeners[0].socket.getsockname()[1], clusters, records, ctx, pool, tables)
            nursery.cancel_scope.cancel()


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


class Client:
    """A keep-alive HTTP/1.1 client (reconnects when the proxy closed the connection)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.conn: h11.Connection | None = None
        self.connects = 0

    async def request(
        self, target: str = "/", *, method: str = "GET", headers=(), body: bytes = b""
    ) -> Reply:
        if self.conn is None or self.conn.our_state is not h11.IDLE:
            await self.close()
            self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            self.conn = h11.Connection(h11.CLIENT)
            self.connects += 1
        hdrs = [(b"host", HOST.encode()), *headers]
        if body:
            hdrs.append((b"content-length", str(len(body)).encode()))
        await self._send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())
        response = await _next(self.conn, self.stream)
        data = b""
        while True:
            event = await _next(self.conn, self.stream)
            if isinstance(event, h11.Data):
                data += event.data
            else:
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Reply(response.status_code, dict(response.headers), data)

    async def _send(self, event: h11.Event) -> None:
        await self.stream.send_all(self.conn.send(event))

    async def close(self) -> None:
        if self.stream is not None:
            await trio.aclose_forcefully(self.stream)
        self.stream = self.conn = None


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# ---------------------------------------------------------------------------------------------
# Routing


async def test_weighted_split_80_20_over_keep_alive():
    backends = [Backend("a", "v1"), Backend("b", "v2")]
    vs = _vs(
        {
            "route": [
                {"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20},
            ]
        }
    )
    with trio.fail_after(15):
        async with open_mesh(backends, [vs, _subsets_dr()]) as mesh, mesh.client() as client:
            seen = Counter([(await client.request()).text for _ in range(1000)])
            assert client.connects == 1  # one keep-alive connection carried them all
    assert seen["a"] + seen["b"] == 1000
    assert 750 <= seen["a"] <= 850, seen
    assert {r.cluster for r in mesh.records} == {
        f"outbound|{PORT}|v1|{HOST}",
        f"outbound|{PORT}|v2|{HOST}",
    }
    # Upstream connections are reused too: one per backend is enough for one client.
    assert backends[0].connections == 1 and backends[1].connections == 1


async def test_header_match_routes_canary_to_v2_only():
    backends = [Backend("a", "v1"), Backend("c", "v1"), Backend("b", "v2")]
    vs = _vs(
        {
            "match": [{"headers": {"x-canary": {"exact": "1"}}}],
            "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
        },
        {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
    )
    with trio.fail_after(10):
        async with open_mesh(backends, [vs, _subsets_dr()]) as mesh, mesh.client() as client:
            canary = {(await client.request(headers=[(b"x-canary", b"1")])).text for _ in range(50)}
            plain = {(await client.request()).text for _ in range(50)}
            other = {(await client.request(headers=[(b"x-canary", b"2")])).text for _ in range(20)}
    assert canary == {"b"}
    assert plain == {"a", "c"}
    assert other <= {"a", "c"}


async def test_no_matching_route_is_404_nr():
    vs = _vs(
        {"match": [{"uri": {"prefix": "/api"}}], "route": [{"destination": {"host": "reviews"}}]}
    )
    with trio.fail_after(5):
        async with open_mesh([Backend("a")], [vs]) as mesh, mesh.client() as client:
            ok = await client.request("/api/x?y=1")
            missing = await client.request("/other")
            again = await client.request("/api")  # the connection survived the 404
    assert (ok.status, ok.text) == (200, "a")
    assert missing.status == 404
    assert again.status == 200
    assert mesh.records[1].flags == ["NR"] and mesh.records[1].attempts == 0


# ---------------------------------------------------------------------------------------------
# Load balancing


async def _spread(mesh: Mesh, clients: int, per_client: int) -> Counter:
    seen: Counter = Counter()

    async def run() -> None:
        async with mesh.client() as client:
            for _ in range(per_client):
                seen[(await client.request()).text] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(run)
    return seen


async def test_least_request_avoids_slow_backend():
    backends = [Backend("fast1"), Backend("fast2"), Backend("slow", delay=0.05)]
    with trio.fail_after(15):
        async with open_mesh(backends, [_dr(loadBalancer={"simple": "LEAST_REQUEST"})]) as mesh:
            seen = await _spread(mesh, clients=6, per_client=40)
    assert sum(seen.values()) == 240
    assert seen["slow"] < seen["fast1"] / 2 and seen["slow"] < seen["fast2"] / 2, seen


async def test_round_robin_spreads_evenly():
    backends = [Backend("x"), Backend("y"), Backend("z", delay=0.02)]
    with trio.fail_after(15):
        mesh_cm = open_mesh(backends, [_dr(loadBalancer={"simple": "ROUND_ROBIN"})])
        async with mesh_cm as mesh, mesh.client() as client:
            seen = Counter([(await client.request()).text for _ in range(90)])
    assert seen == {"x": 30, "y": 30, "z": 30}


async def test_random_reaches_every_backend():
    backends = [Backend("x"), Backend("y"), Backend("z")]
    with trio.fail_after(10):
        mesh_cm = open_mesh(backends, [_dr(loadBalancer={"simple": "RANDOM"})])
        async with mesh_cm as mesh, mesh.client() as client:
            seen = Counter([(await client.request()).text for _ in range(300)])
    assert all(within_binomial(seen[name], 300, 1 / 3) for name in "xyz"), seen


# ---------------------------------------------------------------------------------------------
# Resilience


async def test_retries_hide_a_failing_backend():
    backends = [Backend("good1"), Backend("bad", status=503), Backend("good2")]
    vs = _vs(
        {
            "route": [{"destination": {"host": "reviews"}}],
            "retries": {"attempts": 3, "retryOn": "5xx"},
        }
    )
    with trio.fail_after(15):
        mesh_cm = open_mesh(backends, [vs, _dr(loadBalancer={"simple": "ROUND_ROBIN"})])
        async with mesh_cm as mesh, mesh.client() as client:
            replies = [await client.request() for _ in range(300)]
    assert Counter(r.status for r in replies) == {200: 300}
    assert backends[1].served > 50  # it was tried, and every try was hidden
    retried = [r for r in mesh.records if r.attempts > 1]
    assert retried and all(r.flags == [] for r in retried)


async def test_exhausted_retries_pass_the_response_with_urx():
    backends = [Backend("bad1", status=503), Backend("bad2", status=503)]
    vs = _vs(
        {
            "route": [{"destination": {"host": "reviews"}}],
            "retries": {"attempts": 2, "retryOn": "5xx"},
        }
    )
    with trio.fail_after(5):
        async with open_mesh(backends, [vs]) as mesh, mesh.client() as client:
            reply = await client.request()
    assert reply.status == 503 and reply.text in {"bad1", "bad2"}  # the upstream's own answer
    assert mesh.records[0].attempts == 3 and mesh.records[0].flags == ["URX"]


async def test_outlier_detection_ejects_and_returns_the_bad_backend():
    backends = [Backend("good1"), Backend("bad", status=503), Backend("good2")]
    dr = _dr(
        loadBalancer={"simple": "ROUND_ROBIN"},
        outlierDetection={
            "consecutive5xxErrors": 2,
            "interval": "1s",
            "baseEjectionTime": "0.6s",
            "maxEjectionPercent": 50,
        },
    )
    vs = _vs({"route": [{"destination": {"host": "reviews"}}], "retries": {"attempts": 0}})
    cluster = f"outbound|{PORT}||{HOST}"
    before = metric("meshagent_outlier_cluster_ejections_total", cluster=cluster)
    with trio.fail_after(10):
        async with open_mesh(backends, [vs, dr]) as mesh, mesh.client() as client:
            statuses = [(await client.request()).status for _ in range(12)]
            assert statuses.count(503) == 2  # two failures in a row, then it is ejected
            ejected = mesh.clusters.ejected()
            assert [(e.address, e.ejections) for e in ejected] == [
                (f"127.0.0.1:{backends[1].port}", 1)
            ]
            assert metric("meshagent_outlier_ejected_endpoints", cluster=cluster) == 1
            assert (
                metric("meshagent_outlier_cluster_ejections_total", cluster=cluster) == before + 1
            )
            assert 0.4 < ejected[0].until - ejected[0].ejected_at <= 0.6 + 1e-6
            served = backends[1].served
            assert {(await client.request()).text for _ in range(20)} == {"good1", "good2"}
            assert backends[1].served == served
            await trio.sleep(0.65)
            assert mesh.clusters.ejected() == []
            texts = {(await client.request()).text for _ in range(6)}
            assert "bad" in texts  # back in rotation after baseEjectionTime
            assert metric("meshagent_outlier_ejected_endpoints", cluster=cluster) <= 1


async def test_killed_backend_costs_no_request_after_it_is_gone():
    backends = [Backend("a"), Backend("b"), Backend("c")]
    vs = _vs(
        {
            "route": [{"destination": {"host": "reviews"}}],
            "retries": {"attempts": 2, "retryOn": "connect-failure,reset"},
        }
    )
    answers: list[tuple[float, int]] = []  # (when the request started, its status)
    killed_at = math.inf
    with trio.fail_after(60):  # a bound for a hang only: a loaded machine is slow
        async with open_mesh(backends, [vs]) as mesh:

            async def load() -> None:
                async with mesh.client() as client:
                    for _ in range(150):
                        started = trio.current_time()
                        try:
                            status = (await client.request()).status
                        except (h11.RemoteProtocolError, trio.BrokenResourceError):
                            status = 0  # a response cut short (the backend died under it)
                            await client.close()
                        answers.append((started, status))
                        await trio.sleep(0.001)

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(load)
                # Killed once it has served a few (not after a fixed 0.15 s: on a loaded
                # machine that passed before it served any), with most requests still to come.
                await await_until(lambda: backends[1].served, lambda n: n >= 3, what="b serves")
                backends[1].kill()
                killed_at = trio.current_time()
    after = [status for started, status in answers if started > killed_at]
    assert len(after) > 300  # the test is about these
    assert [s for s in after if s != 200] == []
    assert len(answers) == len(mesh.records) == 600


async def test_route_timeout_gives_504_in_time():
    vs = _vs({"route": [{"destination": {"host": "reviews"}}], "timeout": "0.5s"})
    with trio.fail_after(10):
        async with open_mesh([Backend("sleepy", delay=2.0)], [vs]) as mesh, mesh.client() as client:
            started = trio.current_time()
            reply = await client.request()
            elapsed = trio.current_time() - started
    assert reply.status == 504 and reply.text == "upstream request timeout"
    assert 0.45 <= elapsed < 1.0
    assert mesh.records[0].flags == ["UT"]


async def test_per_try_timeout_retries_on_another_endpoint():
    backends = [Backend("slow", delay=2.0), Backend("quick")]
    vs = _vs(
        {
            "route": [{"destination": {"host": "reviews"}}],
            "retries": {"attempts": 1, "perTryTimeout": "0.2s", "retryOn": "reset"},
        }
    )
    with trio.fail_after(10):
        mesh_cm = open_mesh(backends, [vs, _dr(loadBalancer={"simple": "ROUND_ROBIN"})])
        async with mesh_cm as mesh, mesh.client() as client:
            replies = [await client.request() for _ in range(4)]
    assert [r.text for r in replies] == ["quick"] * 4
    assert max(r.attempts for r in mesh.records) == 2


async def test_fault_abort_half_the_requests():
    vs = _vs(
        {
            "route": [{"destination": {"host": "reviews"}}],
            "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 50}}},
        }
    )
    with trio.fail_after(10):
        async with open_mesh([Backend("a")], [vs]) as mesh, mesh.client() as client:
            replies = [await client.request() for _ in range(400)]
    aborted = [r for r in replies if r.status == 503]
    assert within_binomial(len(aborted), 400, 0.5)
    assert all(r.text == "fault filter abort" for r in aborted)
    assert {r.status for r in replies} == {200, 503}
    assert all(r.flags == ["FI"] for r in mesh.records if r.status == 503)


async def test_fault_delay():
    vs = _vs(
        {
            "route": [{"destination": {"host": "reviews"}}],
            "fault": {"delay": {"fixedDelay": "0.2s", "percentage": {"value": 100}}},
        }
    )
    with trio.fail_after(5):
        async with open_mesh([Backend("a")], [vs]) as mesh, mesh.client() as client:
            started = trio.current_time()
            reply = await client.request()
            elapsed = trio.current_time() - started
    assert reply.status == 200 and 0.2 <= elapsed < 0.6
    assert mesh.records[0].flags == ["DI"]


async def _concurrent_requests(mesh: Mesh, n: int) -> list[Reply]:
    """`n` requests at once, each from its own client connection."""
    replies: list[Reply] = []

    async def one() -> None:
        async with mesh.client() as client:
            replies.append(await client.request())

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return replies


async def test_max_connections_overflow_is_503_uo():
    dr = _dr(connectionPool={"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}})
    backend = Backend("a", delay=0.1)
    with trio.fail_after(10):
        async with open_mesh([backend], [dr]) as mesh:
            replies = await _concurrent_requests(mesh, 5)
    statuses = Counter(r.status for r in replies)
    assert statuses == {200: 2, 503: 3}  # one in flight, one pending, three overflow
    overflowed = [r for r in mesh.records if r.status == 503]
    assert all(r.flags == ["UO"] for r in overflowed)
    assert backend.connections == 1


async def test_http2_max_requests_bounds_requests_in_flight_with_503_uo():
    """Issue #21: `http.http2MaxRequests` (Envoy's max_requests, HTTP/1.1 too): two requests in
    flight to the cluster, the others overflow at once, whatever the connection limits."""
    dr = _dr(connectionPool={"http": {"http2MaxRequests": 2}})
    backend = Backend("a", delay=0.2)
    with trio.fail_after(10):
        async with open_mesh([backend], [dr]) as mesh:
            replies = await _concurrent_requests(mesh, 5)
            async with mesh.client() as client:
                after = await client.request()  # the slots came back
    assert Counter(r.status for r in replies) == {200: 2, 503: 3}
    assert all(r.flags == ["UO"] for r in mesh.records if r.status == 503)
    assert after.status == 200 and backend.served == 3


@pytest.mark.parametrize(("max_retries", "served"), [(None, 6), (1, 4)])
async def test_max_retries_bounds_the_retries_in_flight(max_retries, served):
    """Issue #21: `http.maxRetries`: three requests fail at once against a backend answering
    503, each may retry once. Unbounded, each retries (6 attempts); with maxRetries 1 only the
    first to fail retries, the two others pass the 503 on (4 attempts); all end 503."""
    pool = {"http": {"maxRetries": max_retries}} if max_retries else {"tcp": {}}
    vs = _vs(
        {
            "route": [{"destination": {"host": "reviews"}}],
            "retries": {"attempts": 1, "retryOn": "5xx"},
        }
    )
    backend = Backend("bad", status=503, delay=0.2)
    with trio.fail_after(10):
        async with open_mesh([backend], [vs, _dr(connectionPool=pool)]) as mesh:
            replies = await _concurrent_requests(mesh, 3)
    assert [r.status for r in replies] == [503] * 3 and backend.served == served


async def test_no_endpoints_is_503_uh():
    with trio.fail_after(5):
        async with open_mesh([], []) as mesh, mesh.client() as client:
            reply = await client.request()
    assert (reply.status, reply.text) == (503, "no healthy upstream")
    assert mesh.records[0].flags == ["UH"]


async def test_unreachable_endpoint_is_503_uf_urx():
    dead = Backend("dead")
    with trio.fail_after(5):
        async with open_mesh([dead]) as mesh:
            dead.kill()
            await trio.sleep(0.01)
            async with mesh.client() as client:
                reply = await client.request()
    assert reply.status == 503
    # Istio's default policy retried the connect failure twice, then gave up.
    assert mesh.records[0].flags == ["UF", "URX"] and mesh.records[0].attempts == 3


# ---------------------------------------------------------------------------------------------
# HTTP handling


async def test_malformed_request_is_400_and_closed():
    with trio.fail_after(5):
        async with open_mesh([Backend("a")]) as mesh:
            stream = await trio.open_tcp_stream("127.0.0.1", mesh.port)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(4096):
                data += chunk
            await stream.aclose()
            # The proxy still serves other connections.
            async with mesh.client() as client:
                ok = await client.request()
    assert data.startswith(b"HTTP/1.1 400 ")
    assert ok.status == 200
    assert mesh.records[0].flags == ["DPE"]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET /\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nHost: x\r\n\r\n",
    ],
)
async def test_garbage_never_crashes_the_proxy(garbage: bytes):
    with trio.fail_after(5):
        async with open_mesh([Backend("a")]) as mesh:
            stream = await trio.open_tcp_stream("127.0.0.1", mesh.port)
            await stream.send_all(garbage)
            data = b""
            while chunk := await stream.receive_some(4096):
                data += chunk
            await stream.aclose()
            async with mesh.client() as client:
                assert (await client.request()).status == 200
    assert data.startswith((b"HTTP/1.1 4", b"HTTP/1.1 501 "))


async def test_request_filter_answers_locally():
    async def deny_admin(info: RequestInfo) -> LocalResponse | None:
        if info.path.startswith("/admin"):
            return LocalResponse(403, b"RBAC: access denied", flags=("RBAC",))
        return None

    with trio.fail_after(5):
        mesh_cm = open_mesh([Backend("a")], request_filter=deny_admin)
        async with mesh_cm as mesh, mesh.client() as client:
            denied = await client.request("/admin?x=1", method="POST", body=b"x" * 5000)
            allowed = await client.request("/shop")
    assert (denied.status, denied.text) == (403, "RBAC: access denied")
    assert allowed.status == 200 and client.connects == 1
    assert mesh.records[0].flags == ["RBAC"] and mesh.records[0].cluster == ""


async def test_bodies_stream_both_ways_and_large_bodies_are_not_retried():
    backend = Backend("a")
    vs = _vs(
        {
            "route": [{"destination": {"host": "reviews"}}],
            "retries": {"attempts": 2, "retryOn": "5xx"},
        }
    )
    small = b"s" * 1000
    large = bytes(range(256)) * 4096  # 1 MiB: beyond the 64 KiB retry buffer
    with trio.fail_after(10):
        async with open_mesh([backend], [vs]) as mesh, mesh.client() as client:
            r1 = await client.request("/echo", method="POST", body=small)
            r2 = await client.request("/echo", method="POST", body=large)
    assert r1.body == small and r2.body == large
    assert backend.bodies == [small, large]
    assert mesh.records[1].bytes_received == len(large) and mesh.records[1].bytes_sent == len(large)


async def test_chunked_request_and_expect_100_continue():
    backend = Backend("a")
    with trio.fail_after(5):
        async with open_mesh([backend]) as mesh:
            stream = await trio.open_tcp_stream("127.0.0.1", mesh.port)
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method="POST",
                target="/echo",
                headers=[
                    (b"host", b"reviews"),
                    (b"transfer-encoding", b"chunked"),
                    (b"expect", b"100-continue"),
                ],
            )
            await stream.send_all(conn.send(request))
            first = await _next(conn, stream)
            assert isinstance(first, h11.InformationalResponse) and first.status_code == 100
            for part in (b"hello ", b"chunked ", b"world"):
                await stream.send_all(conn.send(h11.Data(data=part)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            response = await _next(conn, stream)
            body = await _next(conn, stream)
            await stream.aclose()
    assert response.status_code == 200 and body.data == b"hello chunked world"


async def test_websocket_upgrade_is_relayed():
    async def upgrade_server(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request = await _next(conn, stream)
        assert dict(request.headers)[b"upgrade"] == b"websocket"
        await _next(conn, stream)  # EndOfMessage
        await stream.send_all(
            conn.send(
                h11.InformationalResponse(
                    status_code=101,
                    headers=[(b"connection", b"upgrade"), (b"upgrade", b"websocket")],
                )
            )
        )
        data = await stream.receive_some(100)
        await stream.send_all(b"echo:" + data)
        await stream.aclose()

    backend = Backend("ws", external=True)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, upgrade_server, 0, host="127.0.0.1")
            )
            backend.port = listeners[0].socket.getsockname()[1]
            async with open_mesh([backend]) as mesh:
                stream = await trio.open_tcp_stream("127.0.0.1", mesh.port)
                await stream.send_all(
                    b"GET /ws HTTP/1.1\r\nHost: reviews\r\nConnection: Upgrade\r\n"
                    b"Upgrade: websocket\r\n\r\n"
                )
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(1000)
                await stream.send_all(b"ping")
                reply = await stream.receive_some(100)
                await stream.aclose()
            nursery.cancel_scope.cancel()
    assert head.startswith(b"HTTP/1.1 101 ")
    assert reply == b"echo:ping"
    assert mesh.records[0].status == 101


async def test_head_request_and_record_fields():
    with trio.fail_after(5):
        async with open_mesh([Backend("a")]) as mesh, mesh.client() as client:
            head = await client.request("/x?q=1", method="HEAD")
            get = await client.request("/x?q=1")
    assert head.status == 200 and head.body == b"" and head.headers[b"content-length"] == b"1"
    assert get.text == "a"
    record = mesh.records[1]
    assert (record.method, record.target, record.authority) == ("GET", "/x?q=1", HOST)
    assert record.status == 200 and record.bytes_sent == 1 and record.flag_string == "-"
    assert record.upstream.startswith("127.0.0.1:") and record.endpoint.workload_uid == "uid-a"
    assert record.cluster == f"outbound|{PORT}||{HOST}" and record.route == "default"
    assert record.attempts == 1 and record.duration > 0


async def test_reused_connection_closed_by_the_server_is_not_used():
    backend = Backend("rude", rude=True)
    vs = _vs({"route": [{"destination": {"host": "reviews"}}], "retries": {"attempts": 0}})
    with trio.fail_after(5):
        async with open_mesh([backend], [vs]) as mesh, mesh.client() as client:
            replies = [await client.request() for _ in range(30)]
    assert [r.status for r in replies] == [200] * 30
    assert backend.connections == 30


# ---------------------------------------------------------------------------------------------
# Connections, snapshots and misbehaving peers


@dataclass
class Opened:
    """What a connector may return: the stream and what it knows about it."""

    stream: trio.SocketStream
    security: str


async def test_pooled_connections_are_never_shared_between_sources():
    backend = Backend("a")
    opened: list[str] = []
    with trio.fail_after(5):
        async with open_mesh([backend]) as mesh:
            table_routes = mesh.ctx.routes

            def ctx_for(source: str) -> HttpContext:
                async def connect(endpoint: Endpoint, port: int, _spec=None) -> Opened:
                    opened.append(source)
                    return Opened(await trio.open_tcp_stream(endpoint.ip, port), f"mtls-{source}")

                return replace(mesh.ctx, connect=connect, pool_key=source, routes=table_routes)

            for source in ("pod-a", "pod-b", "pod-a", "pod-b"):
                await _one_request(ctx_for(source))
    assert opened == ["pod-a", "pod-b"]  # each source reused its own connection only
    assert backend.connections == 2
    assert [r.upstream_info.security for r in mesh.records] == [
        "mtls-pod-a",
        "mtls-pod-b",
        "mtls-pod-a",
        "mtls-pod-b",
    ]


async def _one_request(ctx: HttpContext) -> None:
    """One request through proxy_http1 over an in-memory client connection."""
    client, server = trio.testing.memory_stream_pair()
    conn = h11.Connection(h11.CLIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy_http1, server, ctx)
        await client.send_all(
            conn.send(h11.Request(method="GET", target="/", headers=[(b"host", b"r")]))
        )
        await client.send_all(conn.send(h11.EndOfMessage()))
        while not isinstance(await _next(conn, client), h11.EndOfMessage):
            pass
        await client.aclose()


async def test_connector_failures_of_any_type_are_connect_failures():
    class TunnelRefused(Exception):
        kind = "refused"

    async def refuse(endpoint: Endpoint, port: int, _spec=None) -> trio.SocketStream:
        raise TunnelRefused("401 from the peer proxy")

    with trio.fail_after(5):
        async with open_mesh([Backend("a")]) as mesh:
            await _one_request(replace(mesh.ctx, connect=refuse))
    assert mesh.records[0].status == 503 and mesh.records[0].flags == ["UF", "URX"]


async def test_max_requests_per_connection():
    backend = Backend("a")
    dr = _dr(connectionPool={"http": {"maxRequestsPerConnection": 2}})
    with trio.fail_after(5):
        async with open_mesh([backend], [dr]) as mesh, mesh.client() as client:
            for _ in range(6):
                assert (await client.request()).status == 200
    assert backend.connections == 3


async def test_snapshot_change_applies_to_open_keep_alive_connections():
    old, new = Backend("old", "v1"), Backend("new", "v2")
    to_v1 = _vs({"route": [{"destination": {"host": "reviews", "subset": "v1"}}]})
    to_v2 = _vs({"route": [{"destination": {"host": "reviews", "subset": "v2"}}]})
    with trio.fail_after(5):
        async with open_mesh([old, new], [to_v1, _subsets_dr()]) as mesh, mesh.client() as client:
            before = (await client.request()).text
            await trio.testing.wait_all_tasks_blocked()  # the proxy put the connection back
            assert mesh.pool.idle_count() == 1
            # The next snapshot routes to v2, and the old backend's pod is gone.
            mesh.set_table(compile_routes(_snapshot([new], [to_v2, _subsets_dr()])))
            after = (await client.request()).text
            # the old pod left the subset's cluster and the Service's own (the TCP routes')
            retired = mesh.retired_seen
            assert {gone.address for gone in retired} == {f"127.0.0.1:{old.port}"}
            assert all(mesh.pool.idle_count(gone) == 0 for gone in retired)  # idle one closed
    assert (before, after) == ("old", "new") and client.connects == 1


async def test_client_leaving_mid_body_is_dc_and_harmless():
    backend = Backend("a")
    with trio.fail_after(5):
        async with open_mesh([backend]) as mesh:
            stream = await trio.open_tcp_stream("127.0.0.1", mesh.port)
            await stream.send_all(
                b"POST /echo HTTP/1.1\r\nHost: r\r\nContent-Length: 200000\r\n\r\n" + b"x" * 100000
            )
            await trio.sleep(0.05)
            await stream.aclose()
            # the proxy records the client that left before the next request is made
            await await_until(lambda: mesh.records, what="the record of the client that left")
            async with mesh.client() as client:
                assert (await client.request()).text == "a"
    assert mesh.records[0].flags == ["DC"] and mesh.records[0].status == 0


async def test_upstream_dying_mid_response_closes_the_client_connection():
    async def half_answer(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        await _next(conn, stream)
        await _next(conn, stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await stream.aclose()

    backend = Backend("dies", external=True)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, half_answer, 0, host="127.0.0.1")
            )
            backend.port = listeners[0].socket.getsockname()[1]
            async with open_mesh([backend]) as mesh, mesh.client() as client:
                with pytest.raises(h11.RemoteProtocolError):  # a truncated body, not a wrong one
                    await client.request()
            nursery.cancel_scope.cancel()
    assert mesh.records[0].status == 200 and mesh.records[0].flags == ["UC"]


async def test_failing_request_filter_is_500():
    async def broken(info: RequestInfo) -> LocalResponse | None:
        raise RuntimeError("bug in a filter")

    with trio.fail_after(5):
        async with (
            open_mesh([Backend("a")], request_filter=broken) as mesh,
            mesh.client() as client,
        ):
            reply = await client.request()
            again = await client.request()
    assert reply.status == 500 and again.status == 500


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.sampled_from(
                [
                    b"GET / HTTP/1.1\r\n",
                    b"Host: r\r\n",
                    b"\r\n",
                    b"Content-Length: 5\r\n",
                    b"Transfer-Encoding: chunked\r\n",
                    b"0\r\n\r\n",
                    b"5\r\nhello\r\n",
                    b"Connection: close\r\n",
                    b"Expect: 100-continue\r\n",
                    b"Upgrade: x\r\nConnection: upgrade\r\n",
                ]
            ),
        ),
        max_size=12,
    )
)
def test_fuzzed_client_input_never_crashes_the_engine(chunks: list[bytes]):
    """Whatever a client sends, proxy_http1 returns (no exception) once it is done."""

    async def main() -> None:
        backend_client, backend_server = trio.testing.memory_stream_pair()

        async def connect(endpoint: Endpoint, port: int, _spec=None):
            client, server = trio.testing.memory_stream_pair()

            async def answer() -> None:
                with contextlib.suppress(Exception):
                    await server.receive_some(65536)
                    await server.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await server.aclose()

            nursery.start_soon(answer)
            return client

        table = compile_routes(_snapshot([Backend("a", port=1)], []))
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery, open_connection_pool(connect) as pool:
                ctx = HttpContext(
                    routes=lambda: table.http_routes(HOST, PORT),
                    clusters=Clusters(),
                    pool=pool,
                    settings=HttpSettings(
                        client_idle_timeout=0.05, request_header_timeout=0.05, drain_timeout=0.05
                    ),
                )

                async def serve() -> None:
                    try:
                        await proxy_http1(backend_server, ctx)
                    finally:
                        await backend_server.aclose()  # the caller owns the client stream

                nursery.start_soon(serve)
                for chunk in chunks:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await backend_client.send_all(chunk)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await backend_client.send_eof()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while await backend_client.receive_some(65536):
                        pass

    trio.run(main)


async def test_a_draining_proxy_closes_idle_keep_alive_connections_and_busy_ones_after_reply():
    """SIGTERM: an idle keep-alive connection is closed at once (clients retry, RFC 9112
    9.3); one that sends a request still gets its answer, then the connection closes."""
    with trio.fail_after(10):
        async with (
            open_mesh([Backend("a", "v1")], drain=Drain()) as mesh,
            mesh.client() as idle,
        ):
            assert (await idle.request()).status == 200
            mesh.ctx.drain.start()
            assert await idle.stream.receive_some() == b""  # closed while idle
            # a request on a connection accepted before the listener closed is answered
            late = Client(mesh.port)
            assert (await late.request()).status == 200
            assert await late.stream.receive_some() == b""  # then closed
            await late.close()
    assert len(mesh.records) == 2
