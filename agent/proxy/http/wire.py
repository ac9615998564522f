"""A lean HTTP/1.1 codec for the proxy's engine: h11's model and semantics, a fraction of its cost.

What flows through: bytes received from a peer go in (`receive_data`), events come out
(`next_event`: Request, InformationalResponse, Response, Data, EndOfMessage, ConnectionClosed,
or NEED_DATA / PAUSED); events the engine sends go in (`send`) and the bytes to write come out.
One `Connection` per TCP connection and role (SERVER toward a downstream client, CLIENT toward
an upstream server), with h11's state machine as far as the engine relies on it: `our_state` /
`their_state` (IDLE, SEND_RESPONSE, SEND_BODY, DONE, MUST_CLOSE, CLOSED, ERROR,
MIGHT_SWITCH_PROTOCOL, SWITCHED_PROTOCOL), `start_next_cycle`, keep-alive (``Connection:
close``, HTTP/1.0), `client_is_waiting_for_100_continue`, upgrades (Upgrade, CONNECT) and
`trailing_data`.

Why not h11: profiles of the node proxy under keep-alive load showed h11 at 23-28% of the
agent's CPU (its generic event machinery and per-header validation on both parse and send).
This codec parses a head with a few `bytes` operations and one regular expression per line,
frames bodies the way h11 does (Content-Length, chunked, read-until-close for HTTP/1.0 style
responses; no body for HEAD, 1xx, 204, 304, 2xx to CONNECT), and writes heads without
re-validating what it parsed itself. Incoming messages are validated as h11 validates them
(request and status lines, header names and values, Content-Length and Transfer-Encoding
rules, Host on HTTP/1.1 requests, head size limit): a violation raises RemoteProtocolError
with h11's `error_status_hint` (400, 431 for a head too large, 501 for an unsupported
Transfer-Encoding). Events the engine builds are trusted (header names lower-case bytes).
Trailers of chunked bodies are read and dropped.
"""

from __future__ import annotations

import re

__all__ = [
    "CLIENT",
    "CLOSED",
    "DONE",
    "ERROR",
    "IDLE",
    "MIGHT_SWITCH_PROTOCOL",
    "MUST_CLOSE",
    "NEED_DATA",
    "PAUSED",
    "SEND_BODY",
    "SEND_RESPONSE",
    "SERVER",
    "SWITCHED_PROTOCOL",
    "Connection",
    "ConnectionClosed",
    "Data",
    "EndOfMessage",
    "Event",
    "InformationalResponse",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "Request",
    "Response",
    "Sentinel",
]

Headers = list[tuple[bytes, bytes]]


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


CLIENT = _Sentinel("CLIENT")
SERVER = _Sentinel("SERVER")
IDLE = _Sentinel("IDLE")
SEND_RESPONSE = _Sentinel("SEND_RESPONSE")
SEND_BODY = _Sentinel("SEND_BODY")
DONE = _Sentinel("DONE")
MUST_CLOSE = _Sentinel("MUST_CLOSE")
CLOSED = _Sentinel("CLOSED")
ERROR = _Sentinel("ERROR")
MIGHT_SWITCH_PROTOCOL = _Sentinel("MIGHT_SWITCH_PROTOCOL")
SWITCHED_PROTOCOL = _Sentinel("SWITCHED_PROTOCOL")
NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")


class ProtocolError(Exception):
    def __init__(self, msg: str, error_status_hint: int = 400) -> None:
        super().__init__(msg)
        self.error_status_hint = error_status_hint


class LocalProtocolError(ProtocolError):
    """We were asked to send something HTTP/1.1 does not allow here."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that is not valid HTTP/1.1 (or closed mid-message)."""


# -- events -----------------------------------------------------------------------------------


