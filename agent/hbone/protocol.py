"""HBONE's HTTP/2 conventions, without I/O: settings, the CONNECT request and its answer.

What flows through: a tunnel target and client address become CONNECT request headers
(client side); received request headers become a validated `ConnectRequest` or a
`BadRequest` naming the fault (server side); response headers become a status. Also the one
place that configures `h2` the way both proxies must agree on (windows, frame size, streams).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import struct
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.frame_buffer
import h2.settings
import h2.stream
import hyperframe.frame
from h2.connection import ConnectionState
from h2.stream import StreamState

__all__ = [
    "CONNECTION_WINDOW",
    "MAX_CONCURRENT_STREAMS",
    "MAX_FRAME_SIZE",
    "PROTOCOLS",
    "PROTOCOL_HEADER",
    "STREAM_WINDOW",
    "BadRequest",
    "ConnectRequest",
    "connect_request_headers",
    "format_authority",
    "forwarded_for",
    "new_h2_connection",
    "parse_authority",
    "parse_connect_request",
    "response_status",
]

# ztunnel's defaults: big windows keep a single fast stream from stalling on round trips,
# while still bounding what a slow reader makes the sender hold.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 4 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
MAX_CONCURRENT_STREAMS = 100
# A CONNECT carries a handful of short headers; refuse header floods early.
MAX_HEADER_LIST_SIZE = 64 * 1024
# h2's fixed initial connection window (RFC 9113 section 6.9.2); only WINDOW_UPDATE grows it.
_DEFAULT_CONNECTION_WINDOW = 65_535
# Addresses parsed and formatted per tunnel (one each per connection) are a node's few pods
# and peers: kept, so that a connection does not parse the same address again (ipaddress's
# parse is ~100 Python calls). Bounded: a peer's authorities cannot grow it.
_PARSED_CACHE = 4096


def _data_frame_body_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


# h2 formats ``repr(frame)`` for a trace line on every received frame whether or not logging
# is on, and hyperframe's DATA frame repr hex-encodes the whole body before truncating it: for
# 1 MiB frames that is several passes over every payload byte, the largest single cost on the
# receive path. Describe DATA frames by their size instead (this only changes a debug repr).
hyperframe.frame.DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign]


_FRAME_HEADER = struct.Struct(">HBBBL")  # RFC 9113 section 4.1: 24-bit length, type, flags, id
_DATA_TYPE = hyperframe.frame.DataFrame.type
_END_STREAM = 0x01
# Where DATA changes no state (h2's state machines): the connection open, the stream open or
# half-closed on the other side.
_OPEN_CONNECTION = frozenset({ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN})
_SEND_DATA_STATES = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
_RECEIVE_DATA_STATES = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL})


def _h2_has_what_the_fast_path_reads() -> bool:
    """The DATA fast path reads and moves h2 internals (its frame buffer's held bytes, the
    windows, the content length it tracks): an h2 without them gets h2's own path."""
    try:
        conn = h2.connection.H2Connection()
        stream = h2.stream.H2Stream(1, conn.config, 65535, 65535)
        buffer = conn.incoming_buffer
        return (
            hasattr(stream.state_machine, "headers_received")
            and all(hasattr(buffer, name) for name in ("_data", "_preamble_len", "_headers_buffer"))
            and all(
                hasattr(conn, name)
                for name in (
                    "_inbound_flow_control_window_manager",
                    "_data_to_send",
                    "outbound_flow_control_window",
                    "state_machine",
                    "streams",
                )
            )
            and all(
                hasattr(stream, name)
                for name in (
                    "_inbound_window_manager",
                    "_expected_content_length",
                    "outbound_flow_control_window",
                    "state_machine",
                )
            )
        )
    except Exception:
        return False


_FAST_DATA = _h2_has_what_the_fast_path_reads()


def _data_event_by_keywords(stream_id: int, data: bytes, length: int) -> h2.events.Event:
    return h2.events.DataReceived(stream_id=stream_id, data=data, flow_controlled_length=length)


def _data_event_by_attributes(stream_id: int, data: bytes, length: int) -> h2.events.Event:
    event = h2.events.DataReceived()  # type: ignore[call-arg]
    event.stream_id, event.data, event.flow_controlled_length = stream_id, data, length
    return event


