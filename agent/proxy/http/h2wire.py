"""HTTP/2 for the L7 engine, without I/O: connection settings and limits, request and response
heads, gRPC status rules, and local replies.

What flows through: the `h2` state machine's header lists (lower-case byte names, pseudo
headers first) in, checked and rewritten header lists out; an HTTP status or a `LocalResponse`
in, the HTTP/2 (or gRPC trailers-only) answer out. `h2proxy.py` is the trio shell around it.

gRPC (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md): a call is a POST whose
content-type starts with `application/grpc`; its status is `grpc-status` in the trailers, or
in the headers of a "trailers-only" response (HEADERS with END_STREAM). A reply the proxy makes
itself to a gRPC call is trailers-only with :status 200 and the gRPC code of the HTTP status
(https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md), except that a
policy denial (403) is PERMISSION_DENIED (7), as Envoy's RBAC filter answers gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from meshagent.agent.proxy.http.types import LocalResponse

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

GRPC_OK = 0
GRPC_DEADLINE_EXCEEDED = 4
GRPC_PERMISSION_DENIED = 7
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16
GRPC_UNKNOWN = 2

# Headers that belong to one HTTP/1.x hop and are forbidden in HTTP/2 (RFC 9113 section 8.2.2).
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
     b"http2-settings"}
)  # fmt: skip
_HTTP_TO_GRPC = {
    400: GRPC_INTERNAL,
    401: GRPC_UNAUTHENTICATED,
    403: GRPC_PERMISSION_DENIED,
    404: GRPC_UNIMPLEMENTED,
    429: GRPC_UNAVAILABLE,
    502: GRPC_UNAVAILABLE,
    503: GRPC_UNAVAILABLE,
    504: GRPC_UNAVAILABLE,
}


@dataclass(frozen=True, slots=True)
class H2Limits:
    """What one downstream (pod-facing) HTTP/2 connection may use of the proxy.

    Streams over `max_concurrent_streams` are refused by h2 (GOAWAY PROTOCOL_ERROR); a header
    block over `max_header_list_size`, long CONTINUATION runs and rapid-reset, PING and
    SETTINGS floods are stopped by the frame guard shared with the HBONE server
    (`common/h2guard.py`: GOAWAY ENHANCE_YOUR_CALM). Windows bound what a slow reader makes us
    hold."""

    max_concurrent_streams: int = 100
    max_header_list_size: int = 64 * 1024
    stream_window: int = 1024 * 1024
    connection_window: int = 4 * 1024 * 1024


DEFAULT_LIMITS = H2Limits()
_DEFAULT_WINDOW = 65_535


class GracefulGoaway(h2.connection.H2Connection):
    """h2's connection, except that a graceful GOAWAY (NO_ERROR) received ends it for new
    streams only: the streams the peer accepted (up to its last stream id) still finish, as
    RFC 9113 6.8 has it (a draining proxy sends one first, with the highest stream id; servers
    shutting down send one). h2 closes its state machine and drops what it had queued to send
    on any GOAWAY, so the answers still coming in the same read were a protocol error and the
    request bodies queued behind were lost. Opening no new stream after it is the caller's
    part (`H2Peer.goaway`); a GOAWAY with an error code ends the connection as h2 does."""

    def _receive_goaway_frame(self, frame):
        if frame.error_code != h2.errors.ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors.ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def new_connection(
    *, client_side: bool, limits: H2Limits = DEFAULT_LIMITS
) -> h2.connection.H2Connection:
    """An initiated h2 connection (its preface and SETTINGS queued) with our limits."""
    config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
    conn = GracefulGoaway(config=config)
    codes = h2.settings.SettingCodes
    conn.local_settings = h2.settings.Settings(
        client=client_side,
        initial_values={
            codes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            codes.INITIAL_WINDOW_SIZE: limits.stream_window,
            codes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            codes.ENABLE_PUSH: 0,
        },
    )
    conn.initiate_connection()
    conn.increment_flow_control_window(limits.connection_window - _DEFAULT_WINDOW)
    return conn


def is_preface(data: bytes) -> bool | None:
    """Whether a connection that began with `data` is HTTP/2 with prior knowledge (None: too
    short to tell yet)."""
    if data[: len(H2_PREFACE)] != H2_PREFACE[: len(data)]:
        return False
    return True if len(data) >= len(H2_PREFACE) else None


class BadRequest(ValueError):
    """A request head the proxy cannot forward (answered 400)."""


@dataclass(slots=True)
class RequestHead:
    method: str
    path: str
    authority: str
    scheme: str
    headers: list[tuple[bytes, bytes]]  # regular headers, lower-case names
    ended: bool = False  # the HEADERS ended the request (no body follows)

    @property
    def grpc(self) -> bool:
        return is_grpc(self.headers)


def parse_request(headers: list[tuple[bytes, bytes]]) -> RequestHead:
    """The request head of a received HEADERS block (h2 has checked the pseudo-header rules);
    raises BadRequest for what we do not forward (CONNECT, extended CONNECT)."""
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name.startswith(b":"):
            pseudo[name] = value
        elif name not in _CONNECTION_SPECIFIC:
            regular.append((name, value))
    method = pseudo.get(b":method", b"").decode("ascii", "replace")
    if method == "CONNECT" or b":protocol" in pseudo:
        raise BadRequest("CONNECT is not proxied on an HTTP/2 service port")
    path = pseudo.get(b":path", b"")
    if not path:
        raise BadRequest("request without :path")
    authority = pseudo.get(b":authority")
    if authority is None:
        authority = next((v for n, v in regular if n == b"host"), b"")
    return RequestHead(
        method=method,
        path=path.decode("latin-1"),
        authority=authority.decode("latin-1"),
        scheme=pseudo.get(b":scheme", b"http").decode("latin-1"),
        headers=[(n, v) for n, v in regular if n != b"host"],
    )


def upstream_request(head: RequestHead, default_authority: str) -> list[tuple[bytes, bytes]]:
    """The HEADERS to send upstream for `head` (path as normalized, authority kept)."""
    return [
        (b":method", head.method.encode("ascii")),
        (b":scheme", head.scheme.encode("latin-1")),
        (b":path", head.path.encode("latin-1")),
        (b":authority", (head.authority or default_authority).encode("latin-1")),
        *head.headers,
    ]


def response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Response headers (or trailers) to pass on: connection-specific ones dropped."""
    return [(n, v) for n, v in headers if n not in _CONNECTION_SPECIFIC]


