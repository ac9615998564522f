"""The server name (SNI) a TLS client asks for, read from its first bytes, as Envoy's
tls_inspector listener filter does: so `tls` routes can choose a destination for a TLS
connection the mesh does not terminate, and the bytes still go on unchanged.

Only the ClientHello's framing is parsed (RFC 8446 §4.1.2, RFC 6066 §3): a record of type
handshake, a handshake message of type client_hello, and its server_name extension. A
ClientHello may span several records (RFC 8446 §5.1), so handshake bytes are gathered across
records up to `MAX_HELLO` bytes, as tls_inspector's own bound.
"""

from __future__ import annotations

from enum import Enum

_HANDSHAKE_RECORD = 22
_CLIENT_HELLO = 1
_SERVER_NAME_EXTENSION = 0
_HOST_NAME = 0
# What a ClientHello may take before we give up on finding an SNI in it (Envoy's
# tls_inspector reads at most 64 KiB; real ClientHellos are well under 2 KiB, or ~3 with a
# post-quantum key share).
MAX_HELLO = 16 * 1024 + 5


class Hello(Enum):
    """What the bytes so far say when they name no server (yet)."""

    INCOMPLETE = "incomplete"  # a ClientHello so far: read more
    NOT_TLS = "not-tls"  # not a TLS ClientHello (or malformed): no SNI
    NO_SNI = "no-sni"  # a whole ClientHello without a host_name


class _Short(Exception):
    """The bytes end before the structure does."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise _Short
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))


def _handshake_bytes(data: bytes) -> tuple[bytes, bool]:
    """The handshake bytes of the leading handshake records (a later record of another type,
    such as 0-RTT data, ends them), and False when the first record is not a well-formed
    handshake record header (this is not a TLS client's first flight)."""
    out, at = bytearray(), 0
    while at + 5 <= len(data):
        kind, major, length = data[at], data[at + 1], int.from_bytes(data[at + 3 : at + 5], "big")
        if kind != _HANDSHAKE_RECORD and at > 0:
            break
        if kind != _HANDSHAKE_RECORD or major != 3 or length == 0 or length > 16384 + 256:
            return bytes(out), False
        out += data[at + 5 : at + 5 + length]
        at += 5 + length
    return bytes(out), True


def server_name(data: bytes) -> str | Hello:
    """The host_name of the ClientHello at the start of ``data``, lower-cased; or why there
    is none (yet). Never raises for any input."""
    if not data:
        return Hello.INCOMPLETE
    if data[0] != _HANDSHAKE_RECORD:
        return Hello.NOT_TLS
    handshake, framed = _handshake_bytes(data)
    if not framed:
        return Hello.NOT_TLS
    try:
        return _parse_hello(_Reader(handshake))
    except _Short:
        return Hello.INCOMPLETE if len(data) < MAX_HELLO else Hello.NOT_TLS


def _parse_hello(r: _Reader) -> str | Hello:
    if r.number(1) != _CLIENT_HELLO:
        return Hello.NOT_TLS
    body = _Reader(r.take(r.number(3)))
    try:
        body.take(2 + 32)  # legacy_version, random
        body.vector(1)  # legacy_session_id
        body.vector(2)  # cipher_suites
        body.vector(1)  # legacy_compression_methods
        if body.at == len(body.data):
            return Hello.NO_SNI  # no extensions at all
        extensions = _Reader(body.vector(2))
        while extensions.at < len(extensions.data):
            kind, value = extensions.number(2), extensions.vector(2)
            if kind == _SERVER_NAME_EXTENSION:
                return _host_name(_Reader(value))
    except _Short:
        return Hello.NOT_TLS  # the message is whole: its insides do not add up
    return Hello.NO_SNI


def _host_name(r: _Reader) -> str | Hello:
    names = _Reader(r.vector(2))
    while names.at < len(names.data):
        kind, name = names.number(1), names.vector(2)
        if kind == _HOST_NAME:
            try:
                text = name.decode("ascii")
            except UnicodeDecodeError:
                return Hello.NOT_TLS
            return text.lower().rstrip(".") if text else Hello.NO_SNI
    return Hello.NO_SNI
