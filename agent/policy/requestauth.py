"""JWT authentication at the destination (RequestAuthentication), before authorization.

Every HTTP request to a local pod that RequestAuthentications select is checked here with the
keys the snapshot carries (`meshagent.common.jwtauth`): a present token that does not verify
gets 401 (Envoy's jwt_authn answer: its reason as the body, `www-authenticate: Bearer ...
error="invalid_token"`); a verified one becomes the request's identity for the
AuthorizationPolicy check that follows (`requestPrincipals`, `request.auth.*`); a request
without a token goes on unauthenticated.
"""

from __future__ import annotations

from meshagent.agent.proxy.http.types import LocalResponse, RequestInfo
from meshagent.common.jwtauth import AuthResult, JwtPolicies, WorkloadJwt
from meshagent.common.snapshot import Workload


class DestinationJwt:
    """The JWT rules of one destination workload, kept while the snapshot's JwtPolicies stay
    the same (a connection's requests then skip the selection)."""

    __slots__ = ("_policies", "_rules", "destination")

    def __init__(self, destination: Workload) -> None:
        self.destination = destination
        self._policies: JwtPolicies | None = None
        self._rules: WorkloadJwt | None = None

    def get(self, policies: JwtPolicies) -> WorkloadJwt:
        if policies is not self._policies or self._rules is None:
            d = self.destination
            self._rules = policies.for_workload(d.namespace, d.labels)
            self._policies = policies
        return self._rules


def authenticate(
    rules: WorkloadJwt, request: RequestInfo
) -> tuple[AuthResult | None, LocalResponse | None]:
    """(the verified token or None, None) to go on, or (None, the 401) to answer. The request's
    headers lose a verified token that is not forwarded and gain `outputPayloadToHeader`."""
    if not rules:
        return None, None
    result = rules.authenticate(request.headers, request.header_map(), request.target)
    if result.error is not None:
        realm = f'Bearer realm="http://{request.authority}{request.path}", error="invalid_token"'
        headers = ((b"www-authenticate", realm.encode("latin-1", "replace")),)
        return None, LocalResponse(401, result.error.encode(), headers)
    if result.headers is not None:
        request.replace_headers(result.headers)
    return (result if result.principal is not None else None), None
