"""Header rewriting between the client's and the upstream's HTTP/1.1 connections.

What flows through: the header lists h11 parsed (lower-case names, bytes) going either way. The
proxy owns each hop, so hop-by-hop headers (RFC 9110 section 7.6.1: Connection and the headers
it names, Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade) are dropped; framing headers
(Content-Length, Transfer-Encoding) stay so that h11 frames the body the same way on the other
side. `Expect: 100-continue` is answered by the proxy itself (as Envoy does by default) and
not forwarded. An upgrade (WebSocket) keeps its Connection/Upgrade pair.
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def upgrade_protocol(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The protocol a request asks to upgrade to (`Connection: upgrade` + `Upgrade: x`)."""
    headers = list(headers)
    if b"upgrade" not in _connection_tokens(headers):
        return None
    return next((value for name, value in headers if name == b"upgrade"), None)


def request_headers(headers: Headers, *, default_host: bytes, upgrade: bytes | None) -> Headers:
    """The headers to send upstream for a client's request."""
    drop = _connection_tokens(headers) | _HOP_BY_HOP
    out = [(n, v) for n, v in headers if n not in drop and n != b"expect"]
    if not any(n == b"host" for n, _ in out):
        out.insert(0, (b"host", default_host))  # HTTP/1.0 clients may omit it; 1.1 needs it
    if upgrade is not None:
        out += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
    return out


def response_headers(headers: Headers, *, upgrade: bool = False) -> Headers:
    """The headers to send the client for an upstream's response (a 101 keeps its upgrade)."""
    upgrade_value = next((v for n, v in headers if n == b"upgrade"), None) if upgrade else None
    drop = _connection_tokens(headers) | _HOP_BY_HOP
    out = [(n, v) for n, v in headers if n not in drop]
    if upgrade_value is not None:
        out += [(b"connection", b"upgrade"), (b"upgrade", upgrade_value)]
    return out
