"""The `observe` level's header and idle timeouts (agent/proxy/observe_timeouts.py), over real
loopback TCP: a client, the relay with its observer, a server; what each end receives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from meshagent.agent.proxy.http.observer import Http1Observer
from meshagent.agent.proxy.http.types import HttpSettings, RequestRecord
from meshagent.agent.proxy.limits import Limits
from meshagent.agent.proxy.observe_timeouts import relay_observed
from meshagent.agent.proxy.relay import RelayResult

from tests.unit.test_relay import _read_all, _tcp_pair

SETTINGS = HttpSettings(request_header_timeout=0.5, client_idle_timeout=0.5)
GET = b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"


class Run:
    """A client <-> relay <-> server; the requests the observer reported, refusals counted."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.stops: list[str] = []
        self.refused: list[tuple[str, str]] = []
        self.limits = Limits(count=lambda listener, why: self.refused.append((listener, why)))

    async def relay(self, client_side: trio.SocketStream, upstream_side: trio.SocketStream):
        tap = Http1Observer(self.records.append, self.stops.append, clock=trio.current_time)
        async with client_side, upstream_side:
            await relay_observed(
                client_side,
                upstream_side,
                RelayResult(),
                tap,
                SETTINGS,
                self.limits,
                idle_timeout=60,
                listener="pod",
                source="client",
            )


End = Callable[[trio.SocketStream], Awaitable[None]]


async def _through_the_relay(client_does: End, server_does: End) -> Run:
    """Run the client's and the server's part, each on its end of real loopback TCP, with the
    relay between them until all three are done (10 s at most); both ends closed after."""
    client, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()
    run = Run()
    async with client, server:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_does, client)
                nursery.start_soon(server_does, server)
                await run.relay(client_side, upstream_side)
    return run


async def test_a_head_not_complete_in_time_gets_408_and_both_sides_close() -> None:
    got: dict[str, bytes] = {}

    async def slowloris(client: trio.SocketStream) -> None:
        for byte in b"GET / HTTP/1.1\r\nHost: web\r\nX-A: ":
            try:
                await client.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                break
            await trio.sleep(0.05)  # 0.05 s a byte: the head takes longer than the timeout
        got["client"] = await _read_all(client)

    async def serve(server: trio.SocketStream) -> None:
        got["server"] = await _read_all(server)

    run = await _through_the_relay(slowloris, serve)
    answer = got["client"]
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert b"connection: close\r\n" in answer and answer.endswith(b"request header timeout")
    assert got["server"].startswith(b"GET /")  # relayed as it came, then closed
    assert run.refused == [("pod", "header_timeout")]
    assert [(r.method, r.status) for r in run.records] == [("", 408)]


async def test_requests_in_time_are_the_servers_and_an_idle_connection_closes_quietly() -> None:
    got: dict[str, bytes] = {}

    async def keep_alive(client: trio.SocketStream) -> None:
        for _ in range(3):
            await client.send_all(GET[:5])
            await trio.sleep(0.2)  # each head in pieces, complete well within the timeout
            await client.send_all(GET[5:])
            answer = b""
            while not answer.endswith(b"abc"):
                answer += await client.receive_some(1024)
            assert answer == OK
            await trio.sleep(0.3)  # idle less than the idle timeout between requests
        got["client"] = await _read_all(client)  # then idle: closed, with nothing said

    async def serve(server: trio.SocketStream) -> None:
        head = b""
        while data := await server.receive_some(1024):
            head += data
            if head.endswith(b"\r\n\r\n"):
                await server.send_all(OK)
                head = b""

    run = await _through_the_relay(keep_alive, serve)
    assert got["client"] == b""
    assert run.refused == []
    assert [(r.method, r.status) for r in run.records] == [("GET", 200)] * 3


async def test_a_head_late_behind_an_unanswered_request_is_closed_without_a_408() -> None:
    """The server owes the first request its response: the proxy cannot answer the second
    one before it, so it closes (counted) without a word."""
    got: dict[str, bytes] = {}

    async def pipelining(client: trio.SocketStream) -> None:
        await client.send_all(GET + b"GET /b HTTP/1.1\r\n")
        got["client"] = await _read_all(client)

    async def silent(server: trio.SocketStream) -> None:
        got["server"] = await _read_all(server)

    run = await _through_the_relay(pipelining, silent)
    assert got == {"client": b"", "server": GET + b"GET /b HTTP/1.1\r\n"}
    assert run.refused == [("pod", "header_timeout")]
    assert [(r.method, r.status, r.flags) for r in run.records] == [("GET", 0, ["DC"])]
