"""What meshagent does with the parts of Istio's API it does not honour, said up front.

Istio resources are written for Istio; meshagent implements a subset (DESIGN.md §3). For each
raw document this module decides, before the schema sees it, whether the resource does not
concern a sidecar-less mesh at all (`skip_reason`: bound to gateways only, hidden by
`exportTo`, or naming only hosts that are not Kubernetes Services), so it is skipped with a
warning instead of being refused with schema noise; and, for an accepted resource, which of
its settings the data path does not (fully) honour (`warnings`). Fields Istio has and meshagent
does not are refused by the schema (extra fields are forbidden); `unsupported_hint` says what
such a field is, so every refusal reads "<field> is not supported by meshagent yet".
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

# The Kubernetes cluster domain the data path resolves hosts in (agent/proxy/routing.py).
CLUSTER_DOMAIN = "cluster.local"
MESH_GATEWAY = "mesh"
# What the HTTP/2 engine (agent/proxy/http/h2proxy.py: http2/grpc ports, and HTTP/2 clients
# on http ports) does not enforce yet; the HTTP/1.1 engine and TCP ports do.
_HTTP2_GAP = (
    "not applied to HTTP/2 traffic yet (http2/grpc ports, and HTTP/2 clients on http ports); "
    "honoured for HTTP/1.1"
)
# On a node other than the client's, the destination node dials the pod with this fixed
# timeout (agent/proxy/inbound.py CONNECT_TIMEOUT): a longer connectTimeout cannot be honoured.
FAR_POD_CONNECT_TIMEOUT = 5.0
# The destination node's own limits on a meshed pod's connections (agent config
# tcp_idle_timeout_s default; the HTTP connection pool's idle timeout, agent/proxy/http/pool.py):
# a longer (or disabled) DestinationRule idleTimeout is cut short by them.
FAR_TCP_IDLE_TIMEOUT = 3600.0
POD_HTTP_IDLE_TIMEOUT = 300.0

# targetRef(s) attach a policy to a Gateway, or in ambient to the waypoint of a Service: rules
# for traffic addressed to that Service. Here the destination's node proxy enforces policies and
# sees a connection to a pod: which Service its client addressed is the client's word (a VIP
# translated at the source, a Host header), and a client dialling the pod directly would escape a
# Service-scoped DENY. Refused rather than enforced on a claim (README, "targetRef(s)").
_TARGET_REF = (
    "attaches the policy to a Gateway or a Service's waypoint; meshagent has neither, and its "
    "node proxies cannot verify which Service a client addressed: select the Service's pods "
    "with `selector` instead"
)
# Istio fields meshagent refuses, with what they are (for the "not supported yet" message).
_HINTS: dict[str, str] = {
    "tls": "TLS settings / SNI routes",
    "credentialName": (
        "TLS credentials from a Kubernetes Secret, which Istio itself applies at gateways, and at "
        "sidecars only with a workloadSelector; meshagent reads caCertificates, "
        "clientCertificate and privateKey as files on the node (README: DestinationRule tls)"
    ),
    "caCrl": "a certificate revocation list for TLS origination",
    "rewrite": "URI/authority rewrite",
    "headers": "request/response header manipulation",
    "corsPolicy": "CORS policy",
    "mirror": "traffic mirroring",
    "mirrors": "traffic mirroring",
    "mirrorPercentage": "traffic mirroring",
    "mirrorPercent": "traffic mirroring",
    "redirect": "HTTP redirect",
    "directResponse": "direct response",
    "warmupDurationSecs": "slow-start warm-up",
    "gateways": "gateway-specific matching",
    "queryParams": "query parameter matching",
    "withoutHeaders": "negative header matching",
    "ignoreUriCase": "case-insensitive URI matching",
    "authority": "authority matching",
    "scheme": "scheme matching",
    "targetRef": _TARGET_REF,
    "targetRefs": _TARGET_REF,
    "serviceAccounts": "matching by service account",
    "notServiceAccounts": "matching by service account",
    "maxConcurrentStreams": "an HTTP/2 connection-pool limit",
    "maxConnectionDuration": "connection lifetime limit",
    "splitExternalLocalOriginErrors": "outlier detection of local-origin errors",
    "consecutiveLocalOriginFailures": "outlier detection of local-origin errors",
    "consecutiveErrors": "the deprecated outlier field (use consecutive5xxErrors)",
    "minHealthPercent": "outlier detection's minimum healthy percentage",
    "workloadSelector": "workload-scoped DestinationRules",
    "proxyProtocol": "PROXY protocol toward the destination",
    "tunnel": "tunnel settings",
    "retryRemoteLocalities": "retries across localities",
    "statPrefix": "per-route statistics prefix",
}


def unsupported_hint(field: str) -> str:
    """The message for a field the schema forbids: uniform, with what the field is for."""
    hint = _HINTS.get(field)
    what = f" ({hint})" if hint else ""
    return f"field is not supported by meshagent yet{what}"


def service_fqdn(host: str, namespace: str, domain: str = CLUSTER_DOMAIN) -> str:
    """The FQDN a host names from a resource of `namespace`: short, `name.ns` and `name.ns.svc`
    forms expand; the one resolution the data path (agent/proxy/routing.py) and validation use."""
    host = host.lower().rstrip(".")
    if host.startswith("*"):
        return host
    parts = host.split(".")
    if len(parts) == 1:
        return f"{host}.{namespace}.svc.{domain}"
    if len(parts) == 2:
        return f"{host}.svc.{domain}"
    if len(parts) == 3 and parts[2] == "svc":
        return f"{host}.{domain}"
    return host


def is_service_host(host: str, namespace: str, domain: str = CLUSTER_DOMAIN) -> bool:
    """True when `host` can name a Kubernetes Service (the destinations besides the hosts of
    ServiceEntries, `is_entry_host`). `*` and `*.svc.cluster.local`-style wildcards count."""
    fqdn = service_fqdn(host, namespace, domain)
    return fqdn == "*" or fqdn.endswith(f".svc.{domain}")


def resolve_host(
    host: str, namespace: str, entry_hosts: Collection[str] = (), domain: str = CLUSTER_DOMAIN
) -> str:
    """The FQDN a host in a resource of `namespace` names: a host a ServiceEntry declares as
    written (Istio reads dotted names literally: `httpbin.org`), else the Kubernetes Service
    forms `service_fqdn` expands. The one resolution of the data path and validation."""
    literal = host.lower().rstrip(".")
    if is_entry_host(literal, entry_hosts):
        return literal
    return service_fqdn(host, namespace, domain)


def dns_form_note(host: str, entry_hosts: Collection[str] = ()) -> str | None:
    """For `name.namespace` hosts no ServiceEntry declares: Istio takes them literally (an
    external name such as `httpbin.org`), the data path reads them as a Service in that
    namespace: say so."""
    parts = host.lower().rstrip(".").split(".")
    if len(parts) != 2 or host.startswith("*") or is_entry_host(host, entry_hosts):
        return None
    return (
        f"{host!r} is read as Service {parts[0]} in namespace {parts[1]} (Kubernetes DNS "
        "form; Istio would take it literally): if it names an external host, this does nothing "
        "for it (a ServiceEntry declaring it makes it the external host)"
    )


def _spec(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = doc.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def _strings(value: Any) -> list[str] | None:
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def is_entry_host(host: str, entry_hosts: Collection[str]) -> bool:
    """True when `host` is one a ServiceEntry declares (exactly, or under its `*.` prefix)."""
    host = host.lower().rstrip(".")
    return host in entry_hosts or any(
        e.startswith("*.") and host.endswith(e[1:]) for e in entry_hosts
    )


def skip_reason(
    doc: Mapping[str, Any], namespace: str, entry_hosts: Collection[str] = ()
) -> tuple[str, str] | None:
    """(field path, why) when the resource does not concern meshagent and is skipped (not
    applied, not an error); None when it is to be validated and applied. `entry_hosts`: the
    hosts the accepted ServiceEntries declare, destinations as much as Services are."""
    kind = doc.get("kind")
    if kind not in ("VirtualService", "DestinationRule"):
        return None
    spec = _spec(doc)
    gateways = _strings(spec.get("gateways"))
    if kind == "VirtualService" and gateways and MESH_GATEWAY not in gateways:
        return (
            "spec.gateways",
            f"bound to gateways {gateways} and not to `mesh`: it routes traffic entering "
            "through those gateways, which meshagent does not run, so it is not applied",
        )
    export_to = _strings(spec.get("exportTo"))
    if export_to is not None and set(export_to) != {"*"}:
        return (
            "spec.exportTo",
            f"exportTo {export_to} limits which namespaces see this {kind}; meshagent applies "
            "it to every client of its host and cannot limit that, so it is not applied "
            "(omit exportTo or set ['*'] to apply it everywhere)",
        )
    hosts = _strings(spec.get("hosts")) if kind == "VirtualService" else None
    if kind == "DestinationRule" and isinstance(spec.get("host"), str):
        hosts = [spec["host"]]
    if (
        hosts
        and "*" not in hosts
        and not any(is_service_host(h, namespace) or is_entry_host(h, entry_hosts) for h in hosts)
    ):
        field = "spec.hosts" if kind == "VirtualService" else "spec.host"
        return (
            field,
            f"{'hosts' if len(hosts) > 1 else 'host'} {hosts} "
            f"{'are' if len(hosts) > 1 else 'is'} not a Kubernetes Service "
            f"(<name>.<namespace>.svc.{CLUSTER_DOMAIN} or a short form) and no ServiceEntry "
            "declares them, so no traffic would use it and it is not applied",
        )
    return None


def warnings(resource: Any, entry_hosts: Collection[str] = ()) -> list[tuple[str, str]]:
    """(field path, message) for each setting of an accepted resource that the data path
    does not fully honour (`entry_hosts`: as for skip_reason). Empty for a resource that
    means exactly what it says."""
    from meshagent.common.istio.networking import DestinationRule, VirtualService
    from meshagent.common.istio.security import AuthorizationPolicy
    from meshagent.common.istio.serviceentry import ServiceEntry

    if isinstance(resource, AuthorizationPolicy):
        return _ap_warnings(resource, entry_hosts)
    if isinstance(resource, VirtualService):
        return _vs_warnings(resource, entry_hosts)
    if isinstance(resource, DestinationRule):
        return _dr_warnings(resource, entry_hosts)
    if isinstance(resource, ServiceEntry) and resource.spec.names_to_resolve():
        names = list(resource.spec.names_to_resolve())
        return [
            (
                "spec.resolution",
                f"the controller resolves {names} (every 60 s) and the entry applies "
                "to connections made to those addresses (and to its addresses): a client "
                "whose DNS answers with others (round-robin DNS, CDNs) is not matched, and "
                "until a name resolves it has no endpoint",
            )
        ]
    return []


def _ap_warnings(policy: Any, entry_hosts: Collection[str]) -> list[tuple[str, str]]:
    """A policy is checked on the destination's node, for its pods: a ServiceEntry's endpoints
    have no such node, so naming an entry's host does not act on traffic to the entry."""
    out: list[tuple[str, str]] = []
    for i, rule in enumerate(policy.spec.rules or ()):
        for j, to in enumerate(rule.to or ()):
            op = to.operation
            for field, hosts in (("hosts", op.hosts), ("notHosts", op.not_hosts)):
                named = [h for h in hosts if is_entry_host(h, entry_hosts)]
                if named:
                    out.append(
                        (
                            f"spec.rules[{i}].to[{j}].operation.{field}",
                            f"{named} are ServiceEntry hosts: AuthorizationPolicy is enforced "
                            "by the destination pod's node, and an entry's endpoints have "
                            "none, so traffic to the entry is not checked by this policy",
                        )
                    )
    return out


