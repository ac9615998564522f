"""The controller <-> agent configuration stream: message framing and types.

One long-lived TCP (later mutual-TLS) connection per agent, newline-delimited
JSON both ways:

  agent -> controller  {"type": "hello", "node": N, "token": T, "version": V|""}
  controller -> agent  {"type": "snapshot", "version": V, "snapshot": {...}}
  agent -> controller  {"type": "ack", "version": V}
                       {"type": "nack", "version": V, "error": "..."}

The controller pushes a snapshot whenever the node's version differs from the
last one the agent holds (the hello's version on reconnect, so a resumed agent
with the current version gets nothing new). Both sides read with a bounded
buffer so a broken peer cannot make the other grow without limit.
"""

from __future__ import annotations

import json
from typing import Any

import trio

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class WireError(Exception):
    """The peer sent something that is not a message of this protocol."""


class MessageStream:
    """Newline-delimited JSON messages over a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None when the peer closed the stream cleanly."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                try:
                    message = json.loads(line)
                except ValueError as exc:
                    raise WireError(f"not JSON: {exc}") from None
                if not isinstance(message, dict) or "type" not in message:
                    raise WireError("message without a type")
                return message
            if len(self._buffer) > MAX_MESSAGE_BYTES:
                raise WireError("message too large")
            data = await self.stream.receive_some(1 << 20)
            if not data:
                if self._buffer:
                    raise WireError("truncated message")
                return None
            self._buffer += data
