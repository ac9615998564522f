"""Route tables for the node proxy: what a request or connection to a service port leads to.

What flows through: a Snapshot (services, workloads, accepted VirtualServices and
DestinationRules) is compiled once per snapshot into a RouteTable of plain, immutable objects;
per request the proxy only matches precompiled predicates and picks a weighted destination.

- Every (service hostname, port) gets either HTTP routes (an HTTP/1.1 or HTTP/2 port,
  `port_protocol`) or
  TCP routes. Without a VirtualService the one route leads to the whole service.
- A destination (host, subset, port) becomes a ClusterSpec, as Envoy's clusters: its endpoints
  (a subset keeps the endpoints whose workload carries the subset's labels) and its traffic
  policy (load balancer, connection pool limits, outlier detection), merged as Istio merges
  them: the DestinationRule's policy, replaced by its `portLevelSettings` for the port, then
  each field the subset sets, then the subset's port-level settings.

Istio semantics kept (https://istio.io/latest/docs/reference/config/networking/):
- A short host (`reviews`) is resolved in the namespace of the resource naming it. Unlike Istio
  we also expand `reviews.shop` and `reviews.shop.svc` (Kubernetes DNS forms) rather than take
  them literally. A `*.suffix` host matches by suffix; an exact host wins over a wildcard.
- One VirtualService applies per host (Istio does not merge them for sidecars): the one in the
  service's namespace first, then by (namespace, name). Istio picks the oldest; creation time
  is not in the snapshot. DestinationRules likewise: the service's namespace, then the root
  namespace, then any other. (Istio prefers the client's namespace; a node proxy serves many.)
- `uri.exact` and `uri.regex` match the path without its query string, `uri.prefix` the whole
  request target, as Envoy's path/safe_regex/prefix matchers; a regex is RE2 (google-re2, as
  Envoy's safe_regex) and must match in full. The path is the normalized one: the HTTP engine
  normalizes each request (meshConfig pathNormalization, common/pathnorm.py) before matching.
- Retries: with no `retries` a route gets Istio's default policy (2 retries on connect-failure,
  refused-stream and status 503); `attempts: 0` disables retries; `attempts` counts retries,
  so a request is tried at most attempts + 1 times. No default timeout.
- Fault `percentage` unset means no request is faulted (as Istio documents).
- An HTTP rule with matches none of which can apply to the port (`match[].port`) is dropped for
  that port; requests no rule matches get 404 (flag NR).
- `sourceLabels`/`sourceNamespace` are per-request (HTTP) or per-connection (TCP) conditions on
  the client workload, checked by the source node's proxy, which knows its local workloads.
  Istio prunes such entries per sidecar instead; the outcome is the same. A client that is not
  a known workload (e.g. a host process) matches no entry that names a source.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from meshagent.agent.proxy.route_actions import Cors, HeaderOps, Mirror, Redirect, Rewrite
from meshagent.common import locality
from meshagent.common.istio import networking as net
from meshagent.common.istio.delegation import merge_delegates
from meshagent.common.istio.resource import ResourceError, parse_resource
from meshagent.common.istio.support import CLUSTER_DOMAIN, resolve_host
from meshagent.common.snapshot import Endpoint, Service, ServicePort, Snapshot, Workload

log = logging.getLogger(__name__)

DEFAULT_DOMAIN = CLUSTER_DOMAIN
DEFAULT_ROOT_NAMESPACE = "istio-system"

LbAlgorithm = Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"]

# Istio's defaults when a DestinationRule leaves a setting out.
DEFAULT_LB: LbAlgorithm = "LEAST_REQUEST"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_CONSECUTIVE_5XX = 5
DEFAULT_OUTLIER_INTERVAL = 10.0
DEFAULT_BASE_EJECTION_TIME = 30.0
DEFAULT_MAX_EJECTION_PERCENT = 10
# Istio's default retry policy (pilot/pkg/networking/core/route/retry): 2 retries on
# connect-failure, refused-stream and retriable status 503, preferring untried hosts.
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_RETRY_STATUS = frozenset({503})


Protocol = Literal["http1", "http2", "tcp"]

# Istio's protocol names (appProtocol or the port name's prefix) that we serve at L7.
# `grpc-web` is HTTP/1.1 from browsers (an HTTP/2 client is still recognised by its preface).
_HTTP1_NAMES = frozenset({"http", "grpc-web"})
_HTTP2_NAMES = frozenset({"http2", "grpc", "h2c", "kubernetes.io/h2c"})
_TLS_NAMES = frozenset({"tls", "https"})


def port_protocol(port: ServicePort) -> Protocol:
    """The protocol of a Service port, as Istio selects it: `appProtocol` when set, else the
    port name `<protocol>` or `<protocol>-<suffix>` (case-insensitive).

    - `http`, `grpc-web` -> "http1": the HTTP/1.1 engine; a client that opens with the
      HTTP/2 preface is served by the HTTP/2 engine instead (Envoy's codec auto-detection)
      and its requests go upstream as HTTP/2 (Istio's `useClientProtocol`).
    - `http2`, `grpc`, `h2c` (appProtocol also `kubernetes.io/h2c`) -> "http2": h2c with
      prior knowledge, per-request balancing, routing and policy.
    - anything else (`tcp`, `tls`, `https`, `mongo`, `mysql`, ..., UDP/SCTP ports) and
      unnamed ports -> "tcp": bytes relayed. Unlike Istio we do not sniff unnamed ports:
      nothing waits for the client's first bytes, so a server-first protocol (an SMTP or
      MySQL banner) arrives at once, as over plain TCP. Name the port to get L7.
    """
    if port.protocol != "TCP":
        return "tcp"
    if port.app_protocol is not None:
        name = port.app_protocol.lower()
    else:
        name = port.name.lower().partition("-")[0]
        if name == "grpc" and port.name.lower().startswith("grpc-web"):
            name = "grpc-web"
    if name in _HTTP1_NAMES:
        return "http1"
    if name in _HTTP2_NAMES:
        return "http2"
    return "tcp"


def is_http_port(port: ServicePort) -> bool:
    """True for a port served at L7 (HTTP/1.1 or HTTP/2, `port_protocol`)."""
    return port_protocol(port) != "tcp"


def is_tls_port(port: ServicePort) -> bool:
    """True for a port whose clients speak TLS the mesh does not terminate (`tls`, `https` by
    appProtocol or name prefix): where `tls` routes choose by SNI, as Istio applies them."""
    name = port.app_protocol or port.name.partition("-")[0]
    return port.protocol == "TCP" and name.lower() in _TLS_NAMES


def _host_matches(pattern: str, hostname: str) -> bool:
    return hostname.endswith(pattern[1:]) if pattern.startswith("*") else pattern == hostname


# ---------------------------------------------------------------------------------------------
# Clusters: a destination (service port, optional subset) with its endpoints and policy.


class ClusterKey(NamedTuple):
    hostname: str
    port: int
    subset: str = ""

    @property
    def name(self) -> str:
        """Envoy's cluster name, as Istio spells it (for logs and metrics)."""
        return f"outbound|{self.port}|{self.subset}|{self.hostname}"


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_5xx: int = DEFAULT_CONSECUTIVE_5XX  # 0 disables
    consecutive_gateway: int = 0  # 0 disables
    interval: float = DEFAULT_OUTLIER_INTERVAL
    base_ejection_time: float = DEFAULT_BASE_EJECTION_TIME
    max_ejection_percent: int = DEFAULT_MAX_EJECTION_PERCENT


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """`loadBalancer.consistentHash`: what a request (or a connection) is hashed on to stick
    to one endpoint (agent/proxy/lb.py). `kind` "cookie" with a `ttl` makes the proxy set
    the cookie when a request lacks it, as Envoy does."""

    kind: Literal["header", "cookie", "source_ip", "query"]
    name: str = ""  # the header (lower-case), cookie or query parameter
    ttl: float | None = None
    path: str | None = None

    @classmethod
    def of(cls, ch: net.ConsistentHashLB) -> HashPolicy:
        if ch.http_header_name is not None:
            return cls("header", ch.http_header_name)
        if ch.http_cookie is not None:
            cookie = ch.http_cookie
            return cls("cookie", cookie.name, cookie.ttl, cookie.path)
        if ch.http_query_parameter_name is not None:
            return cls("query", ch.http_query_parameter_name)
        return cls("source_ip")


@dataclass(frozen=True, slots=True)
class Keepalive:
    """`connectionPool.tcp.tcpKeepalive`: None fields keep the kernel's defaults."""

    time: int | None = None  # TCP_KEEPIDLE, s
    interval: int | None = None  # TCP_KEEPINTVL, s
    probes: int | None = None  # TCP_KEEPCNT

    @classmethod
    def of(cls, ka: net.TcpKeepalive) -> Keepalive:
        def whole(seconds: float | None) -> int | None:
            return None if seconds is None else int(seconds)

        return cls(whole(ka.time), whole(ka.interval), ka.probes)


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """The effective DestinationRule policy of one cluster; None means unlimited."""

    lb: LbAlgorithm = DEFAULT_LB
    hash: HashPolicy | None = None  # consistentHash; `lb` is then RANDOM, for unhashed picks
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_requests: int | None = None  # `http.http2MaxRequests`: requests in flight
    max_retries: int | None = None  # `http.maxRetries`: retries in flight
    outlier: OutlierPolicy | None = None
    # DestinationRule `tls`; None or ISTIO_MUTUAL: the mesh's own (HBONE to meshed pods)
    tls: net.ClientTLSSettings | None = None
    keepalive: Keepalive | None = None  # `tcp.tcpKeepalive`, on sockets dialled directly
    # `tcp.idleTimeout` (L4 relays) and `http.idleTimeout` (pooled HTTP/1.1 connections):
    # seconds, math.inf when 0s turned them off; None: the agent's own default
    tcp_idle_timeout: float | None = None
    http_idle_timeout: float | None = None
    locality: net.LocalityLbSetting | None = None  # `loadBalancer.localityLbSetting`
    # `http.h2UpgradePolicy: UPGRADE` (without useClientProtocol true): the HTTP/1.1 engine
    # sends the cluster's requests to the endpoint as HTTP/2 (h2c prior knowledge)
    h2_upgrade: bool = False


DEFAULT_POLICY = TrafficPolicy()


# The endpoint address of a service whose endpoint is where each client dialled (a
# ServiceEntry with resolution NONE: Envoy's ORIGINAL_DST): proxy/outbound.py dial_address
# puts the connection's original destination in its place.
ORIGINAL_DESTINATION = ""


class UpstreamEndpoint(NamedTuple):
    endpoint: Endpoint
    port: int  # the pod's port

    @property
    def address(self) -> str:
        return f"{self.endpoint.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    key: ClusterKey
    endpoints: tuple[UpstreamEndpoint, ...]
    policy: TrafficPolicy = DEFAULT_POLICY
    # Locality balancing (common/locality.py), per endpoint when it applies, else ():
    # the failover priority, or the endpoint's locality and that locality's traffic share
    priorities: tuple[int, ...] = ()
    localities: tuple[str, ...] = ()
    shares: tuple[float, ...] = ()
    # Envoy's cluster name (key.name), formatted once: every request records it
    name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.key.name)


