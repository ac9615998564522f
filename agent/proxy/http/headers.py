"""Header rewriting between the client's and the upstream's HTTP/1.1 connections.

What flows through: the header lists h11 parsed (lower-case names, bytes) going either way. The
proxy owns each hop, so hop-by-hop headers (RFC 9110 section 7.6.1: Connection and the headers
it names, Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade) are dropped; framing headers
(Content-Length, Transfer-Encoding) stay so that h11 frames the body the same way on the other
side. `Expect: 100-continue` goes on to the server, which decides (its 100 Continue or its final
answer comes back to the client): the mesh does not answer for it. An upgrade (WebSocket) keeps
its Connection/Upgrade pair; `Upgrade: h2c` is dropped with HTTP2-Settings (`h2c_upgrade`), as
Envoy does, and the request is served as HTTP/1.1.
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def h2c_upgrade(headers: Headers) -> Headers:
    """The headers of a request offering `Upgrade: h2c` with that offer removed (Envoy's
    default: the request is served as HTTP/1.1 and never switches). Other upgrade offers in
    the same request stay; HTTP2-Settings goes, it only belongs to the h2c offer."""
    offers = [
        t.strip()
        for n, v in headers
        if n == b"upgrade"
        for t in v.split(b",")
        if t.strip() and t.strip().lower() != b"h2c"
    ]
    tokens = [
        t.strip()
        for n, v in headers
        if n == b"connection"
        for t in v.split(b",")
        if t.strip() and t.strip().lower() not in (b"upgrade", b"http2-settings")
    ]
    out = [(n, v) for n, v in headers if n not in (b"upgrade", b"http2-settings", b"connection")]
    if offers:
        out.append((b"upgrade", b", ".join(offers)))
        tokens.append(b"upgrade")
    if tokens:
        out.append((b"connection", b", ".join(tokens)))
    return out


def is_h2c_upgrade(headers: Headers) -> bool:
    """Whether a request offers to upgrade to h2c (`Upgrade: h2c`, perhaps among others)."""
    return any(
        n == b"upgrade" and any(t.strip().lower() == b"h2c" for t in v.split(b","))
        for n, v in headers
    )


def upgrade_protocol(headers: Headers) -> bytes | None:
    """The protocol a request asks to upgrade to (`Connection: upgrade` + `Upgrade: x`)."""
    for name, _ in headers:
        if name == b"connection":
            break
    else:
        return None  # the common case: no Connection header, one pass and no copy
    if b"upgrade" not in connection_tokens(headers):
        return None
    return next((value for name, value in headers if name == b"upgrade"), None)


def _plain(headers: Headers, special: frozenset[bytes]) -> tuple[bool, bool]:
    """(no header in `special`, a Host header seen): one pass for the common case."""
    host = False
    for name, _ in headers:
        if name in special:
            return False, host
        if name == b"host":
            host = True
    return True, host


def request_headers(headers: Headers, *, default_host: bytes, upgrade: bytes | None) -> Headers:
    """The headers to send upstream for a client's request (the list given back as is when
    there is nothing to change: callers must not modify either afterwards)."""
    if upgrade is None:
        plain, host = _plain(headers, _HOP_BY_HOP)
        if plain:
            return headers if host else [(b"host", default_host), *headers]
    drop = connection_tokens(headers) | _HOP_BY_HOP
    out = [(n, v) for n, v in headers if n not in drop]
    if not any(n == b"host" for n, _ in out):
        out.insert(0, (b"host", default_host))  # HTTP/1.0 clients may omit it; 1.1 needs it
    if upgrade is not None:
        out += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
    return out


def response_headers(headers: Headers, *, upgrade: bool = False) -> Headers:
    """The headers to send the client for an upstream's response (a 101 keeps its upgrade;
    the list given back as is when there is nothing to drop)."""
    if not upgrade and _plain(headers, _HOP_BY_HOP)[0]:
        return headers
    upgrade_value = next((v for n, v in headers if n == b"upgrade"), None) if upgrade else None
    drop = connection_tokens(headers) | _HOP_BY_HOP
    out = [(n, v) for n, v in headers if n not in drop]
    if upgrade_value is not None:
        out += [(b"connection", b"upgrade"), (b"upgrade", upgrade_value)]
    return out
