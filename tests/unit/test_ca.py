"""The mesh CA: its file on disk, intermediates, and what it will and will not sign."""

import ssl
import stat
import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from meshagent.agent.identity.keys import build_csr, key_pem, new_key
from meshagent.common.spiffe import Identity, identity_from_certificate
from meshagent.controller.ca import CAError, CertificateAuthority, SigningRefused

FRONTEND = Identity("cluster.local", "shop", "frontend")
REVIEWS = Identity("cluster.local", "shop", "reviews")
DAY = timedelta(hours=24)
PEM = serialization.Encoding.PEM


@pytest.fixture
def ca(tmp_path):
    return CertificateAuthority.load_or_create(tmp_path / "ca.pem")


def _roots(ca: CertificateAuthority) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(ca.trust_bundle_pem.encode())


def _verify(ca: CertificateAuthority, chain) -> list[x509.Certificate]:
    """Verify like a TLS peer would (RFC 5280 path validation); returns the path."""
    intermediates = [x509.load_pem_x509_certificate(p) for p in chain.intermediates_pem]
    verifier = PolicyBuilder().store(Store(_roots(ca))).build_client_verifier()
    verified = verifier.verify(chain.leaf(), intermediates)
    assert [str(s.value) for s in verified.subjects] == [FRONTEND.uri]
    return verified.chain


# -- the CA file -----------------------------------------------------------------------------


def test_creates_a_root_file_readable_only_by_its_owner(tmp_path):
    path = tmp_path / "state" / "ca.pem"
    ca = CertificateAuthority.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert len(x509.load_pem_x509_certificates(data)) == 1
    assert serialization.load_pem_private_key(data, None) is not None
    (root,) = _roots(ca)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.not_valid_after_utc - root.not_valid_before_utc >= timedelta(days=3650)
    assert list(tmp_path.joinpath("state").iterdir()) == [path]  # no temporary files left


def test_restart_loads_the_same_ca(tmp_path):
    first = CertificateAuthority.load_or_create(tmp_path / "ca.pem")
    second = CertificateAuthority.load_or_create(tmp_path / "ca.pem")
    assert second.trust_bundle_pem == first.trust_bundle_pem
    chain = second.sign_workload_csr(build_csr(new_key(), FRONTEND), FRONTEND, DAY)
    _verify(first, chain)


