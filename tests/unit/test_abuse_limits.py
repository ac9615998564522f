"""Issue #17 item 5: slow, idle, malformed and greedy clients of the HTTP/1.1 engine, and the
per-source limits (agent/proxy/limits.py), over real loopback sockets.

A slowloris gets 408 once its head is late while another client is served; an idle keep-alive
connection is closed without a word; garbage gets 400; a source over its requests in flight
gets 503 UO while it lasts; every refusal is counted under its reason and logged with one.
"""

from __future__ import annotations

import logging

import trio
from meshagent.agent.proxy.http import HttpSettings
from meshagent.agent.proxy.inbound import InboundProxy
from meshagent.agent.proxy.inputs import ProxyInputs
from meshagent.agent.proxy.limits import Limits
from meshagent.agent.telemetry.ratelog import RateLimitedLog
from meshagent.common.spiffe import Identity

from tests.unit.test_http_proxy import Backend, open_mesh

SHORT = HttpSettings(request_header_timeout=0.3, client_idle_timeout=0.5)


def _limits(**kw) -> tuple[Limits, list[tuple[str, str]]]:
    counted: list[tuple[str, str]] = []
    return Limits(count=lambda listener, why: counted.append((listener, why)), **kw), counted


async def _read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(4096):
            data += chunk
    return data


async def test_a_slowloris_gets_408_after_the_header_timeout_while_others_are_served():
    limits, counted = _limits()
    async with open_mesh([Backend("a")], settings=SHORT, limits=limits) as mesh:
        slow = await trio.open_tcp_stream("127.0.0.1", mesh.port)
        started = trio.current_time()
        answer = b""

        async def trickle() -> None:
            nonlocal answer
            head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
            try:
                for byte in head:  # one byte every 20 ms: never a complete head in time
                    await slow.send_all(bytes([byte]))
                    await trio.sleep(0.02)
            except trio.BrokenResourceError:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            async with mesh.client() as other:  # served meanwhile
                assert (await other.request()).status == 200
            answer = await _read_all(slow)
            nursery.cancel_scope.cancel()
        await slow.aclose()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert answer.endswith(b"request header timeout"), answer
    assert b"connection: close" in answer.lower()
    assert trio.current_time() - started < 2.0  # the head timeout ended it, not the trickle
    assert counted == [("pod", "header_timeout")]
    assert [r.status for r in mesh.records] == [200, 408]


async def test_an_idle_keep_alive_connection_is_closed_without_a_response():
    limits, counted = _limits()
    async with (
        open_mesh([Backend("a")], settings=SHORT, limits=limits) as mesh,
        mesh.client() as client,
    ):
        assert (await client.request()).status == 200
        assert await _read_all(client.stream) == b""  # closed after the idle timeout
    assert counted == []  # an idle client is not refused


async def test_garbage_is_400_closed_and_counted():
    limits, counted = _limits()
    async with open_mesh([Backend("a")], settings=SHORT, limits=limits) as mesh:
        stream = await trio.open_tcp_stream("127.0.0.1", mesh.port)
        await stream.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
        data = await _read_all(stream)
        await stream.aclose()
        async with mesh.client() as client:
            assert (await client.request()).status == 200
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert counted == [("pod", "bad_request")]


async def test_a_source_over_its_requests_in_flight_gets_503_uo_while_it_lasts():
    limits, counted = _limits(max_pending_requests=2)
    slow = Backend("a", delay=0.5)
    statuses: list[int] = []
    async with open_mesh([slow], limits=limits) as mesh:

        async def one() -> None:
            async with mesh.client() as client:
                statuses.append((await client.request()).status)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
        async with mesh.client() as client:  # the two in flight are done: room again
            assert (await client.request()).status == 200
    assert sorted(statuses) == [200, 200, 503]
    assert counted == [("pod", "source_pending_requests")]
    refused = [r for r in mesh.records if r.status == 503]
    assert refused[0].flags == ["UO"]
    assert limits.pending == {}  # nothing held once the requests ended


def test_connections_are_held_per_source_and_forgotten_at_zero():
    limits, _ = _limits(max_connections=2)
    with limits.connection("a") as first, limits.connection("a") as second:
        with limits.connection("a") as third, limits.connection("b") as other:
            assert (first, second, third, other) == (True, True, False, True)
        assert limits.connections == {"a": 2}
    assert limits.connections == {}  # a burst of sources leaves nothing behind


def test_refusals_are_logged_with_a_reason_at_a_bounded_rate(caplog):
    now = [0.0]
    log = RateLimitedLog(logging.getLogger("test.limits"), burst=3, per_second=1.0,
                         clock=lambda: now[0])  # fmt: skip
    limits, counted = _limits()
    limits.log = log
    with caplog.at_level(logging.WARNING, logger="test.limits"):
        for _ in range(100):
            limits.refused("pod", "source_connections", "shop/flood", "")
        now[0] = 10.0
        limits.refused("pod", "source_connections", "shop/flood", "10 connections open")
    assert len(counted) == 101  # every refusal counted
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4  # but only a burst, then one line saying how many were left out
    assert all(line.rstrip() and not line.endswith(": ") for line in lines), lines
    assert lines[0] == "pod: refused source_connections from shop/flood: no reason given"
    assert "(97 similar lines left out)" in lines[-1]


async def test_a_source_identity_over_its_tunnel_limit_gets_429_counted():
    """15008: the identity in the peer's certificate is the source; one tunnel more than it
    may hold is refused 429 before anything else is looked at (no pod is dialled)."""
    limits, counted = _limits(max_connections=1)
    inputs = ProxyInputs(store=None, node="n", trust_domain="cluster.local", metrics=None)
    inputs.limits = limits
    proxy = InboundProxy(inputs, http_pool=None)
    peer = Identity.parse("spiffe://cluster.local/ns/shop/sa/flood")
    answers: list[int] = []

    class Tunnel:
        peer_identity = peer

        async def reject(self, status: int) -> None:
            answers.append(status)

    with limits.connection(peer.uri):  # the one it may hold
        await proxy.handle(Tunnel())
    assert answers == [429]
    assert counted == [("hbone", "source_connections")]
    assert proxy.stats.refused == {429: 1}
