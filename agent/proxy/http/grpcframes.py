"""Counting gRPC messages in a stream's DATA (Istio's istio_request_messages_total and
istio_response_messages_total).

gRPC over HTTP/2 frames each message with a 5-byte prefix (a compressed flag, then the length,
big-endian) and HTTP/2 splits the bytes into DATA frames anywhere, so the count needs the few
bytes of state kept here between frames. Nothing is copied or kept but a partial prefix; a
message is counted when its prefix is complete, as Envoy's gRPC frame inspector counts frames.
"""

from __future__ import annotations

_PREFIX = 5


class MessageCounter:
    """Length-prefixed gRPC messages seen so far in one direction of one call."""

    __slots__ = ("_left", "_prefix", "count")

    def __init__(self) -> None:
        self.count = 0
        self._prefix = b""  # the part of a message prefix received so far
        self._left = 0  # message bytes still to skip

    def feed(self, data: bytes | memoryview) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._left:
                step = min(self._left, n - i)
                self._left -= step
                i += step
                continue
            take = min(_PREFIX - len(self._prefix), n - i)
            self._prefix += bytes(data[i : i + take])
            i += take
            if len(self._prefix) == _PREFIX:
                self.count += 1
                self._left = int.from_bytes(self._prefix[1:], "big")
                self._prefix = b""
