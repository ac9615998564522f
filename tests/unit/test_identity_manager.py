"""The agent's identity manager, driven by trio's MockClock and a real in-process CA."""

from datetime import timedelta

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from meshagent.agent.identity import IdentityManager, IdentityUnavailable, build_csr, new_key
from meshagent.common.spiffe import CertificateChain, Identity, identity_from_certificate
from meshagent.controller.ca import CertificateAuthority

FRONTEND = Identity("cluster.local", "shop", "frontend")
REVIEWS = Identity("cluster.local", "shop", "reviews")
HOUR = 3600.0
DAY = timedelta(hours=24)
# The CA backdates notBefore by a minute, so a 24 h certificate's validity is 24 h 1 min
# and its half-life 12 h 30 s after it arrives.
HALF_LIFE = (24 * HOUR + 60) / 2


class CASigner:
    """The controller's signing, in process: the real CA, plus scripted outages."""

    def __init__(self, ca: CertificateAuthority, lifetime: timedelta = DAY) -> None:
        self.ca = ca
        self.lifetime = lifetime
        self.calls: list[tuple[float, Identity]] = []
        self.failures_left = 0
        self.down = False
        # Answer with a certificate for this identity and a key of the signer's own.
        self.impostor: Identity | None = None

    async def sign(self, csr_pem: bytes, identity: Identity) -> CertificateChain:
        self.calls.append((trio.current_time(), identity))
        await trio.sleep(0)  # a round trip is a checkpoint
        if self.down or self.failures_left:
            self.failures_left = max(self.failures_left - 1, 0)
            raise ConnectionError("controller unreachable")
        if self.impostor is not None:
            csr_pem, identity = build_csr(new_key(), self.impostor), self.impostor
        return self.ca.sign_workload_csr(csr_pem, identity, self.lifetime)

    def times(self, identity: Identity = FRONTEND) -> list[float]:
        return [t for t, i in self.calls if i == identity]


@pytest.fixture
def signer(tmp_path):
    return CASigner(CertificateAuthority.load_or_create(tmp_path / "ca.pem"))


@pytest.fixture
async def manager(signer, nursery):
    manager = IdentityManager(signer)
    await nursery.start(manager.serve)
    return manager


async def test_wanted_identity_gets_a_certificate_for_a_node_local_key(manager):
    manager.set_wanted([FRONTEND])
    cert = await manager.wait_for(FRONTEND, timeout=5)
    leaf = x509.load_pem_x509_certificate(cert.cert_chain_pem)
    key = serialization.load_pem_private_key(cert.key_pem, None)
    assert identity_from_certificate(leaf) == FRONTEND
    assert leaf.public_key() == key.public_key()
    assert cert.not_after == leaf.not_valid_after_utc
    assert manager.get(FRONTEND) is cert
    assert b"PRIVATE KEY" not in repr(cert).encode()
    assert manager.status() == [
        {
            "identity": FRONTEND.uri,
            "state": "ready",
            "not_after": leaf.not_valid_after_utc.isoformat(),
            "renewals": 0,
            "last_error": None,
        }
    ]


async def test_renews_at_half_life_for_new_handshakes_only(manager, signer, autojump_clock):
    manager.set_wanted([FRONTEND])
    first = await manager.wait_for(FRONTEND, timeout=5)
    (issued_at,) = signer.times()

    await trio.sleep_until(issued_at + HALF_LIFE - 1)
    assert manager.get(FRONTEND) is first
    await trio.sleep_until(issued_at + HALF_LIFE + 1)
    assert signer.times() == [issued_at, pytest.approx(issued_at + HALF_LIFE)]
    second = manager.get(FRONTEND)
    assert second is not None and second is not first
    assert second.key_pem != first.key_pem  # a fresh key each time
    assert first.cert_chain_pem  # whoever holds the old one keeps using it

    await trio.sleep_until(issued_at + 2 * HALF_LIFE + 1)
    assert len(signer.times()) == 3
    assert manager.status()[0]["renewals"] == 2


