"""The proxy's HTTP/1.1 codec: llhttp (Node.js's parser, through `httptools`) reads, h11's model.

What flows through: bytes received from a peer go in (`receive_data`), events come out
(`next_event`: Request, InformationalResponse, Response, Data, EndOfMessage, ConnectionClosed,
or NEED_DATA / PAUSED); events the engine sends go in (`send`) and the bytes to write come out.
One `Connection` per TCP connection and role (SERVER toward a downstream client, CLIENT toward
an upstream server), with h11's state machine as far as the engine relies on it: `our_state` /
`their_state` (IDLE, SEND_RESPONSE, SEND_BODY, DONE, MUST_CLOSE, CLOSED, ERROR,
MIGHT_SWITCH_PROTOCOL, SWITCHED_PROTOCOL), `start_next_cycle`, keep-alive,
`client_is_waiting_for_100_continue`, upgrades (Upgrade, CONNECT) and `trailing_data`.

Every received byte is parsed and validated by llhttp in its strict mode (request and status
lines, header names and values, Content-Length and Transfer-Encoding rules, chunk sizes and
extensions, trailers): `httptools.HttpRequestParser` as SERVER, `HttpResponseParser` as CLIENT.
This module only decides how many buffered bytes llhttp sees at a time, so that a message's end
is known to the byte without re-parsing anything: a head up to its blank line (CRLF CRLF:
llhttp refuses bare-LF line ends), a Content-Length body up to its length, a chunked body up to
the LF of each size or trailer line, and a chunk's data and CRLF by the size read from the line
llhttp has just accepted. Bytes past the message (a pipelined request, data after an upgrade)
stay in the buffer until the next cycle or for `trailing_data`. What llhttp does not do stays
here: the head size limit (RemoteProtocolError with `error_status_hint` 431), one Host
(required on HTTP/1.1), Transfer-Encoding other than plain `chunked` (501, as h11), the end of
a response without a body to a HEAD or CONNECT request (llhttp's response parser does not know
the request; httptools offers no way to tell it, so such a head is fed alone and the parser is
replaced), read-until-close bodies at EOF (httptools has no `finish`), and the writing side
(heads serialized from trusted events, bodies framed as h11 frames them). Trailers of chunked
bodies are validated and dropped.

Where llhttp is stricter than h11 (each RFC 9112-conformant), with 400: obs-folded header
lines, bare-LF line ends, a Content-Length list ("5, 5") or repeated Content-Length,
Content-Length with Transfer-Encoding, a request line with bytes above 0x7e, HTTP versions
other than 1.0, 1.1 and 2.0 (h11: any digit.digit), HTTP/0.9's "GET /", and methods outside
llhttp's list of known ones (RFC 9110 asks for 501 there; llhttp's error does not tell an
unknown method from binary garbage). Refused here for llhttp's sake: an upgrade or CONNECT
request with a body (llhttp would take the body for the new protocol's bytes). More lenient:
empty lines before a request line are skipped (RFC 9112 section 2.2).

HTTP/1.0 stays HTTP/1.0 (unlike h11, which closes every 1.0 connection): a request goes on
with its version, and a 1.0 connection is kept alive only with `Connection: keep-alive`
(llhttp's `should_keep_alive()`), answered with `Connection: keep-alive` and a length-framed
body. Parser errors reach the engine in plain words naming the problem (`_PROBLEMS`), never
llhttp's own messages ("Pause on PRI/Upgrade" says nothing to a client).
"""

from __future__ import annotations

import re
from http import HTTPStatus

import httptools

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


_NO_BODY_STATUS = (204, 304)
# The standard reason phrase for a response sent without one (a local reply, an HTTP/2 response)
_REASONS = {int(s): s.phrase.encode() for s in HTTPStatus}
_FRAMING = (b"content-length", b"transfer-encoding")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_BLANK_LINE = b"\r\n\r\n"

