"""The engine's HTTP/1.1 codec (agent/proxy/http/wire.py: parsing by llhttp through httptools):
framing, keep-alive, upgrades and validation as h11 does them; received messages are compared
with h11's reading of the same bytes, split anywhere; where llhttp reads differently from h11,
the test says so."""

from __future__ import annotations

import itertools
import re
import sys

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meshagent.agent.proxy.http import wire

codec = wire  # parsing by llhttp (httptools); the hand-written parser it replaced is gone
CODECS = [pytest.param(wire, id="llhttp")]


@pytest.fixture(params=CODECS)
def w(request):
    return request.param


def _mod(conn):
    return sys.modules[type(conn).__module__]


def _feed(conn, data: bytes, *, eof: bool = False) -> list:
    w = _mod(conn)
    if data:  # b"" reads what is already buffered (use eof=True for the peer's close)
        conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    events = []
    while True:
        event = conn.next_event()
        if event is w.NEED_DATA or event is w.PAUSED:
            return events
        events.append(event)
        if isinstance(event, w.ConnectionClosed):
            return events


def _body(events: list) -> bytes:
    return b"".join(e.data for e in events if type(e).__name__ == "Data")


def test_request_head_and_content_length_body(w):
    conn = w.Connection(w.SERVER)
    events = _feed(
        conn, b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A:  v  1 \r\nContent-Length: 5\r\n\r\nhello"
    )
    req = events[0]
    assert (req.method, req.target, req.http_version) == (b"POST", b"/a?b=1", b"1.1")
    assert req.headers == [(b"host", b"x"), (b"x-a", b"v  1"), (b"content-length", b"5")]
    assert _body(events) == b"hello" and isinstance(events[-1], w.EndOfMessage)
    assert conn.their_state is w.DONE and conn.our_state is w.SEND_RESPONSE


def test_chunked_request_with_extensions_and_trailers_split_byte_by_byte(w):
    conn = w.Connection(w.SERVER)
    head = b"PUT / HTTP/1.1\nHost: x\nTransfer-Encoding: Chunked\n\n"
    if w is codec:
        # llhttp refuses bare-LF line ends (stricter than h11; RFC 9112 section 2.2 only
        # allows a recipient to accept them): the same request with CRLF
        with pytest.raises(codec.RemoteProtocolError):
            _feed(codec.Connection(codec.SERVER), head)
        head = head.replace(b"\n", b"\r\n")
    raw = head + b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-Trailer: t\r\n\r\n"
    events = []
    for i in range(len(raw)):
        events += _feed(conn, raw[i : i + 1])
    assert _body(events) == b"hello!"
    assert isinstance(events[-1], w.EndOfMessage) and conn.their_state is w.DONE


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: v\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS ClientHello
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 70_000, 431),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX", 400),
    ],
)
def test_invalid_requests_raise_with_h11s_status_hint(w, raw: bytes, status: int):
    conn = w.Connection(w.SERVER, max_incomplete_event_size=60 * 1024)
    with pytest.raises(w.RemoteProtocolError) as info:
        _feed(conn, raw)
    assert info.value.error_status_hint == status
    assert conn.their_state is w.ERROR
    # the proxy may still answer the error
    out = conn.send(w.Response(status_code=status, headers=[(b"content-length", b"0")]))
    assert out.startswith(b"HTTP/1.1 %d " % status)


