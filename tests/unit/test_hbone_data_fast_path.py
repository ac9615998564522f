"""HBONE's DATA fast path (agent/hbone/protocol.py `_HboneH2Connection.send_data` and
`receive_data`) against h2's own path: for any sequence of sends, partial deliveries,
acknowledgements, resets and stream ends, both put the same bytes on the wire, report the
same events, keep the same flow-control windows and refuse the same things."""

from __future__ import annotations

import contextlib

import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshagent.agent.hbone import protocol

MAX_STREAMS = 3


class _ThroughH2(protocol._HboneH2Connection):
    """The same connection with every DATA frame through h2 (the reference)."""

    def send_data(self, stream_id, data, end_stream=False, pad_length=None):  # type: ignore[override]
        h2.connection.H2Connection.send_data(self, stream_id, data, end_stream, pad_length)

    def receive_data(self, data):  # type: ignore[override]
        return h2.connection.H2Connection.receive_data(self, data)


def _pair(kind: type) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = protocol.new_h2_connection(client_side=True, kind=kind)
    server = protocol.new_h2_connection(client_side=False, kind=kind)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return client, server


def _event(event: h2.events.Event) -> tuple:
    fields = ("stream_id", "data", "flow_controlled_length", "error_code", "delta")
    ended = getattr(event, "stream_ended", None)
    return (
        type(event).__name__,
        *(getattr(event, name, None) for name in fields),
        None if ended is None else type(ended).__name__,
    )


class _Side:
    """One implementation's client and server, driven by the same steps."""

    def __init__(self, kind: type) -> None:
        self.ends = _pair(kind)
        self.wire: list[bytes] = [b"", b""]  # bytes in flight towards client (0), server (1)
        self.streams: list[int] = []

    def do(self, step: tuple) -> tuple:
        """Apply ``step``; what the caller compares: the result or the error's type."""
        try:
            return ("ok", self._do(step))
        except Exception as exc:  # h2 raises a KeyError for 0 bytes on a gone stream
            return ("error", type(exc).__name__)

    def _do(self, step: tuple) -> object:
        kind = step[0]
        if kind == "open":  # the CONNECT goes on the wire with whatever follows it
            client = self.ends[0]
            stream_id = client.get_next_available_stream_id()
            client.send_headers(
                stream_id, protocol.connect_request_headers("10.1.2.3:8080", "10.1.1.1")
            )
            self.wire[1] += client.data_to_send()
            self.streams.append(stream_id)
            return stream_id
        if kind == "ping":
            conn = self.ends[step[1]]
            conn.ping(b"12345678")
            self.wire[1 - step[1]] += conn.data_to_send()
            return None
        if kind == "settings":  # a new initial window moves every open stream's window
            conn = self.ends[step[1]]
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: step[2]})
            self.wire[1 - step[1]] += conn.data_to_send()
            return None
        if not self.streams:
            return None
        _, who, index, *rest = step
        conn = self.ends[who]
        stream_id = self.streams[index % len(self.streams)]
        if kind == "respond":
            conn.send_headers(stream_id, [(b":status", b"200")])
            self.wire[1 - who] += conn.data_to_send()
            return None
        if kind == "send":
            size, end, as_view = rest
            payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            conn.send_data(stream_id, memoryview(payload) if as_view else payload, end_stream=end)
            self.wire[1 - who] += conn.data_to_send()
            return conn.outbound_flow_control_window, conn.local_flow_control_window(stream_id)
        if kind == "end":
            conn.end_stream(stream_id)
            self.wire[1 - who] += conn.data_to_send()
            return None
        if kind == "reset":
            conn.reset_stream(stream_id)
            self.wire[1 - who] += conn.data_to_send()
            return None
        if kind == "deliver":
            (cut,) = rest
            pending = self.wire[who]
            cut = min(cut, len(pending))
            self.wire[who] = pending[cut:]
            events = conn.receive_data(pending[:cut])
            for event in events:
                if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                    with contextlib.suppress(h2.exceptions.StreamClosedError):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
            self.wire[1 - who] += conn.data_to_send()
            windows = (
                conn._inbound_flow_control_window_manager.current_window_size,
                conn.outbound_flow_control_window,
                {
                    sid: (
                        stream._inbound_window_manager.current_window_size,
                        stream.outbound_flow_control_window,
                        stream.state_machine.state,
                    )
                    for sid, stream in conn.streams.items()
                },
            )
            return [_event(e) for e in events], windows
        raise AssertionError(step)


_steps = st.one_of(
    st.just(("open",)),
    st.tuples(
        st.just("send"),
        st.integers(0, 1),
        st.integers(0, MAX_STREAMS),
        st.sampled_from([0, 1, 30, 1024, 70_000, 1_048_576]),
        st.booleans(),
        st.booleans(),
    ),
    st.tuples(st.just("deliver"), st.integers(0, 1), st.integers(0, 3), st.integers(1, 200_000)),
    st.tuples(st.just("end"), st.integers(0, 1), st.integers(0, MAX_STREAMS)),
    st.tuples(st.just("respond"), st.just(1), st.integers(0, MAX_STREAMS)),
    st.tuples(st.just("ping"), st.integers(0, 1)),
    st.tuples(st.just("settings"), st.integers(0, 1), st.sampled_from([0, 100, 65535, 1 << 22])),
    st.tuples(st.just("reset"), st.integers(0, 1), st.integers(0, MAX_STREAMS)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_steps, max_size=50))
def test_the_fast_path_does_what_h2_does(steps):
    fast, reference = _Side(protocol._HboneH2Connection), _Side(_ThroughH2)
    assert {type(end) for end in reference.ends} == {_ThroughH2}  # h2's own path, truly
    for step in [("open",), ("deliver", 1, 0, 1000), ("respond", 1, 0), *steps]:
        assert fast.do(step) == reference.do(step), step
        assert fast.wire == reference.wire, step


def test_plain_data_on_an_open_stream_skips_h2s_frame_machinery(monkeypatch):
    client, server = _pair(protocol._HboneH2Connection)
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, protocol.connect_request_headers("10.1.2.3:80", "10.1.1.1"))
    server.receive_data(client.data_to_send())
    server.send_headers(stream_id, [(b":status", b"200")])
    client.receive_data(server.data_to_send())

    def refused(*args, **kwargs):
        raise AssertionError("went through h2")

    monkeypatch.setattr(h2.connection.H2Connection, "send_data", refused)
    monkeypatch.setattr(h2.connection.H2Connection, "receive_data", refused)
    client.send_data(stream_id, b"hello")
    (event,) = server.receive_data(client.data_to_send())
    assert (event.stream_id, event.data, event.flow_controlled_length) == (stream_id, b"hello", 5)


def test_a_window_overrun_is_h2s_flow_control_error_and_goaway():
    client, server = _pair(protocol._HboneH2Connection)
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, protocol.connect_request_headers("10.1.2.3:80", "10.1.1.1"))
    server.receive_data(client.data_to_send())
    # a peer that ignores the window: more than the stream's 4 MiB in frames it builds itself
    frame = protocol._FRAME_HEADER.pack(0x100000 >> 8, 0, 0, 0, stream_id) + b"x" * 0x100000
    with pytest.raises(h2.exceptions.FlowControlError):
        server.receive_data(frame * 5)
    assert b"\x07" in server.data_to_send()[3:4]  # a GOAWAY frame went out
