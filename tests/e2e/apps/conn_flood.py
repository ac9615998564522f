"""Many, slow and garbled HTTP/1.1 clients for the lab (asyncio, standard library only).

    python conn_flood.py hold HOST PORT COUNT SECONDS  # COUNT keep-alive connections at once
    python conn_flood.py slowloris HOST PORT           # a request head at 1 byte/s
    python conn_flood.py garbage HOST PORT             # bytes that are not HTTP

`hold`: opens COUNT connections (a bounded number connecting at a time), sends a GET on each
and reads its response, keeps all of them open until SECONDS after the last one was answered,
then sends a second GET on each and reads it; a connection counts as `ok` when both answers
are 200 (`first` counts the first answers' statuses: a refused one is not held).
`slowloris`: sends a request head one byte a second (never complete within 60 s) and reports
the status line the server answers with and when. `garbage`: sends random bytes and reports
the server's answer and whether it closed. Each prints one JSON line; each is bounded in time.
Runs inside a lab pod (`meshlab exec`), raising its own open-file limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import sys
import time
from collections import Counter

CONNECTING_AT_ONCE = 200
IO_TIMEOUT = 60.0


def _raise_fd_limit(needed: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(needed, 1024), max(hard, needed)))


def _request(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: conn-flood\r\n\r\n".encode()


async def _response(reader: asyncio.StreamReader) -> int:
    """Read one response (Content-Length framed, as nginx answers); its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def hold(host: str, port: int, count: int, seconds: float) -> dict:
    _raise_fd_limit(count + 256)
    address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
    gate = asyncio.Semaphore(CONNECTING_AT_ONCE)
    answered = 0
    all_answered = asyncio.Event()
    release = asyncio.Event()
    errors: Counter[str] = Counter()
    statuses: Counter[int] = Counter()  # of the first responses
    ok = 0
    request = _request(host)

    async def one() -> None:
        nonlocal answered, ok
        writer = None
        first = False
        try:
            async with gate:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(address, port), IO_TIMEOUT
                )
                writer.write(request)
                status = await asyncio.wait_for(_response(reader), IO_TIMEOUT)
                statuses[status] += 1
                first = status == 200
            answered += 1
            if answered == count:
                all_answered.set()
            if not first:  # refused: nothing to hold
                return
            await release.wait()
            writer.write(request)
            second = await asyncio.wait_for(_response(reader), IO_TIMEOUT)
            if second == 200:
                ok += 1
            else:
                errors[f"second status {second}"] += 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors[type(exc).__name__] += 1
            answered += 1
            if answered == count:
                all_answered.set()
        finally:
            if writer is not None:
                writer.close()

    started = time.monotonic()
    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await asyncio.wait_for(all_answered.wait(), IO_TIMEOUT * 2)
    opened_in = time.monotonic() - started
    await asyncio.sleep(seconds)
    release.set()
    await asyncio.gather(*tasks)
    return {
        "count": count,
        "ok": ok,
        "errors": dict(errors),
        "first": dict(statuses),
        "opened_in": round(opened_in, 2),
        "seconds": round(time.monotonic() - started, 2),
    }


async def slowloris(host: str, port: int) -> dict:
    reader, writer = await asyncio.open_connection(host, port)
    head = _request(host)[:-2] + b"X-Slow: " + b"a" * 100 + b"\r\n\r\n"
    started = time.monotonic()

    async def trickle() -> int:
        sent = 0
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            sent += 1
            await asyncio.sleep(1.0)
        return sent

    sender = asyncio.create_task(trickle())
    try:
        line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
        rest = await asyncio.wait_for(reader.read(), 10)
    except (TimeoutError, OSError) as exc:
        line, rest = f"error: {type(exc).__name__}".encode(), b""
    seconds = time.monotonic() - started
    sender.cancel()
    with contextlib.suppress(asyncio.CancelledError, OSError):
        await sender
    writer.close()
    return {
        "status_line": line.decode("latin-1").strip(),
        "body": rest.decode("latin-1")[-200:],
        "seconds": round(seconds, 2),
    }


async def garbage(host: str, port: int) -> dict:
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    writer.write(b"\x16\x03\x01" + os.urandom(4096) + b"\r\n\r\n")
    try:
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), IO_TIMEOUT)  # until the server closes
        closed = True
    except ConnectionResetError:
        answer, closed = b"", True
    except (TimeoutError, OSError):
        answer, closed = b"", False
    writer.close()
    return {
        "status_line": answer.split(b"\r\n", 1)[0].decode("latin-1"),
        "closed": closed,
        "seconds": round(time.monotonic() - started, 2),
    }


def main() -> None:
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "hold":
        result = asyncio.run(hold(host, port, int(sys.argv[4]), float(sys.argv[5])))
    elif mode == "slowloris":
        result = asyncio.run(slowloris(host, port))
    elif mode == "garbage":
        result = asyncio.run(garbage(host, port))
    else:
        raise SystemExit(f"unknown mode {mode!r}: hold, slowloris or garbage")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