# ---------------------------------------------------------------------------------------------
# HTTP and TCP routes.


class DestinationHeaders(NamedTuple):
    """A destination's own `headers` operations (request, response)."""

    request: HeaderOps | None = None
    response: HeaderOps | None = None


NO_HEADERS = DestinationHeaders()


@dataclass(frozen=True, slots=True)
class WeightedClusters:
    """Destinations of one route; `pick` chooses by weight. A None cluster is a destination
    that names no known service port (requests routed there get 503, flag NC). `headers`,
    when given, holds each destination's header operations (same order as `clusters`)."""

    clusters: tuple[ClusterSpec | None, ...]
    cumulative: tuple[int, ...]
    headers: tuple[DestinationHeaders, ...] = ()

    @classmethod
    def of(
        cls,
        weighted: Sequence[tuple[ClusterSpec | None, int]],
        headers: Sequence[DestinationHeaders] = (),
    ) -> WeightedClusters:
        clusters, cumulative, kept, total = [], [], [], 0
        for i, (cluster, weight) in enumerate(weighted):
            if weight <= 0:
                continue
            total += weight
            clusters.append(cluster)
            cumulative.append(total)
            kept.append(headers[i] if headers else NO_HEADERS)
        with_headers = tuple(kept) if any(h != NO_HEADERS for h in kept) else ()
        return cls(tuple(clusters), tuple(cumulative), with_headers)

    def pick_index(self, rand: Callable[[], float] = random.random) -> int | None:
        if len(self.clusters) == 1:
            return 0
        if not self.clusters:
            return None
        return bisect_right(self.cumulative, rand() * self.cumulative[-1])

    def pick(self, rand: Callable[[], float] = random.random) -> ClusterSpec | None:
        index = self.pick_index(rand)
        return None if index is None else self.clusters[index]

    def headers_of(self, index: int) -> DestinationHeaders:
        return self.headers[index] if self.headers else NO_HEADERS


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try a request again, on another endpoint; `attempts` counts retries."""

    attempts: int = DEFAULT_RETRY_ATTEMPTS
    per_try_timeout: float | None = None
    on_5xx: bool = False
    on_gateway_error: bool = False
    on_connect_failure: bool = True
    on_reset: bool = False
    on_refused_stream: bool = True  # an HTTP/2 REFUSED_STREAM reset (Istio's default has it)
    status_codes: frozenset[int] = DEFAULT_RETRY_STATUS
    grpc_codes: frozenset[int] = frozenset()  # gRPC statuses retried (HTTP/2 engine)


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    delay: float | None = None
    delay_percent: float = 0.0
    abort_status: int | None = None
    abort_percent: float = 0.0
    abort_grpc_status: int | None = None  # a gRPC abort: this status, trailers-only


Matcher = Callable[[str], bool]


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _string_matcher(match: net.StringMatch, ignore_case: bool = False) -> Matcher:
    """`ignore_case`: ASCII case ignored by exact and prefix matches (Envoy's
    case_sensitive: false), never by a regex."""
    if ignore_case and (match.exact is not None or match.prefix is not None):
        text = (match.exact if match.exact is not None else match.prefix or "").translate(
            _ASCII_LOWER
        )
        if match.exact is not None:
            return lambda value: value.translate(_ASCII_LOWER) == text
        return lambda value: value[: len(text)].translate(_ASCII_LOWER) == text
    if match.exact is not None:
        return match.exact.__eq__
    if match.prefix is not None:
        prefix = match.prefix
        return lambda value: value.startswith(prefix)
    assert match.regex is not None
    rx = net.compile_regex(match.regex)  # RE2, as Envoy's safe_regex
    return lambda value: rx.fullmatch(value) is not None


def _path_only(target: str) -> str:
    cut = target.find("?")
    return target if cut < 0 else target[:cut]


@dataclass(frozen=True, slots=True)
class SourceMatch:
    """A match entry's `sourceLabels` and `sourceNamespace`: conditions on the client workload,
    which the source node's proxy knows (its local workloads). A client that is not a known
    workload (None) matches none, as Istio applies them only to its own proxies."""

    labels: tuple[tuple[str, str], ...] = ()
    namespace: str | None = None

    @classmethod
    def compile(
        cls, m: net.HTTPMatchRequest | net.L4MatchAttributes | net.TLSMatchAttributes
    ) -> SourceMatch | None:
        if not m.source_labels and m.source_namespace is None:
            return None
        return cls(tuple(sorted(m.source_labels.items())), m.source_namespace)

    def __call__(self, source: Workload | None) -> bool:
        if source is None:
            return False
        if self.namespace is not None and source.namespace != self.namespace:
            return False
        return all(source.labels.get(k) == v for k, v in self.labels)


@dataclass(frozen=True, slots=True)
class RequestMatch:
    """One `match[]` entry; every condition given must hold."""

    uri: Matcher | None = None
    uri_ignores_query: bool = True
    method: Matcher | None = None
    headers: tuple[tuple[str, Matcher], ...] = ()
    # What `rewrite.uri` replaces: the `uri.prefix` ("/" without a uri match, as Envoy's
    # catch-all prefix route), None for an exact or regex match (the whole path).
    rewrite_prefix: str | None = "/"
    source: SourceMatch | None = None

    @classmethod
    def compile(cls, m: net.HTTPMatchRequest) -> RequestMatch:
        return cls(
            uri=_string_matcher(m.uri, m.ignore_uri_case) if m.uri else None,
            uri_ignores_query=m.uri is None or m.uri.prefix is None,
            method=_string_matcher(m.method) if m.method else None,
            headers=tuple((name, _string_matcher(sm)) for name, sm in m.headers.items()),
            rewrite_prefix=m.uri.prefix if m.uri else "/",
            source=SourceMatch.compile(m),
        )

    def __call__(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        source: Workload | None = None,
    ) -> bool:
        if self.source is not None and not self.source(source):
            return False
        if self.uri is not None and not self.uri(
            _path_only(target) if self.uri_ignores_query else target
        ):
            return False
        if self.method is not None and not self.method(method):
            return False
        for name, matcher in self.headers:
            value = headers.get(name)
            if value is None or not matcher(value):
                return False
        return True


@dataclass(frozen=True, slots=True)
class HttpRoute:
    name: str
    matches: tuple[RequestMatch, ...]  # empty: every request
    destinations: WeightedClusters
    timeout: float | None = None
    retry: RetryPolicy | None = DEFAULT_RETRY
    fault: FaultPolicy | None = None
    # What the rule does besides choosing a destination (agent/proxy/route_actions.py).
    redirect: Redirect | None = None
    direct_response: tuple[int, bytes] | None = None  # (status, body) the proxy answers
    rewrite: Rewrite | None = None
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    mirrors: tuple[Mirror, ...] = ()
    cors: Cors | None = None

    def matching_entry(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        source: Workload | None = None,
    ) -> RequestMatch | None:
        """The first `match[]` entry the request from `source` meets (`CATCH_ALL` for a route
        without any), None if it meets none. Its `rewrite_prefix` is what `rewrite.uri`
        replaces in this request."""
        if not self.matches:
            return CATCH_ALL
        for m in self.matches:
            if m(method, target, headers, source):
                return m
        return None


CATCH_ALL = RequestMatch()  # a route without `match[]`: every request, "/" rewritten


@dataclass(frozen=True, slots=True)
class HttpRoutes:
    """The HTTP routes of one service port, first match wins."""

    hostname: str
    port: int
    routes: tuple[HttpRoute, ...]
    source: str = ""  # "namespace/name" of the VirtualService, "" for the default route
    uses_headers: bool = False  # whether matching needs the request's headers

    def match(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        source: Workload | None = None,
    ) -> HttpRoute | None:
        """The first route matching the request from `source` (the client workload)."""
        for route in self.routes:
            if route.matching_entry(method, target, headers, source) is not None:
                return route
        return None


@dataclass(frozen=True, slots=True)
class TcpRoutes:
    """Where connections to one L4 service port go (the first `tcp[]` rule for the port).
    `by_source`: the rules before it whose every entry for the port names the client
    (`sourceLabels`/`sourceNamespace`), in order, with the entries; `destinations_for` picks."""

    hostname: str
    port: int
    destinations: WeightedClusters
    source: str = ""
    by_source: tuple[tuple[tuple[SourceMatch, ...], WeightedClusters], ...] = ()

    def destinations_for(self, source: Workload | None) -> WeightedClusters:
        for entries, dests in self.by_source:
            if any(m(source) for m in entries):
                return dests
        return self.destinations


@dataclass(frozen=True, slots=True)
class TlsMatch:
    """One `tls[].match[]` entry for a port: the SNI patterns and the client conditions."""

    sni_hosts: tuple[str, ...]
    source: SourceMatch | None

    def __call__(self, sni: str, source: Workload | None) -> bool:
        return any(_host_matches(p, sni) for p in self.sni_hosts) and (
            self.source is None or self.source(source)
        )


@dataclass(frozen=True, slots=True)
class TlsRoutes:
    """Where TLS connections to one `tls`/`https` service port go by their ClientHello's SNI
    (`tls[]` rules in order, the first whose entry matches); a connection none matches (no
    SNI, or not TLS) goes where the port's TCP routes send it, as Envoy's default filter
    chain does."""

    hostname: str
    port: int
    rules: tuple[tuple[tuple[TlsMatch, ...], WeightedClusters], ...]
    source: str = ""

    def destinations_for(self, sni: str | None, source: Workload | None) -> WeightedClusters | None:
        if sni is None:
            return None
        sni = sni.lower()
        for entries, dests in self.rules:
            if any(m(sni, source) for m in entries):
                return dests
        return None


@dataclass(frozen=True)
class RouteTable:
    http: dict[tuple[str, int], HttpRoutes] = field(default_factory=dict)
    tcp: dict[tuple[str, int], TcpRoutes] = field(default_factory=dict)
    tls: dict[tuple[str, int], TlsRoutes] = field(default_factory=dict)
    clusters: dict[ClusterKey, ClusterSpec] = field(default_factory=dict)
    # References that lead nowhere (unknown host, subset or port), for logs and status.
    problems: tuple[str, ...] = ()

    def http_routes(self, hostname: str, port: int) -> HttpRoutes | None:
        return self.http.get((hostname, port))

    def tcp_routes(self, hostname: str, port: int) -> TcpRoutes | None:
        return self.tcp.get((hostname, port))

    def tls_routes(self, hostname: str, port: int) -> TlsRoutes | None:
        return self.tls.get((hostname, port))


def single_endpoint_routes(
    hostname: str,
    port: int,
    endpoint: Endpoint,
    pod_port: int,
    *,
    policy: TrafficPolicy = DEFAULT_POLICY,
) -> HttpRoutes:
    """Routes that send every request to one endpoint, without retries or timeout: what the
    destination proxy uses to run the HTTP engine in front of a local pod."""
    spec = ClusterSpec(
        ClusterKey(hostname, port, f"inbound:{endpoint.ip}:{pod_port}"),
        (UpstreamEndpoint(endpoint, pod_port),),
        policy,
    )
    route = HttpRoute("inbound", (), WeightedClusters.of([(spec, 1)]), retry=None)
    return HttpRoutes(hostname, port, (route,))


# ---------------------------------------------------------------------------------------------
# Compilation.


def _policy_components(
    tp: net._Policies | None,
) -> tuple[
    net.LoadBalancerSettings | None,
    net.ConnectionPoolSettings | None,
    net.OutlierDetection | None,
    net.ClientTLSSettings | None,
]:
    if tp is None:
        return None, None, None, None
    return tp.load_balancer, tp.connection_pool, tp.outlier_detection, tp.tls


def _port_level(tp: net.TrafficPolicy | None, port: int) -> net.PortTrafficPolicy | None:
    if tp is None:
        return None
    return next((p for p in tp.port_level_settings if p.port.number == port), None)


def merge_policy(
    top: net.TrafficPolicy | None, subset: net.TrafficPolicy | None, port: int
) -> TrafficPolicy:
    """Istio's MergeTrafficPolicy for one port: port-level settings replace the four
    policies whole (they do not inherit), a subset's fields replace the rule's."""
    level = _port_level(top, port)
    lb, pool, outlier, tls = _policy_components(level if level is not None else top)
    if subset is not None:
        sub_level = _port_level(subset, port)
        if sub_level is not None:
            lb, pool, outlier, tls = _policy_components(sub_level)
        else:
            lb = subset.load_balancer or lb
            pool = subset.connection_pool or pool
            outlier = subset.outlier_detection or outlier
            tls = subset.tls or tls
    return _to_policy(lb, pool, outlier, tls)


def _positive(value: int | None) -> int | None:
    return value if value else None  # Istio: 0 or unset means the (unlimited) default


def _to_policy(
    lb: net.LoadBalancerSettings | None,
    pool: net.ConnectionPoolSettings | None,
    outlier: net.OutlierDetection | None,
    tls: net.ClientTLSSettings | None = None,
) -> TrafficPolicy:
    tcp = pool.tcp if pool else None
    http = pool.http if pool else None
    od = None
    if outlier is not None:
        od = OutlierPolicy(
            consecutive_5xx=DEFAULT_CONSECUTIVE_5XX
            if outlier.consecutive_5xx_errors is None
            else outlier.consecutive_5xx_errors,
            consecutive_gateway=outlier.consecutive_gateway_errors or 0,
            interval=outlier.interval or DEFAULT_OUTLIER_INTERVAL,
            base_ejection_time=outlier.base_ejection_time or DEFAULT_BASE_EJECTION_TIME,
            max_ejection_percent=DEFAULT_MAX_EJECTION_PERCENT
            if outlier.max_ejection_percent is None
            else outlier.max_ejection_percent,
        )
    return TrafficPolicy(
        # Envoy's ring: random when no key
        lb=lb.simple or ("RANDOM" if lb.consistent_hash else DEFAULT_LB) if lb else DEFAULT_LB,
        hash=HashPolicy.of(lb.consistent_hash) if lb and lb.consistent_hash else None,
        connect_timeout=(tcp.connect_timeout if tcp else None) or DEFAULT_CONNECT_TIMEOUT,
        max_connections=_positive(tcp.max_connections if tcp else None),
        max_pending_requests=_positive(http.http1_max_pending_requests if http else None),
        max_requests_per_connection=_positive(http.max_requests_per_connection if http else None),
        max_requests=_positive(http.http2_max_requests if http else None),
        max_retries=_positive(http.max_retries if http else None),
        outlier=od,
        tls=None if tls is None or tls.mode == "ISTIO_MUTUAL" else tls,
        keepalive=Keepalive.of(tcp.tcp_keepalive) if tcp and tcp.tcp_keepalive else None,
        tcp_idle_timeout=_idle(tcp.idle_timeout if tcp else None),
        http_idle_timeout=_idle(http.idle_timeout if http else None),
        locality=lb.locality_lb_setting if lb else None,
        h2_upgrade=http.h2_upgrade if http else False,
    )


def _idle(seconds: float | None) -> float | None:
    return None if seconds is None else (seconds or math.inf)  # Istio: 0s means never


_GRPC_RETRY_ON = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}


def _retry_policy(retries: net.HTTPRetry | None) -> RetryPolicy | None:
    """Istio's ConvertPolicy: the default, overridden by what the VirtualService sets."""
    if retries is None:
        return DEFAULT_RETRY
    if retries.attempts <= 0:
        return None
    policy = RetryPolicy(attempts=retries.attempts, per_try_timeout=retries.per_try_timeout)
    if not retries.retry_on:
        return policy
    on = set(retries.retry_on)
    return RetryPolicy(
        attempts=retries.attempts,
        per_try_timeout=retries.per_try_timeout,
        on_5xx="5xx" in on,
        on_gateway_error="gateway-error" in on,
        on_connect_failure="connect-failure" in on,
        on_reset="reset" in on,
        on_refused_stream="refused-stream" in on,
        status_codes=retries.retriable_status_codes,
        grpc_codes=frozenset(code for name, code in _GRPC_RETRY_ON.items() if name in on),
    )


