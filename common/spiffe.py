"""SPIFFE workload identities: the names that flow between CA, agents and proxies.

An `Identity` is what a certificate's URI SAN, an authorization rule's principal and an HBONE
client's TLS SNI all name. The controller (signing) and the agent (keys, certificates, proxy)
share these helpers so both sides agree on one spelling.

Formats:

- URI (the certificate SAN): ``spiffe://cluster.local/ns/shop/sa/frontend``
- principal (Istio's AuthorizationPolicy form): ``cluster.local/ns/shop/sa/frontend``
- SNI (an HBONE client asking a node proxy for one workload identity):
  ``<service-account>.<namespace>.<trust-domain>.mesh.meshagent.io``, for example
  ``frontend.shop.cluster.local.mesh.meshagent.io``. A namespace is a single DNS label, so given
  the trust domain (which the server knows) the name splits back without ambiguity even though
  service accounts and trust domains may contain dots. DNS limits (63-character labels,
  253-character names) mean a service account with a label over 63 characters, or a very long
  whole name, cannot be put in SNI: `sni_for` raises a clear error for those rather than
  truncating, because a truncated name would present the wrong identity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # loaded where certificates are read: `meshagent status` needs only names
    from cryptography import x509
    from meshagent.common.snapshot import Workload

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "SNI_SUFFIX",
    "CertificateChain",
    "Identity",
    "InvalidIdentity",
    "check_trust_domain",
    "identity_from_certificate",
    "identity_from_sni",
    "sni_for",
]

DEFAULT_TRUST_DOMAIN = "cluster.local"
SNI_SUFFIX = "mesh.meshagent.io"

_SCHEME = "spiffe"
# Kubernetes rules: a namespace is a DNS-1123 label, a service account a DNS-1123 subdomain.
_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_NAMESPACE_RE = re.compile(rf"{_LABEL}\Z")
_SUBDOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_MAX_LABEL = 63
_MAX_SUBDOMAIN = 253
# SPIFFE ID spec: trust domain characters are lowercase letters, digits, '.', '-' and '_'.
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+\Z")
_MAX_TRUST_DOMAIN = 255
# What a DNS name (and so SNI) allows: LDH labels of at most 63 characters, 253 in all.
_DNS_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_MAX_DNS_NAME = 253


class InvalidIdentity(ValueError):
    """A SPIFFE ID, principal, SNI name or certificate does not name a valid workload identity."""


def check_trust_domain(td: str) -> str:
    """``td`` if it is a valid SPIFFE trust domain, else `InvalidIdentity` saying why."""
    if not (_TRUST_DOMAIN_RE.match(td) and len(td) <= _MAX_TRUST_DOMAIN):
        raise InvalidIdentity(
            f"trust domain {td!r} is not valid: use lowercase letters, digits, '.', '-', '_'"
            f" (at most {_MAX_TRUST_DOMAIN} characters)"
        )
    return td


@dataclass(frozen=True, order=True)
class Identity:
    """One workload identity: a Kubernetes service account in a namespace of a trust domain."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        td, ns, sa = self.trust_domain, self.namespace, self.service_account
        check_trust_domain(td)
        if not (_NAMESPACE_RE.match(ns) and len(ns) <= _MAX_LABEL):
            raise InvalidIdentity(
                f"namespace {ns!r} is not a valid Kubernetes namespace name (a DNS-1123 label:"
                f" lowercase letters, digits and '-', at most {_MAX_LABEL} characters)"
            )
        if not (_SUBDOMAIN_RE.match(sa) and len(sa) <= _MAX_SUBDOMAIN):
            raise InvalidIdentity(
                f"service account {sa!r} is not a valid Kubernetes name (a DNS-1123 subdomain:"
                f" lowercase letters, digits, '-' and '.', at most {_MAX_SUBDOMAIN} characters)"
            )

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Read ``spiffe://<td>/ns/<ns>/sa/<sa>``; raise `InvalidIdentity` saying what is wrong."""
        if not isinstance(uri, str):
            raise InvalidIdentity(f"SPIFFE ID must be a string, got {type(uri).__name__}")
        try:
            parts = urlsplit(uri)
            port = parts.port
        except ValueError as exc:
            raise InvalidIdentity(f"SPIFFE ID {uri!r} is not a valid URI: {exc}") from None
        if parts.scheme != _SCHEME:
            raise InvalidIdentity(f"SPIFFE ID {uri!r} must start with 'spiffe://'")
        if parts.query or parts.fragment or "?" in uri or "#" in uri:
            raise InvalidIdentity(f"SPIFFE ID {uri!r} must not have a query or fragment")
        if parts.username is not None or port is not None or ":" in parts.netloc:
            raise InvalidIdentity(f"SPIFFE ID {uri!r} must not have a user or port")
        if not parts.netloc:
            raise InvalidIdentity(f"SPIFFE ID {uri!r} has no trust domain")
        return cls._from_path(parts.netloc, parts.path, uri)

    @classmethod
    def parse_principal(cls, principal: str) -> Identity:
        """Read Istio's principal form ``<td>/ns/<ns>/sa/<sa>``."""
        td, sep, path = principal.partition("/")
        if not sep:
            raise InvalidIdentity(f"principal {principal!r} must look like <td>/ns/<ns>/sa/<sa>")
        return cls._from_path(td, "/" + path, principal)

    @classmethod
    def _from_path(cls, trust_domain: str, path: str, original: str) -> Identity:
        segments = path.split("/")
        # "/ns/shop/sa/frontend" splits into ["", "ns", "shop", "sa", "frontend"].
        if len(segments) != 5 or segments[0] or segments[1] != "ns" or segments[3] != "sa":
            raise InvalidIdentity(
                f"{original!r} must have the path /ns/<namespace>/sa/<service-account>"
            )
        return cls(trust_domain, segments[2], segments[4])

    @cached_property
    def uri(self) -> str:
        return f"{_SCHEME}://{self.principal}"

    @cached_property
    def principal(self) -> str:
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class CertificateChain:
    """A signed workload certificate as PEM: the leaf, then the intermediates up to (not
    including) the root that peers already hold in the trust bundle."""

    leaf_pem: bytes
    intermediates_pem: tuple[bytes, ...] = ()

    @property
    def pem(self) -> bytes:
        """Leaf then intermediates, the order TLS sends them (and `load_cert_chain` reads)."""
        return b"".join(_ensure_newline(p) for p in (self.leaf_pem, *self.intermediates_pem))

    def leaf(self) -> x509.Certificate:
        from cryptography import x509

        return x509.load_pem_x509_certificate(self.leaf_pem)


