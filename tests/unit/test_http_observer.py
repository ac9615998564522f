"""The `observe` level's HTTP/1.1 observer (agent/proxy/http/observer.py), as transcripts: the
bytes each way in, the records (and the reason it stopped) out."""

from __future__ import annotations

import itertools

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from meshagent.agent.proxy.http.observer import Http1Observer
from meshagent.agent.proxy.http.types import RequestRecord
from meshagent.agent.proxy.observing import opens_with_h2_preface


class Transcript:
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.stops: list[str] = []
        ticks = itertools.count()
        self.observer = Http1Observer(
            self.records.append,
            self.stops.append,
            peer="10.0.0.1",
            upstream="10.0.0.2:80",
            clock=lambda: float(next(ticks)),
        )

    def summary(self) -> list[tuple]:
        return [
            (r.method, r.target, r.authority, r.status, r.bytes_received, r.bytes_sent, r.flags)
            for r in self.records
        ]


GET = b"GET /a?x=1 HTTP/1.1\r\nHost: web\r\n\r\n"
POST = b"POST /b HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello"
HEAD = b"HEAD /c HTTP/1.1\r\nHost: web\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
CREATED = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\n\r\n"
HEAD_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"


def test_one_exchange() -> None:
    t = Transcript()
    t.observer.request_data(GET)
    t.observer.response_data(OK)
    assert t.summary() == [("GET", "/a?x=1", "web", 200, 0, 3, [])]
    record = t.records[0]
    assert record.peer == "10.0.0.1" and record.upstream == "10.0.0.2:80"
    assert record.duration > 0 and record.flag_string == "-"
    assert t.stops == []


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_pipelined_exchanges_split_anywhere(data: st.DataObject) -> None:
    """Pipelined requests (a HEAD among them) and their responses, each direction cut at any
    points: the same records."""
    requests = GET + POST + HEAD + GET
    responses = OK + CREATED + HEAD_OK + OK
    t = Transcript()
    for stream, feed in (
        (requests, t.observer.request_data),
        (responses, t.observer.response_data),
    ):
        cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=6)))
        for a, b in itertools.pairwise([0, *cuts, len(stream)]):
            feed(stream[a:b])
    assert t.summary() == [
        ("GET", "/a?x=1", "web", 200, 0, 3, []),
        ("POST", "/b", "web", 201, 5, 4, []),
        ("HEAD", "/c", "web", 200, 0, 0, []),
        ("GET", "/a?x=1", "web", 200, 0, 3, []),
    ]
    assert t.stops == []


