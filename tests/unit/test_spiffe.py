"""SPIFFE identity names: URIs, principals, certificates and SNI."""

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from meshagent.common.spiffe import (
    SNI_SUFFIX,
    CertificateChain,
    Identity,
    InvalidIdentity,
    identity_from_certificate,
    identity_from_sni,
    sni_for,
)

FRONTEND = Identity("cluster.local", "shop", "frontend")


def test_uri_and_principal():
    assert FRONTEND.uri == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert FRONTEND.principal == "cluster.local/ns/shop/sa/frontend"
    assert str(FRONTEND) == FRONTEND.uri


def test_parse_round_trips():
    assert Identity.parse("spiffe://cluster.local/ns/shop/sa/frontend") == FRONTEND
    assert Identity.parse_principal("cluster.local/ns/shop/sa/frontend") == FRONTEND


@pytest.mark.parametrize(
    ("uri", "complaint"),
    [
        ("https://cluster.local/ns/shop/sa/frontend", "spiffe://"),
        ("spiffe:///ns/shop/sa/frontend", "no trust domain"),
        ("spiffe://cluster.local/ns/shop", "/ns/<namespace>/sa/<service-account>"),
        ("spiffe://cluster.local/sa/frontend/ns/shop", "/ns/<namespace>/sa/<service-account>"),
        ("spiffe://cluster.local/ns/shop/sa/frontend/extra", "/ns/<namespace>/sa/"),
        ("spiffe://cluster.local/ns/shop/sa/frontend?x=1", "query"),
        ("spiffe://cluster.local:443/ns/shop/sa/frontend", "port"),
        ("spiffe://Cluster.Local/ns/shop/sa/frontend", "trust domain"),
        ("spiffe://cluster.local/ns/Shop/sa/frontend", "namespace 'Shop'"),
        ("spiffe://cluster.local/ns/shop/sa/front_end", "service account 'front_end'"),
        ("spiffe://cluster.local/ns//sa/frontend", "namespace ''"),
    ],
)
def test_parse_rejects_with_reason(uri, complaint):
    with pytest.raises(InvalidIdentity) as caught:
        Identity.parse(uri)
    assert complaint in str(caught.value)


def test_namespace_longer_than_a_label_is_refused():
    with pytest.raises(InvalidIdentity, match="namespace"):
        Identity("cluster.local", "a" * 64, "default")


def _cert_with_sans(*names: x509.GeneralName) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "test")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=True)
    return builder.sign(key, hashes.SHA256())


def test_identity_from_certificate():
    cert = _cert_with_sans(
        x509.DNSName("ignored.example"), x509.UniformResourceIdentifier(FRONTEND.uri)
    )
    assert identity_from_certificate(cert) == FRONTEND


@pytest.mark.parametrize(
    ("sans", "complaint"),
    [
        ((), "no subject alternative names"),
        ((x509.DNSName("frontend.shop"),), "it has 0"),
        (
            (
                x509.UniformResourceIdentifier(FRONTEND.uri),
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/admin"),
            ),
            "it has 2",
        ),
        ((x509.UniformResourceIdentifier("https://example.com/"),), "spiffe://"),
    ],
)
def test_identity_from_certificate_refuses(sans, complaint):
    with pytest.raises(InvalidIdentity) as caught:
        identity_from_certificate(_cert_with_sans(*sans))
    assert complaint in str(caught.value)


def test_sni_is_readable():
    assert sni_for(FRONTEND) == "frontend.shop.cluster.local.mesh.meshagent.io"


def test_sni_decodes_case_insensitively_and_with_root_dot():
    name = "Frontend.SHOP.cluster.local.mesh.meshagent.io."
    assert identity_from_sni(name, "cluster.local") == FRONTEND


def test_sni_with_dotted_service_account_and_trust_domain():
    identity = Identity("prod.example.org", "shop", "build.v2.runner")
    name = sni_for(identity)
    assert name == "build.v2.runner.shop.prod.example.org.mesh.meshagent.io"
    assert identity_from_sni(name, "prod.example.org") == identity


def test_sni_of_another_trust_domain_is_refused():
    with pytest.raises(InvalidIdentity, match=r"trust domain 'cluster\.local'"):
        identity_from_sni("frontend.shop.other.org.mesh.meshagent.io", "cluster.local")


@pytest.mark.parametrize(
    "name",
    ["shop.cluster.local.mesh.meshagent.io", "example.com", "frontend.shop.cluster.local"],
)
def test_sni_that_is_not_an_identity_is_refused(name):
    with pytest.raises(InvalidIdentity):
        identity_from_sni(name, "cluster.local")


def test_sni_refuses_a_service_account_label_over_63_characters():
    identity = Identity("cluster.local", "shop", "x" * 64)
    with pytest.raises(InvalidIdentity, match="longer than 63"):
        sni_for(identity)


def test_sni_refuses_a_name_over_253_characters():
    identity = Identity("cluster.local", "a" * 63, ".".join(["b" * 60] * 3))
    with pytest.raises(InvalidIdentity, match="DNS limit of 253"):
        sni_for(identity)


def test_sni_refuses_a_trust_domain_with_underscore():
    with pytest.raises(InvalidIdentity, match="not a DNS name"):
        sni_for(Identity("my_domain", "shop", "frontend"))


_label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_dotted = st.lists(_label, min_size=1, max_size=4).map(".".join)


@given(trust_domain=_dotted, namespace=_label, service_account=_dotted)
def test_sni_round_trip(trust_domain, namespace, service_account):
    identity = Identity(trust_domain, namespace, service_account)
    if len(f"{service_account}.{namespace}.{trust_domain}.{SNI_SUFFIX}") > 253:
        with pytest.raises(InvalidIdentity, match="DNS limit"):
            sni_for(identity)
        return
    name = sni_for(identity)
    labels = name.split(".")
    assert len(name) <= 253
    assert all(1 <= len(label) <= 63 for label in labels)
    assert identity_from_sni(name, trust_domain) == identity
    assert identity_from_sni(name.upper(), trust_domain) == identity


@given(trust_domain=_dotted, namespace=_label, service_account=_dotted)
def test_uri_round_trip(trust_domain, namespace, service_account):
    identity = Identity(trust_domain, namespace, service_account)
    assert Identity.parse(identity.uri) == identity
    assert Identity.parse_principal(identity.principal) == identity


def test_chain_pem_is_leaf_then_intermediates():
    chain = CertificateChain(b"LEAF", (b"INT1\n", b"INT2"))
    assert chain.pem == b"LEAF\nINT1\nINT2\n"
