"""Copies bytes both ways between two streams, honouring half-close.

When one side finishes sending (EOF), the other side's write half is shut
(send_eof) and the opposite direction keeps flowing until it ends too; an
error on either side aborts both. Returns the bytes moved each way.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

CHUNK = 256 * 1024


@dataclass
class RelayResult:
    sent: int = 0  # client -> upstream
    received: int = 0  # upstream -> client


async def _pipe(src: trio.abc.ReceiveStream, dst: trio.abc.SendStream) -> int:
    total = 0
    while True:
        data = await src.receive_some(CHUNK)
        if not data:
            break
        await dst.send_all(data)
        total += len(data)
    if isinstance(dst, trio.abc.HalfCloseableStream):
        await dst.send_eof()
    return total


async def relay(client: trio.abc.Stream, upstream: trio.abc.Stream) -> RelayResult:
    result = RelayResult()

    async def up() -> None:
        result.sent = await _pipe(client, upstream)

    async def down() -> None:
        result.received = await _pipe(upstream, client)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(up)
            nursery.start_soon(down)
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # a reset on either side ends the relay; both are closed by the caller
    return result