def test_continue_then_final_response() -> None:
    t = Transcript()
    t.observer.request_data(
        b"PUT /u HTTP/1.1\r\nHost: web\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    t.observer.response_data(b"HTTP/1.1 100 Continue\r\n\r\n")
    t.observer.request_data(b"ok")
    t.observer.response_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert t.summary() == [("PUT", "/u", "web", 204, 2, 0, [])]


def test_a_body_to_the_connections_end_completes_at_finish() -> None:
    t = Transcript()
    t.observer.request_data(GET)
    t.observer.response_data(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome bytes")
    t.observer.response_eof()
    assert t.records == []
    t.observer.finish()
    assert t.summary() == [("GET", "/a?x=1", "web", 200, 0, 10, [])]


@pytest.mark.parametrize(("upstream_first", "flag"), [(True, "UC"), (False, "DC")])
def test_a_request_without_response_is_reported_at_finish(upstream_first: bool, flag: str) -> None:
    t = Transcript()
    t.observer.request_data(GET)
    if upstream_first:
        t.observer.response_eof()
    t.observer.request_eof()
    t.observer.finish()
    assert t.summary() == [("GET", "/a?x=1", "web", 0, 0, 0, [flag])]


@pytest.mark.parametrize(
    ("request_bytes", "response_bytes", "reason"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", b"", "parse_error"),
        (GET, b"SSH-2.0-OpenSSH\r\n", "parse_error"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"", "http2"),
        (b"", OK, "unmatched_response"),
    ],
)
def test_what_it_cannot_follow_stops_it_once(
    request_bytes: bytes, response_bytes: bytes, reason: str
) -> None:
    t = Transcript()
    t.observer.request_data(request_bytes)
    t.observer.response_data(response_bytes)
    t.observer.request_data(GET)  # ignored from now on
    t.observer.response_data(OK)
    t.observer.finish()
    assert t.stops == [reason]
    assert t.records == []


def test_an_upgrade_is_reported_then_stops() -> None:
    t = Transcript()
    t.observer.request_data(
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"\x81\x02hi"
    )
    t.observer.response_data(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"\x81\x02yo"
    )
    t.observer.finish()
    assert t.summary() == [("GET", "/ws", "web", 101, 0, 0, [])]
    assert t.stops == ["upgrade"]


async def _opens_with_preface(*chunks: bytes, close: bool = False, ahead: int = 0) -> bool:
    """Feed a real socket pair the client's chunks (a little apart) and ask; the first
    `ahead` chunks are there before the question (a request that came with its connection)."""
    a, b = trio.socket.socketpair()
    client, proxy_side = trio.SocketStream(a), trio.SocketStream(b)
    for chunk in chunks[:ahead]:
        await client.send_all(chunk)
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            for chunk in chunks[ahead:]:
                await client.send_all(chunk)
                await trio.sleep(0.02)
            if close:
                await client.aclose()

        nursery.start_soon(send)
        answer = await opens_with_h2_preface(proxy_side, wait=0.5)
        sent = b"".join(chunks)
        if sent:  # peeked, not taken: every byte is still there for the relay or the engine
            assert await proxy_side.receive_some(len(sent)) == sent
    return answer


@pytest.mark.parametrize(
    ("chunks", "close", "h2"),
    [
        ((b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",), False, True),
        ((b"P", b"R", b"I * HTTP/2.0\r\n"), False, True),  # the start arrives in pieces
        ((b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",), False, False),
        ((b"P", b"UT / HTTP/1.1\r\n"), False, False),
        ((b"PR",), False, False),  # a start that stops: observed as HTTP/1.1 after the wait
        ((), False, False),  # a client that sends nothing (server-first protocol)
        ((b"P",), True, False),  # closed after one byte
    ],
)
async def test_an_http2_client_on_an_http1_port_is_recognised_by_its_preface(chunks, close, h2):
    assert await _opens_with_preface(*chunks, close=close) is h2


@pytest.mark.parametrize(
    ("chunks", "ahead", "h2"),
    [
        ((b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",), 1, True),
        ((b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",), 1, False),
        ((b"P", b"RI * HTTP/2.0\r\n"), 1, True),  # a part there, the rest waited for
        ((b"P", b"UT / HTTP/1.1\r\n"), 1, False),
        ((b"PR",), 1, False),  # a part there and nothing more: after the wait
    ],
)
async def test_a_preface_already_there_is_told_at_once_or_waited_for(chunks, ahead, h2):
    assert await _opens_with_preface(*chunks, ahead=ahead) is h2


def test_changes_within_one_batch_are_told_once_with_the_state_after_it() -> None:
    """A request read whole in one batch begins and completes its head in it: the caller
    (whose timeouts each change moves) hears once, after the batch, and sees the end state."""
    t = Transcript()
    seen: list[tuple[float | None, float | None]] = []
    t.observer.on_change = lambda: seen.append((t.observer.head_begun, t.observer.idle_since))
    t.observer.request_data(GET)
    assert seen == [(None, None)]  # head begun and complete: an exchange in progress
    t.observer.response_data(OK)
    assert len(seen) == 2 and seen[1][0] is None and seen[1][1] is not None  # idle again
    t.observer.request_data(GET[:10])
    assert len(seen) == 3 and seen[2][0] is not None  # a head begun, not complete
    t.observer.request_data(GET[10:])
    assert seen[3] == (None, None)