class Request:
    __slots__ = ("headers", "http_version", "method", "target")

    def __init__(
        self, *, method: bytes, target: bytes, headers: Headers, http_version: bytes = b"1.1"
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version

    def __repr__(self) -> str:
        return f"Request(method={self.method!r}, target={self.target!r})"


class _ResponseBase:
    __slots__ = ("headers", "http_version", "reason", "status_code")

    def __init__(
        self,
        *,
        status_code: int,
        headers: Headers,
        reason: bytes = b"",
        http_version: bytes = b"1.1",
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self.reason = reason
        self.http_version = http_version

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status_code={self.status_code})"


class Response(_ResponseBase):
    __slots__ = ()


class InformationalResponse(_ResponseBase):
    __slots__ = ()


class Data:
    __slots__ = ("data",)

    def __init__(self, *, data: bytes) -> None:
        self.data = data


class EndOfMessage:
    __slots__ = ()


class ConnectionClosed:
    __slots__ = ()


# -- grammar (RFC 9110/9112, as h11 checks it) ------------------------------------------------

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])")
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ([ \t\x21-\x7e\x80-\xff]*))?")
_HEADER_LINE = re.compile(
    rb"(" + _TOKEN + rb"):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*"
    rb"[\x21-\x7e\x80-\xff])?)?)[ \t]*"
)
_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\r\n]*)?[ \t]*")
_DIGITS = re.compile(rb"[0-9]+")
_MAX_CONTENT_LENGTH_DIGITS = 20
_NO_BODY_STATUS = (204, 304)
_FRAMING = (b"content-length", b"transfer-encoding")


def _comma_tokens(headers: Headers, name: bytes) -> list[bytes]:
    out: list[bytes] = []
    for n, v in headers:
        if n == name:
            for token in v.split(b","):
                token = token.strip().lower()
                if token:
                    out.append(token)
    return out


def _split_head(head: bytes) -> list[bytes]:
    """Lines of a head (without its blank line), CRLF or bare LF, obs-folds unfolded."""
    lines = head.split(b"\n")
    out: list[bytes] = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = out[-1] + b" " + line.strip(b" \t")  # obs-fold (RFC 9112 5.2)
        else:
            out.append(line)
    return out


def _parse_headers(lines: list[bytes]) -> Headers:
    headers: Headers = []
    match = _HEADER_LINE.fullmatch
    for line in lines:
        m = match(line)
        if m is None:
            raise RemoteProtocolError(f"illegal header line {line[:80]!r}")
        headers.append((m.group(1).lower(), m.group(2)))
    return headers


def _framing(headers: Headers) -> tuple[bool, int | None]:
    """(chunked, content length or None) of a received message; h11's header rules."""
    length: bytes | None = None
    chunked = False
    for name, value in headers:
        if name == b"content-length":
            lengths = {v.strip() for v in value.split(b",")}
            if len(lengths) != 1:
                raise RemoteProtocolError("conflicting Content-Length headers")
            one = lengths.pop()
            if not _DIGITS.fullmatch(one) or len(one) > _MAX_CONTENT_LENGTH_DIGITS:
                raise RemoteProtocolError("bad Content-Length")
            if length is not None and length != one:
                raise RemoteProtocolError("conflicting Content-Length headers")
            length = one
        elif name == b"transfer-encoding":
            if chunked:
                raise RemoteProtocolError("multiple Transfer-Encoding headers", 501)
            if value.lower() != b"chunked":
                raise RemoteProtocolError("Only Transfer-Encoding: chunked is supported", 501)
            chunked = True
    if chunked:
        return True, None
    return False, None if length is None else int(length)


# -- body readers -----------------------------------------------------------------------------
# A reader is (kind, remaining): kind "length" (remaining bytes), "chunked" (remaining bytes of
# the current chunk, -1 before a chunk header, -2 in the trailers), "eof" (until the peer
# closes: HTTP/1.0-style responses).

_LENGTH, _CHUNKED, _EOF = 0, 1, 2
_CHUNK_HEADER_NEXT, _CHUNK_TRAILERS, _CHUNK_CRLF = -1, -2, -3