async def test_retries_with_backoff_after_signer_failures(manager, signer, autojump_clock):
    signer.failures_left = 3
    start = trio.current_time()
    manager.set_wanted([FRONTEND])
    await trio.sleep(0.5)
    assert manager.get(FRONTEND) is None
    assert "controller unreachable" in manager.status()[0]["last_error"]
    assert manager.status()[0]["state"] == "pending"

    cert = await manager.wait_for(FRONTEND, timeout=60)
    assert cert is not None
    # Backoff doubles from one second: attempts at 0, 1, 3 and 7 s.
    assert [round(t - start, 3) for t in signer.times()] == [0, 1, 3, 7]
    assert manager.status()[0]["last_error"] is None


async def test_failed_renewals_keep_the_old_certificate_until_it_expires(
    manager, signer, autojump_clock
):
    manager.set_wanted([FRONTEND])
    cert = await manager.wait_for(FRONTEND, timeout=5)
    (issued_at,) = signer.times()
    signer.down = True

    await trio.sleep_until(issued_at + 20 * HOUR)
    assert manager.get(FRONTEND) is cert
    assert len(signer.times()) > 5  # kept trying
    gaps = [b - a for a, b in zip(signer.times()[1:], signer.times()[2:], strict=False)]
    assert max(gaps) == pytest.approx(60)  # backoff is capped

    await trio.sleep_until(issued_at + 24 * HOUR + 1)
    assert manager.get(FRONTEND) is None
    assert manager.status()[0]["state"] == "expired"

    signer.down = False
    renewed = await manager.wait_for(FRONTEND, timeout=120)
    assert renewed is not cert


async def test_unwanted_identities_are_dropped(manager, signer, autojump_clock):
    manager.set_wanted([FRONTEND, REVIEWS])
    await manager.wait_for(FRONTEND, timeout=5)
    await manager.wait_for(REVIEWS, timeout=5)

    manager.set_wanted([FRONTEND])
    assert manager.get(REVIEWS) is None
    assert [row["identity"] for row in manager.status()] == [FRONTEND.uri]

    await trio.sleep(2 * 24 * HOUR)
    assert len(signer.times(REVIEWS)) == 1  # never renewed after it was dropped
    assert len(signer.times(FRONTEND)) > 1


async def test_wait_for_times_out_with_the_last_error(manager, signer, autojump_clock):
    signer.down = True
    manager.set_wanted([FRONTEND])
    with pytest.raises(IdentityUnavailable, match="controller unreachable"):
        await manager.wait_for(FRONTEND, timeout=10)
    with pytest.raises(IdentityUnavailable, match="not a wanted identity"):
        await manager.wait_for(REVIEWS, timeout=1)


async def test_wait_for_covers_an_identity_wanted_a_moment_later(manager, nursery):
    async def discover_later():
        await trio.sleep(0.01)
        manager.set_wanted([FRONTEND])

    nursery.start_soon(discover_later)
    cert = await manager.wait_for(FRONTEND, timeout=5)
    assert cert.identity == FRONTEND


@pytest.mark.parametrize(
    ("impostor", "complaint"),
    [(REVIEWS, "for spiffe://cluster.local/ns/shop/sa/reviews, not"), (FRONTEND, "another key")],
)
async def test_a_certificate_that_does_not_match_the_request_is_not_accepted(
    manager, signer, autojump_clock, impostor, complaint
):
    signer.impostor = impostor  # a confused or malicious controller
    manager.set_wanted([FRONTEND])
    await trio.sleep(5)
    assert manager.get(FRONTEND) is None
    assert complaint in manager.status()[0]["last_error"]
    signer.impostor = None
    assert (await manager.wait_for(FRONTEND, timeout=60)).identity == FRONTEND


async def test_serve_cannot_run_twice(manager):
    with pytest.raises(RuntimeError, match="already running"):
        await manager.serve()
