"""The mesh certificate authority: CSRs in, signed workload certificates out.

The controller holds one issuing key: either a root it made itself (stored as one PEM file on
the controller's volume so restarts and other replicas find the same CA) or an intermediate the
operator supplies under their own root. Leaves are SPIFFE X.509-SVIDs: one URI SAN, ECDSA P-256.
Whether a node may have a given identity signed is not decided here (see `signing.py`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import stat
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from meshagent.common.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    CertificateChain,
    Identity,
    InvalidIdentity,
)

__all__ = ["CAError", "CertificateAuthority", "SigningRefused"]

log = logging.getLogger(__name__)

ROOT_LIFETIME = timedelta(days=3650)
# Backdating tolerates clocks on nodes that run a little behind the controller's.
BACKDATE = timedelta(minutes=1)
_FILE_MODE = 0o600

_IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CAError(Exception):
    """The CA material on disk or supplied by the operator is unusable."""


class SigningRefused(Exception):
    """A CSR was not signed.

    ``reason`` is a short fixed code (used as a metric label); ``detail`` says what was wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class CertificateAuthority:
    """Signs workload certificates for one trust domain with one issuing key."""

    def __init__(
        self,
        issuer_cert: x509.Certificate,
        issuer_key: _IssuerKey,
        intermediates: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
        trust_domain: str,
    ) -> None:
        """Prefer `load_or_create` or `from_intermediate`, which check their input.

        ``intermediates`` are what leaves carry after themselves (the issuer first), ``roots``
        what peers trust.
        """
        self._cert = issuer_cert
        self._key = issuer_key
        self._intermediates = tuple(intermediates)
        self._roots = tuple(roots)
        self.trust_domain = trust_domain

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def load_or_create(
        cls, path: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN
    ) -> CertificateAuthority:
        """Load the self-made root CA at ``path``, creating it first if there is none.

        The file holds the certificate and the key (mode 0600). It appears atomically and only
        once: a new CA is written to a temporary file and hard-linked into place, which fails
        if another replica got there first, in which case that replica's CA is loaded instead.
        Raises `CAError` if an existing file is unreadable, mismatched, or expired.
        """
        path = Path(path)
        _check_trust_domain(trust_domain)
        if not path.exists():
            cert, key = _new_root(trust_domain)
            if _publish_exclusive(path, _root_file_pem(cert, key)):
                log.info("created root CA for %s at %s", trust_domain, path)
            else:
                log.info("another replica created the root CA at %s first; using it", path)
        return cls._load_root(path, trust_domain)

    @classmethod
    def _load_root(cls, path: Path, trust_domain: str) -> CertificateAuthority:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("CA file %s is readable by others (mode %o); expected 0600", path, mode)
        data = path.read_bytes()
        certs = _load_certs(data, f"CA file {path}")
        if len(certs) != 1:
            raise CAError(f"CA file {path} must hold exactly one certificate, it has {len(certs)}")
        key = _load_key(data, f"CA file {path}")
        cert = certs[0]
        _check_issuer(cert, key, f"CA file {path}")
        if cert.issuer != cert.subject:
            raise CAError(f"CA file {path} holds a certificate that is not self-signed")
        return cls(cert, key, (), (cert,), trust_domain)

    @classmethod
    def from_intermediate(
        cls,
        cert_chain_pem: bytes | str,
        key_pem: bytes | str,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
    ) -> CertificateAuthority:
        """Sign with an operator-supplied intermediate CA.

        ``cert_chain_pem`` is the intermediate first, then each issuer in turn, ending with the
        self-signed root (which becomes the trust bundle). Signed leaves carry the chain
        without the root. Raises `CAError` naming the problem if the chain does not link up or
        the key does not belong to the first certificate.
        """
        _check_trust_domain(trust_domain)
        chain = _load_certs(_as_bytes(cert_chain_pem), "intermediate chain")
        key = _load_key(_as_bytes(key_pem), "intermediate key")
        _check_issuer(chain[0], key, "intermediate chain")
        for position, (child, parent) in enumerate(itertools.pairwise(chain)):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature) as exc:
                raise CAError(
                    f"intermediate chain: certificate {position} ({child.subject.rfc4514_string()})"
                    f" is not issued by certificate {position + 1}"
                    f" ({parent.subject.rfc4514_string()}): {exc or 'bad signature'}"
                ) from None
        root = chain[-1]
        if root.issuer != root.subject:
            raise CAError(
                "intermediate chain must end with the self-signed root certificate;"
                f" it ends with {root.subject.rfc4514_string()} issued by"
                f" {root.issuer.rfc4514_string()}"
            )
        if len(chain) < 2:
            raise CAError(
                "intermediate chain holds only a self-signed root; use load_or_create for a"
                " root CA, or supply the intermediate followed by its root"
            )
        return cls(chain[0], key, chain[:-1], (root,), trust_domain)

    # -- use ---------------------------------------------------------------------------------

    @property
    def certificate(self) -> x509.Certificate:
        """The issuing certificate (the root itself, or the intermediate)."""
        return self._cert

    @property
    def trust_bundle_pem(self) -> str:
        """The root certificates every peer must trust, as PEM, for snapshots."""
        return "".join(
            root.public_bytes(serialization.Encoding.PEM).decode("ascii") for root in self._roots
        )

    def sign_workload_csr(
        self, csr_pem: bytes, identity: Identity, lifetime: timedelta
    ) -> CertificateChain:
        """Issue a certificate for ``identity`` to the key in ``csr_pem``, valid for ``lifetime``.

        The CSR must be well signed, hold an ECDSA P-256 key and name exactly ``identity`` as
        its only subject alternative name. The leaf never outlives the issuer. Raises
        `SigningRefused` otherwise; the caller has already decided the requester may have
        ``identity``.
        """
        if lifetime <= timedelta(0):
            raise ValueError(f"certificate lifetime must be positive, got {lifetime}")
        if identity.trust_domain != self.trust_domain:
            raise SigningRefused(
                "trust_domain",
                f"{identity} is not in this CA's trust domain {self.trust_domain!r}",
            )
        csr = _parse_csr(csr_pem)
        _check_csr_identity(csr, identity)

        now = datetime.now(UTC)
        not_after = min(now + lifetime, self._cert.not_valid_after_utc)
        if not_after <= now:
            raise SigningRefused("ca_expired", f"the issuing CA expired on {not_after}")
        public_key = csr.public_key()
        builder = (
            x509.CertificateBuilder()
            # An empty subject is the X.509-SVID norm; the identity lives in the SAN alone
            # (which RFC 5280 then wants marked critical).
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(now - BACKDATE, self._cert.not_valid_before_utc))
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # Only digitalSignature: keyEncipherment describes RSA key transport, which an
            # ECDSA key cannot do (and TLS 1.3 never uses).
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_authority_key_id(self._cert), critical=False)
        )
        leaf = builder.sign(self._key, hashes.SHA256())
        return CertificateChain(
            leaf_pem=leaf.public_bytes(serialization.Encoding.PEM),
            intermediates_pem=tuple(
                c.public_bytes(serialization.Encoding.PEM) for c in self._intermediates
            ),
        )