class Connection:
    """One side of one HTTP/1.1 connection (see the module docstring)."""

    __slots__ = (
        "_body_kind",
        "_buf",
        "_closed",
        "_keep_alive",
        "_max",
        "_remaining",
        "_request_method",
        "_switch_proposed",
        "_their_version",
        "_write_kind",
        "_write_remaining",
        "client_is_waiting_for_100_continue",
        "our_role",
        "our_state",
        "their_state",
    )

    def __init__(self, our_role: _Sentinel, max_incomplete_event_size: int = 16 * 1024) -> None:
        self.our_role = our_role
        self.our_state = IDLE
        self.their_state = IDLE
        self.client_is_waiting_for_100_continue = False
        self._buf = bytearray()
        self._closed = False  # the peer's side ended (EOF received)
        self._max = max_incomplete_event_size
        self._keep_alive = True
        self._request_method: bytes | None = None
        self._switch_proposed = False  # an Upgrade or CONNECT awaits the server's answer
        self._their_version: bytes | None = None
        self._body_kind = _LENGTH
        self._remaining = 0
        self._write_kind = _LENGTH
        self._write_remaining = 0

    # -- state ------------------------------------------------------------------------------

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received beyond the last event (after a protocol switch) and whether the
        peer closed."""
        return bytes(self._buf), self._closed

    def _both_done(self) -> None:
        """After either side finishes: keep-alive off turns DONE into MUST_CLOSE."""
        if not self._keep_alive:
            if self.our_state is DONE:
                self.our_state = MUST_CLOSE
            if self.their_state is DONE:
                self.their_state = MUST_CLOSE

    def start_next_cycle(self) -> None:
        if self.our_state is not DONE or self.their_state is not DONE:
            raise LocalProtocolError(
                f"not in a reusable state: ours {self.our_state}, theirs {self.their_state}"
            )
        self.our_state = self.their_state = IDLE
        self.client_is_waiting_for_100_continue = False
        self._request_method = None
        self._switch_proposed = False

    # -- receiving --------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Bytes from the peer; b"" means the peer closed its side."""
        if data:
            if self._closed:
                raise RuntimeError("received data after the end of the stream")
            self._buf += data
        else:
            self._closed = True

    def next_event(self):
        state = self.their_state
        try:
            if state is SEND_BODY:
                event = self._read_body()
            elif state is IDLE or state is SEND_RESPONSE:
                event = self._read_head()
            elif state is DONE:
                if self._buf:
                    return PAUSED
                event = self._eof_or_need()
            elif state is MIGHT_SWITCH_PROTOCOL or state is SWITCHED_PROTOCOL:
                return PAUSED
            elif state is MUST_CLOSE or state is CLOSED:
                if self._buf:
                    raise RemoteProtocolError("Got data when expecting EOF")
                event = self._eof_or_need()
            else:  # ERROR
                raise RemoteProtocolError("cannot read from a connection in error")
            if event is NEED_DATA:
                if len(self._buf) > self._max:
                    raise RemoteProtocolError("Receive buffer too long", 431)
                if self._closed:
                    raise RemoteProtocolError("peer unexpectedly closed connection")
            return event
        except ProtocolError as exc:
            self.their_state = ERROR
            if isinstance(exc, RemoteProtocolError):
                raise
            raise RemoteProtocolError(str(exc), exc.error_status_hint) from exc

    def _eof_or_need(self):
        if self._closed:
            self.their_state = CLOSED
            return ConnectionClosed()
        return NEED_DATA

    def _take_head(self) -> bytes | None:
        """The head up to its blank line (CRLF, or bare LF as h11 accepts), consumed."""
        buf = self._buf
        end = buf.find(b"\n\r\n")
        lf = buf.find(b"\n\n", 0, end if end >= 0 else len(buf))
        if lf >= 0:
            head = bytes(buf[:lf])
            del buf[: lf + 2]
            return head
        if end >= 0:
            head = bytes(buf[:end])
            del buf[: end + 3]
            return head
        return None

    def _read_head(self):
        buf = self._buf
        if not buf:
            if self._closed:
                if self.their_state is IDLE:
                    self.their_state = CLOSED
                    return ConnectionClosed()
                raise RemoteProtocolError("peer unexpectedly closed connection")
            return NEED_DATA
        if buf[0] < 0x21:  # the first byte of a request/status line cannot be blank or binary
            if self.our_role is SERVER:
                raise RemoteProtocolError("illegal request line")
            raise RemoteProtocolError("illegal status line")
        head = self._take_head()
        if head is None:
            return NEED_DATA
        if len(head) > self._max:
            raise RemoteProtocolError("Receive buffer too long", 431)
        lines = _split_head(head)
        if self.our_role is SERVER:
            return self._request(lines)
        return self._response(lines)

    def _request(self, lines: list[bytes]) -> Request:
        m = _REQUEST_LINE.fullmatch(lines[0])
        if m is None:
            raise RemoteProtocolError("illegal request line")
        method, target, version = m.group(1), m.group(2), m.group(3)
        headers = _parse_headers(lines[1:])
        chunked, length = _framing(headers)
        if version == b"1.1":
            hosts = sum(1 for n, _ in headers if n == b"host")
            if hosts == 0:
                raise RemoteProtocolError("Missing mandatory Host: header")
            if hosts > 1:
                raise RemoteProtocolError("Found multiple Host: headers")
        connection = _comma_tokens(headers, b"connection")
        self._keep_alive = b"close" not in connection and version >= b"1.1"
        self._their_version = version
        self._request_method = method
        self._switch_proposed = method == b"CONNECT" or any(n == b"upgrade" for n, _ in headers)
        if version >= b"1.1" and b"100-continue" in _comma_tokens(headers, b"expect"):
            self.client_is_waiting_for_100_continue = True
        if chunked:
            self._body_kind, self._remaining = _CHUNKED, _CHUNK_HEADER_NEXT
        else:
            self._body_kind, self._remaining = _LENGTH, length or 0
        self.their_state = SEND_BODY
        self.our_state = SEND_RESPONSE
        return Request(method=method, target=target, headers=headers, http_version=version)

    def _response(self, lines: list[bytes]):
        if self.our_state is IDLE:
            raise RemoteProtocolError("response without a request")
        m = _STATUS_LINE.fullmatch(lines[0])
        if m is None:
            raise RemoteProtocolError("illegal status line")
        version, status, reason = m.group(1), int(m.group(2)), m.group(3) or b""
        headers = _parse_headers(lines[1:])
        if status < 200:
            if status == 101:
                if not self._switch_proposed or self.our_state is not MIGHT_SWITCH_PROTOCOL:
                    raise RemoteProtocolError("101 without a complete upgrade request")
                self.our_state = self.their_state = SWITCHED_PROTOCOL
            return InformationalResponse(
                status_code=status, headers=headers, reason=reason, http_version=version
            )
        chunked, length = _framing(headers)
        if b"close" in _comma_tokens(headers, b"connection") or version < b"1.1":
            self._keep_alive = False
        method = self._request_method
        response = Response(
            status_code=status, headers=headers, reason=reason, http_version=version
        )
        if method == b"CONNECT" and 200 <= status < 300:
            self.our_state = self.their_state = SWITCHED_PROTOCOL
            return response
        if self._switch_proposed:  # the server declined the upgrade
            self._switch_proposed = False
            if self.our_state is MIGHT_SWITCH_PROTOCOL:
                self.our_state = DONE
                self._both_done()
        if method == b"HEAD" or status in _NO_BODY_STATUS:
            self._body_kind, self._remaining = _LENGTH, 0
        elif chunked:
            self._body_kind, self._remaining = _CHUNKED, _CHUNK_HEADER_NEXT
        elif length is not None:
            self._body_kind, self._remaining = _LENGTH, length
        else:
            self._body_kind, self._remaining = _EOF, 0
            self._keep_alive = False
        self.their_state = SEND_BODY
        return response

    def _end_of_their_message(self) -> EndOfMessage:
        if self.our_role is SERVER:
            self.client_is_waiting_for_100_continue = False
        if self.our_role is SERVER and self._switch_proposed:
            self.their_state = MIGHT_SWITCH_PROTOCOL
        else:
            self.their_state = DONE
            self._both_done()
        return EndOfMessage()

    def _read_body(self):
        buf = self._buf
        kind = self._body_kind
        if kind == _LENGTH:
            remaining = self._remaining
            if remaining == 0:
                return self._end_of_their_message()
            if not buf:
                if self._closed:
                    raise RemoteProtocolError(
                        "peer closed connection without sending complete message body"
                    )
                return NEED_DATA
            if len(buf) <= remaining:
                data = bytes(buf)
                buf.clear()
            else:
                data = bytes(buf[:remaining])
                del buf[:remaining]
            self._remaining = remaining - len(data)
            if self.client_is_waiting_for_100_continue and self.our_role is SERVER:
                self.client_is_waiting_for_100_continue = False
            return Data(data=data)
        if kind == _EOF:
            if buf:
                data = bytes(buf)
                buf.clear()
                return Data(data=data)
            if self._closed:
                return self._end_of_their_message()
            return NEED_DATA
        # chunked
        while True:
            remaining = self._remaining
            if remaining > 0:
                if not buf:
                    return self._chunk_need()
                if len(buf) <= remaining:
                    data = bytes(buf)
                    buf.clear()
                else:
                    data = bytes(buf[:remaining])
                    del buf[:remaining]
                remaining -= len(data)
                self._remaining = remaining if remaining else _CHUNK_CRLF
                if self.client_is_waiting_for_100_continue and self.our_role is SERVER:
                    self.client_is_waiting_for_100_continue = False
                return Data(data=data)
            if remaining == _CHUNK_CRLF:
                if len(buf) < 2:
                    return self._chunk_need()
                if buf[:2] != b"\r\n":
                    raise RemoteProtocolError("missing CRLF after a chunk")
                del buf[:2]
                self._remaining = _CHUNK_HEADER_NEXT
                continue
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > self._max:
                    raise RemoteProtocolError("Receive buffer too long", 431)
                return self._chunk_need()
            line = bytes(buf[:end])
            del buf[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if remaining == _CHUNK_TRAILERS:
                if not line:
                    return self._end_of_their_message()
                if _HEADER_LINE.fullmatch(line) is None and line[:1] not in (b" ", b"\t"):
                    raise RemoteProtocolError("illegal trailer line")
                continue
            m = _CHUNK_HEADER.fullmatch(line)
            if m is None:
                raise RemoteProtocolError("illegal chunk header")
            size = int(m.group(1), 16)
            self._remaining = size if size else _CHUNK_TRAILERS

    def _chunk_need(self):
        if self._closed:
            raise RemoteProtocolError(
                "peer closed connection without sending complete message body"
            )
        return NEED_DATA

    # -- sending ----------------------------------------------------------------------------

    def send(self, event) -> bytes:
        """The bytes that carry `event` to the peer; LocalProtocolError if it is not allowed
        now (the connection then goes to ERROR, as h11 does)."""
        try:
            kind = type(event)
            if kind is Data:
                return self._send_data(event.data)
            if kind is EndOfMessage:
                return self._send_end()
            if kind is Response:
                return self._send_response(event)
            if kind is InformationalResponse:
                return self._send_informational(event)
            if kind is Request:
                return self._send_request(event)
            if kind is ConnectionClosed:
                self.our_state = CLOSED
                return b""
            raise LocalProtocolError(f"cannot send {kind.__name__}")
        except LocalProtocolError:
            self.our_state = ERROR
            raise

    def _send_data(self, data: bytes) -> bytes:
        if self.our_state is not SEND_BODY:
            raise LocalProtocolError(f"cannot send data in state {self.our_state}")
        kind = self._write_kind
        if kind == _LENGTH:
            if len(data) > self._write_remaining:
                raise LocalProtocolError("Too much data for declared Content-Length")
            self._write_remaining -= len(data)
            return data
        if kind == _CHUNKED:
            if not data:
                return b""
            return b"%x\r\n%b\r\n" % (len(data), data)
        return data

    def _send_end(self) -> bytes:
        if self.our_state is not SEND_BODY:
            raise LocalProtocolError(f"cannot end a message in state {self.our_state}")
        kind = self._write_kind
        out = b""
        if kind == _LENGTH:
            if self._write_remaining:
                raise LocalProtocolError("Too little data for declared Content-Length")
        elif kind == _CHUNKED:
            out = b"0\r\n\r\n"
        else:
            self._keep_alive = False  # an HTTP/1.0-style body ends with the connection
        if self.our_role is CLIENT and self._switch_proposed:
            self.our_state = MIGHT_SWITCH_PROTOCOL
        else:
            self.our_state = DONE
            self._both_done()
        return out

    def _send_request(self, event: Request) -> bytes:
        if self.our_role is not CLIENT or self.our_state is not IDLE:
            raise LocalProtocolError(f"cannot send a request in state {self.our_state}")
        headers = event.headers
        host = None
        chunked = False
        length: bytes | None = None
        upgrade = False
        lines = []
        for name, value in headers:
            if name == b"host":
                host = value
                continue
            if name == b"transfer-encoding":
                chunked = True
            elif name == b"content-length":
                length = value
            elif name == b"upgrade":
                upgrade = True
            elif name == b"connection" and b"close" in _comma_tokens([(name, value)], name):
                self._keep_alive = False
            lines.append(b"%b: %b\r\n" % (name, value))
        if host is None:
            raise LocalProtocolError("Missing mandatory Host: header")
        self._request_method = event.method
        self._switch_proposed = upgrade or event.method == b"CONNECT"
        if chunked:
            self._write_kind, self._write_remaining = _CHUNKED, 0
        else:
            self._write_kind = _LENGTH
            self._write_remaining = int(length) if length is not None else 0
        self.our_state = SEND_BODY
        self.their_state = SEND_RESPONSE
        return b"%b %b HTTP/1.1\r\nhost: %b\r\n%b\r\n" % (
            event.method,
            event.target,
            host,
            b"".join(lines),
        )

    def _send_informational(self, event: InformationalResponse) -> bytes:
        if self.our_role is not SERVER or self.our_state is not SEND_RESPONSE:
            raise LocalProtocolError(f"cannot send a 1xx in state {self.our_state}")
        self.client_is_waiting_for_100_continue = False
        if event.status_code == 101:
            if not self._switch_proposed or self.their_state is not MIGHT_SWITCH_PROTOCOL:
                raise LocalProtocolError("101 without a complete upgrade request")
            self.our_state = self.their_state = SWITCHED_PROTOCOL
        return self._head(event.status_code, event.reason, event.headers)

    def _send_response(self, event: Response) -> bytes:
        if self.our_role is not SERVER or (
            self.our_state is not SEND_RESPONSE and self.our_state is not IDLE
        ):
            raise LocalProtocolError(f"cannot send a response in state {self.our_state}")
        status = event.status_code
        method = self._request_method
        headers = event.headers
        if status in _NO_BODY_STATUS:
            kind, remaining = _LENGTH, 0
        else:  # the framing headers of a HEAD response say what a GET would get
            kind, remaining = _EOF, 0
            for name, value in headers:
                if name == b"transfer-encoding":
                    kind = _CHUNKED
                    break
                if name == b"content-length":
                    kind, remaining = _LENGTH, int(value)
        need_close = False
        if kind in (_EOF, _CHUNKED):
            # h11's framing: chunked to an HTTP/1.1 client, else the body ends with the close
            headers = [(n, v) for n, v in headers if n not in _FRAMING]
            if self._their_version is None or self._their_version < b"1.1":
                kind = _EOF
                need_close = method != b"HEAD"
            else:
                kind = _CHUNKED
                headers.append((b"transfer-encoding", b"chunked"))
        if need_close:
            self._keep_alive = False
        if not self._keep_alive:
            tokens = {t for t in _comma_tokens(headers, b"connection") if t != b"keep-alive"}
            tokens.add(b"close")
            headers = [(n, v) for n, v in headers if n != b"connection"]
            headers.append((b"connection", b", ".join(sorted(tokens))))
        if self._switch_proposed:  # a normal response declines the client's upgrade
            self._switch_proposed = False
            if self.their_state is MIGHT_SWITCH_PROTOCOL:
                self.their_state = DONE
        self.client_is_waiting_for_100_continue = False
        if method == b"HEAD" or status in _NO_BODY_STATUS:
            kind, remaining = _LENGTH, 0
        self._write_kind, self._write_remaining = kind, remaining
        self.our_state = SEND_BODY
        return self._head(status, event.reason, headers)

    @staticmethod
    def _head(status: int, reason: bytes, headers: Headers) -> bytes:
        return b"HTTP/1.1 %d %b\r\n%b\r\n" % (
            status,
            reason,
            b"".join([b"%b: %b\r\n" % (n, v) for n, v in headers]),
        )


Event = Request | Response | InformationalResponse | Data | EndOfMessage | ConnectionClosed
Sentinel = _Sentinel