def _fault_policy(fault: net.HTTPFaultInjection | None) -> FaultPolicy | None:
    if fault is None:
        return None
    delay, abort = fault.delay, fault.abort
    return FaultPolicy(
        delay=delay.fixed_delay if delay else None,
        delay_percent=delay.percentage.value if delay and delay.percentage else 0.0,
        abort_status=(abort.http_status or 200) if abort else None,
        abort_percent=abort.percentage.value if abort and abort.percentage else 0.0,
        abort_grpc_status=abort.grpc_code if abort else None,
    )


def _direct(direct: net.HTTPDirectResponse | None) -> tuple[int, bytes] | None:
    if direct is None:
        return None
    return direct.status, direct.body.content if direct.body is not None else b""


def _cors(policy: net.CorsPolicy | None) -> Cors | None:
    if policy is None:
        return None
    return Cors.of(policy, tuple(_string_matcher(m) for m in policy.origins))


def _ordered(resources: Iterable, preferred: Sequence[str]) -> list:
    rank = {ns: i for i, ns in enumerate(preferred)}
    return sorted(resources, key=lambda r: (rank.get(r.namespace, len(rank)), r.namespace, r.name))


@dataclass(frozen=True)
class ReusableClusters:
    """The clusters of a previous compile that the next one may take as they are, for the
    Services that are the same objects as then (the agent's next view keeps an unchanged
    item's model: agent/helddoc.py). The caller vouches that nothing else a cluster reads
    changed: the Istio resources and the nodes (localities); ``workloads_same`` says whether
    the workloads did too (a subset selects endpoints by their pods' labels, and so does a
    failover priority by label)."""

    routes: RouteTable
    services: Mapping[str, Service]  # hostname -> the Service the clusters were made of
    workloads_same: bool


