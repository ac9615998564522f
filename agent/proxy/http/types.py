"""The HTTP engine's contracts with the rest of the proxy.

What flows through: the caller hands `proxy_http1` an HttpContext (where the current routes come
from, the shared cluster states and upstream connection pool, an optional per-request filter and
a callback for finished requests); the engine reaches endpoints only through `Connect`, so the
same code serves same-node pods (plain TCP) and other nodes (HBONE streams), and reports each
request as a RequestRecord (for metrics and the access log).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import trio
from meshagent.agent.proxy.http.grpcframes import MessageCounter
from meshagent.agent.proxy.limits import POD_LISTENER
from meshagent.common.pathnorm import DEFAULT_MODE, PathNormalization
from meshagent.common.snapshot import Endpoint, Workload

if TYPE_CHECKING:
    from meshagent.agent.proxy.drain import Drain
    from meshagent.agent.proxy.http.pool import ConnectionPool
    from meshagent.agent.proxy.lb import Clusters
    from meshagent.agent.proxy.limits import Limits
    from meshagent.agent.proxy.routing import ClusterSpec, HttpRoutes

UpstreamErrorKind = Literal["connect-failure", "refused", "reset"]


class UpstreamError(Exception):
    """An endpoint could not be reached or dropped the stream; `kind` says how."""

    def __init__(self, kind: UpstreamErrorKind, message: str = "", transport: str = "") -> None:
        super().__init__(message or kind)
        self.kind: UpstreamErrorKind = kind
        self.transport = transport  # why TLS origination failed, for the 503's body


# Opens a byte stream to an endpoint's pod port (TCP on this node, an HBONE stream to another),
# or an object carrying it as `.stream` (kept as RequestRecord.upstream_info). Raises
# UpstreamError (any other exception counts as a connect failure, its `kind` kept if valid).
# For a stream without `.socket`, a cancelled receive_some must lose no data: such idle pooled
# connections are watched for the server closing them by a receive cancelled on reuse.
# The ClusterSpec says how (its DestinationRule `tls`, the hostname for SNI).
Connect = Callable[[Endpoint, int, "ClusterSpec"], Awaitable[trio.abc.HalfCloseableStream]]


@dataclass(slots=True)
class RequestInfo:
    """A request as the filter sees it. Header names are lower-case bytes (as h11 gives them)."""

    method: str
    target: str  # path and query, normalized per HttpSettings.path_normalization
    authority: str
    headers: list[tuple[bytes, bytes]]
    peer: str = ""  # the downstream client's address
    _dict: dict[str, str] | None = field(default=None, repr=False)
    # What the request filter decided (an authz.Decision), for the request's access log line.
    decision: object = None

    @property
    def path(self) -> str:
        """The path without the query string."""
        cut = self.target.find("?")
        return self.target if cut < 0 else self.target[:cut]

    def replace_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Change the headers the request goes on with (in place: the engine forwards this
        list), e.g. a verified JWT removed by RequestAuthentication."""
        self.headers[:] = headers
        self._dict = None

    def header_map(self) -> Mapping[str, str]:
        """Headers by lower-case name; repeated headers joined with ',' (as Envoy matches)."""
        if self._dict is None:
            out: dict[str, str] = {}
            for name, value in self.headers:
                key = name.decode("latin-1")
                text = value.decode("latin-1")
                out[key] = f"{out[key]},{text}" if key in out else text
            self._dict = out
        return self._dict


