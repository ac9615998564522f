"""A bounded gRPC load client: unary calls over ONE channel (one HTTP/2 connection, as a gRPC
client keeps), `--concurrency` calls in flight at all times, for `--seconds`; prints one
`GRPC_JSON {...}` line: calls completed, errors by status code, the measured window and
latency percentiles.

    /usr/bin/python3 -m benchmarks.grpc_load TARGET METHOD --concurrency 10 --seconds 5

Runs under the system Python (Debian's python3-grpcio) in the client pod, so it imports only
grpc and the standard library. There is no gRPC benchmark tool in Debian, and h2load is not one:
it cannot frame gRPC messages nor read grpc-status from the trailers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

MARKER = "GRPC_JSON "  # benchmarks/parse.py reads this line
CALL_TIMEOUT = 5.0  # seconds; a call never holds the run longer than this past its end
CONNECT_TIMEOUT = 10.0


def percentile(ordered: list[float], share: float) -> float:
    """The nearest-rank percentile of sorted samples (0 for none)."""
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, round(share * len(ordered)) - 1))
    return ordered[rank]


def report(latencies: list[float], errors: Counter, window_s: float) -> dict:
    """What the run measured, latencies in ms."""
    ordered = sorted(latencies)
    return {
        "calls": len(ordered),
        "window_s": window_s,
        "errors": dict(errors),
        "p50_ms": percentile(ordered, 0.50) * 1000,
        "p99_ms": percentile(ordered, 0.99) * 1000,
    }


async def load(target: str, method: str, concurrency: int, seconds: float) -> dict:
    import grpc  # only here: the unit tests import this module without grpcio

    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT)
        call = channel.unary_unary(method)
        await call(b"", timeout=CALL_TIMEOUT)  # the connection and the route are warm
        latencies: list[float] = []
        errors: Counter = Counter()
        started = time.monotonic()
        end = started + seconds

        async def caller() -> None:
            while time.monotonic() < end:
                sent = time.perf_counter()
                try:
                    await call(b"", timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return report(latencies, errors, time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.grpc_load")
    parser.add_argument("target", help="host:port")
    parser.add_argument("method", help="/package.Service/Method (empty request, any answer)")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    result = asyncio.run(load(args.target, args.method, args.concurrency, args.seconds))
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
