"""Who may read the controller's state on 15014.

``/metrics`` is public (Prometheus scrapes it; it holds counts, not configuration). Every
other route (``/status``, ``/debug/config``: the whole mesh configuration, workloads,
services and policies) is served only to

- a caller on loopback (the controller's own pod or host: ``kubectl exec deploy/meshctl --
  meshctl status``), or
- a caller with ``Authorization: Bearer <token>`` that the controller authenticates as a
  principal allowed to see the mesh configuration anyway: in Kubernetes, a service-account
  token addressed to the ``meshagent-controller`` audience (TokenReview) of a service account
  in the controller's own namespace, as istiod admits only its system namespace to its debug
  endpoints (the agents' account is one: agents receive that configuration already); in the
  lab, a node bootstrap token (a node's agent receives it too).

Anyone else gets 401 (no token) or 403 (a token that does not pass) and no configuration.
Tokens cross 15014 in clear, as on istiod's 15014: they are bound, short-lived and addressed
to the controller only. `meshctl status` and `meshctl authz check` send one when they find
it (`meshctl` option ``--token-file``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Collection

from lightkube import AsyncClient
from meshagent.common.httpserve import Request, Response
from meshagent.controller.push import (
    TOKEN_AUDIENCE,
    AuthenticationUnavailable,
    NodeAuthenticator,
    reviewed_user,
)
from meshagent.controller.signing import AuthenticationFailed

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/metrics"})


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class NamespaceTokenReviewAuthenticator:
    """A service-account token of any account in ``namespace``, addressed to ``audience``,
    checked by TokenReview; returns the account's user name."""

    def __init__(self, client: AsyncClient, namespace: str, audience: str = TOKEN_AUDIENCE):
        self._client = client
        self._prefix = f"system:serviceaccount:{namespace}:"
        self._audience = audience

    async def authenticate(self, token: str) -> str:
        user = await reviewed_user(self._client, token, self._audience)
        username = user.username if user else None
        if not username or not username.startswith(self._prefix):
            raise AuthenticationFailed(
                f"{username!r} is not a service account of {self._prefix.split(':')[2]!r}"
            )
        return username


class DebugGuard:
    """The `serve_http` guard of 15014 (see the module docstring)."""

    def __init__(
        self,
        authenticator: NodeAuthenticator | None,
        public: Collection[str] = PUBLIC_PATHS,
    ) -> None:
        self.authenticator = authenticator
        self.public = frozenset(public)
        self.refused = 0

    async def __call__(self, request: Request) -> Response | None:
        if request.path in self.public or is_loopback(request.peer):
            return None
        token = bearer_token(request.headers.get("authorization"))
        if token is None or self.authenticator is None:
            self.refused += 1
            return Response(
                401,
                b"authentication required: call from loopback, or send a bearer token of the"
                b" controller's namespace (meshctl --token-file)\n",
                headers=(("www-authenticate", 'Bearer realm="meshctl"'),),
            )
        try:
            who = await self.authenticator.authenticate(token)
        except AuthenticationFailed as exc:
            self.refused += 1
            log.info("debug request %s from %s refused: %s", request.path, request.peer, exc)
            return Response(403, b"forbidden\n")
        except AuthenticationUnavailable as exc:
            return Response(503, f"cannot check the token now: {exc}\n".encode())
        log.debug("debug request %s from %s as %s", request.path, request.peer, who)
        return None
