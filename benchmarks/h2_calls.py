"""The HTTP/2 engine's work per gRPC call, in process: what a change to the engine saves, counted
where the machine's load cannot move it.

A client, the engine and an h2c server talk over memory streams (`memstream`); `--engines 2`
puts the same-node chain in between: outbound engine -> memory stream -> inbound engine, as a
node serves a call between two of its pods. Each call is gRPC-shaped: HEADERS (with
`grpc-timeout`), a 5-byte message and END_STREAM in one write; the server answers HEADERS, a
message and trailers in one write. `--sockets`: Unix socket pairs in place of the memory streams
(the engine's socket reads and writes as a node does them, agent/sockio.py; the kernel's
work is then in the CPU figure too). `--in-flight` calls at a time on one connection. Prints the
process's CPU per call and, with `--count`, cProfile's count of Python function calls per call
(deterministic: the figure to compare before and after; `--engines 0` gives the client and
server's own share, to subtract).

    .venv/bin/python -m benchmarks.h2_calls --engines 2 --calls 2000 --count
    PYTHONPATH=/tmp/other-code .venv/bin/python -m benchmarks.h2_calls ...   # another version
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from dataclasses import dataclass

import h2.events
import trio
from meshagent.agent.proxy.http import h2wire, memstream
from meshagent.agent.proxy.http.h2proxy import H2Peer, proxy_http2
from meshagent.agent.proxy.http.types import HttpContext
from meshagent.agent.proxy.lb import Clusters
from meshagent.agent.proxy.routing import (
    ClusterKey,
    ClusterSpec,
    HttpRoute,
    HttpRoutes,
    TrafficPolicy,
    UpstreamEndpoint,
    WeightedClusters,
)
from meshagent.common.snapshot import Endpoint

HOST = "echo.bench.svc.cluster.local"
MESSAGE = b"\x00\x00\x00\x00\x00"  # an empty gRPC message (flag, 4-byte length)
REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/meshtest.Echo/Who"),
    (b":authority", HOST.encode()),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-timeout", b"5S"),
]
WARM_UP = 20  # calls per caller before the measured ones (connections opened, caches warm)


@dataclass(frozen=True)
class Figures:
    calls: int
    cpu_us_per_call: float
    calls_per_s: float


def _routes() -> HttpRoutes:
    endpoint = UpstreamEndpoint(
        Endpoint(ip="10.1.0.1", node="n", workload_uid="w", ports={80: 80}), 80
    )
    spec = ClusterSpec(ClusterKey(HOST, 80, ""), (endpoint,), TrafficPolicy(lb="ROUND_ROBIN"))
    return HttpRoutes(HOST, 80, (HttpRoute("default", (), WeightedClusters.of([(spec, 1)])),))


async def _server(stream: trio.abc.Stream) -> None:
    """An h2c gRPC server: each call answered in one write once its request ended."""
    conn = h2wire.new_connection(client_side=False)
    await stream.send_all(conn.data_to_send())
    while data := await stream.receive_some(65536):
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                sid = event.stream_id
                conn.send_headers(
                    sid, [(b":status", b"200"), (b"content-type", b"application/grpc")]
                )
                conn.send_data(sid, MESSAGE)
                conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        if out := conn.data_to_send():
            await stream.send_all(out)


def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def measure(engines: int, calls: int, in_flight: int = 10, sockets: bool = False) -> Figures:
    """`calls` calls (rounded down to a multiple of `in_flight`) through `engines` (0, 1, 2),
    over socket pairs with `sockets`, else memory streams."""
    routes = _routes()
    memory_stream_pair = _socket_pair if sockets else memstream.memory_stream_pair
    async with trio.open_nursery() as nursery:

        def context(connect) -> HttpContext:
            return HttpContext(
                routes=lambda: routes, clusters=Clusters(), pool=None, connect=connect
            )

        async def to_server(*_args) -> trio.abc.Stream:
            near, far = memory_stream_pair()
            nursery.start_soon(_server, far)
            return near

        async def to_engine(connect) -> trio.abc.Stream:
            near, far = memory_stream_pair()
            nursery.start_soon(proxy_http2, far, context(connect))
            return near

        async def to_inbound(*_args) -> trio.abc.Stream:
            return await to_engine(to_server)

        first = {0: to_server, 1: to_inbound, 2: lambda: to_engine(to_inbound)}[engines]
        client = H2Peer(await first(), h2wire.new_connection(client_side=True))
        nursery.start_soon(client.run, lambda event: False)

        async def caller(n: int) -> None:
            for _ in range(n):
                sid = client.conn.get_next_available_stream_id()
                inbox = client.open_inbox(sid)
                client.queue_headers(sid, REQUEST)
                await client.send_data(sid, MESSAGE, end=True)
                status = None
                while not isinstance(event := await inbox.receive.receive(), h2.events.StreamEnded):
                    if isinstance(event, h2.events.DataReceived):
                        client.ack(sid, event.flow_controlled_length)
                    elif isinstance(event, h2.events.TrailersReceived):
                        status = dict(event.headers).get(b"grpc-status")
                    elif event is None or isinstance(event, h2.events.StreamReset):
                        raise RuntimeError(f"call {sid} failed: {event!r}")
                if status != b"0":
                    raise RuntimeError(f"call {sid} ended with grpc-status {status!r}")
                client.close_inbox(sid)

        async with trio.open_nursery() as warm:
            for _ in range(in_flight):
                warm.start_soon(caller, WARM_UP)
        each = calls // in_flight
        cpu, wall = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as load:
            for _ in range(in_flight):
                load.start_soon(caller, each)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        nursery.cancel_scope.cancel()
    done = each * in_flight
    return Figures(done, cpu / done * 1e6, done / wall)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.h2_calls")
    parser.add_argument("--engines", type=int, choices=(0, 1, 2), default=2)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=10)
    parser.add_argument("--count", action="store_true", help="count Python function calls")
    parser.add_argument("--sockets", action="store_true", help="socket pairs, not memory")
    args = parser.parse_args(argv)
    profile = cProfile.Profile() if args.count else None
    if profile is not None:
        profile.enable()
    figures = trio.run(measure, args.engines, args.calls, args.in_flight, args.sockets)
    line = (
        f"{args.engines} engine(s): {figures.calls} calls, {figures.cpu_us_per_call:.0f} us CPU "
        f"per call, {figures.calls_per_s:.0f} calls/s"
    )
    if profile is not None:
        profile.disable()
        total = pstats.Stats(profile).total_calls
        per_call = total / (figures.calls + WARM_UP * args.in_flight)
        line += f", {per_call:.0f} Python function calls per call (warm-up included)"
    print(line)


if __name__ == "__main__":
    main()