class _Compiler:
    def __init__(
        self,
        snap: Snapshot,
        root_namespace: str,
        domain: str,
        reuse: ReusableClusters | None = None,
    ) -> None:
        self.root_namespace = root_namespace
        self.domain = domain
        self.reuse = reuse
        self.services = {svc.hostname: svc for svc in snap.services}
        self.node_localities = {n.name: n.locality for n in snap.nodes}
        self.node = snap.node
        self.own_locality = self.node_localities.get(snap.node, "")
        self.snap = snap
        self.virtual_services: list[net.VirtualService] = []
        self.destination_rules: list[net.DestinationRule] = []
        self.entry_hosts = entry_hosts = snap.entry_hosts()
        for doc in snap.istio_resources:
            try:
                res = parse_resource(doc, entry_hosts=entry_hosts)
            except ResourceError as exc:  # the controller validated it; keep serving the rest
                log.warning("ignoring invalid Istio resource: %s", exc)
                continue
            if isinstance(res, net.VirtualService):
                self.virtual_services.append(res)
            elif isinstance(res, net.DestinationRule):
                self.destination_rules.append(res)
        self.clusters: dict[ClusterKey, ClusterSpec] = {}
        self.virtual_services, self.problems = merge_delegates(self.virtual_services)

    def fqdn(self, host: str, namespace: str) -> str:
        return resolve_host(host, namespace, self.entry_hosts, self.domain)

    def _select(self, hostname: str, candidates: Iterable[tuple[list[str], object]]) -> list:
        """Resources naming `hostname`: exact hosts first, then wildcards by specificity."""
        exact, wild = [], []
        for hosts, res in candidates:
            if hostname in hosts:
                exact.append(res)
                continue
            best = max(
                (len(h) for h in hosts if h.startswith("*") and _host_matches(h, hostname)),
                default=0,
            )
            if best:
                wild.append((best, res))
        if exact:
            return exact
        top = max((n for n, _ in wild), default=0)
        return [res for n, res in wild if n == top]

    def virtual_service(self, svc: Service) -> net.VirtualService | None:
        candidates = [
            ([self.fqdn(h, vs.namespace) for h in vs.spec.hosts], vs)
            for vs in self.virtual_services
        ]
        chosen = _ordered(self._select(svc.hostname, candidates), [svc.namespace])
        if len(chosen) > 1:
            others = ", ".join(vs.ref for vs in chosen[1:])
            self.problems.append(
                f"{svc.hostname}: VirtualService {chosen[0].ref} applies, {others} ignored"
            )
        return chosen[0] if chosen else None

    def destination_rule(self, svc: Service) -> net.DestinationRule | None:
        candidates = [
            ([self.fqdn(dr.spec.host, dr.namespace)], dr) for dr in self.destination_rules
        ]
        chosen = _ordered(
            self._select(svc.hostname, candidates), [svc.namespace, self.root_namespace]
        )
        return chosen[0] if chosen else None

    def cluster(
        self, hostname: str, port: int | None, subset: str, default_port: int, where: str
    ) -> ClusterSpec | None:
        svc = self.services.get(hostname)
        if svc is None:
            self.problems.append(f"{where}: host {hostname} is not a known service")
            return None
        numbers = [p.port for p in svc.ports]
        if port is None:
            if default_port in numbers:
                port = default_port
            elif len(numbers) == 1:
                port = numbers[0]
            else:
                self.problems.append(f"{where}: {hostname} has several ports; name one")
                return None
        elif port not in numbers:
            self.problems.append(f"{where}: {hostname} has no port {port}")
            return None
        key = ClusterKey(hostname, port, subset)
        if key in self.clusters:
            return self.clusters[key]
        if (kept := self._kept(key, svc)) is not None:
            self.clusters[key] = kept
            return kept
        dr = self.destination_rule(svc)
        endpoints = [e for e in svc.endpoints if port in e.ports]
        if svc.original_destination:  # one endpoint: wherever the client dialled
            endpoints = [
                Endpoint(ip=ORIGINAL_DESTINATION, node="", workload_uid="", ports={port: port})
            ]
        subset_policy = None
        if subset:
            sub = next((s for s in dr.spec.subsets if s.name == subset), None) if dr else None
            if sub is None:
                self.problems.append(f"{where}: {hostname} has no subset {subset!r}")
                return None
            endpoints = [e for e in endpoints if self._has_labels(e, sub.labels)]
            subset_policy = sub.traffic_policy
        policy = merge_policy(dr.spec.traffic_policy if dr else None, subset_policy, port)
        upstreams = tuple(UpstreamEndpoint(e, e.ports[port]) for e in endpoints)
        spec = ClusterSpec(key, upstreams, policy, *self._locality_balance(endpoints, policy))
        self.clusters[key] = spec
        return spec

    @functools.cached_property
    def _workloads(self) -> dict[str, Workload]:
        """By uid, made on first use: only subsets and failover priorities by label read
        them (a pass over every workload that most compiles need not make)."""
        return {w.uid: w for w in self.snap.workloads}

    def _kept(self, key: ClusterKey, svc: Service) -> ClusterSpec | None:
        """The previous compile's cluster for ``key`` if it was made of this very Service
        (and, for a subset, the workloads did not change either)."""
        reuse = self.reuse
        if reuse is None or reuse.services.get(key.hostname) is not svc:
            return None
        spec = reuse.routes.clusters.get(key)
        if spec is None or reuse.workloads_same:
            return spec
        by_labels = spec.policy.locality is not None and spec.policy.locality.failover_priority
        return None if key.subset or by_labels else spec

    def _locality_balance(
        self, endpoints: Sequence[Endpoint], policy: TrafficPolicy
    ) -> tuple[tuple[int, ...], tuple[str, ...], tuple[float, ...]]:
        where = tuple(self.node_localities.get(e.node, "") for e in endpoints)
        setting, client = policy.locality, self.own_locality
        has_outlier = policy.outlier is not None
        if setting is not None and setting.failover_priority:
            places = tuple(
                locality.Place(e.node, w, self._labels(e))
                for e, w in zip(endpoints, where, strict=True)
            )
            here = locality.Place(self.node, client)
            return locality.label_priorities(here, places, setting, has_outlier), (), ()
        levels = locality.priorities(client, where, setting, has_outlier)
        if levels:
            return levels, (), ()
        shares = locality.shares(client, where, setting)
        if shares:
            return (), where, tuple(shares[w] for w in where)
        return (), (), ()

    def _labels(self, endpoint: Endpoint) -> Mapping[str, str]:
        workload = self._workloads.get(endpoint.workload_uid)
        return workload.labels if workload else {}

    def _has_labels(self, endpoint: Endpoint, labels: Mapping[str, str]) -> bool:
        have = self._labels(endpoint)
        return all(have.get(k) == v for k, v in labels.items())

    def destination(
        self, dest: net.Destination, vs_ns: str, port: int, where: str
    ) -> ClusterSpec | None:
        return self.cluster(
            self.fqdn(dest.host, vs_ns),
            dest.port.number if dest.port else None,
            dest.subset or "",
            port,
            where,
        )

    def destinations(
        self,
        routes: Sequence[net.HTTPRouteDestination | net.RouteDestination],
        vs_ns: str,
        port: int,
        where: str,
    ) -> WeightedClusters:
        weighted, headers = [], []
        for i, rd in enumerate(routes):
            cluster = self.destination(rd.destination, vs_ns, port, f"{where}.route[{i}]")
            weight = rd.weight if rd.weight is not None else (100 if len(routes) == 1 else 0)
            weighted.append((cluster, weight))
            ops = getattr(rd, "headers", None)
            headers.append(
                DestinationHeaders(HeaderOps.of(ops.request), HeaderOps.of(ops.response))
                if ops is not None
                else NO_HEADERS
            )
        return WeightedClusters.of(weighted, headers)

    def mirrors(self, rule: net.HTTPRoute, vs_ns: str, port: int, where: str) -> tuple[Mirror, ...]:
        out = []
        for i, policy in enumerate(rule.mirror_policies):
            cluster = self.destination(policy.destination, vs_ns, port, f"{where}.mirrors[{i}]")
            percent = policy.percentage.value if policy.percentage is not None else 100.0
            out.append(Mirror(cluster, percent))
        return tuple(out)

    def http_routes(self, svc: Service, port: int, vs: net.VirtualService | None) -> HttpRoutes:
        if vs is None or not vs.spec.http:
            default = self.cluster(svc.hostname, port, "", port, svc.hostname)
            route = HttpRoute("default", (), WeightedClusters.of([(default, 100)]))
            return HttpRoutes(svc.hostname, port, (route,))
        routes = []
        for i, rule in enumerate(vs.spec.http):
            entries = [m for m in rule.match if m.port is None or m.port == port]
            if rule.match and not entries:
                continue  # every match names another port
            where = f"VirtualService {vs.ref} http[{i}]"
            routes.append(
                HttpRoute(
                    name=rule.name or f"{vs.ref}#{i}",
                    matches=tuple(RequestMatch.compile(m) for m in entries),
                    destinations=self.destinations(rule.route, vs.namespace, port, where),
                    timeout=rule.timeout,
                    retry=_retry_policy(rule.retries),
                    fault=_fault_policy(rule.fault),
                    redirect=Redirect.of(rule.redirect),
                    direct_response=_direct(rule.direct_response),
                    rewrite=Rewrite.of(rule.rewrite),
                    request_headers=HeaderOps.of(rule.headers.request if rule.headers else None),
                    response_headers=HeaderOps.of(rule.headers.response if rule.headers else None),
                    mirrors=self.mirrors(rule, vs.namespace, port, where),
                    cors=_cors(rule.cors_policy),
                )
            )
        uses_headers = any(m.headers for r in routes for m in r.matches)
        return HttpRoutes(svc.hostname, port, tuple(routes), vs.ref, uses_headers)

    def tcp_routes(self, svc: Service, port: int, vs: net.VirtualService | None) -> TcpRoutes:
        by_source: list[tuple[tuple[SourceMatch, ...], WeightedClusters]] = []
        for i, rule in enumerate(vs.spec.tcp if vs else ()):
            entries = [m for m in rule.match if m.port in (None, port)]
            if rule.match and not entries:
                continue
            where = f"VirtualService {vs.ref} tcp[{i}]"
            dests = self.destinations(rule.route, vs.namespace, port, where)
            sources = [SourceMatch.compile(m) for m in entries]
            if not entries or None in sources:  # some entry holds for every client
                return TcpRoutes(svc.hostname, port, dests, vs.ref, tuple(by_source))
            by_source.append((tuple(s for s in sources if s is not None), dests))
        default = self.cluster(svc.hostname, port, "", port, svc.hostname)
        ref = vs.ref if by_source and vs else ""
        return TcpRoutes(
            svc.hostname, port, WeightedClusters.of([(default, 100)]), ref, tuple(by_source)
        )

    def tls_routes(
        self, svc: Service, port: int, vs: net.VirtualService | None
    ) -> TlsRoutes | None:
        rules: list[tuple[tuple[TlsMatch, ...], WeightedClusters]] = []
        for i, rule in enumerate(vs.spec.tls if vs else ()):
            entries = tuple(
                TlsMatch(m.sni_hosts, SourceMatch.compile(m))
                for m in rule.match
                if m.port in (None, port)
            )
            if entries:
                where = f"VirtualService {vs.ref} tls[{i}]"
                rules.append((entries, self.destinations(rule.route, vs.namespace, port, where)))
        return TlsRoutes(svc.hostname, port, tuple(rules), vs.ref) if rules and vs else None


