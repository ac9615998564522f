"""The controller <-> agent stream (port 15012): message framing and types.

One long-lived TLS connection per agent (the agent checks the controller's certificate
against the mesh root, by the name or IP it dialled), newline-delimited JSON both ways.
The first message is the agent's hello; its token is the node credential (a per-node
bootstrap token in the lab, a projected service-account token checked by TokenReview in
a cluster). The session's node is the node that token belongs to: a hello claiming
another node is refused.

  agent -> controller  {"type": "hello", "node": N, "token": T, "version": V|""}
  controller -> agent  {"type": "error", "error": "..."}          then closes: refused
  controller -> agent  {"type": "snapshot", "version": V, "snapshot": {...}}
                       {"type": "delta", "version": V, "base": B, "changes": {...}}
  agent -> controller  {"type": "ack", "version": V}
                       {"type": "nack", "version": V, "error": "..."}

Certificates travel on the same stream, matched by an id the agent chooses (unique on
the connection); requests may overlap and answers come in any order:

  agent -> controller  {"type": "csr", "id": I, "identity": "spiffe://...", "csr": PEM}
  controller -> agent  {"type": "certificate", "id": I, "chain": [leaf PEM, intermediate PEM...]}
                       {"type": "csr_refused", "id": I, "reason": "..."}

The controller pushes a snapshot whenever the node's version differs from the last one the
agent holds (the hello's version on reconnect, so a resumed agent with the current version
gets nothing new); once the agent has ACKed a version on the stream, it sends only the
changes from it (`delta`, common/snapshotdelta.py); a NACKed delta is followed by the whole
snapshot. One snapshot or delta is in flight at a time: the next waits for the answer. Both
sides read with a bounded buffer so a broken peer cannot make the other grow without limit,
and serialize their sends, since several tasks share one connection.
"""

from __future__ import annotations

import json
from typing import Any

import trio

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# TLS keeps each stream's outgoing buffer at the largest piece it was given: 1,000 agent
# streams that were each sent a whole snapshot in 256 KiB pieces held ~256 MiB between them.
SEND_CHUNK = 32 * 1024


class WireError(Exception):
    """The peer sent something that is not a message of this protocol."""


class MessageStream:
    """Newline-delimited JSON messages over a trio stream; `send` is safe to call from
    several tasks, `receive` from one."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._scanned = 0  # the buffer's bytes already searched for a newline
        self._send_lock = trio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_encoded(json.dumps(message, separators=(",", ":")).encode())

    async def send_encoded(self, message: bytes) -> None:
        """Send one message already encoded as JSON (one line, no newline in it), in pieces of
        at most `SEND_CHUNK` bytes: TLS encrypts what one send is given into a buffer that
        keeps its largest size for the life of the connection, so a whole snapshot sent at
        once (~10 MB at 30,000 pods) stayed allocated per agent stream. A free lock is taken
        without a trip through the scheduler (`send_all` is the checkpoint): the controller
        sends each of its thousand agents a message per version."""
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            if len(message) < SEND_CHUNK:
                await self.stream.send_all(message + b"\n")
                return
            view = memoryview(message)
            for start in range(0, len(view), SEND_CHUNK):
                await self.stream.send_all(view[start : start + SEND_CHUNK])
            await self.stream.send_all(b"\n")
        finally:
            self._send_lock.release()

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None when the peer closed the stream cleanly."""
        while True:
            # only what came since the last look: a whole snapshot (~10 MB at 30,000 pods)
            # arrives in ~16 KiB reads, and searching it all again after each cost ~40 ms
            newline = self._buffer.find(b"\n", self._scanned)
            if newline < 0:
                self._scanned = len(self._buffer)
            else:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                self._scanned = 0
                try:
                    message = json.loads(line)
                except ValueError as exc:
                    raise WireError(f"not JSON: {exc}") from None
                if not isinstance(message, dict) or not isinstance(message.get("type"), str):
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


def encode_snapshot_message(
    version: str, node: str, shared_body: bytes, local_workloads: list | None = None
) -> bytes:
    """A `snapshot` message from a snapshot body encoded once for every node: `shared_body` is
    the JSON object of the snapshot without `node`, `version` and `local_workloads` (starting
    with `{`); those three are added here per node."""
    fields = {"node": node, "version": version, "local_workloads": local_workloads or []}
    head = json.dumps(fields, separators=(",", ":"))[:-1]
    tail = shared_body[1:] if shared_body != b"{}" else b"}"
    joiner = b"," if shared_body != b"{}" else b""
    return (
        b'{"type":"snapshot","version":'
        + json.dumps(version).encode()
        + b',"snapshot":'
        + head.encode()
        + joiner
        + tail
        + b"}"
    )
