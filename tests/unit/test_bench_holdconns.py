"""benchmarks/holdconns.py: opens exactly N connections, holds them idle, then closes them all
(here against a loopback listener that counts what it sees)."""

from __future__ import annotations

import trio

from benchmarks.holdconns import hold


async def test_holds_n_idle_connections_then_closes_them(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin.readline", lambda: "")  # end of file: release at once
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    opened = closed = 0
    received = bytearray()
    all_closed = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal opened, closed
        opened += 1
        async for data in stream:
            received.extend(data)
        closed += 1
        if closed == 30:
            all_closed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        held, failed = await hold("127.0.0.1", port, 30, parallel=8, max_hold=5)
        with trio.fail_after(5):
            await all_closed.wait()
        nursery.cancel_scope.cancel()
    assert (held, failed) == (30, 0)
    assert opened == 30 and received == b""  # idle: not a byte sent
    assert capsys.readouterr().out.splitlines() == ["HELD 30 0", "RELEASED"]


async def test_counts_connections_that_fail(monkeypatch):
    monkeypatch.setattr("sys.stdin.readline", lambda: "")
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nobody listens there any more
    assert await hold("127.0.0.1", port, 5, parallel=2, max_hold=1) == (0, 5)
