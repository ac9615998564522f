"""Holds N idle TCP connections open, for measuring a proxy's memory per idle connection. Runs in
a client pod:

    python -m benchmarks.holdconns HOST PORT --count 5000

It opens the connections (a bounded number at a time, sending nothing), prints `HELD <ok>
<failed>`, keeps them until a line (or end of file) arrives on stdin or --max-hold seconds pass,
then closes them all and prints `RELEASED`.
"""

from __future__ import annotations

import argparse
import resource
import sys

import trio

CONNECT_TIMEOUT = 5.0


def raise_fd_limit(needed: int) -> None:
    """Lift the soft open-files limit to the hard one; fail clearly if even that is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"holdconns: need {needed} open files, the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def hold(host: str, port: int, count: int, parallel: int, max_hold: float) -> tuple[int, int]:
    streams: list[trio.SocketStream] = []
    failed = 0
    limiter = trio.CapacityLimiter(parallel)

    async def open_one() -> None:
        nonlocal failed
        async with limiter:
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    streams.append(await trio.open_tcp_stream(host, port))
            except (OSError, trio.TooSlowError):
                failed += 1

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(open_one)
    print(f"HELD {len(streams)} {failed}", flush=True)
    with trio.move_on_after(max_hold):
        await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    for s in streams:
        await trio.aclose_forcefully(s)
    print("RELEASED", flush=True)
    return len(streams), failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--parallel", type=int, default=200, help="connects in flight at once")
    parser.add_argument("--max-hold", type=float, default=120.0, help="seconds at most")
    args = parser.parse_args(argv)
    raise_fd_limit(args.count + 64)
    held, _failed = trio.run(hold, args.host, args.port, args.count, args.parallel, args.max_hold)
    sys.exit(0 if held == args.count else 1)


if __name__ == "__main__":
    main()