# -- CSR checks ------------------------------------------------------------------------------


def _parse_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(_as_bytes(csr_pem))
    except ValueError as exc:
        raise SigningRefused(
            "malformed_csr", f"CSR is not a PEM certificate request: {exc}"
        ) from None
    try:
        valid = csr.is_signature_valid
    except Exception as exc:  # unsupported algorithms surface as assorted errors
        raise SigningRefused("bad_signature", f"CSR signature cannot be checked: {exc}") from None
    if not valid:
        raise SigningRefused("bad_signature", "CSR signature does not match its public key")
    try:
        key = csr.public_key()
    except Exception as exc:  # an unknown key algorithm
        raise SigningRefused("key_type", f"CSR public key cannot be read: {exc}") from None
    if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
        curve = getattr(getattr(key, "curve", None), "name", "")
        raise SigningRefused(
            "key_type", f"CSR key must be ECDSA P-256, got {type(key).__name__} {curve}".rstrip()
        )
    return csr


def _check_csr_identity(csr: x509.CertificateSigningRequest, identity: Identity) -> None:
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise SigningRefused("san_mismatch", f"CSR has no SAN; expected {identity}") from None
    except ValueError as exc:  # duplicate or malformed extensions
        raise SigningRefused("malformed_csr", f"CSR extensions cannot be read: {exc}") from None
    names = list(sans)
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(names) != 1 or len(uris) != 1:
        listed = ", ".join(str(n.value) for n in names)
        raise SigningRefused(
            "san_mismatch", f"CSR must name only {identity} as its SAN, it names: {listed}"
        )
    try:
        requested = Identity.parse(uris[0])
    except InvalidIdentity as exc:
        raise SigningRefused("san_mismatch", f"CSR SAN is not a workload identity: {exc}") from None
    if requested != identity:
        raise SigningRefused("san_mismatch", f"CSR names {requested}, but {identity} was asked")


# -- CA material -----------------------------------------------------------------------------


def _new_root(trust_domain: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, "meshagent root CA"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _root_file_pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _publish_exclusive(path: Path, data: bytes) -> bool:
    """Make ``path`` hold ``data`` unless it already exists; True if this call created it.

    Readers never see a partial file: the data is written and synced under a temporary name,
    then hard-linked to ``path``; linking fails if ``path`` exists, so of racing writers
    exactly one wins and the others keep the winner's content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), _FILE_MODE)
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            return False
        _fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_certs(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CAError(f"{what}: no readable PEM certificate ({exc})") from None
    return certs


def _load_key(data: bytes, what: str) -> _IssuerKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CAError(f"{what}: no readable unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError(f"{what}: the key must be ECDSA or RSA, got {type(key).__name__}")
    return key


def _check_issuer(cert: x509.Certificate, key: _IssuerKey, what: str) -> None:
    """Refuse a certificate that cannot sign leaves now with ``key``."""
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, pub) != key.public_key().public_bytes(der, pub):
        raise CAError(f"{what}: the private key does not belong to the CA certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CAError(f"{what}: the certificate is not a CA (BasicConstraints ca=TRUE missing)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise CAError(f"{what}: the certificate's KeyUsage does not allow keyCertSign")
    now = datetime.now(UTC)
    if cert.not_valid_after_utc <= now:
        raise CAError(
            f"{what}: the CA certificate expired on {cert.not_valid_after_utc:%Y-%m-%d};"
            " replace it (every workload will then get certificates from the new CA)"
        )


def _check_trust_domain(trust_domain: str) -> None:
    # Identity validates trust domains; reuse it rather than repeat the rule.
    try:
        Identity(trust_domain, "default", "default")
    except InvalidIdentity as exc:
        raise ValueError(str(exc)) from None


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("ascii") if isinstance(data, str) else data
