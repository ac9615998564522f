"""The node proxy's HTTP/1.1 engine (per-request routing, balancing and resilience).

`proxy_http1(client, ctx)` serves one downstream connection; `open_connection_pool(connect)`
gives the upstream keep-alive pool it draws from; `types` holds the contracts (Connect,
UpstreamError, HttpContext, RequestRecord, the request filter hook).
"""

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
]
