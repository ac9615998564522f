"""TLS contexts for the node's workload identities, from the identity manager's certificates.

The client side presents the source workload's certificate; the server side
presents the identity the client asked for in SNI. Contexts are cached per
certificate, so a renewal means new contexts for new handshakes only, and a
trust-bundle change (a new snapshot) rebuilds them.
"""

from __future__ import annotations

import ssl

from meshagent.agent.hbone.tls import ServerContextSelector, client_context, server_context_selector
from meshagent.agent.identity.manager import IdentityManager, WorkloadCert
from meshagent.common.spiffe import Identity, InvalidIdentity, identity_from_sni


class NoCertificate(Exception):
    """No valid certificate (yet) for a workload identity on this node."""


class WorkloadTls:
    def __init__(self, identities: IdentityManager, trust_domain: str) -> None:
        self.identities = identities
        self.trust_domain = trust_domain
        self.trust_bundle = ""
        self._clients: dict[Identity, tuple[WorkloadCert, ssl.SSLContext]] = {}
        self.selector: ServerContextSelector | None = None

    def set_trust_bundle(self, pem: str | None) -> None:
        if not pem or pem == self.trust_bundle:
            return
        self.trust_bundle = pem
        self._clients.clear()
        if self.selector is None:
            self.selector = server_context_selector(self._lookup, pem)
        else:
            self.selector.update_trust_bundle(pem)

    def client_context(self, identity: Identity) -> ssl.SSLContext:
        cert = self.identities.get(identity)
        if cert is None or not self.trust_bundle:
            raise NoCertificate(f"no certificate for {identity.uri} on this node yet")
        cached = self._clients.get(identity)
        if cached is not None and cached[0] is cert:
            return cached[1]
        ctx = client_context(cert.cert_chain_pem, cert.key_pem, self.trust_bundle)
        self._clients[identity] = (cert, ctx)
        return ctx

    def _lookup(self, server_name: str | None) -> tuple[bytes, bytes] | None:
        if not server_name:
            return None
        try:
            identity = identity_from_sni(server_name, self.trust_domain)
        except InvalidIdentity:
            return None
        cert = self.identities.get(identity)
        return (cert.cert_chain_pem, cert.key_pem) if cert else None
