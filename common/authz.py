"""Authorization decisions with Istio's AuthorizationPolicy semantics.

What flows through: AuthorizationPolicy models (`meshagent.common.istio.security`) are compiled
once into a PolicySet of plain matchers (frozensets, prefix/suffix tuples, parsed CIDRs). Then,
for every inbound connection (L4) or HTTP request (L7), the destination proxy hands in the
destination Workload and the Request attributes it knows, and gets a Decision: allowed or not,
which policy and rule decided it (for the access log, the 401/403 and `meshctl authz check`),
whether an AUDIT policy matched, and what dry-run policies would have done. Pure logic: no I/O.

Semantics, as Istio documents them:

- Order (reference, https://istio.io/latest/docs/reference/config/security/authorization-policy/):
  CUSTOM first: a request a CUSTOM policy matches is sent to its ext-authz provider, whose
  verdict the caller applies (`WorkloadPolicies.custom_match`; agent/policy/extauthz.py); a
  TCP connection a CUSTOM rule matches is denied (an HTTP check API cannot judge it: fail
  closed). Then any matching DENY policy denies; then, if any ALLOW
  policy applies to the workload, the request must match one of them; with no ALLOW policy the
  request is allowed. AUDIT policies only mark the request for auditing.
- Target and matching (concepts, https://istio.io/latest/docs/concepts/security/#authorization):
  a policy applies to workloads of its namespace that its selector matches (no selector: all of
  them); in the root namespace it applies mesh-wide. Values match exactly, by prefix `x*`, by
  suffix `*x`, or by presence `*` ("anything but empty"); ports and IP blocks match exactly.
  `rules` absent: an ALLOW policy matches nothing (allow-nothing); `rules: [{}]` matches all.
- TCP (task "TCP Traffic", https://istio.io/latest/docs/tasks/security/authorization/authz-tcp/):
  on a non-HTTP connection an ALLOW rule that uses HTTP-only fields (methods, paths, hosts,
  request.headers) is invalid and ignored, so it never matches; in a DENY rule those fields are
  dropped and the rest of the rule still applies, which denies more. Istio's generator
  (pilot/pkg/security/authz/model/model.go, `checkError`) treats AUDIT rules like DENY ones.
- Plaintext (https://istio.io/latest/news/security/istio-security-2021-004/): the mTLS-only
  attributes (principals, namespaces) compare against an empty value, so `principals: ["*"]`
  never matches plaintext and `notNamespaces: ["foo"]` always does.
- JWT (RequestAuthentication, `meshagent.common.jwtauth`): `requestPrincipals` and the
  `request.auth.*` conditions read the request's verified token (`HttpAttrs.auth`); a request
  without one has the empty principal and no claims, so `requestPrincipals: ["*"]` misses it and
  `notRequestPrincipals: ["*"]` matches it. They are HTTP-only fields (like `paths`). A list
  attribute (`request.auth.audiences`, a list claim) matches when any of its items matches.
  Claims are strings or lists of strings, as Istio supports; other claim types never match.
- Remote address (`remoteIpBlocks`, `notRemoteIpBlocks`, `remote.ip`): Istio reads it from
  X-Forwarded-For through `numTrustedProxies` trusted hops, 0 by default, and with none it is
  the connection's peer address, as `source.ip` (Envoy's downstream remote address). A
  sidecar-less mesh has no gateway in front of its pods to trust, so it is always the source
  address: the same meaning as `ipBlocks`; a client-set X-Forwarded-For changes nothing.
- Dry run (annotation `istio.io/dry-run`): Istio builds dry-run policies into separate shadow
  rules, one engine for ALLOW and one for DENY policies, evaluated apart from the enforced ones.
  Their would-be denials are reported in `Decision.dry_run_denials`; they never change `allowed`.

Paths are matched without their query string (Envoy's `url_path` matcher, which Istio uses);
a path holding `{*}` or `{**}` is a path template (`meshagent.common.pathtemplate`), matched as
Envoy's uri_template matcher does.
The caller passes the path normalized as the proxy forwards it (`meshagent.common.pathnorm`:
the node proxy normalizes each request before this runs, `meshctl authz check` does the same).
Hosts are matched case-insensitively, and a Host with a port (`reviews:9080`, `[::1]:80`) matches
a value written with or without it: Istio compares the Host header as sent, so there a DENY on
`hosts: ["reviews"]` misses `Host: reviews:9080` unless `reviews:*` is listed too.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshagent.common.istio.security import (
    AuthorizationPolicy,
    Condition,
    Operation,
    Rule,
    Source,
    claim_condition_path,
    header_condition_name,
)
from meshagent.common.jwtauth import AuthResult
from meshagent.common.pathtemplate import compile_template, is_template
from meshagent.common.spiffe import DEFAULT_TRUST_DOMAIN
from meshagent.common.trustdomain import expand_principals

DEFAULT_ROOT_NAMESPACE = "istio-system"
_WORKLOAD_CACHE_LIMIT = 4096  # distinct (namespace, labels) kept by PolicySet.evaluate


@dataclass(frozen=True, slots=True)
class Workload:
    """The destination workload whose policies apply."""

    namespace: str
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class HttpAttrs:
    """What an HTTP request adds. Header names must be lower-case (as h11 and h2 give them)."""

    method: str
    path: str
    host: str
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    auth: AuthResult | None = None  # the verified JWT (RequestAuthentication); None: no token


@dataclass(slots=True)
class Request:
    """What the destination proxy knows about a connection or request."""

    source_principal: str | None  # "cluster.local/ns/shop/sa/frontend"; None for plaintext
    source_namespace: str | None  # None for plaintext
    source_ip: str
    destination_ip: str
    destination_port: int
    http: HttpAttrs | None = None  # None on a non-HTTP (L4) connection


@dataclass(frozen=True, slots=True)
class DryRunDenial:
    """A denial a dry-run policy would have made. `policy` is None when dry-run ALLOW
    policies apply but none would allow (then no single policy is responsible)."""

    policy: str | None
    rule: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one connection or request; `policy` ("ns/name") and `rule` (index in
    its rules) name what decided it, both None when the default decided."""

    allowed: bool
    action: str  # "ALLOW" or "DENY"
    policy: str | None
    rule: int | None
    reason: str
    dry_run_denials: tuple[DryRunDenial, ...] = ()
    audit: bool = False


# ---------------------------------------------------------------------------------------------
# Attribute getters: each reads one Istio attribute off a Request.

_parse_ip = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)


def _principal(request: Request) -> str:
    return request.source_principal or ""


def _namespace(request: Request) -> str:
    return request.source_namespace or ""


def _source_ip(request: Request) -> Any:
    return _parse_ip(request.source_ip)


def _destination_ip(request: Request) -> Any:
    return _parse_ip(request.destination_ip)


def _destination_port(request: Request) -> int:
    return request.destination_port


def _method(request: Request) -> str:
    return request.http.method  # type: ignore[union-attr]  # HTTP checks only run on HTTP


def _path(request: Request) -> str:
    path = request.http.path  # type: ignore[union-attr]
    cut = path.find("?")
    return path if cut < 0 else path[:cut]


def _host(request: Request) -> str:
    return request.http.host.lower()  # type: ignore[union-attr]


def strip_port(host: str) -> str:
    """`host` without a `:port` suffix (`[v6]:80` -> `[v6]`); as is when it has none."""
    head, sep, port = host.rpartition(":")
    if not sep or not port.isdigit() or (":" in head and not head.endswith("]")):
        return host  # no port, or a bare IPv6 address
    return head


def _auth(request: Request) -> AuthResult | None:
    return request.http.auth  # type: ignore[union-attr]


def _request_principal(request: Request) -> str:
    auth = _auth(request)
    return (auth.principal or "") if auth is not None else ""


def _presenter(request: Request) -> str:
    auth = _auth(request)
    return (auth.presenter or "") if auth is not None else ""


def _audiences(request: Request) -> tuple[str, ...]:
    auth = _auth(request)
    return auth.audiences if auth is not None else ()


def _claim(path: tuple[str, ...]) -> Callable[[Request], tuple[str, ...]]:
    def get(request: Request) -> tuple[str, ...]:
        auth = _auth(request)
        value: Any = auth.claims if auth is not None else None
        for part in path:
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(v for v in value if isinstance(v, str))
        return ()

    return get


def _header(name: str) -> Callable[[Request], str | None]:
    def get(request: Request) -> str | None:
        return request.http.headers.get(name)  # type: ignore[union-attr]

    return get


# ---------------------------------------------------------------------------------------------
# Value matchers: callables value -> bool, built once per policy.

Matcher = Callable[[Any], bool]


class _Strings:
    """Istio's string match forms: exact, prefix `x*`, suffix `*x`, presence `*`."""

    __slots__ = ("exact", "prefixes", "presence", "presence_allows_empty", "suffixes")

    def __init__(self, patterns: Iterable[str], *, fold_case: bool, header: bool) -> None:
        exact, prefixes, suffixes = set(), [], []
        self.presence = False
        for pattern in patterns:
            if fold_case:
                pattern = pattern.lower()
            if pattern == "*":
                self.presence = True
            elif pattern.startswith("*"):
                suffixes.append(pattern[1:])
            elif pattern.endswith("*"):
                prefixes.append(pattern[:-1])
            else:
                exact.add(pattern)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)
        # Istio turns `*` on a header into Envoy's present_match (an empty value is present).
        self.presence_allows_empty = header

    def __call__(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.presence and (value or self.presence_allows_empty):
            return True
        return (
            value in self.exact or value.startswith(self.prefixes) or value.endswith(self.suffixes)
        )


class _Hosts:
    """Host patterns: the Host matches with its port or without it (see the module docstring)."""

    __slots__ = ("strings",)

    def __init__(self, strings: _Strings) -> None:
        self.strings = strings

    def __call__(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.strings(value):
            return True
        bare = strip_port(value)
        return bare is not value and self.strings(bare)


class _Paths:
    """Path patterns: Istio's string forms, and path templates (`/api/{*}/admin`,
    `meshagent.common.pathtemplate`) as Envoy's uri_template matcher reads them."""

    __slots__ = ("strings", "templates")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        plain = [p for p in patterns if not is_template(p)]
        self.strings = _Strings(plain, fold_case=False, header=False) if plain else None
        self.templates = tuple(compile_template(p) for p in patterns if is_template(p))

    def __call__(self, value: str) -> bool:
        if self.strings is not None and self.strings(value):
            return True
        for template in self.templates:  # noqa: SIM110 - hot path: a loop beats any(genexpr)
            if template(value):
                return True
        return False


class _Cidrs:
    __slots__ = ("networks",)

    def __init__(self, blocks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(block, strict=False) for block in blocks)

    def __call__(self, address: Any) -> bool:
        for network in self.networks:  # noqa: SIM110 - hot path: a loop beats any(genexpr)
            if address in network:
                return True
        return False


class _AnyItem:
    """A matcher over a list attribute: matches when one of its items does."""

    __slots__ = ("item",)

    def __init__(self, item: Matcher) -> None:
        self.item = item

    def __call__(self, values: tuple[str, ...]) -> bool:
        return any(self.item(v) for v in values)


def _items(patterns: tuple[str, ...]) -> Matcher | None:
    return _AnyItem(_Strings(patterns, fold_case=False, header=False)) if patterns else None


def _strings(
    patterns: tuple[str, ...], *, fold_case: bool = False, header: bool = False
) -> Matcher | None:
    return _Strings(patterns, fold_case=fold_case, header=header) if patterns else None


def _hosts(patterns: tuple[str, ...]) -> Matcher | None:
    return _Hosts(_Strings(patterns, fold_case=True, header=False)) if patterns else None


def _paths(patterns: tuple[str, ...]) -> Matcher | None:
    return _Paths(patterns) if patterns else None


def _cidrs(blocks: tuple[str, ...]) -> Matcher | None:
    return _Cidrs(blocks) if blocks else None


def _ports(ports: Iterable[int]) -> Matcher | None:
    ports = frozenset(ports)
    return ports.__contains__ if ports else None


# A check: (getter, values matcher or None, notValues matcher or None). It passes when the
# attribute matches some value (if values are given) and matches no notValue.
Check = tuple[Callable[[Request], Any], Matcher | None, Matcher | None]


def _check(
    getter: Callable[[Request], Any], positive: Matcher | None, negative: Matcher | None
) -> list[Check]:
    return [] if positive is None and negative is None else [(getter, positive, negative)]


def _source_checks(
    source: Source, *, keep_http: bool, trust_domains: tuple[str, ...]
) -> tuple[Check, ...]:
    checks = (
        _principal_check(source.principals, source.not_principals, trust_domains)
        + _check(_namespace, _strings(source.namespaces), _strings(source.not_namespaces))
        + _check(_source_ip, _cidrs(source.ip_blocks), _cidrs(source.not_ip_blocks))
        # the remote address is the peer's: no trusted X-Forwarded-For hop (module docstring)
        + _check(_source_ip, _cidrs(source.remote_ip_blocks), _cidrs(source.not_remote_ip_blocks))
    )
    if keep_http:
        checks += _check(
            _request_principal,
            _strings(source.request_principals),
            _strings(source.not_request_principals),
        )
    return tuple(checks)


def _operation_checks(operation: Operation, *, keep_http: bool) -> tuple[Check, ...]:
    checks = _check(_destination_port, _ports(operation.ports), _ports(operation.not_ports))
    if keep_http:
        checks += _check(_method, _strings(operation.methods), _strings(operation.not_methods))
        checks += _check(_path, _paths(operation.paths), _paths(operation.not_paths))
        checks += _check(_host, _hosts(operation.hosts), _hosts(operation.not_hosts))
    return tuple(checks)


def _principal_check(
    values: tuple[str, ...], not_values: tuple[str, ...], trust_domains: tuple[str, ...]
) -> list[Check]:
    """Peer principals, each rewritten for the mesh's trust domain and aliases (as istiod does:
    common/trustdomain.py)."""
    return _check(
        _principal,
        _strings(expand_principals(values, trust_domains)),
        _strings(expand_principals(not_values, trust_domains)),
    )


def _condition_check(condition: Condition, trust_domains: tuple[str, ...]) -> list[Check]:
    key, values, not_values = condition.key, condition.values, condition.not_values
    if key in ("source.ip", "remote.ip", "destination.ip"):
        getter = _destination_ip if key == "destination.ip" else _source_ip
        return _check(getter, _cidrs(values), _cidrs(not_values))
    if key == "destination.port":
        return _check(_destination_port, _ports(map(int, values)), _ports(map(int, not_values)))
    if key == "source.principal":
        return _principal_check(values, not_values, trust_domains)
    if key == "source.namespace":
        return _check(_namespace, _strings(values), _strings(not_values))
    if key in ("request.auth.principal", "request.auth.presenter"):
        getter = _request_principal if key == "request.auth.principal" else _presenter
        return _check(getter, _strings(values), _strings(not_values))
    if key == "request.auth.audiences":
        return _check(_audiences, _items(values), _items(not_values))
    claim = claim_condition_path(key)
    if claim is not None:
        return _check(_claim(claim), _items(values), _items(not_values))
    name = header_condition_name(key)
    if name is None:  # the schema refuses other keys; guard against hand-built models
        raise ValueError(f"unsupported condition key {key!r}")
    return _check(_header(name), _strings(values, header=True), _strings(not_values, header=True))


def _all(checks: tuple[Check, ...], request: Request) -> bool:
    for getter, positive, negative in checks:
        value = getter(request)
        if positive is not None and not positive(value):
            return False
        if negative is not None and negative(value):
            return False
    return True


def _any(clauses: tuple[tuple[Check, ...], ...], request: Request) -> bool:
    for clause in clauses:  # noqa: SIM110 - hot path: a loop beats any(genexpr)
        if _all(clause, request):
            return True
    return False


@dataclass(frozen=True, slots=True)
class _RuleMatcher:
    """One compiled rule. `sources`/`operations` None = the rule had no from/to (match any);
    a clause with no checks left (HTTP fields dropped for TCP) matches any, as in Istio."""

    sources: tuple[tuple[Check, ...], ...] | None
    operations: tuple[tuple[Check, ...], ...] | None
    when: tuple[Check, ...]

    def matches(self, request: Request) -> bool:
        if self.when and not _all(self.when, request):
            return False
        if self.sources is not None and not _any(self.sources, request):
            return False
        return self.operations is None or _any(self.operations, request)


def _compile_rule(
    rule: Rule, *, for_tcp: bool, is_allow: bool, trust_domains: tuple[str, ...]
) -> _RuleMatcher | None:
    """Compile a rule for HTTP or for TCP; None means the rule can never match."""
    if for_tcp and is_allow and rule.uses_http_fields:
        return None  # invalid for TCP: Istio ignores the whole ALLOW rule
    keep_http = not for_tcp
    when: list[Check] = []
    for condition in rule.when:
        if keep_http or not condition.is_http_only:
            when += _condition_check(condition, trust_domains)
    return _RuleMatcher(
        sources=None
        if rule.from_ is None
        else tuple(
            _source_checks(f.source, keep_http=keep_http, trust_domains=trust_domains)
            for f in rule.from_
        ),
        operations=None
        if rule.to is None
        else tuple(_operation_checks(t.operation, keep_http=keep_http) for t in rule.to),
        when=tuple(when),
    )


@dataclass(frozen=True, slots=True)
class _Policy:
    ref: str
    action: str
    provider: str | None  # a CUSTOM policy's ext-authz provider
    dry_run: bool
    namespace: str
    selector: tuple[tuple[str, str], ...] | None
    http_rules: tuple[_RuleMatcher | None, ...]
    tcp_rules: tuple[_RuleMatcher | None, ...]
    decisions: tuple[Decision, ...]  # the enforced decision each rule makes when it matches

    def selects(self, labels: Mapping[str, str]) -> bool:
        if self.selector is None:
            return True
        for key, value in self.selector:  # noqa: SIM110 - runs per policy per workload lookup
            if labels.get(key) != value:
                return False
        return True

    def first_match(self, request: Request) -> int | None:
        rules = self.tcp_rules if request.http is None else self.http_rules
        for index, rule in enumerate(rules):
            if rule is not None and rule.matches(request):
                return index
        return None


def _compile_policy(policy: AuthorizationPolicy, trust_domains: tuple[str, ...]) -> _Policy:
    spec = policy.spec
    is_allow = spec.action == "ALLOW"  # CUSTOM rules on TCP drop their HTTP fields, as DENY
    rules = spec.rules or ()
    selector = spec.selector.match_labels if spec.selector else {}
    if spec.action == "DENY":
        decisions = tuple(
            Decision(False, "DENY", policy.ref, i, f"denied by DENY policy {policy.ref} rule {i}")
            for i in range(len(rules))
        )
    elif spec.action == "CUSTOM":
        decisions = tuple(
            Decision(
                False,
                "DENY",
                policy.ref,
                i,
                f"denied: CUSTOM policy {policy.ref} rule {i} matched a TCP connection, which "
                "its HTTP ext-authz provider cannot check",
            )
            for i in range(len(rules))
        )
    else:
        decisions = tuple(
            Decision(True, "ALLOW", policy.ref, i, f"allowed by ALLOW policy {policy.ref} rule {i}")
            for i in range(len(rules))
        )
    return _Policy(
        ref=policy.ref,
        action=spec.action,
        provider=spec.provider.name if spec.provider is not None else None,
        dry_run=policy.dry_run,
        namespace=policy.namespace,
        selector=tuple(sorted(selector.items())) or None,
        http_rules=tuple(
            _compile_rule(r, for_tcp=False, is_allow=is_allow, trust_domains=trust_domains)
            for r in rules
        ),
        tcp_rules=tuple(
            _compile_rule(r, for_tcp=True, is_allow=is_allow, trust_domains=trust_domains)
            for r in rules
        ),
        decisions=decisions,
    )


_ALLOW_NO_POLICY = Decision(True, "ALLOW", None, None, "allowed: no ALLOW policy applies")


class WorkloadPolicies:
    """The policies that apply to one workload, split by action. Cheap to evaluate; the proxy
    may keep one per local workload and rebuild it when the snapshot changes."""

    __slots__ = ("allow", "audit", "custom", "deny", "dry_allow", "dry_deny", "no_match")

    def __init__(self, policies: Iterable[_Policy]) -> None:
        policies = tuple(policies)
        enforced = [p for p in policies if not p.dry_run]
        self.deny = tuple(p for p in enforced if p.action == "DENY")
        self.allow = tuple(p for p in enforced if p.action == "ALLOW")
        self.audit = tuple(p for p in enforced if p.action == "AUDIT")
        self.custom = tuple(p for p in enforced if p.action == "CUSTOM")
        self.dry_deny = tuple(p for p in policies if p.dry_run and p.action == "DENY")
        self.dry_allow = tuple(p for p in policies if p.dry_run and p.action == "ALLOW")
        names = ", ".join(p.ref for p in self.allow)
        self.no_match = Decision(
            False, "DENY", None, None, f"denied: no ALLOW policy matched (checked {names})"
        )

    def evaluate(self, request: Request) -> Decision:
        decision = self._enforced(request)
        audit = bool(self.audit) and any(p.first_match(request) is not None for p in self.audit)
        denials = self._dry_run(request) if self.dry_deny or self.dry_allow else ()
        if audit or denials:
            return dataclasses.replace(decision, audit=audit, dry_run_denials=denials)
        return decision

    def custom_match(self, request: Request) -> tuple[str, str, int] | None:
        """(provider, policy, rule) of the first CUSTOM policy that matches an HTTP request:
        its provider decides before the other policies are evaluated. None: no CUSTOM match."""
        for policy in self.custom:
            rule = policy.first_match(request)
            if rule is not None:
                return policy.provider or "", policy.ref, rule
        return None

    def _enforced(self, request: Request) -> Decision:
        if request.http is None:
            for policy in self.custom:
                rule = policy.first_match(request)
                if rule is not None:
                    return policy.decisions[rule]
        for policy in self.deny:
            rule = policy.first_match(request)
            if rule is not None:
                return policy.decisions[rule]
        if not self.allow:
            return _ALLOW_NO_POLICY
        for policy in self.allow:
            rule = policy.first_match(request)
            if rule is not None:
                return policy.decisions[rule]
        return self.no_match

    def _dry_run(self, request: Request) -> tuple[DryRunDenial, ...]:
        denials: list[DryRunDenial] = []
        for policy in self.dry_deny:
            rule = policy.first_match(request)
            if rule is not None:
                reason = f"dry-run DENY policy {policy.ref} rule {rule} would deny"
                denials.append(DryRunDenial(policy.ref, rule, reason))
                break
        if self.dry_allow and all(p.first_match(request) is None for p in self.dry_allow):
            names = ", ".join(p.ref for p in self.dry_allow)
            denials.append(
                DryRunDenial(None, None, f"no dry-run ALLOW policy would allow ({names})")
            )
        return tuple(denials)


class PolicySet:
    """All AuthorizationPolicies of a snapshot, compiled once.

    `root_namespace` is the mesh config's root namespace: policies there apply mesh-wide.
    `trust_domains` are the mesh's trust domain and then its aliases (Istio's `trustDomain` and
    `trustDomainAliases`): principals naming one of them, or `cluster.local`, match a peer of
    any of them (common/trustdomain.py).
    """

    def __init__(
        self,
        policies: Iterable[AuthorizationPolicy],
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        trust_domains: tuple[str, ...] = (DEFAULT_TRUST_DOMAIN,),
    ) -> None:
        self.root_namespace = root_namespace
        self.trust_domains = trust_domains
        by_namespace: dict[str, list[_Policy]] = {}
        for policy in sorted(policies, key=lambda p: (p.namespace, p.name)):
            compiled = _compile_policy(policy, trust_domains)
            by_namespace.setdefault(policy.namespace, []).append(compiled)
        self._by_namespace = {ns: tuple(ps) for ns, ps in by_namespace.items()}
        self._cache: dict[tuple[str, frozenset], WorkloadPolicies] = {}

    def for_workload(self, workload: Workload) -> WorkloadPolicies:
        """The policies that apply to `workload`: mesh-wide ones first, then its namespace's."""
        candidates = self._by_namespace.get(self.root_namespace, ())
        if workload.namespace != self.root_namespace:
            candidates += self._by_namespace.get(workload.namespace, ())
        return WorkloadPolicies(p for p in candidates if p.selects(workload.labels))

    def evaluate(self, workload: Workload, request: Request) -> Decision:
        """Decide `request` to `workload`. Raises ValueError if an IP in it is malformed.

        The policies selected for a workload are cached: a PolicySet never changes, a new
        snapshot builds a new one.
        """
        key = (workload.namespace, frozenset(workload.labels.items()))
        selected = self._cache.get(key)
        if selected is None:
            if len(self._cache) >= _WORKLOAD_CACHE_LIMIT:
                self._cache.clear()
            selected = self._cache[key] = self.for_workload(workload)
        return selected.evaluate(request)
