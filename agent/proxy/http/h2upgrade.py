"""HTTP/1.1 requests sent upstream as HTTP/2 (DestinationRule `h2UpgradePolicy: UPGRADE`),
without I/O: which requests are upgraded, and the heads translated each way.

What flows through: the HTTP/1.1 engine's upstream request (`wire.Request`, hop-by-hop headers
already dropped by `headers.request_headers`) in, an HTTP/2 `RequestHead` out (Host becomes
:authority; connection-specific headers, forbidden in HTTP/2, are dropped; `TE` only as
`trailers`); an HTTP/2 response's header list in, the status and the HTTP/1.1 headers out (the
pseudo headers dropped; framing is left to the HTTP/1.1 codec). Trailers are not translated:
the HTTP/1.1 engine drops them, as Envoy does toward an HTTP/1.1 client. As Envoy, requests
asking for a protocol upgrade (WebSocket: `Upgrade:`) and CONNECT stay HTTP/1.1.
"""

from __future__ import annotations

from meshagent.agent.proxy.http import h2wire, wire

# Headers that belong to one HTTP/1.x hop (RFC 9113 section 8.2.2); `te` is checked alone.
_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
     b"http2-settings", b"host"}
)  # fmt: skip


def upgradable(req: wire.Request, upgrade: bytes | None) -> bool:
    """Whether a request may go upstream as HTTP/2 (`upgrade`: the protocol it asks to switch
    to, if any): not CONNECT, not a protocol upgrade."""
    return upgrade is None and req.method != b"CONNECT"


def request_head(req: wire.Request, default_authority: str) -> h2wire.RequestHead:
    """The HTTP/2 request head for an HTTP/1.1 request (its Host as :authority)."""
    host = next((v for n, v in req.headers if n == b"host"), None)
    headers = []
    for name, value in req.headers:
        name = name.lower()
        if name in _HOP:
            continue
        if name == b"te":
            if b"trailers" not in (t.strip().lower() for t in value.split(b",")):
                continue
            value = b"trailers"
        headers.append((name, value))
    return h2wire.RequestHead(
        method=req.method.decode("ascii"),
        path=req.target.decode("latin-1"),
        authority=host.decode("latin-1") if host else default_authority,
        scheme="http",
        headers=headers,
    )


def response_head(
    headers: list[tuple[bytes, bytes]], ended: bool, method: bytes = b"GET"
) -> wire.Response:
    """The HTTP/1.1 response for an HTTP/2 response head (`ended`: the stream ended with it,
    so there is no body: said with Content-Length 0 rather than an empty chunked body, except
    to HEAD, whose length is what a GET would get)."""
    status = h2wire.status_of(headers)
    out = [(n, v) for n, v in h2wire.response_headers(headers) if not n.startswith(b":")]
    silent = method == b"HEAD" or status in (204, 304)
    if ended and not silent and not any(n == b"content-length" for n, _ in out):
        out.append((b"content-length", b"0"))
    return wire.Response(status_code=status, headers=out)