def status_of(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b":status":
            return int(value)
    return 0


_GRPC_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def grpc_timeout(value: bytes) -> float | None:
    """Seconds of a `grpc-timeout` value (at most 8 digits and a unit); None if malformed."""
    digits, unit = value[:-1], value[-1:]
    if not (0 < len(digits) <= 8 and digits.isdigit()) or unit not in _GRPC_TIMEOUT_UNITS:
        return None
    return int(digits) * _GRPC_TIMEOUT_UNITS[unit]


def request_timeout(
    route_timeout: float | None, headers: list[tuple[bytes, bytes]]
) -> float | None:
    """How long a request may take to complete: the route's timeout, shortened by the call's
    `grpc-timeout` (Istio lets the header set the stream's limit, uncapped)."""
    limits = [route_timeout] if route_timeout is not None else []
    for name, value in headers:
        if name == b"grpc-timeout":
            seconds = grpc_timeout(value)
            if seconds is not None:
                limits.append(seconds)
    return min(limits) if limits else None


def is_grpc(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(n == b"content-type" and v.startswith(b"application/grpc") for n, v in headers)


def grpc_status_of(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"grpc-status":
            try:
                return int(value)
            except ValueError:
                return GRPC_UNKNOWN
    return None


def grpc_code_for(status: int) -> int:
    """The gRPC code of a local reply with HTTP `status`."""
    return _HTTP_TO_GRPC.get(status, GRPC_UNKNOWN)


def local_reply(resp: LocalResponse, *, grpc: bool) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The HEADERS (and body) of a reply the proxy makes itself; for a gRPC call a trailers-only
    response whose grpc-message is the body's text."""
    if grpc:
        code = resp.grpc_status if resp.grpc_status is not None else grpc_code_for(resp.status)
        message = resp.body.decode("latin-1").strip() or f"HTTP status {resp.status}"
        headers = [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", str(code).encode()),
            (b"grpc-message", _percent_encode(message)),
        ]
        return headers, b""
    headers = [
        (b":status", str(resp.status).encode()),
        (b"content-length", str(len(resp.body)).encode()),
    ]
    if resp.body:
        headers.append((b"content-type", b"text/plain"))
    headers += [(n, v) for n, v in resp.headers if n not in _CONNECTION_SPECIFIC]
    return headers, resp.body


def _percent_encode(text: str) -> bytes:
    """grpc-message's percent-encoding: printable ASCII except '%' as is, the rest %XX."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


ENHANCE_YOUR_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
CANCEL = h2.errors.ErrorCodes.CANCEL
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
INTERNAL_ERROR = h2.errors.ErrorCodes.INTERNAL_ERROR
REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM
