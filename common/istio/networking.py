"""Schemas for `networking.istio.io` resources: VirtualService and DestinationRule.

Wire documents flow in; validated, immutable models flow out to the controller's route and
destination-policy compiler. Only the documented subset is accepted (mesh-internal HTTP and TCP
routing, retries, timeouts, fault injection, load balancing, connection pools, outlier
detection); any other field is an error naming it. The checks Istio's webhook makes on these
fields (weights summing to 100, regexes compiling, durations of at least 1ms, ...) are
repeated so that what Istio refuses is refused here too. Durations become float seconds.

Regexes (`uri`, `method` and header `regex`) are RE2, as Istio documents them and Envoy's
`safe_regex` runs them: compiled here with google-re2 (`compile_regex`), the same engine the
proxy matches with, so a pattern RE2 refuses (lookahead/lookbehind, backreferences, possessive
quantifiers, ...) is a validation error with its field path, never a surprise at match time.
RE2's semantics hold: the Perl classes (`\\d`, `\\w`, `\\s`) and `\\b` are ASCII-only, `.` does not
match a newline, and a match must cover the whole value (as Envoy's full match).

Reference: https://istio.io/latest/docs/reference/config/networking/virtual-service/
and https://istio.io/latest/docs/reference/config/networking/destination-rule/
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Annotated, Any, Literal

import re2
from meshagent.common.istio.base import (
    DnsLabel,
    Duration,
    IstioModel,
    IstioResource,
    NonEmptyStr,
    Percent,
    Port,
    parse_duration,
)
from pydantic import (
    AfterValidator,
    Base64Bytes,
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

NETWORKING_API_VERSIONS = frozenset(
    {"networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"}
)
RETRY_ON_CONDITIONS = frozenset(
    {
        "5xx",
        "gateway-error",
        "connect-failure",
        "reset",
        "retriable-status-codes",
        "refused-stream",
        # gRPC status codes of a response (trailers-only), as Envoy's x-envoy-retry-grpc-on
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
LoadBalancer = Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"]

_MAX_REGEX_LENGTH = 1024  # Istio's limit on the pattern's length
# RE2's "program size" limit Istio's bootstrap gives Envoy (runtime
# re2.max_program_size.error_level; Envoy's own default is 100).
MAX_REGEX_PROGRAM_SIZE = 32768
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # errors are raised (and reported), not printed by RE2
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_WEIGHT_TOTAL = 100


def compile_regex(value: str) -> Any:
    """Compile `value` as RE2 (google-re2), as Envoy's safe_regex does; match with
    `.fullmatch(text)`. Raises ValueError saying what RE2 refused."""
    try:
        compiled = re2.compile(value, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "refused"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(
            f"invalid regex {value!r}: {reason} (regexes are RE2: no lookahead, lookbehind "
            "or backreferences; see https://github.com/google/re2/wiki/Syntax)"
        ) from None
    if compiled.programsize > MAX_REGEX_PROGRAM_SIZE:
        raise ValueError(
            f"regex {value!r} is too complex (RE2 program size {compiled.programsize}, "
            f"at most {MAX_REGEX_PROGRAM_SIZE})"
        )
    return compiled


def _compile_regex(value: str) -> str:
    if not value:
        raise ValueError("regex must not be empty")
    if len(value) > _MAX_REGEX_LENGTH:
        raise ValueError(f"regex is too long ({len(value)} characters, at most 1024)")
    compile_regex(value)
    return value


def _header_name(value: str) -> str:
    if not _HEADER_NAME_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value.lower()


def _host(value: str) -> str:
    if value == "*":
        raise ValueError("host '*' is not supported by meshagent yet: name the service host")
    return value


def _is_status_code(entry: str) -> bool:
    if not (entry.isascii() and entry.isdigit()):
        return False
    try:
        HTTPStatus(int(entry))
    except ValueError:
        return False
    return True


def _split_retry_on(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("retryOn must be a comma-separated string, for example '5xx,reset'")
    entries = tuple(entry.strip() for entry in value.split(","))
    for entry in entries:
        if entry not in RETRY_ON_CONDITIONS and not _is_status_code(entry):
            supported = ", ".join(sorted(RETRY_ON_CONDITIONS))
            raise ValueError(
                f"{entry!r} is not a supported retryOn condition "
                f"(supported: {supported}, or an HTTP status code such as 503)"
            )
    return entries


# Header names compare case-insensitively; they are stored lower-cased.
HeaderName = Annotated[str, AfterValidator(_header_name)]
Host = Annotated[NonEmptyStr, AfterValidator(_host)]
Regex = Annotated[str, AfterValidator(_compile_regex)]
# Route weights: an int 0..100 (Istio refuses "50" and 50.5).
Weight = Annotated[int, Field(ge=0, le=100, strict=True)]


class StringMatch(IstioModel):
    """Exactly one of exact, prefix or regex. A regex is RE2 and must match the whole value
    (as Envoy's safe_regex matchers do): compile it with `compile_regex`, use `.fullmatch`."""

    exact: str | None = None
    prefix: str | None = None
    regex: Regex | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StringMatch:
        given = [name for name in ("exact", "prefix", "regex") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of exact, prefix or regex")
        return self


class HTTPMatchRequest(IstioModel):
    """One `http[].match[]` entry: all fields given must match; an empty entry matches all."""

    uri: StringMatch | None = None
    method: StringMatch | None = None
    headers: dict[HeaderName, StringMatch] = {}
    port: Port | None = None
    # ASCII case ignored in `uri` exact and prefix matches (not regex), as Istio documents
    ignore_uri_case: bool = False
    # The client workload's labels (all must be present, equal) and namespace: decided by the
    # source node's proxy, which knows its local workloads (agent/proxy/routing.py)
    source_labels: dict[str, str] = {}
    source_namespace: DnsLabel | None = None


class PortSelector(IstioModel):
    number: Port


class Destination(IstioModel):
    host: Host
    subset: DnsLabel | None = None
    port: PortSelector | None = None


def _check_weights(routes: tuple[Any, ...]) -> tuple[Any, ...]:
    total = sum(route.weight or 0 for route in routes)
    if len(routes) > 1 and total != _WEIGHT_TOTAL:
        raise ValueError(
            f"the weights of the {len(routes)} routes sum to {total}; "
            "with several routes they must sum to 100"
        )
    return routes


# Headers a header operation may not touch: Envoy refuses to manipulate pseudo-headers and
# Host (use `rewrite.authority`), and Istio's webhook refuses them too.
_PROTECTED_HEADERS = frozenset({"host"})


def _operation_name(value: str) -> str:
    name = _header_name(value)
    if name in _PROTECTED_HEADERS:
        raise ValueError(f"header {value!r} cannot be changed by a header operation")
    return name


def _literal_value(value: str) -> str:
    # Envoy reads %...% in these values as its command operators (%DOWNSTREAM_REMOTE_ADDRESS%,
    # ...); meshagent sends values literally, so only the escaped %% is accepted.
    if "%" in value.replace("%%", ""):
        raise ValueError(
            f"header value {value!r} uses Envoy's %VARIABLE% substitution, which is not "
            "supported by meshagent yet (write a literal % as %%)"
        )
    return value.replace("%%", "%")


OperationName = Annotated[str, AfterValidator(_operation_name)]
HeaderValue = Annotated[str, AfterValidator(_literal_value)]


class HeaderOperations(IstioModel):
    """`set` overwrites, `add` appends a value, `remove` drops: applied remove, set, add
    (Envoy removes before it adds)."""

    set: dict[OperationName, HeaderValue] = {}
    add: dict[OperationName, HeaderValue] = {}
    remove: tuple[OperationName, ...] = ()


class Headers(IstioModel):
    """Header operations on the request (before it goes upstream) and on the response."""

    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HTTPRouteDestination(IstioModel):
    destination: Destination
    weight: Weight | None = None
    headers: Headers | None = None


class HTTPRetry(IstioModel):
    """Retry policy; retryOn is split into its conditions (status codes stay strings)."""

    attempts: Annotated[int, Field(ge=0, strict=True)] = 0
    per_try_timeout: Duration | None = None
    retry_on: Annotated[tuple[str, ...], BeforeValidator(_split_retry_on)] = ()

    @model_validator(mode="after")
    def _attempts_enable(self) -> HTTPRetry:
        if self.attempts == 0 and (self.per_try_timeout is not None or self.retry_on):
            raise ValueError(
                "retries are configured but attempts is 0 (retries disabled): set attempts"
            )
        return self

    @property
    def retriable_status_codes(self) -> frozenset[int]:
        """Status codes named in retryOn (Envoy retries on them with retriable-status-codes)."""
        return frozenset(int(entry) for entry in self.retry_on if entry.isdigit())


class FaultPercentage(IstioModel):
    value: Percent


class FaultDelay(IstioModel):
    fixed_delay: Duration
    percentage: FaultPercentage | None = None


# gRPC status names an abort may use (Istio's FaultInjection.Abort.grpcStatus).
GRPC_STATUS_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip


class FaultAbort(IstioModel):
    """`httpStatus`, or `grpcStatus` (a gRPC status name) for gRPC calls: exactly one."""

    http_status: Annotated[int, Field(ge=200, le=599, strict=True)] | None = None
    grpc_status: str | None = None
    percentage: FaultPercentage | None = None

    @model_validator(mode="after")
    def _one_status(self) -> FaultAbort:
        if (self.http_status is None) == (self.grpc_status is None):
            raise ValueError("abort needs exactly one of httpStatus and grpcStatus")
        if self.grpc_status is not None and self.grpc_status not in GRPC_STATUS_CODES:
            raise ValueError(
                f"grpcStatus {self.grpc_status!r} is not a gRPC status name (e.g. UNAVAILABLE)"
            )
        return self

    @property
    def grpc_code(self) -> int | None:
        return None if self.grpc_status is None else GRPC_STATUS_CODES[self.grpc_status]


class HTTPFaultInjection(IstioModel):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _has_fault(self) -> HTTPFaultInjection:
        if self.delay is None and self.abort is None:
            raise ValueError("fault must have a delay, an abort, or both")
        return self


class RegexRewrite(IstioModel):
    """`uriRegexRewrite`: every match of `match` (RE2) in the path is replaced by `rewrite`
    (`\\1` names a group), as Envoy's regex_rewrite."""

    match: Regex
    rewrite: str


class HTTPRewrite(IstioModel):
    uri: NonEmptyStr | None = None
    authority: NonEmptyStr | None = None
    uri_regex_rewrite: RegexRewrite | None = None

    @model_validator(mode="after")
    def _one_way(self) -> HTTPRewrite:
        if self.uri is not None and self.uri_regex_rewrite is not None:
            raise ValueError("rewrite may set uri or uriRegexRewrite, not both")
        if self.uri is None and self.authority is None and self.uri_regex_rewrite is None:
            raise ValueError("rewrite must set uri, authority or uriRegexRewrite")
        return self


# The codes Envoy's redirect action can send (Istio refuses the other 3xx at translation).
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


class HTTPRedirect(IstioModel):
    """Answer with a redirect to the same URL, its parts replaced as given (`uri` replaces the
    whole path, keeping the query string unless it has its own, as Envoy's path_redirect)."""

    uri: NonEmptyStr | None = None
    authority: NonEmptyStr | None = None
    port: Port | None = None
    derive_port: Literal["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"] | None = None
    scheme: Literal["http", "https"] | None = None
    redirect_code: Annotated[int, Field(strict=True)] | None = None

    @model_validator(mode="after")
    def _says_where(self) -> HTTPRedirect:
        if self.port is not None and self.derive_port is not None:
            raise ValueError("redirect may set port or derivePort, not both")
        given = (self.uri, self.authority, self.port, self.derive_port, self.scheme)
        if all(v is None for v in given):
            raise ValueError("redirect must set uri, authority, scheme, port or derivePort")
        code = self.redirect_code
        if code is not None and code not in REDIRECT_CODES:
            raise ValueError(f"redirectCode {code} is not supported (301, 302, 303, 307 or 308)")
        return self


# The methods Istio's webhook accepts in corsPolicy.allowMethods.
CORS_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def _cors_method(value: str) -> str:
    if value not in CORS_METHODS:
        raise ValueError(f"{value!r} is not an HTTP method ({', '.join(sorted(CORS_METHODS))})")
    return value


def _cors_header(value: str) -> str:
    return value if value == "*" else _header_name(value)


def _whole_seconds(value: float) -> float:
    if value != int(value):
        raise ValueError("maxAge is sent in whole seconds: give a whole number of seconds")
    return value


class CorsPolicy(IstioModel):
    """Envoy's CORS filter on the route: a preflight from an allowed origin is answered by the
    proxy; other requests from it get the allow/expose headers on their response."""

    allow_origins: tuple[StringMatch, ...] = ()
    allow_origin: tuple[NonEmptyStr, ...] = ()  # deprecated: exact origins
    allow_methods: tuple[Annotated[str, AfterValidator(_cors_method)], ...] = ()
    allow_headers: tuple[Annotated[str, AfterValidator(_cors_header)], ...] = ()
    expose_headers: tuple[Annotated[str, AfterValidator(_cors_header)], ...] = ()
    max_age: Annotated[Duration, AfterValidator(_whole_seconds)] | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: Literal["UNSPECIFIED", "FORWARD", "IGNORE"] | None = None

    @property
    def origins(self) -> tuple[StringMatch, ...]:
        """Every allowed origin (`allowOrigin` entries as exact matches)."""
        return self.allow_origins + tuple(StringMatch(exact=o) for o in self.allow_origin)


# The largest directResponse body accepted (Istio's webhook refuses bodies over 1 MiB).
MAX_DIRECT_BODY = 1024 * 1024


class HTTPBody(IstioModel):
    string: str | None = None
    bytes_: Base64Bytes | None = Field(None, alias="bytes")

    @model_validator(mode="after")
    def _one(self) -> HTTPBody:
        if (self.string is None) == (self.bytes_ is None):
            raise ValueError("body needs exactly one of string and bytes")
        if len(self.content) > MAX_DIRECT_BODY:
            raise ValueError(f"body is larger than {MAX_DIRECT_BODY} bytes")
        return self

    @property
    def content(self) -> bytes:
        return self.string.encode() if self.string is not None else (self.bytes_ or b"")


class HTTPDirectResponse(IstioModel):
    """Answer with this status and body, as Envoy's direct_response."""

    status: Annotated[int, Field(ge=200, le=599, strict=True)]
    body: HTTPBody | None = None


class HTTPMirrorPolicy(IstioModel):
    """One of `mirrors[]`: a copy of each request (a share of them) to another destination."""

    destination: Destination
    percentage: FaultPercentage | None = None


class Delegate(IstioModel):
    """`http[].delegate`: the VirtualService (one without hosts) whose http rules serve the
    requests this rule matches (common/istio/delegation.py merges them in)."""

    name: NonEmptyStr
    namespace: NonEmptyStr | None = None  # the root's namespace when omitted


class HTTPRoute(IstioModel):
    """One `http[]` rule: the first rule whose match fits the request routes it (`route`),
    answers it (`redirect`, `directResponse`) or hands it to a delegate's rules (`delegate`)."""

    name: str | None = None
    match: tuple[HTTPMatchRequest, ...] = ()
    route: Annotated[tuple[HTTPRouteDestination, ...], AfterValidator(_check_weights)] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    rewrite: HTTPRewrite | None = None
    headers: Headers | None = None
    mirror: Destination | None = None
    mirror_percentage: FaultPercentage | None = None
    mirror_percent: Annotated[int, Field(ge=0, le=100, strict=True)] | None = None
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    cors_policy: CorsPolicy | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    delegate: Delegate | None = None

    @model_validator(mode="after")
    def _route_or_redirect(self) -> HTTPRoute:
        if self.delegate is not None:
            if self.route or self.redirect is not None or self.direct_response is not None:
                raise ValueError(
                    "an http rule with delegate has no route, redirect or directResponse: "
                    "the delegate's rules answer"
                )
        elif self.direct_response is not None:
            if self.route or self.redirect is not None:
                raise ValueError("an http rule has one of route, redirect or directResponse")
            if self.rewrite is not None or self.mirror is not None or self.mirrors:
                raise ValueError(
                    "a directResponse rule cannot rewrite or mirror: nothing is forwarded"
                )
        elif self.redirect is not None:
            if self.route:
                raise ValueError("an http rule has route or redirect, not both")
            if self.rewrite is not None:
                raise ValueError("an http rule has rewrite or redirect, not both")
            if self.mirror is not None or self.mirrors:
                raise ValueError("a redirect rule cannot mirror: nothing is forwarded")
        elif not self.route:
            raise ValueError(
                "an http rule needs route (destinations), redirect, directResponse or delegate"
            )
        if self.mirror is not None and self.mirrors:
            raise ValueError("set mirror or mirrors, not both")
        if self.mirror is None and (
            self.mirror_percentage is not None or self.mirror_percent is not None
        ):
            raise ValueError("mirrorPercentage is set but mirror is not")
        return self

    @property
    def mirror_policies(self) -> tuple[HTTPMirrorPolicy, ...]:
        """`mirrors`, or the single `mirror` as one (Istio: 100 % when no percentage)."""
        if self.mirror is None:
            return self.mirrors
        percent = self.mirror_percentage
        if percent is None and self.mirror_percent is not None:
            percent = FaultPercentage(value=self.mirror_percent)
        return (HTTPMirrorPolicy(destination=self.mirror, percentage=percent),)


class L4MatchAttributes(IstioModel):
    port: Port | None = None
    source_labels: dict[str, str] = {}  # as in HTTPMatchRequest
    source_namespace: DnsLabel | None = None


class RouteDestination(IstioModel):
    destination: Destination
    weight: Weight | None = None


class TCPRoute(IstioModel):
    match: tuple[L4MatchAttributes, ...] = ()
    route: Annotated[tuple[RouteDestination, ...], AfterValidator(_check_weights)] = Field(
        min_length=1
    )


class TLSMatchAttributes(IstioModel):
    """One `tls[].match[]` entry: the ClientHello's SNI is one of `sniHosts` (a `*.` prefix
    matches any name under it) and the other fields given hold."""

    sni_hosts: tuple[Annotated[NonEmptyStr, AfterValidator(str.lower)], ...] = Field(min_length=1)
    port: Port | None = None
    source_labels: dict[str, str] = {}  # as in HTTPMatchRequest
    source_namespace: DnsLabel | None = None


class TLSRoute(IstioModel):
    match: tuple[TLSMatchAttributes, ...] = Field(min_length=1)
    route: Annotated[tuple[RouteDestination, ...], AfterValidator(_check_weights)] = Field(
        min_length=1
    )


def _sni_within(sni: str, host: str) -> bool:
    """Istio's rule for `sniHosts`: each names a subset of one of the VirtualService's hosts
    (host.Name.SubsetOf: equal, or under a `*.` host; a `*.` SNI under a `*.` host)."""
    host = host.lower()
    if host.startswith("*"):
        return sni.endswith(host[1:]) and (not sni.startswith("*") or len(sni) >= len(host))
    return sni == host


def _export_everywhere(value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    # Any narrower exportTo is skipped before validation (common/istio/support.py).
    if value is not None and set(value) != {"*"}:
        raise ValueError(f"exportTo {list(value)} is not supported by meshagent yet (only ['*'])")
    return value


# `exportTo: ["*"]` (Istio's default: visible to every namespace) is what meshagent does.
ExportTo = Annotated[tuple[str, ...] | None, AfterValidator(_export_everywhere)]


class VirtualServiceSpec(IstioModel):
    # No hosts: a delegate, whose http rules serve the root VirtualServices naming it
    hosts: tuple[Host, ...] = ()
    gateways: tuple[str, ...] | None = None
    export_to: ExportTo = None
    http: tuple[HTTPRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    tls: tuple[TLSRoute, ...] = ()

    @field_validator("gateways")
    @classmethod
    def _mesh_only(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        # Gateway-only VirtualServices are skipped before validation (support.skip_reason);
        # with `mesh` listed, the other gateways are ignored with a warning.
        if value is not None and "mesh" not in value:
            raise ValueError(
                f"gateways {list(value)} do not include `mesh`: meshagent routes mesh traffic "
                "only, so omit gateways or list mesh"
            )
        return value

    @property
    def is_delegate(self) -> bool:
        return not self.hosts

    @model_validator(mode="after")
    def _delegate_shape(self) -> VirtualServiceSpec:
        """Istio's rules: a delegate (no hosts) has only http rules, no gateways, and does
        not delegate again (one level)."""
        nested = [i for i, rule in enumerate(self.http) if rule.delegate is not None]
        if self.hosts:
            return self
        if not self.http:
            raise ValueError(
                "hosts: required field is missing (a VirtualService without hosts is a "
                "delegate, which needs http rules)"
            )
        if self.tcp or self.tls:
            raise ValueError("a delegate VirtualService (no hosts) has only http rules")
        if self.gateways is not None:
            raise ValueError("a delegate VirtualService (no hosts) has no gateways")
        if nested:
            raise ValueError(
                f"http[{nested[0]}].delegate: a delegate VirtualService (no hosts) cannot "
                "delegate again (Istio allows one level)"
            )
        return self

    @model_validator(mode="after")
    def _has_routes(self) -> VirtualServiceSpec:
        if not self.http and not self.tcp and not self.tls:
            raise ValueError("a VirtualService needs http, tcp or tls routes")
        for i, rule in enumerate(self.tls):
            for j, entry in enumerate(rule.match):
                for k, sni in enumerate(entry.sni_hosts):
                    if not any(_sni_within(sni, host) for host in self.hosts):
                        raise ValueError(
                            f"tls[{i}].match[{j}].sniHosts[{k}]: {sni!r} is not a subset of any "
                            f"of the VirtualService's hosts {list(self.hosts)} (Istio's rule)"
                        )
        return self


class VirtualService(IstioResource):
    """An Istio VirtualService for mesh traffic (no gateways). `tls` routes
    choose by the ClientHello's SNI on `tls`/`https` Service ports (agent/proxy/routing.py)."""

    API_VERSIONS = NETWORKING_API_VERSIONS

    kind: Literal["VirtualService"]
    spec: VirtualServiceSpec


def _reject_passthrough(value: object) -> object:
    if value == "PASSTHROUGH":
        raise ValueError(
            "loadBalancer PASSTHROUGH is not supported by meshagent yet "
            "(use ROUND_ROBIN, LEAST_REQUEST or RANDOM)"
        )
    if value == "LEAST_CONN":  # Istio's deprecated name of LEAST_REQUEST
        return "LEAST_REQUEST"
    return value


def _cookie_ttl(value: Any) -> float:
    # 0s is allowed here (a session cookie), unlike other durations
    seconds = parse_duration(value)
    if seconds < 0:
        raise ValueError(f"ttl {value!r} must not be negative")
    return seconds


class HTTPCookie(IstioModel):
    name: NonEmptyStr
    path: str | None = None
    ttl: Annotated[float, BeforeValidator(_cookie_ttl)] | None = None


class RingHash(IstioModel):
    minimum_ring_size: Annotated[int, Field(ge=0, strict=True)] | None = None


class MagLev(IstioModel):
    table_size: Annotated[int, Field(ge=0, strict=True)] | None = None


class ConsistentHashLB(IstioModel):
    """Sticky balancing: exactly one hash key. The ring parameters tune Envoy's table's
    granularity; meshagent hashes by rendezvous (agent/proxy/lb.py), which needs none."""

    http_header_name: HeaderName | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: NonEmptyStr | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: Annotated[int, Field(ge=0, strict=True)] | None = None

    @model_validator(mode="after")
    def _one_key(self) -> ConsistentHashLB:
        keys = [
            self.http_header_name is not None,
            self.http_cookie is not None,
            bool(self.use_source_ip),
            self.http_query_parameter_name is not None,
        ]
        if sum(keys) != 1:
            raise ValueError(
                "set exactly one of httpHeaderName, httpCookie, useSourceIp: true or "
                "httpQueryParameterName"
            )
        if self.ring_hash is not None and self.maglev is not None:
            raise ValueError("set ringHash or maglev, not both")
        return self


def _locality(value: str) -> str:
    """`region/zone/subzone`, each part a name or `*` (a trailing `*` covers what follows)."""
    parts = value.split("/")
    if not value or len(parts) > 3 or any(not p for p in parts):
        raise ValueError(f"locality {value!r} must be region, region/zone or region/zone/subzone")
    if "*" in parts[:-1] or any("*" in p and p != "*" for p in parts):
        raise ValueError(f"locality {value!r}: `*` may only stand for a whole last part")
    return value


Locality = Annotated[str, AfterValidator(_locality)]


class LocalityDistribute(IstioModel):
    from_: Locality = Field(alias="from")
    to: dict[Locality, Annotated[int, Field(ge=0, le=100, strict=True)]] = Field(min_length=1)

    @model_validator(mode="after")
    def _sums_to_100(self) -> LocalityDistribute:
        if sum(self.to.values()) != _WEIGHT_TOTAL:
            raise ValueError(f"the weights of `to` sum to {sum(self.to.values())}, not 100")
        return self


class LocalityFailover(IstioModel):
    from_: NonEmptyStr = Field(alias="from")  # a region
    to: NonEmptyStr  # a region

    @model_validator(mode="after")
    def _regions(self) -> LocalityFailover:
        if "/" in self.from_ or "/" in self.to or self.from_ == self.to:
            raise ValueError("failover goes from one region to another (no zones, not itself)")
        return self


# failoverPriority labels the node proxy knows for the client without a pod (common/locality.py
# reads them): the node's topology and name; meshagent is one network and one cluster.
TOPOLOGY_PRIORITY_LABELS = frozenset(
    {
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
        "topology.istio.io/subzone",
        "kubernetes.io/hostname",
        "topology.istio.io/network",
        "topology.istio.io/cluster",
    }
)
_LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


def _priority_label(value: str) -> str:
    """A failoverPriority entry: a label key, or `key=value` (Istio 1.20+: the value stands
    for the client's). A bare key other than a topology label would compare the client pod's
    own label, which a node proxy balancing for all the pods of its node cannot do."""
    key, sep, wanted = value.partition("=")
    if not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(wanted):
        raise ValueError(f"failoverPriority {value!r} is not a label key or key=value")
    if not sep and key not in TOPOLOGY_PRIORITY_LABELS:
        raise ValueError(
            f"failoverPriority {value!r} compares the client pod's own label, which is not "
            "supported by meshagent yet (its node proxy balances for every pod of its node): "
            f"write {key}=<value> to prefer endpoints with that value, or use a topology label "
            f"({', '.join(sorted(TOPOLOGY_PRIORITY_LABELS))})"
        )
    return value


class LocalityLbSetting(IstioModel):
    """Locality-aware balancing over the nodes' `topology.kubernetes.io/region`, `/zone` and
    `topology.istio.io/subzone` labels, or by `failoverPriority` labels (common/locality.py)."""

    enabled: bool = True
    distribute: tuple[LocalityDistribute, ...] = ()
    failover: tuple[LocalityFailover, ...] = ()
    failover_priority: tuple[Annotated[str, AfterValidator(_priority_label)], ...] = ()

    @model_validator(mode="after")
    def _one_mode(self) -> LocalityLbSetting:
        if self.distribute and self.failover:
            raise ValueError("set distribute or failover, not both (Istio refuses both)")
        if self.distribute and self.failover_priority:
            raise ValueError(
                "set distribute or failoverPriority, not both (Istio applies distribute and "
                "ignores failoverPriority)"
            )
        if self.failover and self.failover_priority:
            raise ValueError(
                "failover together with failoverPriority is not supported by meshagent yet: "
                "use one of them"
            )
        return self


class LoadBalancerSettings(IstioModel):
    simple: Annotated[LoadBalancer, BeforeValidator(_reject_passthrough)] | None = None
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLbSetting | None = None

    @model_validator(mode="after")
    def _one_policy(self) -> LoadBalancerSettings:
        if self.simple is not None and self.consistent_hash is not None:
            raise ValueError("set simple or consistentHash, not both")
        if self.simple is None and self.consistent_hash is None and not self.locality_lb_setting:
            raise ValueError("set one of simple, consistentHash or localityLbSetting")
        return self


def _idle_timeout_field(value: Any) -> float:
    """An idle timeout: a duration of at least 1ms, or `0s`, which Istio reads as "never"."""
    seconds = parse_duration(value)
    if 0 < seconds < 0.001:
        raise ValueError(f"duration {value!r} is too short: Istio requires at least 1ms (or 0s)")
    return seconds


# Seconds; 0 disables the timeout (Istio: "If set to 0s, the timeout will be disabled").
IdleTimeout = Annotated[float, BeforeValidator(_idle_timeout_field)]


_KERNEL_KEEPALIVE_MAX = 32767  # Linux MAX_TCP_KEEPIDLE / MAX_TCP_KEEPINTVL


def _whole_seconds(value: Any) -> float:
    """Keepalive times go to the kernel in whole seconds (TCP_KEEPIDLE, TCP_KEEPINTVL), as
    Envoy passes them: refuse what would be rounded to something else."""
    seconds = parse_duration(value)
    if seconds < 1 or seconds != int(seconds) or seconds > _KERNEL_KEEPALIVE_MAX:
        raise ValueError(
            f"{value!r}: keepalive times are whole seconds from 1s to {_KERNEL_KEEPALIVE_MAX}s "
            "(what the kernel takes)"
        )
    return seconds


KeepaliveSeconds = Annotated[float, BeforeValidator(_whole_seconds)]


class TcpKeepalive(IstioModel):
    """`tcp.tcpKeepalive`: SO_KEEPALIVE on the upstream socket; unset fields keep the
    kernel's defaults (net.ipv4.tcp_keepalive_*), as Envoy leaves them."""

    probes: Annotated[int, Field(ge=1, le=127, strict=True)] | None = None  # TCP_KEEPCNT
    time: KeepaliveSeconds | None = None  # TCP_KEEPIDLE
    interval: KeepaliveSeconds | None = None  # TCP_KEEPINTVL


class TCPSettings(IstioModel):
    max_connections: Annotated[int, Field(ge=0, strict=True)] | None = None
    connect_timeout: Duration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    idle_timeout: IdleTimeout | None = None


class HTTPSettings(IstioModel):
    http1_max_pending_requests: Annotated[int, Field(ge=0, strict=True)] | None = None
    max_requests_per_connection: Annotated[int, Field(ge=0, strict=True)] | None = None
    idle_timeout: IdleTimeout | None = None
    http2_max_requests: Annotated[int, Field(ge=0, strict=True)] | None = None
    max_retries: Annotated[int, Field(ge=0, strict=True)] | None = None
    # `useClientProtocol: true`: a request reaches the pod in the protocol its client spoke,
    # which the data path does unless h2UpgradePolicy says UPGRADE (Istio: useClientProtocol
    # true makes h2UpgradePolicy ineffective); false is Istio's default, as when unwritten.
    use_client_protocol: Annotated[bool, Field(strict=True)] | None = None
    # DEFAULT (the mesh's, DO_NOT_UPGRADE) and DO_NOT_UPGRADE: as the client spoke; UPGRADE:
    # the client's node proxy sends HTTP/1.1 requests to the pod as HTTP/2 (h2c) at the full
    # L7 level (agent/proxy/http/proxy.py), except upgrades (WebSocket) and CONNECT.
    h2_upgrade_policy: Literal["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"] | None = None

    @property
    def h2_upgrade(self) -> bool:
        """Whether HTTP/1.1 requests go to the destination as HTTP/2."""
        return self.h2_upgrade_policy == "UPGRADE" and not self.use_client_protocol


class ConnectionPoolSettings(IstioModel):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> ConnectionPoolSettings:
        if self.tcp is None and self.http is None:
            raise ValueError("connectionPool must set tcp, http, or both")
        return self


class OutlierDetection(IstioModel):
    consecutive_5xx_errors: Annotated[int, Field(ge=0, strict=True)] | None = Field(
        None, alias="consecutive5xxErrors"
    )
    consecutive_gateway_errors: Annotated[int, Field(ge=0, strict=True)] | None = None
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: Annotated[int, Field(ge=0, le=100, strict=True)] | None = None


TlsMode = Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]


class ClientTLSSettings(IstioModel):
    """`tls`: how the source proxy secures the connection to the destination.

    ISTIO_MUTUAL is the mesh's own HBONE mTLS (the default for meshed pods); DISABLE sends
    plaintext (a STRICT destination then refuses it); SIMPLE/MUTUAL originate TLS from the
    source node's proxy with files on that node (agent/proxy/tls_origin.py)."""

    mode: TlsMode = "DISABLE"
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None
    insecure_skip_verify: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ClientTLSSettings:
        files = (self.client_certificate, self.private_key, self.ca_certificates)
        if self.mode == "ISTIO_MUTUAL" and any(files):
            raise ValueError(
                "ISTIO_MUTUAL uses the mesh's certificates: clientCertificate, privateKey and "
                "caCertificates must not be set"
            )
        if self.mode == "MUTUAL" and not (self.client_certificate and self.private_key):
            raise ValueError("MUTUAL needs clientCertificate and privateKey (files on the node)")
        if self.mode != "MUTUAL" and (self.client_certificate or self.private_key):
            raise ValueError(
                f"clientCertificate/privateKey are only used with MUTUAL, not {self.mode}"
            )
        for name, path in (
            ("clientCertificate", self.client_certificate),
            ("privateKey", self.private_key),
            ("caCertificates", self.ca_certificates),
        ):
            if path is not None and not path.startswith("/"):
                raise ValueError(f"{name} must be an absolute file path on the node, got {path!r}")
        return self


class _Policies(IstioModel):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class PortTrafficPolicy(_Policies):
    """`portLevelSettings[]`: the same policies, for one destination port."""

    port: PortSelector


class TrafficPolicy(_Policies):
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()


class Subset(IstioModel):
    name: DnsLabel
    labels: dict[str, str] = {}
    traffic_policy: TrafficPolicy | None = None


class DestinationRuleSpec(IstioModel):
    host: Host
    export_to: ExportTo = None
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()

    @field_validator("subsets")
    @classmethod
    def _unique_names(cls, value: tuple[Subset, ...]) -> tuple[Subset, ...]:
        seen: set[str] = set()
        for subset in value:
            if subset.name in seen:
                raise ValueError(f"subset name {subset.name!r} is defined more than once")
            seen.add(subset.name)
        return value


class DestinationRule(IstioResource):
    """An Istio DestinationRule: subsets and the traffic policy toward one host."""

    API_VERSIONS = NETWORKING_API_VERSIONS

    kind: Literal["DestinationRule"]
    spec: DestinationRuleSpec
