"""The node proxy's HTTP engines (per-request routing, balancing and resilience).

`proxy_http1(client, ctx)` serves one downstream HTTP/1.1 connection, `proxy_http2` one
HTTP/2 (h2c) connection, `serve_detected` either by the client's first bytes; both engines
take their decisions from `decide.py`; `open_connection_pool(connect)`
gives the upstream keep-alive pool it draws from; `types` holds the contracts (Connect,
UpstreamError, HttpContext, RequestRecord, the request filter hook).
"""

from meshagent.agent.proxy.http.h2proxy import proxy_http2, serve_detected
from meshagent.agent.proxy.http.pool import ConnectionPool, open_connection_pool
from meshagent.agent.proxy.http.proxy import proxy_http1
from meshagent.agent.proxy.http.types import (
    Connect,
    HttpContext,
    HttpSettings,
    LocalResponse,
    RequestFilter,
    RequestInfo,
    RequestRecord,
    UpstreamError,
)

__all__ = [
    "Connect",
    "ConnectionPool",
    "HttpContext",
    "HttpSettings",
    "LocalResponse",
    "RequestFilter",
    "RequestInfo",
    "RequestRecord",
    "UpstreamError",
    "open_connection_pool",
    "proxy_http1",
    "proxy_http2",
    "serve_detected",
]
