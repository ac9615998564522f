"""Workload keys and the CSRs that carry their public half to the controller.

Private keys are made on the node and stay in its memory; only the CSR (public key plus the
requested SPIFFE ID) leaves.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from meshagent.common.spiffe import Identity

__all__ = ["build_csr", "key_pem", "new_key"]


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key, the only kind the mesh CA signs."""
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey, identity: Identity) -> bytes:
    """A PEM CSR asking for ``identity``: empty subject, the SPIFFE ID as its only SAN."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM, for building TLS contexts in memory."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
