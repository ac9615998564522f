"""How much of L7 each Service port gets (issue 18, DESIGN.md section 1): `l4` (bytes relayed),
`observe` (bytes relayed unchanged while a parser counts requests) or `full` (the per-request
engine). The proxy's per-request engine costs several times the relay, so it runs only where a
resource asks for a decision per request.

The decision table (`port_level`), first match wins:

1. a port that is not HTTP (`tcp-*`, `tls-*`, unnamed, UDP/SCTP, ...): `l4`, whatever else says;
2. the Service's annotation `meshagent.io/l7`: `off` -> `l4`, `full` -> `full`, `observe` ->
   `observe` (`full` on an HTTP/2 port: there is no HTTP/2 parser in `observe` yet); another
   value is ignored;
3. an HTTP/2 port (`http2-*`, `grpc-*`, `h2c`): `full` (per-request balancing of multiplexed
   streams, issue 12, and no HTTP/2 parser in `observe`);
4. an HTTP/1.1 port: `full` when a resource needs a decision per request (`L7Needs`): a
   VirtualService with http rules for its host, a DestinationRule acting per request
   (connectionPool.http, loadBalancer.simple, consistentHash by header/cookie/query
   parameter, outlierDetection, tls other than ISTIO_MUTUAL, at any level: top, subset,
   port), an AuthorizationPolicy of
   any action selecting a pod behind it (a denial on an HTTP port is a 403 per request), a
   RequestAuthentication with jwtRules selecting one; else `observe`.

The pods' own node serves them at the level of the same table without the hosts' needs of
step 4 (`at_pods`): a VirtualService's routes and a DestinationRule's settings are the source's
decisions, made by the source's proxy; the destination's are authorization and request
authentication (step 4's workloads), the annotation and HTTP/2. So a Service that is `full`
only for a route is served `observe` at its pods (`pods_level_key`, only where it differs).

Pure functions of compiled Services, workloads and the accepted Istio resources: the controller
(compiler.py, incremental.py) runs them on every compile and puts the result in
`Snapshot.l7_levels`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshagent.common import l7
from meshagent.common.istio import networking as net
from meshagent.common.istio import security as sec
from meshagent.common.istio.base import IstioResource
from meshagent.common.istio.support import resolve_host
from meshagent.common.snapshot import (
    L7_ANNOTATION,
    L7Level,
    Service,
    ServicePort,
    Workload,
    level_key,
    pods_level_key,
)

# Policies in this namespace apply mesh-wide: the agent's default root namespace (it builds
# its PolicySet with the same default).
ROOT_NAMESPACE = "istio-system"
FORCED = {"off": "l4", "full": "full", "observe": "observe"}


def http_version(port: ServicePort) -> int | None:
    """1 or 2 for an HTTP port, None otherwise (common/l7.py)."""
    return l7.http_version(port.name, port.app_protocol, port.protocol)


@dataclass(frozen=True)
class HostNeed:
    host: str  # resolved FQDN, or a `*` pattern
    port: int | None  # None: every port of the host
    why: str


@dataclass(frozen=True)
class WorkloadNeed:
    namespace: str  # ROOT_NAMESPACE: every namespace
    selector: tuple[tuple[str, str], ...] | None  # None: every workload of the namespace
    why: str

    def selects(self, workload: Workload) -> bool:
        if self.namespace not in (ROOT_NAMESPACE, workload.namespace):
            return False
        return self.selector is None or all(workload.labels.get(k) == v for k, v in self.selector)


@dataclass(frozen=True)
class L7Needs:
    """What in the accepted Istio resources needs a decision per request: hosts (VirtualService
    http rules, DestinationRule per-request settings) and workloads (AuthorizationPolicy,
    RequestAuthentication)."""

    hosts: tuple[HostNeed, ...] = ()
    workloads: tuple[WorkloadNeed, ...] = ()


def _host_matches(pattern: str, hostname: str) -> bool:
    return hostname.endswith(pattern[1:]) if pattern.startswith("*") else pattern == hostname


def _policy_needs(policy: net._Policies | None) -> str | None:
    """Why a DestinationRule traffic policy acts per request (None: it does not)."""
    if policy is None:
        return None
    pool = policy.connection_pool
    if pool is not None and pool.http is not None:
        return "connectionPool.http"
    lb = policy.load_balancer
    if lb is not None and lb.consistent_hash is not None and not lb.consistent_hash.use_source_ip:
        return "consistentHash by request"
    if lb is not None and lb.simple is not None:
        # an algorithm named for an HTTP host balances its requests (Envoy's), which a relay
        # of keep-alive connections cannot (LEAST_REQUEST would weigh connections)
        return f"loadBalancer {lb.simple} (per request)"
    if policy.outlier_detection is not None:
        return "outlierDetection (response codes)"
    if policy.tls is not None and policy.tls.mode != "ISTIO_MUTUAL":
        # TLS this proxy originates (or plaintext toward a STRICT pod): a failure is answered
        # per request, 503 with Envoy's transport failure reason, not a reset
        return f"tls {policy.tls.mode} (failures answered per request)"
    return None


def _dr_needs(dr: net.DestinationRule, host: str) -> list[HostNeed]:
    out = []
    policies: list[net.TrafficPolicy | None] = [dr.spec.traffic_policy]
    policies += [s.traffic_policy for s in dr.spec.subsets]
    for tp in policies:
        why = _policy_needs(tp)
        if why is not None:
            out.append(HostNeed(host, None, f"DestinationRule {dr.ref}: {why}"))
        for pl in tp.port_level_settings if tp is not None else ():
            why = _policy_needs(pl)
            if why is not None:
                out.append(HostNeed(host, pl.port.number, f"DestinationRule {dr.ref}: {why}"))
    return out


def _selector(spec_selector: object) -> tuple[tuple[str, str], ...] | None:
    labels = getattr(spec_selector, "match_labels", None) or {}
    return tuple(sorted(labels.items())) or None


def needs_of(resources: Iterable[IstioResource], entry_hosts: Iterable[str] = ()) -> L7Needs:
    """The per-request needs of the accepted (parsed) Istio resources."""
    hosts: list[HostNeed] = []
    workloads: list[WorkloadNeed] = []
    entries = frozenset(entry_hosts)
    for res in resources:
        if isinstance(res, net.VirtualService) and res.spec.http:
            for h in res.spec.hosts:
                fqdn = resolve_host(h, res.namespace, entries)
                hosts.append(HostNeed(fqdn, None, f"VirtualService {res.ref}: http rules"))
        elif isinstance(res, net.DestinationRule):
            hosts += _dr_needs(res, resolve_host(res.spec.host, res.namespace, entries))
        elif isinstance(res, sec.AuthorizationPolicy):
            # Any policy, not only one with HTTP fields: on an HTTP port a denial is answered
            # per request (403 `RBAC: access denied`, counted as a request with its code and
            # logged with the policy), as Istio's sidecars answer it; only the engine can.
            spec = res.spec
            if spec.action == "CUSTOM":
                why = "CUSTOM"
            elif any(r.uses_http_fields for r in spec.rules or ()):
                why = "HTTP fields"
            else:
                why = "denials answered per request (403)"
            workloads.append(
                WorkloadNeed(
                    res.namespace, _selector(spec.selector), f"AuthorizationPolicy {res.ref}: {why}"
                )
            )
        elif isinstance(res, sec.RequestAuthentication) and res.spec.jwt_rules:
            why = f"RequestAuthentication {res.ref}"
            workloads.append(WorkloadNeed(res.namespace, _selector(res.spec.selector), why))
    return L7Needs(tuple(hosts), tuple(workloads))


def port_level(
    service: Service,
    port: ServicePort,
    forced: str | None,
    needs: L7Needs,
    workloads: Mapping[str, Workload],
    *,
    at_pods: bool = False,
) -> tuple[L7Level, str]:
    """The level of one Service port and why (the decision table above); `at_pods`: the
    level its pods' own node serves them at, where the hosts' needs (a VirtualService's
    routes, a DestinationRule's settings: decisions the source makes) do not count."""
    version = http_version(port)
    if version is None:
        return "l4", "not an HTTP port"
    level = FORCED.get(forced or "")
    if level is not None:
        if level == "observe" and version == 2:
            return "full", "annotation observe on an HTTP/2 port (no HTTP/2 parser)"
        return level, f"annotation {forced}"  # type: ignore[return-value]
    if version == 2:
        return "full", "HTTP/2 port (per-request balancing)"
    for need in () if at_pods else needs.hosts:
        if (need.port is None or need.port == port.port) and _host_matches(
            need.host, service.hostname
        ):
            return "full", need.why
    if needs.workloads:
        for endpoint in service.endpoints:
            workload = workloads.get(endpoint.workload_uid)
            if workload is None:
                continue
            for need in needs.workloads:
                if need.selects(workload):
                    return "full", need.why
    return "observe", "HTTP/1.1 port, nothing needs a per-request decision"


def compile_levels(
    services: Iterable[Service],
    forced: Mapping[tuple[str, str], str],
    needs: L7Needs,
    workloads: Iterable[Workload],
) -> dict[str, L7Level]:
    """`Snapshot.l7_levels`: every TCP Service port's level, and its pods' level where that is
    lower (`pods_level_key`); `forced` the Services' `meshagent.io/l7` annotations by
    (namespace, name)."""
    by_uid = {w.uid: w for w in workloads} if needs.workloads else {}
    out: dict[str, L7Level] = {}
    for svc in services:
        force = forced.get((svc.namespace, svc.name))
        for port in svc.ports:
            if port.protocol == "TCP":
                level, _why = port_level(svc, port, force, needs, by_uid)
                out[level_key(svc.namespace, svc.name, port.port)] = level
                if level == "full" and needs.hosts:
                    at_pods, _ = port_level(svc, port, force, needs, by_uid, at_pods=True)
                    if at_pods != level:
                        out[pods_level_key(svc.namespace, svc.name, port.port)] = at_pods
    return out


def forced_levels(service_objects: Iterable[dict]) -> dict[tuple[str, str], str]:
    """The `meshagent.io/l7` annotation of each Service object that has one, else its label of
    that name (DESIGN.md: a label or an annotation; the annotation wins)."""
    out = {}
    for svc in service_objects:
        meta = svc.get("metadata") or {}
        value = (meta.get("annotations") or {}).get(L7_ANNOTATION)
        if value is None:
            value = (meta.get("labels") or {}).get(L7_ANNOTATION)
        if value is not None:
            out[(meta.get("namespace", "default"), meta.get("name", ""))] = str(value).lower()
    return out


def needs_of_manifests(manifests: Iterable[dict], entry_hosts: Iterable[str] = ()) -> L7Needs:
    """`needs_of` the accepted manifests (`compiler.compile_istio`'s output, all valid)."""
    from meshagent.common.istio.resource import parse_resource

    hosts = frozenset(entry_hosts)
    return needs_of((parse_resource(m, entry_hosts=hosts) for m in manifests), hosts)