def compile_routes(
    snap: Snapshot,
    *,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    domain: str = DEFAULT_DOMAIN,
    reuse: ReusableClusters | None = None,
) -> RouteTable:
    """Compile a snapshot's services and Istio routing resources into a RouteTable.

    Never raises for a reference that leads nowhere (unknown host, subset or port): that
    destination answers 503 (NC) and the reason is listed in `RouteTable.problems`. With
    ``reuse``, the clusters of unchanged Services are taken from the previous compile
    (a Service of 3,000 endpoints costs its endpoints once, not on every delta)."""
    c = _Compiler(snap, root_namespace, domain, reuse)
    http: dict[tuple[str, int], HttpRoutes] = {}
    tcp: dict[tuple[str, int], TcpRoutes] = {}
    tls: dict[tuple[str, int], TlsRoutes] = {}
    for svc in snap.services:
        vs = c.virtual_service(svc)
        for port in svc.ports:
            if port.protocol != "TCP":
                continue
            key = (svc.hostname, port.port)
            protocol = port_protocol(port)
            if protocol != "tcp":
                http[key] = c.http_routes(svc, port.port, vs)
            # every port has TCP routes: HTTP/2 ports for non-HTTP/2 clients, HTTP/1.1 ports
            # for the `l4` and `observe` levels, which relay (issue 18)
            tcp[key] = c.tcp_routes(svc, port.port, vs)
            tls_routes = c.tls_routes(svc, port.port, vs) if is_tls_port(port) else None
            if tls_routes is not None:
                tls[key] = tls_routes
    return RouteTable(http, tcp, tls, c.clusters, tuple(c.problems))
