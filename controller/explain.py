"""`meshctl authz check`: what the destination's proxy would decide, and why, offline.

Takes the cluster as the controller currently sees it (a snapshot's workloads and
accepted AuthorizationPolicies) and evaluates one connection or request with the
same evaluator the node proxies run, so the answer is the one traffic would get. The path is
normalized first, as the proxies normalize every request (`meshagent.common.pathnorm`, the
mesh's default DECODE_AND_MERGE_SLASHES unless told otherwise): `--path /./admin` is judged as
`/admin`, and a path the proxies would refuse with 400 is an ExplainError saying so. A token in
`--header "Authorization: Bearer ..."` is checked against the destination's
RequestAuthentications with the keys the controller fetched: one the proxy would refuse with
401 is an ExplainError saying why, a verified one is the request's `requestPrincipals`.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshagent.common import authz
from meshagent.common.istio.resource import parse_resource
from meshagent.common.istio.security import AuthorizationPolicy, RequestAuthentication
from meshagent.common.jwtauth import JwtPolicies
from meshagent.common.pathnorm import DEFAULT_MODE, InvalidPath, PathNormalization, normalize_target
from meshagent.common.snapshot import Snapshot, Workload
from meshagent.common.spiffe import Identity


class ExplainError(ValueError):
    """The question names something that does not exist (a pod, a port)."""


@dataclass(frozen=True)
class Explanation:
    source: Workload
    destination: Workload
    port: int
    http: authz.HttpAttrs | None
    decision: authz.Decision
    sent_path: str | None = None  # the path as given, when normalization changed it
    # (provider, policy, rule) of a CUSTOM policy that matched: its ext-authz provider is asked
    # first, and `decision` holds only if it answers 200
    custom: tuple[str, str, int] | None = None

    def render(self) -> str:
        d = self.decision
        what = f"{self.http.method} {self.http.path} " if self.http else "a connection "
        if self.sent_path is not None:
            what += f"(sent as {self.sent_path}) "
        src, dst = self.source, self.destination
        lines = [
            f"{'ALLOW' if d.allowed else 'DENY'}: {what}from {src.namespace}/{src.name} "
            f"to {dst.namespace}/{dst.name}:{self.port}",
            f"  decided by: {d.policy or 'no single policy'}"
            + (f", rule {d.rule}" if d.rule is not None else ""),
            f"  reason:     {d.reason}",
        ]
        for would in d.dry_run_denials:
            lines.append(f"  dry-run:    {would.policy} would deny ({would.reason})")
        if d.audit:
            lines.append("  audit:      an AUDIT policy matched")
        if self.custom is not None:
            provider, policy, rule = self.custom
            lines.append(
                f"  ext-authz:  first asked of provider {provider!r} (CUSTOM policy {policy}, "
                f"rule {rule}); the above holds only if it answers 200, else its answer does"
            )
        return "\n".join(lines)


def _find(snap: Snapshot, ref: str) -> Workload:
    namespace, _, name = ref.partition("/")
    for w in snap.workloads:
        if w.namespace == namespace and w.name == name:
            return w
    raise ExplainError(f"no pod {ref!r} in the cluster")


def explain(
    snap: Snapshot,
    source_ref: str,
    destination_ref: str,
    *,
    method: str | None = None,
    path: str | None = None,
    headers: dict[str, str] | None = None,
    trust_domain: str = "cluster.local",
    trust_domain_aliases: tuple[str, ...] = (),
    root_namespace: str = "istio-system",
    path_normalization: PathNormalization = DEFAULT_MODE,
) -> Explanation:
    """Evaluate `source_ref` (NS/POD) -> `destination_ref` (NS/POD:PORT)."""
    dest_ref, sep, port_text = destination_ref.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ExplainError(f"--to must be NAMESPACE/POD:PORT, not {destination_ref!r}")
    source, destination, port = _find(snap, source_ref), _find(snap, dest_ref), int(port_text)
    hosts = snap.entry_hosts()
    resources = [parse_resource(doc, entry_hosts=hosts) for doc in snap.istio_resources]
    policies = [r for r in resources if isinstance(r, AuthorizationPolicy)]
    identity = (
        Identity(trust_domain, source.namespace, source.service_account) if source.meshed else None
    )
    http = None
    sent_path = None
    if method or path:
        lowered = {k.lower(): v for k, v in (headers or {}).items()}
        host = lowered.get("host", f"{destination.name}.{destination.namespace}")
        target = path or "/"
        try:
            normalized, authority = normalize_target(target, path_normalization)
        except InvalidPath as exc:
            raise ExplainError(f"the proxies would answer 400 Bad Request: {exc}") from None
        if normalized != target:
            sent_path = target
        if authority is not None:
            host = lowered["host"] = authority
        jwt = JwtPolicies(
            [r for r in resources if isinstance(r, RequestAuthentication)],
            snap.jwks,
            root_namespace=root_namespace,
        ).for_workload(destination.namespace, destination.labels)
        auth = None
        if jwt:
            raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in lowered.items()]
            auth = jwt.authenticate(raw, lowered, normalized)
            if auth.error is not None:
                raise ExplainError(f"the proxies would answer 401 Unauthorized: {auth.error}")
        http = authz.HttpAttrs(method or "GET", normalized, host, lowered, auth)
    request = authz.Request(
        source_principal=identity.principal if identity else None,
        source_namespace=identity.namespace if identity else None,
        source_ip=source.ips[0],
        destination_ip=destination.ips[0],
        destination_port=port,
        http=http,
    )
    trust_domains = tuple(dict.fromkeys((trust_domain, *trust_domain_aliases)))
    selected = authz.PolicySet(
        policies, root_namespace=root_namespace, trust_domains=trust_domains
    ).for_workload(authz.Workload(destination.namespace, destination.labels))
    custom = selected.custom_match(request) if http is not None else None
    decision = selected.evaluate(request)
    return Explanation(source, destination, port, http, decision, sent_path, custom)
