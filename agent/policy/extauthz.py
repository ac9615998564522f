"""AuthorizationPolicy `action: CUSTOM` at the destination: ask the ext-authz provider.

For a request to a local pod that a CUSTOM policy matches, the destination's node proxy sends
the check request (common/extauthz.py) to the provider's Service through the mesh, as the
destination workload (its identity over HBONE, or the same-node path), and follows the verdict
before the pod's other policies are evaluated (Istio's order). A provider not declared in the
agent config (`extension_providers`) denies the requests it would judge (fail closed, as
istiod does with a CUSTOM policy whose provider it does not know).
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

import h2.exceptions
import h11
import trio
from meshagent.agent.proxy.http.types import LocalResponse, RequestInfo
from meshagent.agent.proxy.upstream import UpstreamError
from meshagent.common import authz, extauthz
from meshagent.common.extauthz_provider import EnvoyExtAuthzGrpc, Provider
from meshagent.common.istio.support import service_fqdn
from meshagent.common.snapshot import Workload
from meshagent.common.spiffe import workload_identity

if TYPE_CHECKING:
    from meshagent.agent.proxy.upstream import Connector
    from meshagent.agent.state import Tables

log = logging.getLogger(__name__)

_DENIED = LocalResponse(403, b"RBAC: access denied", flags=("UAEX",))
_warned: set[str] = set()


class ProviderUnreachable(Exception):
    pass


def _endpoint(tables: Tables, provider: Provider) -> tuple[str, int]:
    """A pod (ip, port) behind the provider's Service port."""
    fqdn = service_fqdn(provider.service, "default")
    for service in tables.snapshot.services:
        if service.hostname == fqdn:
            ready = [e for e in service.endpoints if provider.port in e.ports]
            if not ready:
                raise ProviderUnreachable(f"{fqdn}:{provider.port} has no endpoint")
            chosen = random.choice(ready)
            return chosen.ip, chosen.ports[provider.port]
    raise ProviderUnreachable(f"no Service {fqdn}")


async def _ask(
    connector: Connector,
    tables: Tables,
    provider: Provider,
    target: Workload,
    request: RequestInfo,
    peer: authz.Request,
    trust_domain: str,
) -> extauthz.Verdict:
    ip, port = _endpoint(tables, provider)
    grpc = isinstance(provider, EnvoyExtAuthzGrpc)
    upstream = await connector.open(
        target, ip, port, target.ips[0], "http2" if grpc else "http1", provider.timeout_s
    )
    try:
        if grpc:
            # Imported here: protobuf's descriptors cost each worker's start ~10 ms, and only a
            # gRPC provider needs them.
            from meshagent.common import extauthz_grpc

            check = extauthz_grpc.check_request(
                request.method,
                request.target,
                request.authority,
                request.headers,
                source=(peer.source_ip, 0, peer.source_principal),
                destination=(
                    peer.destination_ip,
                    peer.destination_port,
                    workload_identity(target, trust_domain).principal,
                ),
            )
            authority = f"{provider.service}:{provider.port}"
            try:
                answer = await extauthz_grpc.call(
                    upstream.stream, authority, check, provider.timeout_s
                )
                return extauthz_grpc.verdict(answer)
            except extauthz_grpc.CallFailed as exc:  # the provider failed: as unreachable
                raise ProviderUnreachable(str(exc)) from exc
        http_check = extauthz.check_request(
            provider, request.method, request.target, request.authority, request.headers
        )
        status, headers, body = await extauthz.ask(upstream.stream, http_check)
    finally:
        await trio.aclose_forcefully(upstream.stream)
    return extauthz.verdict(provider, status, headers, body)


async def consult(
    match: tuple[str, str, int],
    providers: dict[str, Provider],
    connector: Connector | None,
    tables: Tables,
    target: Workload,
    request: RequestInfo,
    peer: authz.Request,
    trust_domain: str,
) -> tuple[authz.Decision, LocalResponse | None]:
    """Ask the provider of the CUSTOM policy that matched (`match`: provider, policy, rule;
    `peer`: the connection's source and destination, and the mesh's `trust_domain`, for a
    gRPC provider's CheckRequest);
    (the decision for the access log, the response to send or None to go on)."""
    name, policy, rule = match
    provider = providers.get(name)
    if provider is None or connector is None:
        if name not in _warned:
            _warned.add(name)
            log.warning(
                "CUSTOM policy %s names ext-authz provider %r, not declared in the agent "
                "config's extension_providers: denying the requests it matches",
                policy,
                name,
            )
        why = f"denied: ext-authz provider {name!r} of CUSTOM policy {policy} is not declared"
        return authz.Decision(False, "DENY", policy, rule, why), _DENIED
    try:
        with trio.fail_after(provider.timeout_s):
            verdict = await _ask(connector, tables, provider, target, request, peer, trust_domain)
    except (
        ProviderUnreachable,
        UpstreamError,
        trio.TooSlowError,
        trio.BrokenResourceError,
        OSError,
        h11.ProtocolError,
        h2.exceptions.ProtocolError,
    ) as exc:
        log.warning("ext-authz provider %r of %s could not be asked: %s", name, policy, exc)
        verdict = extauthz.on_error(provider)
    if verdict.allowed:
        if verdict.upstream_headers or verdict.appended_headers or verdict.removed_headers:
            gone = {n for n, _ in verdict.upstream_headers} | set(verdict.removed_headers)
            kept = [(n, v) for n, v in request.headers if n not in gone]
            request.replace_headers([*kept, *verdict.upstream_headers, *verdict.appended_headers])
        why = f"allowed by ext-authz provider {name!r} (CUSTOM policy {policy} rule {rule})"
        return authz.Decision(True, "ALLOW", policy, rule, why), None
    why = f"denied by ext-authz provider {name!r} (CUSTOM policy {policy} rule {rule})"
    response = LocalResponse(verdict.status, verdict.body, verdict.headers, flags=("UAEX",))
    return authz.Decision(False, "DENY", policy, rule, why), response
