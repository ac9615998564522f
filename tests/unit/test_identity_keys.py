"""Workload keys and CSRs as the node makes them."""

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from meshagent.agent.identity.keys import build_csr, key_pem, new_key
from meshagent.common.spiffe import Identity

FRONTEND = Identity("cluster.local", "shop", "frontend")


def test_csr_asks_for_exactly_the_identity_with_a_p256_key():
    key = new_key()
    csr = x509.load_pem_x509_csr(build_csr(key, FRONTEND))
    assert csr.is_signature_valid
    assert isinstance(csr.public_key().curve, ec.SECP256R1)
    assert csr.public_key() == key.public_key()
    assert csr.subject == x509.Name([])
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(FRONTEND.uri)]


def test_key_pem_is_unencrypted_and_round_trips():
    key = new_key()
    loaded = serialization.load_pem_private_key(key_pem(key), password=None)
    assert loaded.public_key() == key.public_key()
    assert new_key().public_key() != key.public_key()
