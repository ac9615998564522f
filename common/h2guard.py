"""Bounds on what one HTTP/2 peer may make a server connection of ours do: the HBONE server on
15008 (issue #17 item 5) and the pod-facing HTTP/2 engine (issue #15 item 4) use this one guard.

What flows through: the bytes a server connection receives, before `h2` sees them, and the
stream resets `h2` reports. Out: nothing, or an `Abuse` naming what the peer overdid; the
connection then answers GOAWAY (ENHANCE_YOUR_CALM, the reason in its debug data) and ends,
as Envoy and the HTTP/2 servers patched after CVE-2023-44487 do. Sans-IO: no sockets, the
clock is injected.

Why before `h2`: h2 4.x holds a header block until its END_HEADERS, up to 64 CONTINUATION
frames of up to the frame size we allow (1 MiB), i.e. 64 MiB per connection before it
complains, and it answers every PING and SETTINGS with an ACK however many come. The guard
reads only the 9-byte frame headers, so a header block over `MAX_HEADER_BLOCK` is refused
when the header of the frame that would cross it arrives, before its body is buffered.

What is bounded (figures per connection; legitimate peers, our own pool included, stay
far below them):

- header block (HEADERS + CONTINUATION, encoded) at most `max_header_block` bytes (the
  SETTINGS_MAX_HEADER_LIST_SIZE we announce, `MAX_HEADER_BLOCK` by default) and
  `MAX_CONTINUATIONS` CONTINUATION frames;
- premature resets (rapid reset): a stream the peer resets within `PREMATURE_RESET_AGE` s of
  opening it costs a token of a bucket of `RESET_BURST` refilled at `RESET_RATE`/s (Envoy
  counts resets within 1 s of the request as premature; Node allows 1000 then 33/s; Rust h2
  20 pending);
- PING and SETTINGS frames (each makes us queue an ACK): buckets of `PING_BURST` and
  `SETTINGS_BURST` refilled at `PING_RATE` and `SETTINGS_RATE` per second;
- a header block open (HEADERS seen, its END_HEADERS frame not yet received whole) since
  `header_block_since`: a server ends the connection once that is older than its request
  header timeout (a stream's head cannot be reset alone: no other frame may come between);
- concurrent streams: 100 (SETTINGS_MAX_CONCURRENT_STREAMS, enforced by h2 itself), and
  tunnel requests still being decided at most `MAX_PENDING_REQUESTS` (streams a peer reset
  no longer count against h2's limit while their handler runs).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

__all__ = [
    "ABUSE",
    "MAX_CONTINUATIONS",
    "MAX_HEADER_BLOCK",
    "MAX_PENDING_REQUESTS",
    "PREMATURE_RESET_AGE",
    "Abuse",
    "FloodGuard",
    "TokenBucket",
]

MAX_CONCURRENT_STREAMS = 100  # what both servers announce (SETTINGS_MAX_CONCURRENT_STREAMS)
MAX_HEADER_BLOCK = 64 * 1024  # the SETTINGS_MAX_HEADER_LIST_SIZE both servers announce
MAX_CONTINUATIONS = 16
PREMATURE_RESET_AGE = 1.0
RESET_BURST, RESET_RATE = 100, 20.0
PING_BURST, PING_RATE = 50, 5.0
SETTINGS_BURST, SETTINGS_RATE = 20, 2.0
MAX_PENDING_REQUESTS = 2 * MAX_CONCURRENT_STREAMS

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADER = struct.Struct(">HBBBL")  # 24-bit length as 16 + 8, type, flags, stream id
_HEADERS, _RST_STREAM, _SETTINGS, _PING, _CONTINUATION = 0x1, 0x3, 0x4, 0x6, 0x9
_ACK = 0x1  # SETTINGS and PING
_END_HEADERS = 0x4


ABUSE = Counter(
    "meshagent_http2_abuse",
    "HTTP/2 connections ended with GOAWAY ENHANCE_YOUR_CALM because the peer exceeded a bound,"
    " by listener (hbone: port 15008; pod: the pod-facing HTTP/2 engine) and kind (rapid_reset,"
    " continuation, header_block, header_timeout, ping, settings, pending_requests).",
    ("listener", "kind"),
)


@dataclass(frozen=True)
class Abuse:
    """What a peer overdid: ``kind`` (a metric label) and a human reason."""

    kind: str  # header_block, header_timeout, continuation, rapid_reset, ping, settings, ...
    reason: str

    def __str__(self) -> str:
        return self.reason


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second of ``clock``."""

    __slots__ = ("_at", "_tokens", "burst", "clock", "rate")

    def __init__(self, burst: int, rate: float, clock: Callable[[], float]) -> None:
        self.burst, self.rate, self.clock = float(burst), rate, clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class FloodGuard:
    """The server side's frame-level bounds for one connection (see the module docstring)."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        preface: bool = True,
        max_header_block: int = MAX_HEADER_BLOCK,
    ) -> None:
        self.clock = clock
        self.max_header_block = max_header_block
        self._preface_left = len(PREFACE) if preface else 0
        self._header = bytearray()  # a frame header split across reads
        self._skip = 0  # body bytes of the current frame still to pass
        self._block: int | None = None  # header block bytes so far, while one is open
        self._continuations = 0
        self._block_since: float | None = None  # when the open header block began
        self._ends_block = False  # the current frame's body ends the header block
        self._resets = TokenBucket(RESET_BURST, RESET_RATE, clock)
        self._pings = TokenBucket(PING_BURST, PING_RATE, clock)
        self._settings = TokenBucket(SETTINGS_BURST, SETTINGS_RATE, clock)

    def feed(self, data: bytes | memoryview) -> Abuse | None:
        """Account for received bytes; the first abuse found, if any (then stop feeding)."""
        view = memoryview(data)
        if self._preface_left:
            taken = min(self._preface_left, len(view))
            self._preface_left -= taken
            view = view[taken:]
        while view:
            if self._skip:
                taken = min(self._skip, len(view))
                self._skip -= taken
                view = view[taken:]
                if not self._skip and self._ends_block:
                    self._block_since, self._ends_block = None, False
                continue
            need = _HEADER.size - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) < _HEADER.size:
                break
            high, low, kind, flags, _stream = _HEADER.unpack(self._header)
            self._header.clear()
            length = (high << 8) | low
            self._skip = length
            abuse = self._frame(kind, flags, length)
            if abuse is not None:
                return abuse
        return None

    @property
    def header_block_since(self) -> float | None:
        """When the header block still incomplete began (None: none is open)."""
        return self._block_since

    def _frame(self, kind: int, flags: int, length: int) -> Abuse | None:
        if kind == _HEADERS:
            self._block, self._continuations = length, 0
            self._block_since = self.clock()
        elif kind == _CONTINUATION:
            self._block = (self._block or 0) + length
            self._continuations += 1
            if self._continuations > MAX_CONTINUATIONS:
                return Abuse(
                    "continuation",
                    f"header block in more than {MAX_CONTINUATIONS} CONTINUATION frames",
                )
        elif kind == _PING and not flags & _ACK and not self._pings.take():
            return Abuse("ping", f"more than {PING_BURST} PINGs at {PING_RATE:g}/s")
        elif kind == _SETTINGS and not flags & _ACK and not self._settings.take():
            return Abuse("settings", f"more than {SETTINGS_BURST} SETTINGS at {SETTINGS_RATE:g}/s")
        if kind in (_HEADERS, _CONTINUATION):
            limit = self.max_header_block
            if self._block is not None and self._block > limit:
                return Abuse("header_block", f"header block over {limit} bytes ({self._block})")
            if flags & _END_HEADERS:
                self._block = None
                if length:
                    self._ends_block = True
                else:
                    self._block_since = None
        return None

    def stream_reset(self, age: float) -> Abuse | None:
        """The peer reset one of its streams ``age`` s after opening it."""
        if age >= PREMATURE_RESET_AGE or self._resets.take():
            return None
        return Abuse(
            "rapid_reset",
            f"more than {RESET_BURST} streams reset within {PREMATURE_RESET_AGE:g} s of opening"
            f" at {RESET_RATE:g}/s",
        )

    @staticmethod
    def pending_requests(count: int) -> Abuse | None:
        """``count`` tunnel requests of this connection are being decided."""
        if count <= MAX_PENDING_REQUESTS:
            return None
        return Abuse("pending_requests", f"more than {MAX_PENDING_REQUESTS} requests pending")
