"""HBONE's HTTP/2 conventions without sockets: two h2 state machines talking in memory."""

from __future__ import annotations

import h2.events
import pytest
from hypothesis import given
from hypothesis import strategies as st
from meshagent.agent.hbone.protocol import (
    CONNECTION_WINDOW,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    STREAM_WINDOW,
    BadRequest,
    connect_request_headers,
    format_authority,
    forwarded_for,
    new_h2_connection,
    parse_authority,
    parse_connect_request,
)


def _exchange(a, b) -> tuple[list[h2.events.Event], list[h2.events.Event]]:
    """Shuttle bytes between two h2 connections until both are quiet."""
    events_a: list[h2.events.Event] = []
    events_b: list[h2.events.Event] = []
    while True:
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return events_a, events_b
        if out_a:
            events_b += b.receive_data(out_a)
        if out_b:
            events_a += a.receive_data(out_b)


def test_both_sides_agree_on_windows_frame_size_and_stream_limit():
    client, server = new_h2_connection(client_side=True), new_h2_connection(client_side=False)
    _exchange(client, server)
    for conn in (client, server):
        assert conn.remote_settings.initial_window_size == STREAM_WINDOW
        assert conn.remote_settings.max_frame_size == MAX_FRAME_SIZE
        assert conn.max_outbound_frame_size == MAX_FRAME_SIZE
        assert conn.outbound_flow_control_window == CONNECTION_WINDOW
    assert client.remote_settings.max_concurrent_streams == MAX_CONCURRENT_STREAMS


def test_a_connect_round_trip_carries_authority_forwarded_and_baggage():
    client, server = new_h2_connection(client_side=True), new_h2_connection(client_side=False)
    _exchange(client, server)
    headers = connect_request_headers("10.1.2.3:9080", "10.0.0.7", baggage="k8s.pod=a")
    client.send_headers(1, headers)
    _, server_events = _exchange(client, server)
    (request,) = [e for e in server_events if isinstance(e, h2.events.RequestReceived)]
    parsed = parse_connect_request(request.headers)
    assert parsed.authority == "10.1.2.3:9080"
    assert parsed.target == ("10.1.2.3", 9080)
    assert parsed.forwarded_for == "10.0.0.7"
    assert parsed.baggage == "k8s.pod=a"
    assert parsed.protocol is None  # a source that does not name the protocol


@pytest.mark.parametrize("protocol", ["http1", "http2", "tcp"])
def test_the_connect_names_the_service_ports_protocol(protocol):
    headers = connect_request_headers("10.1.2.3:8082", "10.0.0.7", protocol=protocol)
    assert (b"x-meshagent-protocol", protocol.encode()) in headers
    assert parse_connect_request([(b":method", b"CONNECT"), *headers[1:]]).protocol == protocol


def test_an_unknown_protocol_is_refused_when_sent_and_ignored_when_received():
    with pytest.raises(ValueError, match="protocol"):
        connect_request_headers("10.1.2.3:80", "10.0.0.7", protocol="spdy")
    parsed = parse_connect_request(
        [(b":method", b"CONNECT"), (b":authority", b"10.1.2.3:80"), (b"x-meshagent-protocol", b"x")]
    )
    assert parsed.protocol is None


def test_a_full_stream_window_of_one_mib_frames_is_accepted():
    client, server = new_h2_connection(client_side=True), new_h2_connection(client_side=False)
    _exchange(client, server)
    client.send_headers(1, connect_request_headers("10.1.2.3:80", "10.0.0.7"))
    _exchange(client, server)
    sent = 0
    while client.local_flow_control_window(1) > 0:
        size = min(client.local_flow_control_window(1), client.max_outbound_frame_size)
        client.send_data(1, b"x" * size)
        sent += size
    _, events = _exchange(client, server)
    frames = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert sent == STREAM_WINDOW
    assert sum(len(e.data) for e in frames) == STREAM_WINDOW
    assert max(len(e.data) for e in frames) == MAX_FRAME_SIZE


