"""Certificates for the sidecar-pair reference, made fresh for each run: a throwaway CA and one
leaf per proxy (ECDSA P-256, as the mesh's workload certificates), written as the PEM files
HAProxy reads (`crt`: certificate then key; `ca-file`: the CA)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from benchmarks.configs import SidecarFiles

VALIDITY = dt.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class BenchCA:
    """A CA that lives for one benchmark run; it signs the two proxies' certificates."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("meshagent bench CA"))
            .issuer_name(_name("meshagent bench CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return _cert_pem(self.cert)

    def leaf(self, dns_name: str) -> bytes:
        """A certificate for `dns_name`, usable as TLS server and client, followed by its key."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(dns_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return _cert_pem(cert) + _key_pem(key)


def write_sidecar_certs(folder: Path, names: dict[str, str]) -> dict[str, SidecarFiles]:
    """Make a CA and one leaf per proxy ({proxy: dns name}) in `folder` (private keys 0600).
    Returns each proxy's files."""
    ca = BenchCA()
    ca_file = folder / "ca.pem"
    ca_file.write_bytes(ca.pem)
    out: dict[str, SidecarFiles] = {}
    for proxy, dns_name in names.items():
        crt = folder / f"{proxy}.pem"
        crt.touch(mode=0o600)
        crt.write_bytes(ca.leaf(dns_name))
        out[proxy] = SidecarFiles(crt=str(crt), ca=str(ca_file))
    return out
