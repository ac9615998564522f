"""HTTP/1.1 seen from beside a relayed connection: the `observe` level (issue 18).

The relay (agent/proxy/relay.py) moves the bytes unchanged and hands this observer a copy of
each direction as it goes out (a request before its response); the observer parses them
with llhttp (`httptools`) and reports each finished exchange as the engine does (a
`RequestRecord`: method, path, status, body sizes, duration), so Istio's request metrics
and the access log are the same at `observe` as at `full`. Sans-IO: bytes in, records out;
no socket, no clock of its own.

Responses answer requests in order (HTTP/1.1 pipelining included). What llhttp cannot know
from the response alone is handled here: a response to HEAD has no body whatever its
Content-Length says (its head is read here, not by llhttp), 1xx responses precede the final
one, and a body that runs to the connection's end ends with it (`finish`).

Observation stops, the bytes still flowing, on what it cannot follow: a parse error, the
HTTP/2 preface on an HTTP/1.1 port, a protocol upgrade (after reporting the upgrade request),
a response with no request; `on_stop(reason)` is told once (STOP_REASONS), and the requests
still in flight are not reported.

What the engine's slow-client timeouts need (agent/proxy/observe_timeouts.py) is kept here
too: `head_begun`, when the request being read began (None once its head is complete), and
`idle_since`, when the connection last had no exchange in progress (None while one is);
`on_change` is told whenever either changes. `answerable` says whether the proxy may still
answer the request being read itself: no byte of a response is owed or under way.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import httptools
from meshagent.agent.proxy.http.types import RequestRecord

STOP_REASONS = ("parse_error", "http2", "upgrade", "unmatched_response", "internal_error")
_H2_PREFACE = b"PRI * HTTP/2.0"
# a response head read here (HEAD requests) larger than this stops observation as a parse error
MAX_HEAD = 64 * 1024


class _Exchange:
    __slots__ = ("began", "record")

    def __init__(self, record: RequestRecord, began: float) -> None:
        self.record = record
        self.began = began


class Http1Observer:
    """One connection's HTTP/1.1 exchanges. `request_data`/`response_data` get each
    direction's bytes in order; `finish` at the end of the relay. Never raises."""

    def __init__(
        self,
        on_request: Callable[[RequestRecord], None],
        on_stop: Callable[[str], None],
        *,
        peer: str = "",
        upstream: str = "",
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._on_request, self._on_stop = on_request, on_stop
        self._peer, self._upstream = peer, upstream
        self._clock, self._wall = clock, wall
        self.stopped: str | None = None
        self._requests = httptools.HttpRequestParser(_RequestEvents(self))
        self._responses = httptools.HttpResponseParser(_ResponseEvents(self))
        self._pending: deque[_Exchange] = deque()  # requests whose response has not ended
        self._current: _Exchange | None = None  # the request being read
        self._url = bytearray()
        self._host = ""
        self._status = 0  # of the response being read (0: none)
        self._response_body = 0
        self._in_response = False
        self._head: bytearray | None = None  # a HEAD request's response head, being read
        self._first = True
        self._upgrading = False
        self._response_ended_first = False
        self._request_ended = False
        self._request_open = False  # a request began and its message has not ended
        self.head_begun: float | None = None
        self.idle_since: float | None = clock()
        self.on_change: Callable[[], None] | None = None
        # Inside a feed, changes are told once at its end: a request read whole in one batch
        # begins and completes its head in it, and only the state after it matters to the
        # caller's timeouts (`ObserveTimeouts`: each change moves a trio deadline).
        self._feeding = False
        self._changed_in_feed = False

    # -- input -------------------------------------------------------------------------------

    def request_data(self, data: bytes) -> None:
        if self.stopped is not None or self._upgrading:
            return
        self._feeding = True
        try:
            self._request_data(data)
        finally:
            self._fed()

    def _request_data(self, data: bytes) -> None:
        try:
            if self._first:
                self._first = False
                if data.startswith(_H2_PREFACE[: len(data)]) and data[:3] == b"PRI":
                    self._stop("http2")
                    return
            self._requests.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrading = True  # the rest is the new protocol, after the response
        except httptools.HttpParserError:
            self._stop("parse_error")
        except Exception:
            self._stop("internal_error")

    def response_data(self, data: bytes) -> None:
        if self.stopped is not None:
            return
        self._feeding = True
        try:
            self._response_data(data)
        finally:
            self._fed()

    def _fed(self) -> None:
        self._feeding = False
        if self._changed_in_feed:
            self._changed_in_feed = False
            self._changed()

    def _response_data(self, data: bytes) -> None:
        try:
            self._response_bytes(memoryview(data))
        except httptools.HttpParserError:
            self._stop("parse_error")
        except _Stopped:
            pass
        except Exception:
            self._stop("internal_error")

    def request_eof(self) -> None:
        self._request_ended = True

    def response_eof(self) -> None:
        if not self._request_ended:
            self._response_ended_first = True

    def finish(self) -> None:
        """The relay ended: a response read to the connection's end is complete; requests
        still waiting for theirs are reported with status 0 and Envoy's flag for who closed
        first (DC: the client, UC: the upstream)."""
        if self.stopped is not None:
            return
        try:
            if self._in_response and self._status and self._pending:
                self._complete_response()
            flag = "UC" if self._response_ended_first else "DC"
            while self._pending:
                exchange = self._pending.popleft()
                if exchange.record.method:
                    exchange.record.flags.append(flag)
                    self._report(exchange, 0)
        except Exception:
            self._stop("internal_error")
        self.stopped = "finished"

    # -- requests ----------------------------------------------------------------------------

    def _request_begin(self) -> None:
        record = RequestRecord("", "", "", peer=self._peer, start=self._wall())
        record.upstream = self._upstream
        self._current = _Exchange(record, self._clock())
        self._url.clear()
        self._host = ""
        self._request_open = True
        self.head_begun, self.idle_since = self._current.began, None
        self._changed()

    def _request_header(self, name: bytes, value: bytes) -> None:
        if not self._host and name.lower() == b"host":
            self._host = value.decode("latin-1")

    def _request_head(self) -> None:
        exchange = self._current
        assert exchange is not None
        record = exchange.record
        record.method = self._requests.get_method().decode("ascii")
        record.target = self._url.decode("latin-1")
        record.authority = self._host
        self._pending.append(exchange)  # a response may come before the body has
        self.head_begun = None
        self._changed()

    def _request_body(self, body: bytes) -> None:
        if self._current is not None:
            self._current.record.bytes_received += len(body)

    def _request_end(self) -> None:
        self._request_open = False
        self._maybe_idle()

    # -- responses ---------------------------------------------------------------------------

    def _response_bytes(self, view: memoryview) -> None:
        while view:
            if self._in_response or not self._pending or self._pending[0].record.method != "HEAD":
                if not self._in_response and not self._pending:
                    self._stop("unmatched_response")
                    raise _Stopped
                if any(e.record.method == "HEAD" for e in self._pending):
                    # a HEAD's response may start in this chunk: llhttp must stop before it
                    self._responses.feed_data(view[:1])
                    view = view[1:]
                    continue
                self._responses.feed_data(view)
                return
            view = self._head_response(view)

    def _head_response(self, view: memoryview) -> memoryview:
        """Read the head of a response to HEAD (it has no body); returns what follows it."""
        head = self._head if self._head is not None else bytearray()
        start = max(0, len(head) - 3)
        head += view
        end = head.find(b"\r\n\r\n", start)
        if end < 0:
            if len(head) > MAX_HEAD:
                self._stop("parse_error")
                raise _Stopped
            self._head = head
            return view[len(view) :]
        self._head = None
        rest = memoryview(bytes(head[end + 4 :]))
        line = bytes(head[: head.find(b"\r\n")]).split(None, 2)
        if len(line) < 2 or not line[0].startswith(b"HTTP/1.") or not line[1].isdigit():
            self._stop("parse_error")
            raise _Stopped
        status = int(line[1])
        if status >= 200:
            self._report(self._pending.popleft(), status)
        return rest

    def _response_begin(self) -> None:
        if not self._pending:
            self._stop("unmatched_response")
            raise _Stopped
        self._in_response = True
        self._status = 0
        self._response_body = 0

    def _response_head(self) -> None:
        self._status = self._responses.get_status_code()
        if self._status == 101:
            self._report(self._pending.popleft(), 101)
            self._stop("upgrade")
            raise _Stopped

    def _response_body_bytes(self, body: bytes) -> None:
        self._response_body += len(body)

    def _response_end(self) -> None:
        if 100 <= self._status < 200:  # informational: the final response follows
            self._in_response = False
            return
        self._complete_response()
        if self._upgrading:  # the server refused the upgrade: what follows is unknown
            self._stop("upgrade")
            raise _Stopped

    def _complete_response(self) -> None:
        self._in_response = False
        exchange = self._pending.popleft()
        exchange.record.bytes_sent = self._response_body
        self._report(exchange, self._status)

    # -- output ------------------------------------------------------------------------------

    def _report(self, exchange: _Exchange, status: int) -> None:
        record = exchange.record
        record.status = status
        record.duration = self._clock() - exchange.began
        record.attempts = 1
        self._on_request(record)
        self._maybe_idle()

    def _stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason
            self._pending.clear()
            self.head_begun = self.idle_since = None  # no timeout for what is not followed
            self._changed()
            self._on_stop(reason)

    # -- timeouts (agent/proxy/observe_timeouts.py) -------------------------------------------

    @property
    def answerable(self) -> bool:
        """A request is being read and the proxy may answer it itself: observation goes on
        and no response is owed to an earlier request or under way."""
        return (
            self.stopped is None
            and self.head_begun is not None
            and not self._pending
            and not self._in_response
            and self._head is None
        )

    def report_local(self, status: int) -> None:
        """Report a response the proxy made itself to the request being read (as the engine
        does: no method, path or duration), and follow nothing more."""
        record = RequestRecord("", "", "", peer=self._peer, start=self._wall())
        record.status = status
        self._stop_quietly()
        try:
            self._on_request(record)
        except Exception:
            self._stop("internal_error")

    def _stop_quietly(self) -> None:
        self.stopped = "finished"
        self._pending.clear()
        self.head_begun = self.idle_since = None

    def _maybe_idle(self) -> None:
        if self.stopped is None and not (self._request_open or self._pending or self._in_response):
            self.idle_since = self._clock()
            self._changed()

    def _changed(self) -> None:
        if self._feeding:
            self._changed_in_feed = True
        elif self.on_change is not None:
            self.on_change()


class _Stopped(Exception):
    """Raised inside a parser callback to abandon the rest of the bytes."""


class _RequestEvents:
    """llhttp's request callbacks, forwarded to the observer."""

    __slots__ = ("_o",)

    def __init__(self, observer: Http1Observer) -> None:
        self._o = observer

    def on_message_begin(self) -> None:
        self._o._request_begin()

    def on_url(self, url: bytes) -> None:
        self._o._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._o._request_header(name, value)

    def on_headers_complete(self) -> None:
        self._o._request_head()

    def on_body(self, body: bytes) -> None:
        self._o._request_body(body)

    def on_message_complete(self) -> None:
        self._o._request_end()


class _ResponseEvents:
    """llhttp's response callbacks, forwarded to the observer."""

    __slots__ = ("_o",)

    def __init__(self, observer: Http1Observer) -> None:
        self._o = observer

    def on_message_begin(self) -> None:
        self._o._response_begin()

    def on_headers_complete(self) -> None:
        self._o._response_head()

    def on_body(self, body: bytes) -> None:
        self._o._response_body_bytes(body)

    def on_message_complete(self) -> None:
        self._o._response_end()
