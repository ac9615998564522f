"""Handing a relayed connection to another process (agent/proxy/handoff.py): the record's
framing, and real loopback TCP connections whose sockets go over a Unix socket with
SCM_RIGHTS while bytes flow, paused where nothing is in flight and resumed by the taker."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import trio
from meshagent.agent.proxy import handoff
from meshagent.agent.proxy.handoff import (
    HandedConnection,
    HandoffError,
    HandoffSender,
    PolicyFacts,
    decode,
    encode,
    send_connection,
    serve_handoff,
)
from meshagent.agent.proxy.relay import Pause, RelayResult, relay
from meshagent.agent.telemetry import ConnectionLabels
from meshagent.agent.telemetry.labels import Peer, ServiceRef

from tests.unit.test_live_policy import CLIENT, FRONTEND, REMOTE, REVIEWS, deny, tables
from tests.unit.test_relay import _read_all, _tcp_pair

LABELS = ConnectionLabels(
    "source",
    Peer("frontend", "shop", "spiffe://cluster.local/ns/shop/sa/frontend", "frontend"),
    Peer("echo-local", "shop", "spiffe://cluster.local/ns/shop/sa/default", "echo-local"),
    ServiceRef("echo-local.shop.svc.cluster.local", "echo-local", "shop"),
    connection_security_policy="mutual_tls",
)
FACTS = PolicyFacts(
    source_uid="uid-frontend",
    source_name="frontend",
    source_namespace="shop",
    source_identity="spiffe://cluster.local/ns/shop/sa/frontend",
    source_ip="10.244.1.5",
    ip="10.244.1.7",
    port=7000,
    destination=True,
)


def _handed(result: RelayResult, **changes) -> HandedConnection:
    fields = dict(
        labels=LABELS,
        client="10.244.1.5",
        upstream="10.244.1.7:7000",
        start=1_700_000_000.5,
        age=12.25,
        sent=result.sent,
        received=result.received,
        done=result.done,
        idle_timeout=3600.0,
        policy=FACTS,
    )
    fields.update(changes)
    return HandedConnection(**fields)


def test_a_record_comes_back_as_it_went() -> None:
    conn = _handed(RelayResult(sent=5, received=7, done=(True, False)))
    assert decode(encode(conn)) == conn
    assert decode(encode(conn)).labels.values == LABELS.values  # the same metric series
    endless = _handed(RelayResult(), idle_timeout=float("inf"), policy=None)
    assert decode(encode(endless)) == endless


@pytest.mark.parametrize(
    ("mangle", "says"),
    [
        (lambda r: b"{not json", "not JSON"),
        (lambda r: b"[1, 2]", "not a JSON object"),
        (lambda r: json.dumps({**r, "version": 99}).encode(), "version 99"),
        (lambda r: json.dumps({k: v for k, v in r.items() if k != "labels"}).encode(), "labels"),
        (lambda r: json.dumps({**r, "sent": -1}).encode(), "sent is -1"),
        (lambda r: json.dumps({**r, "done": [True]}).encode(), r"done is \[True\]"),
        (
            lambda r: json.dumps({**r, "labels": {**r["labels"], "reporter": "x"}}).encode(),
            "reporter 'x'",
        ),
    ],
)
def test_a_bad_record_is_refused_saying_what_is_wrong(mangle, says) -> None:
    record = json.loads(encode(_handed(RelayResult())))
    with pytest.raises(HandoffError, match=says):
        decode(mangle(record))


async def _exchange(app, server, line: bytes) -> None:
    """One line each way: app -> server, then back."""
    await app.send_all(line)
    assert await _receive_exactly(server, len(line)) == line
    await server.send_all(line.upper())
    assert await _receive_exactly(app, len(line)) == line.upper()


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    got = b""
    while len(got) < n:
        data = await stream.receive_some(n - len(got))
        assert data, f"EOF after {got!r}"
        got += data
    return got


class _Taker:
    """The receiving process's side: resumes each connection handed to it."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.results: list[RelayResult] = []
        self.taken: list[HandedConnection] = []
        self.ended = trio.Event()

    def take(self, conn: HandedConnection, client, upstream) -> None:
        self.taken.append(conn)
        result = RelayResult(sent=conn.sent, received=conn.received, done=conn.done)
        self.results.append(result)
        self.nursery.start_soon(self._relay, client, upstream, result)

    async def _relay(self, client, upstream, result) -> None:
        async with client, upstream:
            await relay(client, upstream, result)
        self.ended.set()