# How the body being received is framed: _LENGTH (remaining bytes), _CHUNKED (remaining bytes
# of the current chunk's data and its CRLF; 0 while llhttp reads a size or trailer line), _EOF
# (until the peer closes: HTTP/1.0-style responses).
# _RAW: a length-framed body llhttp will not read (it stopped at an h2c upgrade's head).
_LENGTH, _CHUNKED, _EOF, _RAW = 0, 1, 2, 3
# What primes a parser for a chunked body whose head llhttp did not take as a message's (above)
_CHUNKED_HEAD = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"


def _comma_tokens(headers: Headers, name: bytes) -> list[bytes]:
    out: list[bytes] = []
    for n, v in headers:
        if n == name:
            for token in v.split(b","):
                token = token.strip().lower()
                if token:
                    out.append(token)
    return out


# llhttp's reasons (its parser's words) turned into what was wrong, in the peer's terms: the
# first entry whose fragment occurs in the reason (case-insensitive) names the problem.
_PROBLEMS = (
    ("pri/upgrade", "an HTTP/2 connection preface where HTTP/1.1 was expected"),
    ("expected cr", "malformed line ending (CRLF expected)"),
    ("expected lf", "malformed line ending (CRLF expected)"),
    ("method", "unknown or malformed method"),
    ("url", "invalid character in the request target"),
    ("version", "unsupported or malformed HTTP version"),
    ("http/", "malformed request line"),
    ("can't be present with", "both Content-Length and Transfer-Encoding"),
    ("duplicate content-length", "more than one Content-Length"),
    ("content-length", "invalid Content-Length"),
    ("transfer-encoding", "invalid Transfer-Encoding"),
    ("chunk", "malformed chunked body"),
    ("whitespace after header", "folded or malformed header line"),
    ("header token", "invalid character in a header name"),
    ("header value", "invalid character in a header value"),
    ("status", "malformed status line"),
)


def _plain_words(exc: Exception) -> str:
    """What a parser error means, never the parser's own message (it names its internals)."""
    reason = str(exc).lower()
    for fragment, words in _PROBLEMS:
        if fragment in reason:
            return words
    return "malformed HTTP/1.1 message"