# h2's event for received DATA: keyword fields since h2 4.2 (dataclasses), attributes before.
_data_event = (
    _data_event_by_keywords
    if dataclasses.is_dataclass(h2.events.DataReceived)
    else _data_event_by_attributes
)


class _HboneH2Connection(h2.connection.H2Connection):
    """`h2`'s connection, with outgoing frames kept as a list of pieces until they are sent.

    `h2` serialises every frame into one growing bytearray and copies it out again in
    `data_to_send`; a DATA frame's payload is copied three more times on the way (padding
    join, header join, bytearray append). Here an unpadded DATA frame is its 9-byte header
    plus the payload object as given, and `data_to_send` joins the pieces once: one copy
    of each payload byte between the relay and TLS instead of five.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self._pieces: list[bytes | memoryview] = []

    def _prepare_for_sending(self, frames: list[hyperframe.frame.Frame]) -> None:
        pieces = self._pieces
        if self._data_to_send:  # written directly by h2 (the preamble): it goes first
            pieces.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        for frame in frames:
            if frame.type == _DATA_TYPE and not frame.pad_length and "PADDED" not in frame.flags:
                data = frame.data
                length = len(data)
                frame.body_len = length
                pieces.append(
                    _FRAME_HEADER.pack(
                        (length >> 8) & 0xFFFF,
                        length & 0xFF,
                        _DATA_TYPE,
                        _END_STREAM if "END_STREAM" in frame.flags else 0,
                        frame.stream_id & 0x7FFFFFFF,
                    )
                )
                if length:
                    pieces.append(data)
            else:
                pieces.append(frame.serialize())
            if frame.body_len > self.max_outbound_frame_size:
                raise AssertionError("frame larger than the peer allows")

    # --- DATA frames of open streams, without h2's per-frame machinery ------------------------
    #
    # A tunnel's bytes are DATA frames on open streams, one or more per message each way. For
    # each, h2 runs its connection and stream state machines (no state changes for DATA on an
    # open stream), builds a frame object, a trace line's repr and an event: ~40 Python calls
    # sent and ~70 received, a sixth of what a node does per relayed request. Here such a frame
    # takes the few steps that matter (the flow-control windows, the frame's bytes, the
    # event); anything else (a frame with flags, padding, END_STREAM, a stream in another
    # state, a window overrun, a frame h2 holds part of) goes through h2 as before, in order.

    def send_data(
        self,
        stream_id: int,
        data: bytes | memoryview,
        end_stream: bool = False,
        pad_length: object = None,
    ) -> None:
        stream = self.streams.get(stream_id)
        size = len(data)
        if (
            not _FAST_DATA
            or end_stream
            or pad_length is not None
            or stream is None
            or stream.state_machine.state not in _SEND_DATA_STATES
            or self.state_machine.state not in _OPEN_CONNECTION
            or not 0 < size <= self.max_outbound_frame_size
            or size > self.outbound_flow_control_window
            or size > stream.outbound_flow_control_window
        ):
            super().send_data(stream_id, data, end_stream, pad_length)
            return
        pieces = self._pieces
        if self._data_to_send:  # written directly by h2: it goes first
            pieces.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        if type(data) is not bytes and not (type(data) is memoryview and type(data.obj) is bytes):
            data = bytes(data)  # a frame waiting to be sent must not change under it
        pieces.append(_FRAME_HEADER.pack(size >> 8, size & 0xFF, _DATA_TYPE, 0, stream_id))
        pieces.append(data)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size

    def receive_data(self, data: bytes) -> list[h2.events.Event]:
        buffer = self.incoming_buffer
        if not _FAST_DATA or buffer._data or buffer._preamble_len or buffer._headers_buffer:
            return super().receive_data(data)
        events: list[h2.events.Event] = []
        view = memoryview(data)
        total = len(view)
        pos = h2_from = 0  # frames from h2_from to pos are h2's, not handed to it yet
        while total - pos >= 9:
            high, low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(view, pos)
            end = pos + 9 + ((high << 8) | low)
            if end > total:
                break
            if kind == _DATA_TYPE and not flags and end > pos + 9:
                if h2_from < pos:  # what came before may open, end or reset this stream
                    events.extend(super().receive_data(view[h2_from:pos]))
                    h2_from = pos
                    if buffer._headers_buffer:  # a header block goes on: h2 takes the rest
                        break
                event = self._receive_plain_data(stream_id & 0x7FFFFFFF, view, pos + 9, end)
                if event is not None:
                    events.append(event)
                    h2_from = end
            pos = end
        if h2_from < total:  # h2 raises (and queues its GOAWAY) on what it refuses
            events.extend(super().receive_data(view[h2_from:]))
        return events

    def _receive_plain_data(
        self, stream_id: int, view: memoryview, start: int, end: int
    ) -> h2.events.DataReceived | None:
        """The event for an unflagged DATA frame on an open stream, its window taken; None if
        it is not that (h2 then takes the frame)."""
        stream = self.streams.get(stream_id)
        length = end - start
        if (
            stream is None
            or stream.state_machine.state not in _RECEIVE_DATA_STATES
            or not stream.state_machine.headers_received  # h2 refuses DATA before HEADERS
            or self.state_machine.state not in _OPEN_CONNECTION
            or stream._expected_content_length is not None
            or length > self.max_inbound_frame_size
        ):
            return None
        connection_window = self._inbound_flow_control_window_manager
        stream_window = stream._inbound_window_manager
        if (
            length > connection_window.current_window_size
            or length > stream_window.current_window_size
        ):
            return None  # h2 raises the flow-control error
        connection_window.window_consumed(length)
        stream_window.window_consumed(length)
        return _data_event(stream_id, view[start:end].tobytes(), length)

    def data_to_send(self, amount: int | None = None) -> bytes:
        pieces = self._pieces
        if self._data_to_send:
            pieces.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        if not pieces:
            return b""
        self._pieces = []
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if not isinstance(data, bytes):
            data = bytes(data)
        if amount is not None and amount < len(data):
            self._data_to_send = bytearray(data[amount:])
            data = data[:amount]
        return data

    def clear_outbound_data_buffer(self) -> None:
        self._pieces = []
        super().clear_outbound_data_buffer()


class BadRequest(ValueError):
    """A request on an HBONE server that is not a valid tunnel CONNECT (answered 400)."""


def new_h2_connection(
    *, client_side: bool, kind: type[h2.connection.H2Connection] | None = None
) -> h2.connection.H2Connection:
    """An initiated `H2Connection` with HBONE's settings; its preface is queued to send.
    ``kind``: the class (tests compare the DATA fast path with h2's own through a subclass).

    The settings go out in the very first SETTINGS frame and apply locally at once: they only
    grant the peer more (bigger windows and frames), which is safe before the peer's ACK.
    """
    # What a tunnel sends in headers is only what this module builds and checks itself (the
    # CONNECT: `connect_request_headers` validates each value; the answer: a status), so h2's
    # own outbound checks and normalisation (~100 Python calls per HEADERS frame) are off.
    # What arrives is still validated by h2.
    config = h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = (kind or _HboneH2Connection)(config=config)
    codes = h2.settings.SettingCodes
    conn.local_settings = h2.settings.Settings(
        client=client_side,
        initial_values={
            codes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            codes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            codes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            codes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            codes.ENABLE_PUSH: 0,
        },
    )
    conn.max_inbound_frame_size = MAX_FRAME_SIZE
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_CONNECTION_WINDOW)
    return conn


@functools.lru_cache(maxsize=_PARSED_CACHE)
def parse_authority(authority: str) -> tuple[str, int]:
    """``ip:port`` or ``[ipv6]:port`` to ``(ip, port)``; raise `BadRequest` saying what is off.

    HBONE targets are pod addresses, so a host name is refused rather than resolved.
    """
    host, sep, port_text = authority.rpartition(":")
    if not sep or not host:
        raise BadRequest(f"authority {authority!r} must be ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        want_v6 = True
    else:
        want_v6 = False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BadRequest(f"authority {authority!r}: {host!r} is not an IP address") from None
    if (ip.version == 6) != want_v6:
        raise BadRequest(f"authority {authority!r}: an IPv6 address must be in brackets")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise BadRequest(f"authority {authority!r}: port {port_text!r} is not 1-65535")
    return str(ip), int(port_text)


@functools.lru_cache(maxsize=_PARSED_CACHE)
def format_authority(ip: str, port: int) -> str:
    """The ``:authority`` for a pod address (brackets around IPv6)."""
    address = ipaddress.ip_address(ip)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not 1-65535")
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


@functools.lru_cache(maxsize=_PARSED_CACHE)
def _forwarded_value(client_ip: str) -> str:
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        raise ValueError(f"forwarded_for {client_ip!r} is not an IP address") from None
    # RFC 7239: an IPv6 node is bracketed, and then the value must be a quoted string.
    return f'for="[{address}]"' if address.version == 6 else f"for={address}"


# The source proxy names the protocol of the Service port the client dialled (http1, http2,
# tcp), so the destination serves the tunnel the same way whatever the pod port is.
PROTOCOL_HEADER = "x-meshagent-protocol"
PROTOCOLS = frozenset({"http1", "http2", "tcp"})


def connect_request_headers(
    authority: str,
    forwarded_for_ip: str,
    baggage: str | None = None,
    protocol: str | None = None,
) -> list[tuple[bytes, bytes]]:
    """Headers of the CONNECT that opens a tunnel to ``authority`` for ``forwarded_for_ip``
    (``protocol``: one of PROTOCOLS, sent as PROTOCOL_HEADER).

    Raises `ValueError` (`BadRequest`) if the authority or client address is malformed, so a
    caller's bug surfaces here and not as a 400 from the peer.
    """
    parse_authority(authority)
    headers = [
        (b":method", b"CONNECT"),
        (b":authority", authority.encode("ascii")),
        (b"forwarded", _forwarded_value(forwarded_for_ip).encode("ascii")),
    ]
    if baggage is not None:
        if not baggage.isascii() or any(c in baggage for c in "\r\n\0"):
            raise ValueError("baggage must be printable ASCII without line breaks")
        headers.append((b"baggage", baggage.encode("ascii")))
    if protocol is not None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} is not one of {sorted(PROTOCOLS)}")
        headers.append((PROTOCOL_HEADER.encode(), protocol.encode("ascii")))
    return headers


@functools.lru_cache(maxsize=_PARSED_CACHE)
def forwarded_for(value: str) -> str | None:
    """The client IP from the first ``for=`` of a ``Forwarded`` header, if it is an IP (a
    tunnel's header names one of a few clients: parsed once per value)."""
    first_element = value.split(",", 1)[0]
    for pair in first_element.split(";"):
        name, sep, raw = pair.strip().partition("=")
        if not sep or name.strip().lower() != "for":
            continue
        node = raw.strip().strip('"')
        if node.startswith("["):
            node = node[1:].partition("]")[0]
        elif node.count(":") == 1:  # ipv4:port
            node = node.partition(":")[0]
        try:
            return str(ipaddress.ip_address(node))
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class ConnectRequest:
    """A validated tunnel request: where to, and the headers that came with it."""

    authority: str
    target: tuple[str, int]
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lowercase), or None."""
        return next((v for k, v in self.headers if k == name), None)

    @property
    def forwarded_for(self) -> str | None:
        value = self.header("forwarded")
        return forwarded_for(value) if value is not None else None

    @property
    def baggage(self) -> str | None:
        return self.header("baggage")

    @property
    def protocol(self) -> str | None:
        """The Service port's protocol the source named (PROTOCOLS), None if absent or unknown."""
        value = self.header(PROTOCOL_HEADER)
        return value if value in PROTOCOLS else None


def parse_connect_request(headers: list[tuple[bytes, bytes]]) -> ConnectRequest:
    """Validate received request headers as an HBONE CONNECT; raise `BadRequest` if not.

    Header bytes are decoded as Latin-1, which cannot fail; h2 has already checked the
    pseudo-header rules that apply to every request.
    """
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for raw_name, raw_value in headers:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        if name.startswith(":"):
            pseudo[name] = value
        else:
            regular.append((name, value))
    method = pseudo.get(":method")
    if method != "CONNECT":
        raise BadRequest(f"method {method!r} is not CONNECT")
    if ":protocol" in pseudo:
        raise BadRequest("extended CONNECT (:protocol) is not an HBONE tunnel")
    authority = pseudo.get(":authority")
    if not authority:
        raise BadRequest("CONNECT without :authority")
    target = parse_authority(authority)
    return ConnectRequest(authority=authority, target=target, headers=tuple(regular))


def response_status(headers: list[tuple[bytes, bytes]]) -> int:
    """The ``:status`` of response headers (h2 guarantees one is present and numeric)."""
    for name, value in headers:
        if name == b":status":
            return int(value)
    raise ValueError("response without :status")