def _first_relay(nursery, client_side, upstream_side) -> tuple[Pause, RelayResult, trio.Event]:
    """The handing process's relay, pausable; the event is set once it returned."""
    pause, result, relayed = Pause(), RelayResult(), trio.Event()

    async def run() -> None:
        await relay(client_side, upstream_side, result, pause=pause)
        relayed.set()

    nursery.start_soon(run)
    return pause, result, relayed


@pytest.mark.parametrize("half_closed", [False, True], ids=["open", "client-done"])
async def test_a_paused_relay_goes_on_in_the_process_it_was_handed_to(
    tmp_path, half_closed: bool
) -> None:
    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()
    path = tmp_path / "handoff" / "taker.sock"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            taker = _Taker(nursery)
            await nursery.start(serve_handoff, path, taker.take)
            pause, result, relayed = _first_relay(nursery, client_side, upstream_side)
            await _exchange(app, server, b"one line\n")
            if half_closed:
                await app.send_eof()
                assert await _read_all(server) == b""  # the EOF went through before the pause
            pause.request()
            await relayed.wait()
            assert result.paused and result.done == (half_closed, False)
            fds = (client_side.socket.fileno(), upstream_side.socket.fileno())
            assert await send_connection(path, _handed(result), fds)
            await client_side.aclose()  # the sender's copies: the connection stays open
            await upstream_side.aclose()

            if not half_closed:
                await _exchange(app, server, b"two lines\n")
                await app.send_eof()
                assert await _read_all(server) == b""
            await server.send_all(b"bye\n")
            await server.send_eof()
            assert await _read_all(app) == b"bye\n"
            await taker.ended.wait()
            nursery.cancel_scope.cancel()
    assert len(taker.taken) == 1 and taker.taken[0].policy == FACTS
    final = taker.results[0]
    up = len(b"one line\n") + (0 if half_closed else len(b"two lines\n"))
    assert (final.sent, final.received) == (up, up + len(b"bye\n"))
    assert not path.exists()  # the taker's socket goes with it
    for s in (app, server):
        await s.aclose()


async def test_an_idle_relay_pauses_at_once_and_relays_on_when_not_handed() -> None:
    """Idle, the relay is parked alone (no scope registered with the pause): a request wakes
    it, it returns paused with nothing done, and relayed again it moves bytes both ways."""
    from meshagent.agent.proxy import relay as relay_mod

    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            pause, result, relayed = _first_relay(nursery, client_side, upstream_side)
            await trio.testing.wait_all_tasks_blocked()
            assert pause._waiting == [] and pause._parked is not None
            pause.request()
            await relayed.wait()
            assert result.paused and result.done == (False, False)
            assert pause._parked is None and relay_mod._watcher().waits == {}
            pause.reset()
            nursery.start_soon(relay, client_side, upstream_side, result)
            await _exchange(app, server, b"after\n")
            await server.send_all(b"back\n")
            assert await app.receive_some(5) == b"back\n"
            await app.send_eof()
            await server.send_eof()
            assert await _read_all(app) == b""
    assert (result.sent, result.received) == (6, 6 + 5) and not result.paused
    for s in (app, client_side, upstream_side, server):
        await s.aclose()