def test_truncated_body_is_an_error_and_idle_close_is_connection_closed(w):
    conn = w.Connection(w.SERVER)
    with pytest.raises(w.RemoteProtocolError):
        _feed(conn, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel", eof=True)
    idle = w.Connection(w.SERVER)
    assert isinstance(_feed(idle, b"", eof=True)[0], w.ConnectionClosed)


def _exchange(w, request: bytes, response, body: bytes = b"") -> tuple[bytes, object]:
    conn = w.Connection(w.SERVER)
    _feed(conn, request)
    out = conn.send(response)
    if body:
        out += conn.send(w.Data(data=body))
    out += conn.send(w.EndOfMessage())
    return out, conn


def test_response_framing_as_h11_chooses_it(w):
    ok = w.Response(status_code=200, headers=[(b"x", b"1")])
    # no length, HTTP/1.1 client: chunked, kept alive
    out, conn = _exchange(w, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ok, b"hi")
    assert (
        out == b"HTTP/1.1 200 OK\r\nx: 1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    )
    assert conn.our_state is w.DONE and conn.their_state is w.DONE
    conn.start_next_cycle()
    # no length, HTTP/1.0 client: the body ends with the connection
    out, conn = _exchange(w, b"GET / HTTP/1.0\r\n\r\n", ok, b"hi")
    assert out == b"HTTP/1.1 200 OK\r\nx: 1\r\nconnection: close\r\n\r\nhi"
    assert conn.our_state is w.MUST_CLOSE
    # Connection: close asked for: answered with close, not reusable
    sized = w.Response(status_code=200, headers=[(b"content-length", b"2")], reason=b"OK")
    out, conn = _exchange(
        w, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", sized, b"hi"
    )
    assert out == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi"
    assert conn.our_state is w.MUST_CLOSE
    # HEAD: headers as for GET, never a body
    out, conn = _exchange(w, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", sized)
    assert out == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n" and conn.our_state is w.DONE


def test_sending_more_or_less_than_content_length_is_refused(w):
    conn = w.Connection(w.SERVER)
    _feed(conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.send(w.Response(status_code=200, headers=[(b"content-length", b"1")]))
    with pytest.raises(w.LocalProtocolError):
        conn.send(w.Data(data=b"toolong"))
    conn = w.Connection(w.SERVER)
    _feed(conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.send(w.Response(status_code=200, headers=[(b"content-length", b"1")]))
    with pytest.raises(w.LocalProtocolError):
        conn.send(w.EndOfMessage())


def test_expect_100_continue_is_cleared_by_an_answer_or_by_body_data(w):
    conn = w.Connection(w.SERVER)
    head = b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    _feed(conn, head)
    assert conn.client_is_waiting_for_100_continue
    assert conn.send(w.InformationalResponse(status_code=100, headers=[])) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    assert not conn.client_is_waiting_for_100_continue
    other = w.Connection(w.SERVER)
    _feed(other, head + b"ok")
    assert not other.client_is_waiting_for_100_continue


def test_client_side_request_and_responses(w):
    conn = w.Connection(w.CLIENT)
    out = conn.send(
        w.Request(
            method=b"POST",
            target=b"/p",
            headers=[(b"x", b"1"), (b"host", b"h"), (b"transfer-encoding", b"chunked")],
        )
    )
    out += conn.send(w.Data(data=b"abc")) + conn.send(w.EndOfMessage())
    assert out == (
        b"POST /p HTTP/1.1\r\nhost: h\r\nx: 1\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    events = _feed(
        conn, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    assert isinstance(events[0], w.InformationalResponse)
    assert events[1].status_code == 200 and events[1].reason == b"OK"
    assert _body(events) == b"ok" and conn.their_state is w.DONE
    conn.start_next_cycle()
    conn.send(w.Request(method=b"HEAD", target=b"/", headers=[(b"host", b"h")]))
    conn.send(w.EndOfMessage())
    events = _feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert isinstance(events[-1], w.EndOfMessage) and conn.their_state is w.DONE
    conn.start_next_cycle()
    conn.send(w.Request(method=b"GET", target=b"/", headers=[(b"host", b"h")]))
    conn.send(w.EndOfMessage())
    events = _feed(conn, b"HTTP/1.0 200 OK\r\n\r\nuntil the end", eof=True)
    assert _body(events) == b"until the end"
    assert conn.their_state is w.CLOSED and conn.our_state is w.MUST_CLOSE


def test_a_closed_connection_before_the_response_is_an_error(w):
    conn = w.Connection(w.CLIENT)
    conn.send(w.Request(method=b"GET", target=b"/", headers=[(b"host", b"h")]))
    conn.send(w.EndOfMessage())
    with pytest.raises(w.RemoteProtocolError):
        _feed(conn, b"", eof=True)
    with pytest.raises(w.LocalProtocolError):
        w.Connection(w.CLIENT).send(w.Request(method=b"GET", target=b"/", headers=[]))


def test_upgrade_switches_both_sides_and_keeps_trailing_bytes(w):
    server = w.Connection(w.SERVER)
    _feed(server, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\nFRAME")
    assert server.their_state is w.MIGHT_SWITCH_PROTOCOL
    server.send(w.InformationalResponse(status_code=101, headers=[(b"upgrade", b"ws")]))
    assert server.our_state is w.SWITCHED_PROTOCOL
    assert server.trailing_data == (b"FRAME", False)
    client = w.Connection(w.CLIENT)
    client.send(
        w.Request(method=b"GET", target=b"/", headers=[(b"host", b"h"), (b"upgrade", b"ws")])
    )
    client.send(w.EndOfMessage())
    events = _feed(client, b"HTTP/1.1 101 Switching\r\nUpgrade: ws\r\n\r\nDATA")
    assert events[0].status_code == 101 and client.their_state is w.SWITCHED_PROTOCOL
    assert client.trailing_data == (b"DATA", False)
    # a normal answer declines the upgrade; the connection stays HTTP
    declined = w.Connection(w.CLIENT)
    declined.send(
        w.Request(method=b"GET", target=b"/", headers=[(b"host", b"h"), (b"upgrade", b"ws")])
    )
    declined.send(w.EndOfMessage())
    _feed(declined, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert declined.our_state is w.DONE and declined.their_state is w.DONE


def test_pipelined_requests_wait_for_the_next_cycle_byte_exact(w):
    conn = w.Connection(w.SERVER)
    first = (
        b"POST /1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    second = b"PUT /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok"
    third = b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n"
    events = _feed(conn, first + second + third)
    assert events[0].target == b"/1" and _body(events) == b"abc"
    assert conn.their_state is w.DONE and conn.next_event() is w.PAUSED
    for target, body in ((b"/2", b"ok"), (b"/3", b"")):
        conn.send(w.Response(status_code=204, headers=[]))
        conn.send(w.EndOfMessage())
        conn.start_next_cycle()
        events = _feed(conn, b"")
        assert events[0].target == target and _body(events) == body
        assert isinstance(events[-1], w.EndOfMessage)


def test_a_head_response_has_no_body_and_the_next_response_reads_clean(w):
    conn = w.Connection(w.CLIENT)
    conn.send(w.Request(method=b"HEAD", target=b"/", headers=[(b"host", b"h")]))
    conn.send(w.EndOfMessage())
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    events = _feed(conn, head + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n")
    assert [type(e).__name__ for e in events] == ["Response", "EndOfMessage"]
    conn.start_next_cycle()
    conn.send(w.Request(method=b"GET", target=b"/", headers=[(b"host", b"h")]))
    conn.send(w.EndOfMessage())
    events = _feed(conn, b"ok\r\n0\r\n\r\n")
    assert _body(events) == b"ok" and isinstance(events[-1], w.EndOfMessage)
    assert conn.their_state is w.DONE


def test_connect_and_101_switch_with_the_bytes_after_the_head(w):
    client = w.Connection(w.CLIENT)
    client.send(w.Request(method=b"CONNECT", target=b"a:1", headers=[(b"host", b"a:1")]))
    client.send(w.EndOfMessage())
    events = _feed(client, b"HTTP/1.1 200 OK\r\n\r\nTUNNEL")
    assert events[0].status_code == 200 and client.their_state is w.SWITCHED_PROTOCOL
    assert client.trailing_data == (b"TUNNEL", False)
    server = w.Connection(w.SERVER)
    _feed(server, b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\nTUNNEL")
    assert server.their_state is w.MIGHT_SWITCH_PROTOCOL
    assert server.trailing_data == (b"TUNNEL", False)
    # a 101 without `Connection: upgrade` (llhttp pauses on it all the same)
    client = w.Connection(w.CLIENT)
    client.send(
        w.Request(method=b"GET", target=b"/", headers=[(b"host", b"h"), (b"upgrade", b"ws")])
    )
    client.send(w.EndOfMessage())
    events = _feed(client, b"HTTP/1.1 101 Switching\r\nUpgrade: ws\r\n\r\nDATA")
    assert events[0].status_code == 101 and client.trailing_data == (b"DATA", False)


def test_llhttp_readings_that_differ_from_h11():
    """Where wire.py (llhttp, strict mode) reads differently from h11."""
    refused = [
        # an upgrade's body would be taken for the new protocol's bytes: refused
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: ws\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n  folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\n\r\nok",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET /\r\n\r\n",  # HTTP/0.9
        b"FROB / HTTP/1.1\r\nHost: a\r\n\r\n",  # a method llhttp does not know
    ]
    for raw in refused:
        conn = codec.Connection(codec.SERVER)
        with pytest.raises(codec.RemoteProtocolError) as info:
            _feed(conn, raw)
        assert info.value.error_status_hint == 400, raw
    # empty lines before a request line are skipped (RFC 9112 section 2.2)
    conn = codec.Connection(codec.SERVER)
    events = _feed(conn, b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert events[0].target == b"/" and isinstance(events[-1], codec.EndOfMessage)
    # HTTP/1.0 keeps its keep-alive rules (h11 would close): `Connection: keep-alive` keeps
    # the connection (said so in the response), its absence closes it
    out, conn = _exchange(
        codec,
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        codec.Response(status_code=200, headers=[(b"content-length", b"0")]),
    )
    assert conn.our_state is codec.DONE and b"connection: keep-alive\r\n" in out
    out, conn = _exchange(
        codec,
        b"GET / HTTP/1.0\r\n\r\n",
        codec.Response(status_code=200, headers=[(b"content-length", b"0")]),
    )
    assert conn.our_state is codec.MUST_CLOSE and b"connection: close\r\n" in out


# -- the same bytes read by h11 and by each codec ---------------------------------------------


def _h11_read(raw: bytes, cuts: list[int]) -> list:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=60 * 1024)
    out: list = []
    try:
        for piece in _pieces(raw, cuts):
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    break
                out.append(_summary_h11(event))
                if isinstance(event, h11.EndOfMessage):
                    return out
    except h11.RemoteProtocolError:
        out.append("error")
    return out


def _codec_read(w, raw: bytes, cuts: list[int]) -> list:
    conn = w.Connection(w.SERVER, max_incomplete_event_size=60 * 1024)
    out: list = []
    try:
        for piece in _pieces(raw, cuts):
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if event is w.NEED_DATA or event is w.PAUSED:
                    break
                out.append(_summary_codec(event))
                if isinstance(event, w.EndOfMessage):
                    return out
    except w.RemoteProtocolError:
        out.append("error")
    return out


def _pieces(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    return [raw[a:b] for a, b in itertools.pairwise(points) if b > a]


def _summary_h11(event) -> tuple:
    if isinstance(event, h11.Request):
        return ("req", event.method, event.target, list(event.headers), event.http_version)
    if isinstance(event, h11.Data):
        return ("data", event.data)
    return (type(event).__name__,)


def _summary_codec(event) -> tuple:
    kind = type(event).__name__
    if kind == "Request":
        return ("req", event.method, event.target, event.headers, event.http_version)
    if kind == "Data":
        return ("data", event.data)
    return (type(event).__name__,)


def _merge_data(events: list) -> list:
    out: list = []
    for e in events:
        if out and e != "error" and e[0] == "data" and out[-1] != "error" and out[-1][0] == "data":
            out[-1] = ("data", out[-1][1] + e[1])
        else:
            out.append(e)
    return out


_PARTS = [
    b"GET /x HTTP/1.1\r\n",
    b"POST /y?z HTTP/1.1\r\n",
    b"GET / HTTP/1.0\r\n",
    b"Host: r\r\n",
    b"X-Long:  a  b \r\n",
    b"x-folded: a\r\n  b\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 5, 5\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Connection: close\r\n",
    b"\r\n",
    b"hello",
    b"5\r\nhello\r\n",
    b"0\r\n\r\n",
    b"bad header\r\n",
]


# Methods llhttp knows (it refuses any other, with 400; h11 takes any token).
_LLHTTP_METHODS = {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE"}


def _llhttp_refuses(raw: bytes, h11_events: list) -> bool:
    """Where llhttp, in its strict mode, is stricter than h11 (each allowed by RFC 9112):
    obs-folded header lines (5.2: reject or unfold), bare LF line ends, a Content-Length
    list such as "5, 5" or repeated (6.3: may be refused as invalid framing), Content-Length with
    Transfer-Encoding (6.3), a method it does not know (RFC 9110 9.1 asks for 501 there)."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    if b"\r\n " in head or b"\r\n\t" in head or re.search(rb"(?<!\r)\n", head):
        return True  # obs-fold, or a bare LF line end (RFC 9112 2.2: a recipient MAY take it)
    lengths = re.findall(rb"(?i)\r\ncontent-length:([^\r\n]*)", head)
    if len(lengths) > 1 or any(b"," in v for v in lengths):
        return True
    if re.search(rb"(?i)\r\ncontent-length:", head) and re.search(
        rb"(?i)\r\ntransfer-encoding:", head
    ):
        return True  # both framings: "ought to be handled as an error" (RFC 9112 6.3)
    request = h11_events[0] if h11_events else None
    return request is not None and request[0] == "req" and request[1] not in _LLHTTP_METHODS


@pytest.mark.parametrize("w", CODECS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(st.sampled_from(_PARTS), st.binary(max_size=8)), min_size=1, max_size=10),
    st.lists(st.integers(min_value=0, max_value=200), max_size=4),
)
def test_requests_read_as_h11_reads_them(w, parts: list[bytes], cuts: list[int]):
    raw = b"".join(parts)
    expected = _merge_data(_h11_read(raw, cuts))
    if w is codec and raw[:1] in (b"\r", b"\n"):
        # llhttp skips empty lines before a request line, as RFC 9112 section 2.2 asks of a
        # server; h11 refuses them: compare with h11's reading of what follows them
        rest = raw.lstrip(b"\r\n")
        expected = _merge_data(_h11_read(rest, [max(0, c - (len(raw) - len(rest))) for c in cuts]))
    got = _merge_data(_codec_read(w, raw, cuts))
    if expected and expected[-1] == "error":
        # where h11 refuses, so do we (possibly earlier: we check a head as a whole)
        assert got and got[-1] == "error", (raw, expected, got)
        return
    if got and got[-1] == "error":
        # we may refuse what h11 lets through only if h11 has not finished the message
        if w is codec and _llhttp_refuses(raw, expected):
            return
        assert not expected or expected[-1] != ("EndOfMessage",), (raw, expected, got)
        return
    assert got == expected, (raw, expected, got)


def test_http_1_0_request_goes_on_as_1_0_and_its_response_decides_reuse():
    conn = codec.Connection(codec.CLIENT)
    req = codec.Request(method=b"GET", target=b"/", headers=[(b"host", b"a")], http_version=b"1.0")
    assert conn.send(req).startswith(b"GET / HTTP/1.0\r\n")
    conn.send(codec.EndOfMessage())
    events = _feed(conn, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(events[-1], codec.EndOfMessage)
    assert conn.our_state is codec.MUST_CLOSE  # 1.0 without keep-alive: not reused
    keep = codec.Connection(codec.CLIENT)
    asked = [(b"host", b"a"), (b"connection", b"keep-alive")]
    keep.send(codec.Request(method=b"GET", target=b"/", headers=asked, http_version=b"1.0"))
    keep.send(codec.EndOfMessage())
    _feed(keep, b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
    assert keep.our_state is codec.DONE and keep.their_state is codec.DONE


def test_parser_errors_are_plain_words():
    cases = {
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n": "an HTTP/2 connection preface",
        b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n": "invalid character in a header name",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 70_000: "headers too large",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n": (
            "more than one Content-Length"
        ),
        b"G@T / HTTP/1.1\r\n\r\n": "unknown or malformed method",
        b"GET / HTTP/1.1\r\n\r\n": "missing Host header",
    }
    for raw, words in cases.items():
        conn = codec.Connection(codec.SERVER)
        with pytest.raises(codec.RemoteProtocolError) as info:
            _feed(conn, raw)
        assert str(info.value).startswith(words), (raw, str(info.value))


def test_h2c_upgrade_body_is_the_request_body():
    """llhttp stops at an upgrade's head; an h2c offer is never taken, so its body is read."""
    conn = codec.Connection(codec.SERVER)
    events = _feed(
        conn,
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\nContent-Length: 3\r\n\r\nabc",
    )
    assert b"".join(e.data for e in events if isinstance(e, codec.Data)) == b"abc"
    assert isinstance(events[-1], codec.EndOfMessage)


H2C_CHUNKED = (
    b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@pytest.mark.parametrize("cut", [None, 1, len(H2C_CHUNKED) + 2, len(H2C_CHUNKED) + 7])
def test_h2c_upgrade_chunked_body_is_the_request_body(cut):
    """Envoy serves an h2c offer as HTTP/1.1, a chunked body included (curl --http2 -d @- sends
    one): the chunks are the request's, however they arrive, and the connection goes on."""
    raw = H2C_CHUNKED + b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\n"
    raw += b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    conn = codec.Connection(codec.SERVER)
    parts = [raw] if cut is None else [raw[:cut], raw[cut:]]
    events = []
    for part in parts:
        events += _feed(conn, part)
        if any(isinstance(e, codec.EndOfMessage) for e in events):
            conn.send(codec.Response(status_code=200, headers=[(b"content-length", b"0")]))
            conn.send(codec.EndOfMessage())
            conn.start_next_cycle()
            events += _feed(conn, b"")
    request, *rest = events
    assert (request.method, request.target) == (b"POST", b"/up")
    assert b"".join(e.data for e in rest if isinstance(e, codec.Data)) == b"abcde"
    ends = [i for i, e in enumerate(rest) if isinstance(e, codec.EndOfMessage)]
    assert rest[ends[0] + 1].target == b"/next"


def test_h2c_upgrade_with_a_malformed_chunk_is_refused_in_plain_words():
    conn = codec.Connection(codec.SERVER)
    with pytest.raises(codec.RemoteProtocolError, match="malformed chunked body"):
        _feed(conn, H2C_CHUNKED + b"zz\r\nabc\r\n")