def _vs_warnings(vs: Any, entry_hosts: Collection[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    spec = vs.spec
    if spec.gateways and set(spec.gateways) != {MESH_GATEWAY}:
        others = [g for g in spec.gateways if g != MESH_GATEWAY]
        out.append(
            (
                "spec.gateways",
                f"gateways {others} ignored: meshagent applies this VirtualService to mesh "
                "traffic only",
            )
        )
    for i, host in enumerate(spec.hosts):
        note = dns_form_note(host, entry_hosts)
        if note:
            out.append((f"spec.hosts[{i}]", note))
        elif (
            host != "*"
            and not is_service_host(host, vs.namespace)
            and not is_entry_host(host, entry_hosts)
        ):
            out.append(
                (
                    f"spec.hosts[{i}]",
                    f"{host!r} is not a Kubernetes Service and no ServiceEntry declares it, "
                    "so traffic to it is not routed by this VirtualService",
                )
            )
    for i, rule in enumerate(spec.http):
        for j, policy in enumerate(rule.mirror_policies):
            where = f"spec.http[{i}].mirror.host"
            if rule.mirror is None:
                where = f"spec.http[{i}].mirrors[{j}].destination.host"
            host = policy.destination.host
            note = dns_form_note(host, entry_hosts)
            known = is_service_host(host, vs.namespace) or is_entry_host(host, entry_hosts)
            if note or not known or host.startswith("*"):
                out.append(
                    (where, note or f"{host!r} is not a Kubernetes Service: no copy is sent")
                )
    rules = [("http", i, r) for i, r in enumerate(spec.http)]
    rules += [("tcp", i, r) for i, r in enumerate(spec.tcp)]
    for section, i, rule in rules:
        for j, rd in enumerate(rule.route):
            host = rd.destination.host
            note = dns_form_note(host, entry_hosts)
            if note:
                out.append((f"spec.{section}[{i}].route[{j}].destination.host", note))
            elif host.startswith("*") or not (
                is_service_host(host, vs.namespace) or is_entry_host(host, entry_hosts)
            ):
                out.append(
                    (
                        f"spec.{section}[{i}].route[{j}].destination.host",
                        f"{host!r} is not a Kubernetes Service: requests routed there get 503",
                    )
                )
    return out


def _dr_warnings(dr: Any, entry_hosts: Collection[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    note = dns_form_note(dr.spec.host, entry_hosts)
    if note:
        out.append(("spec.host", note))
    policies = [("spec.trafficPolicy", dr.spec.traffic_policy)]
    policies += [
        (f"spec.subsets[{i}].trafficPolicy", s.traffic_policy)
        for i, s in enumerate(dr.spec.subsets)
    ]
    for where, policy in list(policies):
        if policy is not None:
            policies += [
                (f"{where}.portLevelSettings[{i}]", p)
                for i, p in enumerate(policy.port_level_settings)
            ]
    for where, policy in policies:
        tls = policy.tls if policy is not None else None
        if tls is not None and tls.mode == "ISTIO_MUTUAL" and (tls.sni or tls.subject_alt_names):
            out.append(
                (
                    f"{where}.tls",
                    "sni and subjectAltNames are ignored with ISTIO_MUTUAL: HBONE checks the "
                    "destination workload's identity",
                )
            )
        pool = policy.connection_pool if policy is not None else None
        tcp = pool.tcp if pool is not None else None
        http = pool.http if pool is not None else None
        if tcp is not None and tcp.max_connections is not None:
            out.append(
                (f"{where}.connectionPool.tcp.maxConnections", f"{_HTTP2_GAP} and TCP ports")
            )
        for name in ("http1MaxPendingRequests",):
            if http is not None and http.model_dump(by_alias=True).get(name) is not None:
                out.append((f"{where}.connectionPool.http.{name}", _HTTP2_GAP))
        out += _pool_gaps(where, tcp, http)
        lb = policy.load_balancer if policy is not None else None
        setting = lb.locality_lb_setting if lb is not None else None
        if setting is not None and setting.failover and policy.outlier_detection is None:
            out.append(
                (
                    f"{where}.loadBalancer.localityLbSetting.failover",
                    "locality failover needs outlierDetection (as in Istio): without it the "
                    "endpoints are not ordered by locality",
                )
            )
        if (
            tcp is not None
            and tcp.connect_timeout
            and tcp.connect_timeout > FAR_POD_CONNECT_TIMEOUT
        ):
            out.append(
                (
                    f"{where}.connectionPool.tcp.connectTimeout",
                    f"{tcp.connect_timeout:g}s is honoured for pods on the client's node; a pod "
                    f"on another node is dialled by its node with a fixed "
                    f"{FAR_POD_CONNECT_TIMEOUT:g}s",
                )
            )
    return out


def _pool_gaps(where: str, tcp: Any, http: Any) -> list[tuple[str, str]]:
    """What the node proxies cannot honour of the connection pool's keepalive and idle
    timeouts: the destination's node dials a meshed pod on another node itself, with its own
    settings."""
    out: list[tuple[str, str]] = []
    if tcp is not None and tcp.tcp_keepalive is not None:
        out.append(
            (
                f"{where}.connectionPool.tcp.tcpKeepalive",
                "set on the sockets the client's node proxy dials itself (pods on the "
                "client's node, destinations outside the mesh, tls DISABLE/SIMPLE/MUTUAL); a "
                "meshed pod on another node is dialled by its own node, without these options",
            )
        )
    for field, idle, bound, why in (
        (
            "tcp.idleTimeout",
            tcp.idle_timeout if tcp is not None else None,
            FAR_TCP_IDLE_TIMEOUT,
            "holds on the client's node; a pod on another node is reached through its node, "
            "which closes a connection idle for {bound:g}s (agent tcp_idle_timeout_s)",
        ),
        (
            "http.idleTimeout",
            http.idle_timeout if http is not None else None,
            POD_HTTP_IDLE_TIMEOUT,
            "holds for destinations outside the mesh; a meshed pod's own node proxy closes its "
            "connection to the pod after {bound:g}s idle, and this one with it",
        ),
    ):
        if idle is not None and (idle == 0 or idle > bound):
            value = "0s (never)" if idle == 0 else f"{idle:g}s"
            out.append((f"{where}.connectionPool.{field}", f"{value} " + why.format(bound=bound)))
    return out