def _ensure_newline(pem: bytes) -> bytes:
    return pem if pem.endswith(b"\n") else pem + b"\n"


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """The identity a certificate proves: its one URI SAN (the X.509-SVID rule).

    Raises `InvalidIdentity` if the certificate has no URI SAN, several, or one that is not a
    workload SPIFFE ID.
    """
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidIdentity("certificate has no subject alternative names") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise InvalidIdentity(
            f"certificate must have exactly one URI SAN (a SPIFFE ID), it has {len(uris)}"
            + (f": {', '.join(uris)}" if uris else "")
        )
    return Identity.parse(uris[0])


def sni_for(identity: Identity) -> str:
    """The TLS server name an HBONE client sends to ask a node proxy for ``identity``.

    Raises `InvalidIdentity` if the identity does not fit in a DNS name (see module docstring).
    """
    name = f"{identity.service_account}.{identity.namespace}.{identity.trust_domain}.{SNI_SUFFIX}"
    too_long = [label for label in name.split(".") if len(label) > _MAX_LABEL]
    if too_long:
        raise InvalidIdentity(
            f"identity {identity} cannot be named in TLS SNI: label {too_long[0]!r} is longer"
            f" than {_MAX_LABEL} characters"
        )
    if len(name) > _MAX_DNS_NAME:
        raise InvalidIdentity(
            f"identity {identity} cannot be named in TLS SNI: {len(name)} characters is over"
            f" the DNS limit of {_MAX_DNS_NAME}"
        )
    if not _DNS_NAME_RE.match(name):
        raise InvalidIdentity(
            f"identity {identity} cannot be named in TLS SNI: trust domain"
            f" {identity.trust_domain!r} is not a DNS name"
        )
    return name


def identity_from_sni(name: str, trust_domain: str) -> Identity:
    """Read back the identity `sni_for` encoded, for a server in ``trust_domain``.

    SNI compares case-insensitively, so the name is lowercased first. Raises `InvalidIdentity`
    if the name is not a meshagent identity name for that trust domain.
    """
    normalized = name.lower().removesuffix(".")
    suffix = f".{trust_domain}.{SNI_SUFFIX}"
    if not normalized.endswith(suffix):
        raise InvalidIdentity(
            f"server name {name!r} does not name a workload identity of trust domain"
            f" {trust_domain!r} (expected <sa>.<namespace>{suffix})"
        )
    service_account, dot, namespace = normalized.removesuffix(suffix).rpartition(".")
    if not dot:
        raise InvalidIdentity(
            f"server name {name!r} must name a service account and a namespace before {suffix!r}"
        )
    return Identity(trust_domain, namespace, service_account)


def workload_identity(workload: Workload, trust_domain: str) -> Identity:
    """The identity a pod's certificate names: its namespace and service account."""
    return Identity(trust_domain, workload.namespace, workload.service_account)
