"""What the mesh will do with an accepted Istio resource, in words (`meshctl validate --explain`).

Users read Istio resources with Istio's meaning in mind; meshagent applies them on a node
proxy, where what a rule does depends on the Service port it meets: HTTP rules and L7
authorization fields act per request on http/http2/grpc ports (`port_protocol`), and on
tcp/unnamed ports only per connection. Each sentence here states what the data path does
(agent/proxy/routing.py, common/authz.py, agent/policy/), so a rule's meaning is seen before
it bites. When the manifests include the Services, their ports are named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshagent.common.istio import IstioResource
from meshagent.common.istio import networking as net
from meshagent.common.istio import security as sec
from meshagent.common.istio import telemetry as tel
from meshagent.common.istio.serviceentry import ServiceEntry, is_ip
from meshagent.common.istio.support import resolve_host, service_fqdn
from meshagent.common.pathtemplate import is_template

ROOT_NAMESPACE = "istio-system"
L7_PORTS = "http/http2/grpc ports"
L4_PORTS = "tcp/unnamed ports"

# Service FQDN -> [(port number, port name, protocol)] with protocol "http1"/"http2"/"tcp".
ServicePorts = Mapping[str, Sequence[tuple[int, str, str]]]


def service_ports(objects: Sequence[Mapping[str, Any]], default_namespace: str) -> dict:
    """The ports of the Service objects among `objects`, by FQDN, as the proxy classifies
    them (agent/proxy/routing.py `port_protocol`)."""
    from meshagent.agent.proxy.routing import port_protocol
    from meshagent.common.snapshot import ServicePort

    out: dict[str, list[tuple[int, str, str]]] = {}
    for obj in objects:
        if obj.get("kind") == "ServiceEntry":
            out.update(_entry_ports(obj))
            continue
        if obj.get("kind") != "Service" or not isinstance(obj.get("metadata"), Mapping):
            continue
        meta, spec = obj["metadata"], obj.get("spec") or {}
        fqdn = service_fqdn(str(meta.get("name")), meta.get("namespace") or default_namespace)
        ports = []
        for p in spec.get("ports") or ():
            try:
                port = ServicePort(
                    name=p.get("name", ""),
                    port=p["port"],
                    target_port=p.get("targetPort", p["port"]),
                    protocol=p.get("protocol", "TCP"),
                    app_protocol=p.get("appProtocol"),
                )
            except (KeyError, TypeError, ValueError):
                continue
            ports.append((port.port, port.name, port_protocol(port)))
        out[fqdn] = ports
    return out


def _entry_ports(obj: Mapping[str, Any]) -> dict[str, list[tuple[int, str, str]]]:
    """The ports of a valid ServiceEntry, by host, as the proxy classifies them."""
    from meshagent.agent.proxy.routing import port_protocol
    from meshagent.controller.serviceentry import entry_services

    try:
        services = entry_services(ServiceEntry.model_validate(obj))
    except ValueError:
        return {}  # refused: its verdict says why
    return {s.hostname: [(p.port, p.name, port_protocol(p)) for p in s.ports] for s in services}


def describe(resource: IstioResource, services: ServicePorts | None = None) -> list[str]:
    """Lines saying what the mesh does with `resource` (accepted by `parse_resource`)."""
    if isinstance(resource, sec.AuthorizationPolicy):
        return _authorization(resource)
    if isinstance(resource, sec.PeerAuthentication):
        return _peer_authentication(resource)
    if isinstance(resource, sec.RequestAuthentication):
        return _request_authentication(resource)
    if isinstance(resource, net.VirtualService):
        return _virtual_service(resource, services or {})
    if isinstance(resource, tel.Telemetry):
        return _telemetry(resource)
    if isinstance(resource, ServiceEntry):
        return _service_entry(resource)
    return _destination_rule(resource, services or {})


def _scope(namespace: str, selector: sec.WorkloadSelector | None) -> str:
    labels = selector.match_labels if selector else {}
    where = "the whole mesh" if namespace == ROOT_NAMESPACE else f"namespace {namespace}"
    if labels:
        return f"workloads with labels {dict(labels)} in {where}"
    return f"every workload in {where}"


def _authorization(ap: sec.AuthorizationPolicy) -> list[str]:
    action = ap.spec.action
    lines = [f"{action} policy for {_scope(ap.namespace, ap.spec.selector)}."]
    if ap.spec.provider is not None:
        lines.append(
            f"Requests its rules match are sent to ext-authz provider {ap.spec.provider.name!r} "
            "first (the agents' extension_providers; one not declared there denies them); "
            "its 200 lets them on to the other policies, any other answer goes to the client."
        )
    if ap.dry_run:
        lines.append("Dry run: evaluated and reported (access log, metrics), never enforced.")
    rules = ap.spec.rules
    if not rules:
        lines.append(
            "No rules: an ALLOW policy without rules matches nothing, so every connection and "
            "request to these workloads is denied unless another ALLOW policy matches."
            if action == "ALLOW"
            else "No rules: it never matches."
        )
        return lines
    for i, rule in enumerate(rules):
        lines.append(f"rules[{i}]: {_rule_meaning(rule, action)}")
    return lines


def _rule_meaning(rule: sec.Rule, action: str) -> str:
    if not rule.from_ and not rule.to and not rule.when:
        return "matches every connection and request (on every port)."
    mtls = any(f.source.principals or f.source.namespaces for f in rule.from_ or ()) or any(
        c.key in ("source.principal", "source.namespace") for c in rule.when
    )
    note = (
        " Principals and namespaces come from the client's mTLS certificate: plaintext "
        "clients never match them."
        if mtls
        else ""
    )
    if any(
        f.source.remote_ip_blocks or f.source.not_remote_ip_blocks for f in rule.from_ or ()
    ) or any(c.key == "remote.ip" for c in rule.when):
        note += (
            " remoteIpBlocks/remote.ip: with no gateway in front (no trusted X-Forwarded-For "
            "hop, Istio's default numTrustedProxies 0) the remote address is the client's own, "
            "so they match as ipBlocks/source.ip do."
        )
    templates = [
        p
        for t in rule.to or ()
        for p in (*t.operation.paths, *t.operation.not_paths)
        if is_template(p)
    ]
    if templates:
        note += (
            f" Path templates {templates}: {{*}} is one path segment, {{**}} anything to the "
            "end, matched on the normalized path."
        )
    ports = sorted({p for t in rule.to or () for p in t.operation.ports})
    if ports and all(t.operation.ports for t in rule.to or ()):
        note = f" It matches pod ports {', '.join(map(str, ports))} only." + note
    if not rule.uses_http_fields:
        return (
            f"L4 fields only: checked once per connection on {L4_PORTS} and per request on "
            f"{L7_PORTS}{'' if ports else ', on every port'}." + note
        )
    l7 = (
        "uses HTTP fields (methods, paths, hosts, request.headers, requestPrincipals, "
        "request.auth.*): checked per request "
        f"on {L7_PORTS}"
    )
    if action == "ALLOW":
        tcp = f"on {L4_PORTS} the rule never matches (Istio's rule for HTTP fields on TCP)"
    else:
        only_http = (
            not rule.from_
            and not any(t.operation.ports or t.operation.not_ports for t in rule.to or ())
            and all(c.is_http_only for c in rule.when)
        )
        verb = "audits" if action == "AUDIT" else "denies"
        tcp = (
            f"on {L4_PORTS} the HTTP fields are dropped, leaving nothing else to match: it "
            f"{verb} every connection there"
            if only_http
            else f"on {L4_PORTS} the HTTP fields are dropped and the rest of the rule applies "
            f"per connection, so it {verb} more"
        )
    return f"{l7}; {tcp}." + note


_MODE_MEANING = {
    "STRICT": "only mTLS (HBONE) connections are accepted; plaintext is dropped in the kernel",
    "PERMISSIVE": "both mTLS (HBONE) and plaintext connections are accepted",
    "DISABLE": "no mTLS: meshed clients dial these pods directly, in plaintext",
    "UNSET": "inherits the mode of the namespace, else the mesh (PERMISSIVE by default)",
}


def _request_authentication(ra: sec.RequestAuthentication) -> list[str]:
    scope = _scope(ra.namespace, ra.spec.selector)
    if not ra.spec.jwt_rules:
        return [f"No jwtRules: nothing is checked for {scope}."]
    lines = [
        f"JWT check per request on {L7_PORTS} for {scope}: a token that does not verify gets "
        "401; a request without one goes on unauthenticated (requestPrincipals, "
        f"request.auth.* decide). Nothing is checked on {L4_PORTS}."
    ]
    for i, rule in enumerate(ra.spec.jwt_rules):
        where = [
            f"header {h.name}" + (f" after {h.prefix!r}" if h.prefix else "")
            for h in rule.from_headers
        ]
        where += [f"parameter {p}" for p in rule.from_params]
        where += [f"cookie {c}" for c in rule.from_cookies]
        keys = (
            "inline keys"
            if rule.jwks is not None
            else f"keys the controller fetches from {rule.keys_url} (refused until fetched)"
        )
        audiences = f", aud one of {list(rule.audiences)}" if rule.audiences else ""
        kept = "" if rule.forward_original_token else ", removed from its header before forwarding"
        lines.append(
            f"jwtRules[{i}]: issuer {rule.issuer!r}{audiences}, {keys}, token from "
            f"{', '.join(where) or 'Authorization: Bearer or parameter access_token'}{kept}."
        )
    return lines


def _peer_authentication(pa: sec.PeerAuthentication) -> list[str]:
    lines = [f"mTLS mode {pa.mode} for {_scope(pa.namespace, pa.spec.selector)}: "
             f"{_MODE_MEANING[pa.mode]}."]  # fmt: skip
    for port, mtls in sorted((pa.spec.port_level_mtls or {}).items()):
        lines.append(f"Port {port} (pod port): {mtls.mode}: {_MODE_MEANING[mtls.mode]}.")
    return lines


def _ports_text(fqdns: Sequence[str], services: ServicePorts, l7: bool) -> str:
    """The known ports of `fqdns` of one kind (L7 or L4), or the general rule."""
    named = [
        f"{fqdn.split('.')[0]}:{number}"
        for fqdn in fqdns
        for number, _name, protocol in services.get(fqdn, ())
        if (protocol != "tcp") == l7
    ]
    general = L7_PORTS if l7 else L4_PORTS
    if any(fqdn in services for fqdn in fqdns):
        return f"{general} ({', '.join(named) or 'none in these manifests'})"
    return f"the host's {general}"


def _destinations(
    routes: Sequence[Any], namespace: str, services: ServicePorts | None = None
) -> str:
    parts = []
    for rd in routes:
        d = rd.destination
        text = resolve_host(d.host, namespace, services or ())
        if d.subset:
            text += f" subset {d.subset}"
        if d.port:
            text += f" port {d.port.number}"
        if rd.weight is not None and len(routes) > 1:
            text += f" ({rd.weight}%)"
        parts.append(text)
    return ", ".join(parts)


def _match_text(match: Sequence[net.HTTPMatchRequest]) -> str:
    if not match:
        return "every request"
    alts = []
    for m in match:
        conds = []
        for what, sm in (("uri", m.uri), ("method", m.method)):
            if sm is not None:
                conds.append(_string_match(what, sm))
        if m.uri is not None and m.ignore_uri_case and m.uri.regex is None:
            conds[0] += " (ASCII case ignored)"
        conds += [_string_match(f"header {name}", sm) for name, sm in m.headers.items()]
        if m.port is not None:
            conds.append(f"port {m.port}")
        conds += _source_conds(m)
        alts.append(" and ".join(conds) or "any request")
    return "requests with " + " or ".join(alts)


def _source_conds(
    m: net.HTTPMatchRequest | net.L4MatchAttributes | net.TLSMatchAttributes,
) -> list[str]:
    """A match entry's client conditions, checked by the client's own node proxy (a client
    that is not a meshed pod has neither)."""
    out = []
    if m.source_labels:
        labels = ",".join(f"{k}={v}" for k, v in m.source_labels.items())
        out.append(f"client pod labels {labels}")
    if m.source_namespace is not None:
        out.append(f"client pod namespace {m.source_namespace}")
    return out


def _string_match(what: str, sm: net.StringMatch) -> str:
    if sm.exact is not None:
        return f"{what} = {sm.exact!r}"
    if sm.prefix is not None:
        return f"{what} starting {sm.prefix!r}"
    return f"{what} matching RE2 {sm.regex!r} (in full)"


def _redirect_text(rd: net.HTTPRedirect) -> str:
    parts = [f"{k} {v}" for k, v in (("scheme", rd.scheme), ("host", rd.authority)) if v]
    if rd.port is not None:
        parts.append(f"port {rd.port}")
    if rd.derive_port == "FROM_REQUEST_PORT":
        parts.append("the service port")
    if rd.uri is not None:
        parts.append(f"path {rd.uri!r}")
    return f"answered {rd.redirect_code or 301} with a Location of {', '.join(parts)}"


def _operations_text(what: str, ops: net.HeaderOperations | None) -> list[str]:
    if ops is None:
        return []
    out = [f"{what} header {n} set to {v!r}" for n, v in ops.set.items()]
    out += [f"{what} header {n} added {v!r}" for n, v in ops.add.items()]
    out += [f"{what} header {n} removed" for n in ops.remove]
    return out


def _headers_text(headers: net.Headers | None) -> list[str]:
    if headers is None:
        return []
    return _operations_text("request", headers.request) + _operations_text(
        "response", headers.response
    )


def _rewritten(uri: net.StringMatch | None) -> str:
    """What `rewrite.uri` replaces for a match entry (Envoy's prefix_rewrite)."""
    if uri is None:
        return "the leading '/' (no uri match)"
    return "the matched uri prefix" if uri.prefix is not None else "the whole path"


def _action_texts(rule: net.HTTPRoute, namespace: str) -> list[str]:
    """What a rule does to the requests it routes (agent/proxy/route_actions.py)."""
    out = []
    rw = rule.rewrite
    if rw is not None and rw.uri is not None:
        kinds = {_rewritten(m.uri) for m in rule.match} or {_rewritten(None)}
        out.append(f"{' or '.join(sorted(kinds))} rewritten to {rw.uri!r}, query kept")
    if rw is not None and rw.uri_regex_rewrite is not None:
        rx = rw.uri_regex_rewrite
        out.append(f"path: each RE2 match of {rx.match!r} replaced by {rx.rewrite!r}")
    if rw is not None and rw.authority is not None:
        out.append(f"Host sent upstream: {rw.authority!r}")
    out += _headers_text(rule.headers)
    for j, rd in enumerate(rule.route):
        for text in _headers_text(getattr(rd, "headers", None)):
            out.append(f"route[{j}] only: {text}")
    if rule.cors_policy is not None:
        origins = [_string_match("origin", m) for m in rule.cors_policy.origins]
        out.append(
            "CORS: preflights from "
            + (" or ".join(origins) or "no origin")
            + " answered by the proxy, their other requests' responses get the allow headers"
        )
    for policy in rule.mirror_policies:
        share = policy.percentage.value if policy.percentage is not None else 100.0
        target = _destinations([policy], namespace)
        out.append(
            f"a copy of {share:g}% of requests (body up to the retry buffer) to {target} "
            "with Host <host>-shadow, its answer ignored"
        )
    return out


def _virtual_service(vs: net.VirtualService, services: ServicePorts) -> list[str]:
    fqdns = [resolve_host(h, vs.namespace, services) for h in vs.spec.hosts]
    if vs.spec.is_delegate:
        lines = [
            "A delegate (no hosts): routes nothing alone; a root VirtualService's http rule "
            f"naming {vs.ref} is replaced by these rules, each matching only within that "
            "rule's match (a rule that cannot is ignored) and taking its settings where it "
            "has none."
        ]
    else:
        lines = [f"Routes traffic to {', '.join(fqdns)} (one VirtualService per host applies)."]
    for i, rule in enumerate(vs.spec.http):
        extra = []
        if rule.timeout is not None:
            extra.append(f"timeout {rule.timeout:g}s")
        if rule.retries is not None:
            extra.append(
                "no retries"
                if rule.retries.attempts == 0
                else f"{rule.retries.attempts} retries"
                + (f" on {','.join(rule.retries.retry_on)}" if rule.retries.retry_on else "")
            )
        if rule.fault is not None:
            extra.append("fault injection")
        extra += _action_texts(rule, vs.namespace)
        tail = f" ({'; '.join(extra)})" if extra else ""
        if rule.delegate is not None:
            ns = rule.delegate.namespace or vs.namespace
            where = f"the http rules of delegate {ns}/{rule.delegate.name}"
        elif rule.redirect is not None:
            where = _redirect_text(rule.redirect)
        elif rule.direct_response is not None:
            where = f"answered {rule.direct_response.status} by the proxy (directResponse)"
        else:
            where = _destinations(rule.route, vs.namespace, services)
        ports = "the root's ports" if vs.spec.is_delegate else _ports_text(fqdns, services, True)
        lines.append(
            f"http[{i}]: {_match_text(rule.match)} -> {where}{tail}; L7, per request, on {ports}."
        )
    if vs.spec.http and not vs.spec.is_delegate:
        lines.append(
            "Requests no http rule matches get 404 (flag NR). The http rules do not apply on "
            f"{_ports_text(fqdns, services, False)}: "
            + (
                "the tcp routes below apply there."
                if vs.spec.tcp
                else "those ports go to the service itself."
            )
        )
    for i, rule in enumerate(vs.spec.tcp):
        ports = [m.port for m in rule.match if m.port is not None]
        on = f" (port {', '.join(map(str, ports))})" if ports else ""
        sources = [" and ".join(c) for c in map(_source_conds, rule.match) if c]
        if sources and len(sources) == len(rule.match):
            on += f" (with {' or '.join(sources)})"
        to = _destinations(rule.route, vs.namespace, services)
        lines.append(
            f"tcp[{i}]{on}: connections -> {to}; L4, per "
            f"connection, on {_ports_text(fqdns, services, False)} (and on http2/grpc ports for "
            "clients that do not speak HTTP/2)."
        )
    for i, rule in enumerate(vs.spec.tls):
        entries = []
        for m in rule.match:
            conds = [f"SNI {' or '.join(m.sni_hosts)}"]
            conds += [f"port {m.port}"] if m.port is not None else []
            entries.append(" and ".join(conds + _source_conds(m)))
        to = _destinations(rule.route, vs.namespace, services)
        lines.append(
            f"tls[{i}]: TLS connections with {' or '.join(entries)} -> "
            f"{to}; L4 by the ClientHello's SNI (the TLS "
            "passes through untouched), on tls/https ports only; a connection no tls rule "
            "matches goes where the tcp routes or the service send it."
        )
    if not vs.spec.tcp and not vs.spec.http and not vs.spec.tls:
        lines.append("No routes.")
    return lines


def _after(idle_timeout: float) -> str:
    """An idleTimeout in words: `0s` turns it off, as in Istio."""
    return "never" if idle_timeout == 0 else f"after {idle_timeout:g}s"


def _locality_lines(where: str, policy: net.TrafficPolicy | net.PortTrafficPolicy) -> list[str]:
    """Locality balancing: what the nodes' topology labels make of it (common/locality.py)."""
    setting = policy.load_balancer.locality_lb_setting if policy.load_balancer else None
    if setting is not None and not setting.enabled:
        return [f"{where}no locality preference (localityLbSetting disabled)."]
    if setting is not None and setting.distribute:
        rules = "; ".join(
            f"from {d.from_}: " + ", ".join(f"{pct} % to {to}" for to, pct in d.to.items())
            for d in setting.distribute
        )
        return [
            f"{where}traffic shared by the client's locality ({rules}); a locality no `to` "
            "names gets none while another has healthy endpoints."
        ]
    if setting is not None and setting.failover_priority:
        labels = ", ".join(setting.failover_priority)
        if policy.outlier_detection is None:
            return [f"{where}failoverPriority is set but does nothing without outlierDetection."]
        return [
            f"{where}failover by labels ({labels}; outlierDetection is set): endpoints that "
            "match the client on all of them first, then on all but the last, and so on, "
            "spilling over as endpoints are ejected; a key=value compares the endpoint with "
            "that value, topology labels are its node's."
        ]
    failover = setting.failover if setting is not None else ()
    regions = "".join(f"; then {f.to} for clients in {f.from_}" for f in failover)
    if policy.outlier_detection is None:
        return (
            [f"{where}locality failover is set but does nothing without outlierDetection."]
            if failover
            else []
        )
    return [
        f"{where}locality failover (outlierDetection is set): endpoints in the client's zone "
        f"first, then its region{regions}, then the rest, spilling over as endpoints are "
        "ejected; by the nodes' topology.kubernetes.io/region and /zone labels."
    ]


def _policy_lines(where: str, policy: net.TrafficPolicy | net.PortTrafficPolicy) -> list[str]:
    out = []
    lb = policy.load_balancer
    if lb is not None and lb.simple is not None:
        out.append(f"{where}load balancing {lb.simple}, on every port.")
    if lb is not None and lb.consistent_hash is not None:
        out.append(f"{where}{_hash_text(lb.consistent_hash)}")
    out += _locality_lines(where, policy)
    pool = policy.connection_pool
    if pool is not None and pool.tcp is not None:
        t = pool.tcp
        if t.max_connections is not None:
            out.append(
                f"{where}at most {t.max_connections} concurrent connections, counted by each "
                "proxy process of a node (HTTP/1.1 and TCP; not enforced for HTTP/2 yet)."
            )
        if t.connect_timeout is not None:
            out.append(f"{where}connect timeout {t.connect_timeout:g}s (every port).")
        if t.tcp_keepalive is not None:
            ka = t.tcp_keepalive
            named = [
                f"{name} {value:g}{unit}"
                for name, value, unit in (
                    ("idle", ka.time, "s"),
                    ("interval", ka.interval, "s"),
                    ("probes", ka.probes, ""),
                )
                if value is not None
            ]
            out.append(
                f"{where}TCP keepalive ({', '.join(named) or 'kernel defaults'}) on the sockets "
                "the client's node proxy dials itself (every port)."
            )
        if t.idle_timeout is not None:
            out.append(
                f"{where}a connection on {L4_PORTS} with no byte either way is closed "
                f"{_after(t.idle_timeout)}."
            )
    if pool is not None and pool.http is not None:
        h = pool.http
        if h.http1_max_pending_requests is not None:
            out.append(
                f"{where}at most {h.http1_max_pending_requests} pending requests "
                f"(HTTP/1.1 requests only; not enforced for HTTP/2 yet; no effect on {L4_PORTS})."
            )
        if h.http2_max_requests:
            out.append(
                f"{where}at most {h.http2_max_requests} requests in flight, counted by each "
                "proxy process of a node (HTTP/1.1 and HTTP/2; more get 503 UO)."
            )
        if h.max_retries:
            out.append(
                f"{where}at most {h.max_retries} retries in flight, counted by each proxy "
                "process of a node; past it a failed attempt is not retried."
            )
        if h.idle_timeout is not None:
            out.append(
                f"{where}an upstream HTTP connection with no request is closed "
                f"{_after(h.idle_timeout)} (on {L7_PORTS})."
            )
        if h.max_requests_per_connection is not None:
            out.append(
                f"{where}at most {h.max_requests_per_connection} requests per upstream "
                "connection (HTTP/1.1 and HTTP/2)."
            )
        if h.h2_upgrade:
            out.append(
                f"{where}HTTP/1.1 requests go to the pod as HTTP/2 (h2c; the port is at the "
                "full L7 level; WebSocket upgrades and CONNECT stay HTTP/1.1)."
            )
    od = policy.outlier_detection
    if od is not None:
        out.append(
            f"{where}outlier detection: endpoints failing in a row are ejected (5xx and gateway "
            f"errors on {L7_PORTS}; connect failures on every port)."
        )
    return out


def _hash_text(ch: net.ConsistentHashLB) -> str:
    """What consistentHash sticks on (agent/proxy/hashkey.py)."""
    if ch.use_source_ip:
        return (
            "consistent hashing on the client's address: each client pod sticks to one "
            "healthy endpoint, per request on HTTP ports and per connection on TCP ports."
        )
    if ch.http_cookie is not None:
        what = f"cookie {ch.http_cookie.name!r}"
        if ch.http_cookie.ttl is not None:
            what += " (set by the proxy on the response when a request has none)"
    elif ch.http_header_name is not None:
        what = f"header {ch.http_header_name!r}"
    else:
        what = f"query parameter {ch.http_query_parameter_name!r}"
    return (
        f"consistent hashing on the request's {what}: requests with the same value stick to "
        "one healthy endpoint, those without one are spread at random; HTTP ports only (TCP "
        "connections are spread at random)."
    )


def _destination_rule(dr: net.DestinationRule, services: ServicePorts) -> list[str]:
    fqdn = resolve_host(dr.spec.host, dr.namespace, services)
    lines = [f"Traffic policy toward {fqdn} (clients anywhere in the mesh)."]
    tp = dr.spec.traffic_policy
    if tp is not None:
        lines += _policy_lines("", tp)
        for p in tp.port_level_settings:
            lines += _policy_lines(f"port {p.port.number}: ", p)
    for s in dr.spec.subsets:
        lines.append(
            f"subset {s.name}: the endpoints whose pods have labels {dict(s.labels)}; used only "
            "where a VirtualService routes to this subset."
        )
        if s.traffic_policy is not None:
            lines += _policy_lines(f"subset {s.name}: ", s.traffic_policy)
    if len(lines) == 1:
        lines.append("Nothing to apply beyond the defaults (LEAST_REQUEST, 10s connect timeout).")
    return lines


_MODE_SIDE = {
    "CLIENT": "as reported by the client's proxy (reporter=source)",
    "SERVER": "as reported by the server's proxy (reporter=destination)",
    "CLIENT_AND_SERVER": "as reported by both proxies",
}


def _telemetry(t: tel.Telemetry) -> list[str]:
    lines = [f"Istio metrics of {_scope(t.namespace, None)} (applied to series made after it)."]
    for metrics in t.spec.metrics:
        if not metrics.for_prometheus():
            names = ", ".join(p.name for p in metrics.providers)
            lines.append(f"for providers {names}: not applied (meshagent serves Prometheus only).")
            continue
        for o in metrics.overrides:
            what = (
                "every metric"
                if o.match.metric == "ALL_METRICS"
                else f"{o.match.metric} ({tel.METRIC_FAMILIES[o.match.metric]})"
            )
            side = _MODE_SIDE[o.match.mode]
            if o.disabled is True:
                lines.append(f"{what} {side}: not reported.")
            elif o.disabled is False:
                lines.append(f"{what} {side}: reported again.")
            if o.tag_overrides:
                labels = ", ".join(sorted(o.tag_overrides))
                lines.append(f"{what} {side}: without the labels {labels} (written empty).")
    if len(lines) == 1:
        lines.append("Nothing to apply: every metric is reported with all its labels.")
    return lines


def _service_entry(entry: ServiceEntry) -> list[str]:
    from meshagent.agent.proxy.routing import port_protocol
    from meshagent.controller.serviceentry import entry_services

    spec = entry.spec
    (service, *_) = entry_services(entry)
    if spec.addresses:
        blocks = [f"any address in {block}" for block in service.vip_ranges]
        caught = f"connections to {', '.join([*service.vips, *blocks])}"
    else:
        caught = "connections to the endpoints' own addresses (no addresses listed)"
    lines = [
        f"Declares {', '.join(spec.hosts)} as destinations (VirtualServices, DestinationRules "
        f"and metrics name them by host): the node proxy takes a meshed pod's {caught}."
    ]
    for port in service.ports:
        layer = "L7, per request" if port_protocol(port) != "tcp" else "L4, bytes relayed"
        lines.append(f"port {port.port} ({port.name or 'unnamed'}, {port.app_protocol}): {layer}.")
    if spec.resolution == "NONE":
        lines.append("resolution NONE: each connection goes on to the address the client dialled.")
    elif spec.names_to_resolve():
        which = "every address" if spec.resolution == "DNS" else "the first address"
        ips = [e.address for e in spec.endpoints if is_ip(e.address)]
        also = f", and {', '.join(ips)}" if ips else ""
        lines.append(
            f"resolution {spec.resolution}: connections are balanced over {which} the "
            f"controller resolves {', '.join(spec.names_to_resolve())} to (every 60 s){also}."
        )
    else:
        targets = ", ".join(
            f"{e.ip} ({', '.join(f'{k}->{v}' for k, v in e.ports.items())})"
            for e in service.endpoints
        )
        lines.append(
            f"resolution {spec.resolution}: connections are balanced over "
            f"{targets or 'no endpoint'}."
        )
    lines.append(
        f"location {spec.location}: the endpoints are dialled directly, in plain TCP, from the "
        "client's node (nothing of meshagent is in front of them to tunnel to); an endpoint "
        "that is a meshed pod's address is reached through HBONE as any pod. MESH_INTERNAL "
        "therefore adds no mTLS to other endpoints."
    )
    return lines