def test_racing_replicas_end_up_with_one_ca(tmp_path):
    path = tmp_path / "ca.pem"
    start = threading.Barrier(8)
    bundles: list[str] = []

    def replica():
        start.wait()
        bundles.append(CertificateAuthority.load_or_create(path).trust_bundle_pem)

    threads = [threading.Thread(target=replica) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(bundles) == 8
    assert len(set(bundles)) == 1
    assert list(tmp_path.iterdir()) == [path]


def test_a_loser_of_the_race_keeps_the_winners_file(tmp_path):
    from meshagent.controller.ca import _publish_exclusive

    path = tmp_path / "ca.pem"
    assert _publish_exclusive(path, b"winner")
    assert not _publish_exclusive(path, b"loser")
    assert path.read_bytes() == b"winner"
    assert list(tmp_path.iterdir()) == [path]


def test_unreadable_ca_file_is_a_clear_error(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_bytes(b"not a pem file")
    with pytest.raises(CAError, match="no readable PEM certificate"):
        CertificateAuthority.load_or_create(path)


def test_ca_file_with_a_foreign_key_is_refused(tmp_path):
    CertificateAuthority.load_or_create(tmp_path / "a.pem")
    data = (tmp_path / "a.pem").read_bytes()
    cert_part = data[: data.index(b"-----BEGIN PRIVATE KEY")]
    (tmp_path / "b.pem").write_bytes(cert_part + key_pem(new_key()))
    with pytest.raises(CAError, match="does not belong"):
        CertificateAuthority.load_or_create(tmp_path / "b.pem")


# -- operator intermediates ------------------------------------------------------------------


def _ca_cert(subject, issuer, public_key, signing_key, *, days=365):
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
        .sign(signing_key, hashes.SHA256())
    )


@pytest.fixture
def operator_pki():
    """An operator's root (RSA, as corporate PKIs often are) and an ECDSA intermediate."""
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = _ca_cert("corp root", "corp root", root_key.public_key(), root_key)
    int_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = _ca_cert("mesh intermediate", "corp root", int_key.public_key(), root_key)
    return root, intermediate, int_key


def test_leaves_from_an_intermediate_verify_up_to_the_root(operator_pki):
    root, intermediate, int_key = operator_pki
    ca = CertificateAuthority.from_intermediate(
        intermediate.public_bytes(PEM) + root.public_bytes(PEM), key_pem(int_key)
    )
    assert _roots(ca) == [root]
    chain = ca.sign_workload_csr(build_csr(new_key(), FRONTEND), FRONTEND, DAY)
    assert [x509.load_pem_x509_certificate(p) for p in chain.intermediates_pem] == [intermediate]
    path = _verify(ca, chain)
    assert path[1:] == [intermediate, root]


def test_intermediate_chain_that_does_not_link_is_refused(operator_pki):
    _, intermediate, int_key = operator_pki
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_root = _ca_cert("corp root", "corp root", other_key.public_key(), other_key)
    with pytest.raises(CAError, match="is not issued by certificate 1"):
        CertificateAuthority.from_intermediate(
            intermediate.public_bytes(PEM) + other_root.public_bytes(PEM), key_pem(int_key)
        )


def test_intermediate_without_its_root_is_refused(operator_pki):
    _, intermediate, int_key = operator_pki
    with pytest.raises(CAError, match="must end with the self-signed root"):
        CertificateAuthority.from_intermediate(intermediate.public_bytes(PEM), key_pem(int_key))


def test_intermediate_with_the_wrong_key_is_refused(operator_pki):
    root, intermediate, _ = operator_pki
    with pytest.raises(CAError, match="does not belong"):
        CertificateAuthority.from_intermediate(
            intermediate.public_bytes(PEM) + root.public_bytes(PEM), key_pem(new_key())
        )


# -- signing ---------------------------------------------------------------------------------


def test_signed_leaf_is_an_x509_svid(ca):
    key = new_key()
    before = datetime.now(UTC)
    chain = ca.sign_workload_csr(build_csr(key, FRONTEND), FRONTEND, DAY)
    leaf = chain.leaf()
    ext = leaf.extensions
    assert identity_from_certificate(leaf) == FRONTEND
    assert list(ext.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier(FRONTEND.uri)
    ]
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert set(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert leaf.public_key() == key.public_key()
    backdate = before - leaf.not_valid_before_utc
    assert timedelta(seconds=55) <= backdate <= timedelta(seconds=65)
    lifetime = leaf.not_valid_after_utc - before
    assert DAY - timedelta(seconds=5) <= lifetime <= DAY + timedelta(seconds=5)
    assert chain.intermediates_pem == ()
    _verify(ca, chain)


def test_each_leaf_gets_its_own_serial(ca):
    leaves = [
        ca.sign_workload_csr(build_csr(new_key(), FRONTEND), FRONTEND, DAY).leaf() for _ in range(3)
    ]
    assert len({leaf.serial_number for leaf in leaves}) == 3


def test_leaf_never_outlives_its_issuer(ca):
    chain = ca.sign_workload_csr(build_csr(new_key(), FRONTEND), FRONTEND, timedelta(days=9000))
    assert chain.leaf().not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_mutual_tls_handshake_with_signed_certificates(tmp_path, operator_pki):
    """OpenSSL (what the proxy's TLS uses) accepts the leaves and chains both ways."""
    root, intermediate, int_key = operator_pki
    ca = CertificateAuthority.from_intermediate(
        intermediate.public_bytes(PEM) + root.public_bytes(PEM), key_pem(int_key)
    )

    def context(side, identity):
        key = new_key()
        chain = ca.sign_workload_csr(build_csr(key, identity), identity, DAY)
        (tmp_path / f"{side}.crt").write_bytes(chain.pem)
        (tmp_path / f"{side}.key").write_bytes(key_pem(key))
        purpose = ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # peers are checked by SPIFFE ID, not DNS name
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=ca.trust_bundle_pem)
        ctx.load_cert_chain(tmp_path / f"{side}.crt", tmp_path / f"{side}.key")
        return ctx

    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = context("client", FRONTEND).wrap_bio(c_in, c_out, server_side=False)
    server = context("server", REVIEWS).wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert done == {"client": True, "server": True}
    assert ("URI", FRONTEND.uri) in server.getpeercert()["subjectAltName"]
    assert ("URI", REVIEWS.uri) in client.getpeercert()["subjectAltName"]


def _csr_with(key, *sans: x509.GeneralName, algorithm=None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
    return builder.sign(key, algorithm).public_bytes(PEM)


@pytest.mark.parametrize(
    ("make_csr", "reason", "complaint"),
    [
        (lambda: build_csr(new_key(), REVIEWS), "san_mismatch", "but spiffe://"),
        (
            lambda: _csr_with(
                new_key(),
                x509.UniformResourceIdentifier(FRONTEND.uri),
                x509.DNSName("frontend.shop.svc"),
                algorithm=hashes.SHA256(),
            ),
            "san_mismatch",
            "must name only",
        ),
        (lambda: _csr_with(new_key(), algorithm=hashes.SHA256()), "san_mismatch", "no SAN"),
        (
            lambda: _csr_with(
                ec.generate_private_key(ec.SECP384R1()),
                x509.UniformResourceIdentifier(FRONTEND.uri),
                algorithm=hashes.SHA256(),
            ),
            "key_type",
            "secp384r1",
        ),
        (
            lambda: _csr_with(
                rsa.generate_private_key(public_exponent=65537, key_size=2048),
                x509.UniformResourceIdentifier(FRONTEND.uri),
                algorithm=hashes.SHA256(),
            ),
            "key_type",
            "RSAPublicKey",
        ),
        (
            lambda: _csr_with(
                ed25519.Ed25519PrivateKey.generate(),
                x509.UniformResourceIdentifier(FRONTEND.uri),
            ),
            "key_type",
            "Ed25519",
        ),
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "malformed_csr", "PEM"),
    ],
    ids=["other-identity", "extra-dns-san", "no-san", "p384", "rsa", "ed25519", "garbage"],
)
def test_signing_refuses(ca, make_csr, reason, complaint):
    with pytest.raises(SigningRefused) as caught:
        ca.sign_workload_csr(make_csr(), FRONTEND, DAY)
    assert caught.value.reason == reason
    assert complaint in str(caught.value)


def test_signing_refuses_a_csr_whose_signature_does_not_match(ca):
    csr = x509.load_pem_x509_csr(build_csr(new_key(), FRONTEND))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte belongs to the signature's s value
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(PEM)
    with pytest.raises(SigningRefused) as caught:
        ca.sign_workload_csr(tampered, FRONTEND, DAY)
    assert caught.value.reason == "bad_signature"


def test_signing_refuses_another_trust_domain(ca):
    foreign = Identity("other.org", "shop", "frontend")
    with pytest.raises(SigningRefused) as caught:
        ca.sign_workload_csr(build_csr(new_key(), foreign), foreign, DAY)
    assert caught.value.reason == "trust_domain"


def test_non_positive_lifetime_is_a_caller_error(ca):
    with pytest.raises(ValueError, match="positive"):
        ca.sign_workload_csr(build_csr(new_key(), FRONTEND), FRONTEND, timedelta(0))