@dataclass(frozen=True, slots=True)
class LocalResponse:
    """A response the proxy makes itself (a denial, a fault abort, an error)."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    flags: tuple[str, ...] = ()  # Envoy response flags to record, e.g. ("RBAC",)
    grpc_status: int | None = None  # for a gRPC call: this status (else one mapped from status)


RequestFilter = Callable[[RequestInfo], Awaitable[LocalResponse | None]]


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request (the access log's and the metrics' fields)."""

    method: str
    target: str
    authority: str
    peer: str = ""
    start: float = 0.0  # time.time()
    status: int = 0  # the code sent downstream; 0 if none was
    flags: list[str] = field(default_factory=list)  # Envoy response flags (UF, URX, UT, ...)
    bytes_received: int = 0  # request body bytes from the client
    bytes_sent: int = 0  # response body bytes to the client
    duration: float = 0.0  # seconds, until the response was sent (or the request given up)
    route: str = ""
    cluster: str = ""  # Envoy-style cluster name; "" when none was chosen
    endpoint: Endpoint | None = None  # the endpoint that answered (or the last one tried)
    upstream: str = ""  # its "ip:port"
    transport_failure: str = ""  # why TLS origination to it failed (Envoy's wording)
    attempts: int = 0  # upstream attempts made (1 + retries)
    upstream_info: object = None  # what Connect returned with the stream, if anything
    decision: object = None  # the request filter's decision (authz.Decision), if any
    grpc: bool = False  # a gRPC call (content-type application/grpc): request_protocol grpc
    grpc_status: int | None = None  # grpc-status of the response (headers or trailers)
    # gRPC messages each way (set for gRPC calls only: istio_request/response_messages_total)
    request_messages: MessageCounter | None = None
    response_messages: MessageCounter | None = None

    @property
    def flag_string(self) -> str:
        """Flags as Envoy's access log writes them: "UF,URX", or "-" for none."""
        return ",".join(self.flags) or "-"


@dataclass(frozen=True, slots=True)
class HttpSettings:
    retry_buffer_limit: int = 64 * 1024  # a body up to this size is kept for retries
    max_header_bytes: int = 60 * 1024  # Envoy's max_request_headers_kb default
    client_idle_timeout: float = 3600.0  # keep-alive wait for the next request (Envoy: 1 h)
    # from the first byte of a request to its full head; then 408 (agent config
    # http_request_headers_timeout_s)
    request_header_timeout: float = 10.0
    drain_limit: int = 1024 * 1024  # unread request body we read and drop to keep a connection
    drain_timeout: float = 5.0
    retry_backoff_base: float = 0.025  # Envoy's jittered exponential back-off: 25 ms ...
    retry_backoff_max: float = 0.25  # ... to 250 ms
    # Istio's meshConfig.pathNormalization: applied to each request's path before the request
    # filter (authorization), route matching and forwarding (meshagent.common.pathnorm).
    path_normalization: PathNormalization = DEFAULT_MODE


DEFAULT_SETTINGS = HttpSettings()


@dataclass(frozen=True, slots=True)
class HttpContext:
    """Everything `proxy_http1` needs for one downstream connection.

    `routes` is called per request, so a keep-alive connection follows snapshot changes; it
    returns None when the service port is gone (404, flag NR)."""

    routes: Callable[[], HttpRoutes | None]
    clusters: Clusters
    pool: ConnectionPool
    # How to reach endpoints for this connection's requests (default: the pool's), and the
    # key its pooled connections are shared under: connections opened as one source (with
    # its certificate, after its authorization) must never carry another source's requests.
    connect: Connect | None = None
    pool_key: Hashable = None
    # How to reach endpoints with HTTP/2 (h2c prior knowledge) for the HTTP/1.1 requests of a
    # cluster whose DestinationRule says `h2UpgradePolicy: UPGRADE`; None: never upgraded.
    connect_h2: Connect | None = None
    request_filter: RequestFilter | None = None
    on_request_done: Callable[[RequestRecord], None] | None = None
    peer: str = ""
    # Set on SIGTERM: idle connections close, busy ones after their response.
    drain: Drain | None = None
    settings: HttpSettings = DEFAULT_SETTINGS
    rng: random.Random = field(default_factory=random.Random)
    # Per-source bounds (requests in flight of `source_key`) and the refusal record: a
    # request head not complete in time (408) or not HTTP (400) is counted there too, under
    # `listener` (POD_LISTENER: a pod's connection to 15001; "hbone": HTTP inside a 15008 tunnel),
    # and HTTP/2 abuse in meshagent_http2_abuse_total under the same label.
    limits: Limits | None = None
    source_key: Hashable = None
    listener: str = POD_LISTENER
    # The client workload (a local pod), for `sourceLabels`/`sourceNamespace` route matches;
    # None when unknown (those matches then do not apply).
    source: Workload | None = None