class _Message:
    """llhttp's callbacks for the message being received (reset for each)."""

    __slots__ = (
        "body",
        "chunk_header",
        "complete",
        "head_done",
        "headers",
        "keep_alive",
        "method",
        "parser",
        "reason",
        "status",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser | None = None
        self.reset()

    def reset(self) -> None:
        self.target = b""
        self.reason = b""
        self.headers: Headers = []
        self.head_done = False
        self.keep_alive = True
        self.upgrade = False
        self.method = b""
        self.status = 0
        self.version = "1.1"
        self.body: list[bytes] = []
        self.chunk_header = False
        self.complete = False

    # the callbacks (httptools registers only those the protocol object has)

    def on_url(self, url: bytes) -> None:
        self.target += url  # called once per span: a target may arrive in pieces

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # after the head: trailers, dropped
            self.headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self.head_done = True
        parser = self.parser
        # asked now: llhttp forgets a response's framing once the message is complete
        self.keep_alive = parser.should_keep_alive()
        self.upgrade = parser.should_upgrade()
        self.version = parser.get_http_version()
        if isinstance(parser, httptools.HttpRequestParser):
            self.method = parser.get_method()
        else:
            self.status = parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_chunk_header(self) -> None:
        self.chunk_header = True

    def on_message_complete(self) -> None:
        self.complete = True


class Connection:
    """One side of one HTTP/1.1 connection (see the module docstring)."""

    __slots__ = (
        "_body_kind",
        "_buf",
        "_closed",
        "_head_fed",
        "_keep_alive",
        "_line",
        "_max",
        "_msg",
        "_parser",
        "_remaining",
        "_request_method",
        "_switch_proposed",
        "_tail",
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
        self._msg = _Message()
        self._parser: httptools.HttpRequestParser | httptools.HttpResponseParser | None = None
        self._head_fed = 0  # bytes of the current head given to llhttp so far
        self._tail = b""  # the last of them (a blank line may straddle two receives)
        self._line = b""  # the chunked-body line being fed
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
                return self._read_body()
            if state is IDLE or state is SEND_RESPONSE:
                return self._read_head()
            if state is DONE:
                if self._buf:
                    return PAUSED
                return self._eof_or_need()
            if state is MIGHT_SWITCH_PROTOCOL or state is SWITCHED_PROTOCOL:
                return PAUSED
            if state is MUST_CLOSE or state is CLOSED:
                if self._buf:
                    raise RemoteProtocolError("data after the end of the last message")
                return self._eof_or_need()
            raise RemoteProtocolError("cannot read from a connection in error")
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

    def _feed(self, n: int) -> None:
        """Give llhttp the next `n` buffered bytes (the callbacks fill `_msg`)."""
        buf = self._buf
        msg = self._msg
        if not msg.head_done:
            self._tail = (self._tail + bytes(buf[max(0, n - 3) : n]))[-3:]
        parser = self._parser
        if parser is None:
            if self.our_role is SERVER:
                parser = httptools.HttpRequestParser(msg)
            else:
                parser = httptools.HttpResponseParser(msg)
            self._parser = msg.parser = parser
        try:
            # a view, not a copy (the callbacks copy what they keep); released before the
            # fed bytes leave the buffer
            with memoryview(buf) as view, view[:n] as data:
                parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # llhttp stops after the head of an upgrade (CONNECT, Upgrade + Connection:
            # upgrade, 101): the message is complete and, the feed being bounded, nothing
            # of what follows was read
            msg.complete = True
        except httptools.HttpParserError as exc:
            self._parser = None
            if msg.head_done:
                if self.our_role is CLIENT and msg.status < 200:
                    return  # e.g. a 101 without `Connection: upgrade`: llhttp pauses
                self._check_head()  # our refusal (e.g. 501) before llhttp's (400)
            raise RemoteProtocolError(_plain_words(exc)) from None
        finally:
            del buf[:n]

    # -- heads ------------------------------------------------------------------------------

    def _read_head(self):
        buf = self._buf
        msg = self._msg
        while not msg.head_done:
            if not buf:
                if self._closed:
                    if self.their_state is IDLE and not self._head_fed:
                        self.their_state = CLOSED
                        return ConnectionClosed()
                    raise RemoteProtocolError("connection closed in the middle of a message head")
                return NEED_DATA
            if self.our_role is CLIENT and self.our_state is IDLE:
                raise RemoteProtocolError("response without a request")
            end = buf.find(_BLANK_LINE)
            n = len(buf) if end < 0 else end + 4
            tail = self._tail
            if tail:  # does a blank line begun in the previous feed end here?
                straddle = (tail + bytes(buf[:3])).find(_BLANK_LINE)
                if straddle >= 0:
                    n = straddle + 4 - len(tail)
            self._head_fed += n
            if self._head_fed > self._max:
                raise RemoteProtocolError("headers too large", 431)
            self._feed(n)
        self._head_fed = 0
        self._tail = b""
        headers = msg.headers
        if self.our_role is SERVER:
            return self._request(headers)
        return self._response(headers)

    def _check_head(self) -> None:
        """What llhttp leaves to us about a received head (h11's rules)."""
        headers = self._msg.headers
        if self._msg.version == "0.9":  # llhttp takes "GET /" as an HTTP/0.9 request
            raise RemoteProtocolError("HTTP/0.9 is not supported")
        te = [v for n, v in headers if n == b"transfer-encoding"]
        if te and (len(te) > 1 or te[0].lower() != b"chunked"):
            raise RemoteProtocolError("only Transfer-Encoding: chunked is supported", 501)
        if self.our_role is SERVER:  # RFC 9112 section 3.2
            hosts = sum(1 for n, _ in headers if n == b"host")
            if hosts > 1:
                raise RemoteProtocolError("more than one Host header")
            if hosts == 0 and self._msg.version == "1.1":
                raise RemoteProtocolError("missing Host header")

    def _framing(self, headers: Headers) -> None:
        """The body reader for a received message, from its headers as llhttp accepted them
        (one Content-Length of digits at most; never with Transfer-Encoding)."""
        self._remaining = 0
        self._body_kind = _LENGTH
        for name, value in headers:
            if name == b"content-length":
                self._remaining = int(value)
            elif name == b"transfer-encoding":
                self._body_kind = _CHUNKED
                self._line = b""
                return

    def _request(self, headers: Headers) -> Request:
        msg = self._msg
        self._check_head()
        method = msg.method
        version = msg.version
        self._their_version = _VERSIONS.get(version) or version.encode()
        self._keep_alive = msg.keep_alive  # llhttp: 1.0 only with `Connection: keep-alive`
        self._request_method = method
        self._switch_proposed = method == b"CONNECT" or any(n == b"upgrade" for n, _ in headers)
        self._framing(headers)
        if msg.upgrade and (self._remaining or self._body_kind == _CHUNKED):
            if _comma_tokens(headers, b"upgrade") != [b"h2c"]:
                # llhttp takes an upgrade's body for the new protocol's first bytes
                raise RemoteProtocolError("an upgrade or CONNECT request with a body")
            # h2c is never switched to (the engine serves such a request as HTTP/1.1), so
            # the body is the request's, though llhttp stopped at the head
            self._switch_proposed = False
            msg.complete = False
            if self._body_kind == _LENGTH:
                self._body_kind = _RAW  # read here by its length
                self._parser = None
            else:
                self._chunks_past_the_head()
        if version != "1.0" and b"100-continue" in _comma_tokens(headers, b"expect"):
            self.client_is_waiting_for_100_continue = True
        self.their_state = SEND_BODY
        self.our_state = SEND_RESPONSE
        return Request(
            method=method, target=msg.target, headers=headers, http_version=self._their_version
        )

    def _chunks_past_the_head(self) -> None:
        """The chunked body of a request llhttp stopped at the head of (an h2c offer, not
        taken): a fresh parser, primed with a head that declares only chunked framing, reads
        it, so llhttp still checks every chunk line. The head's own fields stay as read."""
        msg = self._msg
        kept = (msg.target, msg.method, msg.version, msg.keep_alive)
        parser = httptools.HttpRequestParser(msg)
        self._parser = msg.parser = parser
        parser.feed_data(_CHUNKED_HEAD)
        msg.target, msg.method, msg.version, msg.keep_alive = kept
        msg.upgrade = False
        self._line, self._remaining = b"", 0

    def _response(self, headers: Headers):
        msg = self._msg
        status = msg.status
        version = msg.version
        version_b = _VERSIONS.get(version) or version.encode()
        if status < 200:
            if status == 101:
                if not self._switch_proposed or self.our_state is not MIGHT_SWITCH_PROTOCOL:
                    raise RemoteProtocolError("101 without a complete upgrade request")
                self.our_state = self.their_state = SWITCHED_PROTOCOL
            elif not msg.complete:
                self._parser = None  # an 1xx with framing headers: llhttp waits for a body
            reason = msg.reason
            self._msg.reset()
            return InformationalResponse(
                status_code=status, headers=headers, reason=reason, http_version=version_b
            )
        self._check_head()
        if not msg.keep_alive:  # llhttp's rules, HTTP/1.0's included
            self._keep_alive = False
        method = self._request_method
        response = Response(
            status_code=status, headers=headers, reason=msg.reason, http_version=version_b
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
            if not msg.complete:  # llhttp, not knowing it was HEAD, waits for the body
                msg.complete = True
                self._parser = None
            self._body_kind, self._remaining = _LENGTH, 0
        else:
            self._framing(headers)
            if self._body_kind == _LENGTH and not any(n == b"content-length" for n, _ in headers):
                self._body_kind = _EOF
                self._keep_alive = False
        self.their_state = SEND_BODY
        return response

    # -- bodies -----------------------------------------------------------------------------

    def _end_of_their_message(self) -> EndOfMessage:
        self._msg.reset()
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
        msg = self._msg
        while True:
            if msg.body:
                body = msg.body
                data = body[0] if len(body) == 1 else b"".join(body)
                body.clear()
                if self.client_is_waiting_for_100_continue and self.our_role is SERVER:
                    self.client_is_waiting_for_100_continue = False
                return Data(data=data)
            if msg.complete:
                return self._end_of_their_message()
            if not buf:
                if self._closed:
                    if self._body_kind == _EOF:
                        self._parser = None
                        return self._end_of_their_message()
                    raise RemoteProtocolError(
                        "connection closed before the end of the message body"
                    )
                return NEED_DATA
            kind = self._body_kind
            if kind == _LENGTH:
                n = min(len(buf), self._remaining)
                self._remaining -= n
                self._feed(n)
            elif kind == _EOF:
                self._feed(len(buf))
            elif kind == _RAW:
                n = min(len(buf), self._remaining)
                msg.body.append(bytes(buf[:n]))
                del buf[:n]
                self._remaining -= n
                msg.complete = not self._remaining
            else:
                # chunked: what is left of a chunk's data and its CRLF, then the next line
                # (a chunk size, a trailer, or the last one) up to its LF
                skip = self._remaining
                if skip >= len(buf):
                    self._remaining -= len(buf)
                    self._feed(len(buf))
                    continue
                end = buf.find(b"\n", skip)
                n = len(buf) if end < 0 else end + 1
                line = self._line = self._line + bytes(buf[skip:n])
                if len(line) > self._max:
                    raise RemoteProtocolError("chunk line too long", 431)
                self._remaining = 0
                msg.chunk_header = False
                self._feed(n)
                if end >= 0:
                    self._line = b""
                    if msg.chunk_header:  # llhttp accepted a chunk size line: its hex digits
                        size = int(_CHUNK_SIZE.match(line).group(), 16)
                        self._remaining = size + 2 if size else 0

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
        keep_alive_asked = False
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
            elif name == b"connection":
                tokens = _comma_tokens([(name, value)], name)
                if b"close" in tokens:
                    self._keep_alive = False
                keep_alive_asked = b"keep-alive" in tokens
            lines.append(b"%b: %b\r\n" % (name, value))
        if host is None:
            raise LocalProtocolError("Missing mandatory Host: header")
        # HTTP/1.0 goes on as 1.0 (not chunked: 1.0 has no chunked bodies), with its rule:
        # no keep-alive unless asked for
        version = b"1.0" if event.http_version == b"1.0" and not chunked else b"1.1"
        if version == b"1.0" and not keep_alive_asked:
            self._keep_alive = False
        self._request_method = event.method
        self._switch_proposed = upgrade or event.method == b"CONNECT"
        if chunked:
            self._write_kind, self._write_remaining = _CHUNKED, 0
        else:
            self._write_kind = _LENGTH
            self._write_remaining = int(length) if length is not None else 0
        self.our_state = SEND_BODY
        self.their_state = SEND_RESPONSE
        return b"%b %b HTTP/%b\r\nhost: %b\r\n%b\r\n" % (
            event.method,
            event.target,
            version,
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
        elif self._their_version == b"1.0":  # 1.0 keeps a connection only when told so
            headers = [(n, v) for n, v in headers if n != b"connection"]
            headers.append((b"connection", b"keep-alive"))
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
            reason or _REASONS.get(status, b""),
            b"".join([b"%b: %b\r\n" % (n, v) for n, v in headers]),
        )


Event = Request | Response | InformationalResponse | Data | EndOfMessage | ConnectionClosed
Sentinel = _Sentinel