@pytest.mark.parametrize(
    ("headers", "fault"),
    [
        ([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a")], "not CONNECT"),
        ([(b":method", b"CONNECT")], "without :authority"),
        (
            [(b":method", b"CONNECT"), (b":authority", b"1.2.3.4:80"), (b":protocol", b"ws")],
            "extended CONNECT",
        ),
        ([(b":method", b"CONNECT"), (b":authority", b"reviews:80")], "not an IP"),
        ([(b":method", b"CONNECT"), (b":authority", b"1.2.3.4")], "ip:port"),
        ([(b":method", b"CONNECT"), (b":authority", b"1.2.3.4:0")], "not 1-65535"),
        ([(b":method", b"CONNECT"), (b":authority", b"::1:80")], "in brackets"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(headers, fault):
    with pytest.raises(BadRequest, match=fault):
        parse_connect_request(headers)


@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(min_value=1, max_value=65535),
)
def test_authority_round_trips(ip, port):
    assert parse_authority(format_authority(str(ip), port)) == (str(ip), port)


@given(st.text(max_size=60))
def test_parse_authority_accepts_or_says_why(text):
    try:
        ip, port = parse_authority(text)
    except BadRequest as exc:
        assert repr(text) in str(exc)
    else:
        assert 0 < port < 65536 and ip


@pytest.mark.parametrize(
    ("value", "ip"),
    [
        ("for=10.0.0.7", "10.0.0.7"),
        ('for="[2001:db8::1]"', "2001:db8::1"),
        ('For="10.0.0.7:4711";proto=http, for=10.9.9.9', "10.0.0.7"),
        ("proto=https;for=192.0.2.60", "192.0.2.60"),
        ("for=unknown", None),
        ("for=_hidden", None),
        ("by=10.0.0.1", None),
    ],
)
def test_forwarded_for_reads_the_first_client_address(value, ip):
    assert forwarded_for(value) == ip


def test_ipv6_client_is_quoted_and_bracketed_as_rfc_7239_says():
    headers = dict(connect_request_headers("[fd00::5]:80", "fd00::9"))
    assert headers[b"forwarded"] == b'for="[fd00::9]"'
    assert headers[b":authority"] == b"[fd00::5]:80"


@pytest.mark.parametrize(
    ("authority", "client", "baggage", "fault"),
    [
        ("reviews.shop:80", "10.0.0.1", None, "not an IP"),
        ("10.0.0.2:80", "somewhere", None, "not an IP address"),
        ("10.0.0.2:80", "10.0.0.1", "a\r\nb", "line breaks"),
    ],
)
def test_caller_mistakes_fail_before_anything_is_sent(authority, client, baggage, fault):
    with pytest.raises(ValueError, match=fault):
        connect_request_headers(authority, client, baggage)


def _stock_h2(client_side: bool):
    """h2's own connection with HBONE's settings, to compare wire bytes against."""
    import h2.config
    import h2.connection
    import h2.settings
    from meshagent.agent.hbone import protocol

    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=client_side, header_encoding=None)
    )
    codes = h2.settings.SettingCodes
    conn.local_settings = h2.settings.Settings(
        client=client_side,
        initial_values={
            codes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            codes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            codes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            codes.MAX_HEADER_LIST_SIZE: protocol.MAX_HEADER_LIST_SIZE,
            codes.ENABLE_PUSH: 0,
        },
    )
    conn.max_inbound_frame_size = MAX_FRAME_SIZE
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - protocol._DEFAULT_CONNECTION_WINDOW)
    return conn


@given(
    sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=6),
    views=st.booleans(),
    split=st.integers(1, 200),
)
def test_outgoing_frames_are_the_bytes_h2_itself_would_send(sizes, views, split):
    """The piece list (DATA payloads not copied) puts the same bytes on the wire as h2."""
    ours, stock = new_h2_connection(client_side=True), _stock_h2(client_side=True)
    servers = [new_h2_connection(client_side=False), new_h2_connection(client_side=False)]
    for conn, server in zip((ours, stock), servers, strict=True):
        _exchange(conn, server)
    wire: list[bytes] = []
    for conn in (ours, stock):
        out = []
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, connect_request_headers("10.0.0.1:80", "10.0.0.2"))
        out.append(conn.data_to_send(split))  # a partial take keeps the rest in order
        for i, size in enumerate(sizes):
            payload = bytes([i % 251]) * size
            conn.send_data(sid, memoryview(payload)[: size // 2 + 1] if views else payload)
            conn.ping(b"12345678")
        conn.end_stream(sid)
        out.append(conn.data_to_send())
        wire.append(b"".join(out))
    assert wire[0] == wire[1]
    events = servers[0].receive_data(wire[0])
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