async def test_a_bulk_transfer_paused_midway_arrives_whole(tmp_path) -> None:
    """Nothing the relay had read is lost at the pause: the pipe is emptied into the other
    socket first (a slow reader keeps it full meanwhile)."""
    app, client_side = await _tcp_pair()
    upstream_side, server = await _tcp_pair()
    payload = os.urandom(8 * 1024 * 1024 + 3)
    path = tmp_path / "taker.sock"
    got: list[bytes] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            taker = _Taker(nursery)
            await nursery.start(serve_handoff, path, taker.take)
            pause, result, relayed = _first_relay(nursery, client_side, upstream_side)

            async def send() -> None:
                await app.send_all(payload)
                await app.send_eof()

            async def slow_read() -> None:
                while data := await server.receive_some(64 * 1024):
                    got.append(data)
                    await trio.sleep(0.001)

            nursery.start_soon(send)
            nursery.start_soon(slow_read)
            while result.sent < len(payload) // 4:
                await trio.sleep(0.01)
            pause.request()
            await relayed.wait()
            assert result.paused and 0 < result.sent < len(payload)
            fds = (client_side.socket.fileno(), upstream_side.socket.fileno())
            assert await send_connection(path, _handed(result), fds)
            await client_side.aclose()
            await upstream_side.aclose()
            while not got or sum(map(len, got)) < len(payload):
                await trio.sleep(0.05)
            await server.send_eof()
            await taker.ended.wait()
            nursery.cancel_scope.cancel()
    data = b"".join(got)
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
    assert taker.results[0].sent == len(payload)
    for s in (app, server):
        await s.aclose()


async def test_nobody_listening_means_not_handed(tmp_path) -> None:
    app, client_side = await _tcp_pair()
    fds = (client_side.socket.fileno(), client_side.socket.fileno())
    assert not await send_connection(tmp_path / "nobody.sock", _handed(RelayResult()), fds)
    await app.send_all(b"still mine")  # the sender's socket is untouched
    assert await _receive_exactly(client_side, 10) == b"still mine"
    await app.aclose()
    await client_side.aclose()


async def test_a_taker_refuses_fds_that_are_not_tcp_sockets(tmp_path) -> None:
    path = tmp_path / "taker.sock"
    r, w = os.pipe()
    try:
        async with trio.open_nursery() as nursery:
            taken: list = []
            await nursery.start(serve_handoff, path, lambda *a: taken.append(a))
            with trio.fail_after(10):
                assert not await send_connection(path, _handed(RelayResult()), (r, w))
            nursery.cancel_scope.cancel()
        assert taken == []
        os.write(w, b"x")  # ours are still open
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)


async def test_the_sender_pauses_every_relay_once_it_has_somewhere_to_hand_them(tmp_path):
    sender = HandoffSender()
    with sender.pausable() as before:
        assert not before.requested  # not draining: relays run on
        assert sender.start([tmp_path / "nobody.sock"]) == 1
        assert before.requested
        with sender.pausable() as later:
            assert later.requested  # registered during the drain: paused at once
        app, client_side = await _tcp_pair()
        fds = (client_side.socket.fileno(), client_side.socket.fileno())
        assert not await sender.send(_handed(RelayResult()), fds)
        assert sender.targets == []  # nobody took it: the rest drain here
        with sender.pausable() as after:
            assert not after.requested
        await app.aclose()
        await client_side.aclose()
    assert len(encode(_handed(RelayResult()))) < handoff.MAX_MESSAGE


def test_the_policy_facts_still_close_a_handed_connection_that_a_new_snapshot_denies() -> None:
    """The successor re-checks a handed connection as its first process did (live.py)."""
    facts = PolicyFacts(
        source_uid=CLIENT.uid,
        source_name=CLIENT.name,
        source_namespace=CLIENT.namespace,
        source_identity=FRONTEND.uri,
        source_ip=CLIENT.ips[0],
        ip=REVIEWS.ips[0],
        port=9080,
        destination=True,
    )
    moved = decode(encode(_handed(RelayResult(), policy=facts))).policy
    assert moved == facts
    check = moved.check("node-1", "cluster.local")
    assert check(tables()) is None  # allowed: it goes on
    verdict = check(tables(deny(f"cluster.local/ns/shop/sa/{FRONTEND.service_account}")))
    assert verdict is not None and verdict.kind == "denied", verdict
    gone = check(tables(workloads=(REVIEWS, REMOTE)))
    assert gone is not None and gone.kind == "source_left_mesh", gone
