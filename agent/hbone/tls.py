"""TLS for HBONE: PEM material in, `ssl.SSLContext`s out, the peer's identity back.

Both sides speak TLS 1.3 only, offer ALPN ``h2`` and verify the peer's chain against the
mesh trust bundle. Host names play no part: the client checks the server's SPIFFE identity
itself (secure naming, in `client.py`), and the server reads the client's from its URI SAN.

A node proxy holds certificates for several local identities and serves them all on one
port: the client names the identity it wants in SNI (`meshagent.common.spiffe.sni_for`),
and `ServerContextSelector` switches each handshake to that identity's context. Contexts are
cached per certificate; a renewed certificate gets a new context for new handshakes while
established connections keep the one they started with.

The `ssl` module loads certificates and keys only from files, so PEM material passes through
an anonymous in-memory file (memfd); private keys never touch a disk.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from cryptography import x509
from meshagent.agent.hbone.errors import PeerIdentityError
from meshagent.common.spiffe import Identity, InvalidIdentity, identity_from_certificate

__all__ = [
    "ALPN",
    "CertLookup",
    "ServerContextSelector",
    "check_trust_bundle",
    "client_context",
    "peer_identity",
    "server_context_selector",
]

log = logging.getLogger(__name__)

ALPN = "h2"

Pem = bytes | str
# SNI server name (None when the client sent none) -> (certificate chain PEM, key PEM).
CertLookup = Callable[[str | None], "tuple[Pem, Pem] | None"]


class _HasPeerCert(Protocol):
    def getpeercert(self, binary_form: bool = ...) -> object: ...


def _text(pem: Pem, what: str) -> str:
    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    if "-----BEGIN" not in text:
        raise ValueError(f"{what} is not PEM")
    return text


def _as_bytes(pem: Pem) -> bytes:
    return pem.encode("ascii") if isinstance(pem, str) else pem


@contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("meshagent-tls", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _new_context(*, server: bool, trust_bundle: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity is checked against the SPIFFE ID, not a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=trust_bundle)
    except ssl.SSLError as exc:
        raise ValueError(f"trust bundle holds no usable CA certificate: {exc}") from None
    ctx.set_alpn_protocols([ALPN])
    if server:
        # Nobody resumes sessions (connections are long-lived and pooled): skip the tickets.
        ctx.num_tickets = 0
    return ctx


@functools.lru_cache(maxsize=4)
def check_trust_bundle(trust_bundle_pem: str) -> None:
    """Raise `ValueError` saying why ``trust_bundle_pem`` cannot verify peers (not PEM, or
    no usable CA certificate in it), exactly as the contexts built from it would. A bundle
    once checked is remembered, so each snapshot does not parse an unchanged bundle again."""
    _new_context(server=True, trust_bundle=_text(trust_bundle_pem, "trust bundle"))


def _load_identity(ctx: ssl.SSLContext, cert_chain_pem: Pem, key_pem: Pem) -> Identity:
    """Load a chain and key into ``ctx``; return the identity the leaf certificate names."""
    chain = _as_bytes(cert_chain_pem)
    try:
        leaf = x509.load_pem_x509_certificate(chain)
    except ValueError as exc:
        raise ValueError(f"certificate chain is not PEM: {exc}") from None
    try:
        identity = identity_from_certificate(leaf)
    except InvalidIdentity as exc:
        raise ValueError(f"certificate is not a workload certificate: {exc}") from None
    with _memory_file(chain) as chain_path, _memory_file(_as_bytes(key_pem)) as key_path:
        try:
            ctx.load_cert_chain(chain_path, key_path)
        except ssl.SSLError as exc:
            raise ValueError(
                f"certificate chain and key for {identity} do not load together: {exc}"
            ) from None
    return identity


def client_context(cert_chain_pem: Pem, key_pem: Pem, trust_bundle_pem: Pem) -> ssl.SSLContext:
    """A client context presenting one workload identity and trusting the mesh CA(s).

    The caller caches it per source identity and builds a new one when the certificate or
    the trust bundle changes. Raises `ValueError` naming the bad input.
    """
    ctx = _new_context(server=False, trust_bundle=_text(trust_bundle_pem, "trust bundle"))
    _load_identity(ctx, cert_chain_pem, key_pem)
    return ctx


class ServerContextSelector:
    """Picks the server certificate per handshake from the client's SNI.

    Wrap accepted connections with `context`; its SNI callback asks ``lookup`` for the
    material of the requested name and switches the handshake to a cached context for it. A
    lookup answering None fails the handshake with ``unrecognized_name``.
    """

    def __init__(self, lookup: CertLookup, trust_bundle_pem: Pem) -> None:
        self._lookup = lookup
        self._contexts: dict[tuple[bytes, bytes], ssl.SSLContext] = {}
        self._material: dict[Identity, tuple[bytes, bytes]] = {}
        self._identities: weakref.WeakKeyDictionary[ssl.SSLContext, Identity] = (
            weakref.WeakKeyDictionary()
        )
        self.update_trust_bundle(trust_bundle_pem)

    @property
    def context(self) -> ssl.SSLContext:
        """The context to accept new connections with (it has no certificate of its own)."""
        return self._base

    def update_trust_bundle(self, trust_bundle_pem: Pem) -> None:
        """Trust a new bundle for new handshakes (e.g. during CA rotation)."""
        self._bundle = _text(trust_bundle_pem, "trust bundle")
        base = _new_context(server=True, trust_bundle=self._bundle)
        base.sni_callback = self._on_sni
        self._base = base
        self._contexts.clear()
        self._material.clear()

    def identity_of(self, ctx: ssl.SSLContext) -> Identity | None:
        """The local identity a context presents (None for the base context)."""
        return self._identities.get(ctx)

    def context_for(self, cert_chain_pem: Pem, key_pem: Pem) -> ssl.SSLContext:
        """The cached server context for this material, built on first use."""
        material = (_as_bytes(cert_chain_pem), _as_bytes(key_pem))
        ctx = self._contexts.get(material)
        if ctx is None:
            ctx = _new_context(server=True, trust_bundle=self._bundle)
            identity = _load_identity(ctx, *material)
            stale = self._material.pop(identity, None)
            if stale is not None:
                del self._contexts[stale]  # renewed: old connections keep their own reference
            self._material[identity] = material
            self._contexts[material] = ctx
            self._identities[ctx] = identity
        return ctx

    def _on_sni(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        try:
            material = self._lookup(server_name)
            if material is None:
                log.info("HBONE handshake for unknown server name %r refused", server_name)
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            ssl_object.context = self.context_for(*material)
        except Exception:
            log.exception("HBONE server certificate lookup for %r failed", server_name)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None


def server_context_selector(lookup: CertLookup, trust_bundle_pem: Pem) -> ServerContextSelector:
    """A `ServerContextSelector` (see there): ``lookup`` maps SNI to an identity's PEMs."""
    return ServerContextSelector(lookup, trust_bundle_pem)


def peer_identity(ssl_object: _HasPeerCert) -> Identity:
    """The workload identity in the verified peer certificate's one URI SAN.

    Works on an `ssl.SSLObject` or a `TlsStream` after the handshake. Raises
    `PeerIdentityError` if there is no certificate or it names no single workload identity.
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not isinstance(der, bytes):
        raise PeerIdentityError("peer presented no certificate")
    try:
        return identity_from_certificate(x509.load_der_x509_certificate(der))
    except (InvalidIdentity, ValueError) as exc:
        raise PeerIdentityError(f"peer certificate: {exc}") from None
