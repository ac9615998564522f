"""Throwaway certificate authorities and SPIFFE workload certificates for tests.

A test makes a `TestCA`, asks it for leaf certificates naming workload identities (or for
deliberately bad ones: expired, wrong SAN, no SAN), and hands the PEM bytes to the code under
test exactly as the agent would receive them from the real CA (`controller/ca.py`). Keys are
ECDSA P-256 like the mesh's; nothing touches the disk.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["Leaf", "TestCA"]

_ONE_DAY = dt.timedelta(days=1)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Leaf:
    """A workload's TLS material: its certificate chain (leaf first) and private key, as PEM."""

    chain_pem: bytes
    key_pem: bytes
    certificate: x509.Certificate


class TestCA:
    """A self-signed root that signs workload leaves; `pem` is its trust bundle."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, name: str = "meshagent test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - _ONE_DAY)
            .not_valid_after(_now() + 30 * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        *uris: str,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        dns: tuple[str, ...] = (),
    ) -> Leaf:
        """A leaf whose URI SANs are ``uris`` (normally one SPIFFE ID; none or several to test
        rejection) and DNS SANs ``dns`` (a server's names), valid from ``not_before`` to
        ``not_after`` (default: a day around now)."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or _now() - dt.timedelta(hours=1))
            .not_valid_after(not_after or _now() + _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if uris or dns:
            # An X.509-SVID has an empty subject, so the SAN extension must be critical.
            names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
            names += [x509.DNSName(d) for d in dns]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
        cert = builder.sign(self._key, hashes.SHA256())
        return Leaf(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), cert)

    def issue_expired(self, uri: str) -> Leaf:
        """A leaf for ``uri`` that expired an hour ago."""
        return self.issue(
            uri, not_before=_now() - 2 * _ONE_DAY, not_after=_now() - dt.timedelta(hours=1)
        )
