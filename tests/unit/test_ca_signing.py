"""Node-scoped signing decisions and the lab's node bootstrap tokens."""

import stat
from dataclasses import dataclass
from datetime import timedelta

import pytest
from meshagent.agent.identity.keys import build_csr, new_key
from meshagent.common.spiffe import Identity, identity_from_certificate
from meshagent.controller.ca import CertificateAuthority, SigningRefused
from meshagent.controller.signing import (
    AuthenticationFailed,
    NodeTokenAuthenticator,
    authorize_csr,
    sign_for_node,
)
from prometheus_client import REGISTRY

FRONTEND = Identity("cluster.local", "shop", "frontend")
DAY = timedelta(hours=24)


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    node: str
    service_account: str


PODS = [
    Pod("shop", "frontend-7d9", "node-1", "frontend"),
    Pod("shop", "reviews-5f2", "node-2", "reviews"),
    Pod("admin", "frontend-x", "node-2", "frontend"),
]


def test_node_running_the_workload_may_have_it_signed():
    authorize_csr("node-1", FRONTEND, PODS)


@pytest.mark.parametrize(
    ("node", "identity"),
    [
        ("node-2", FRONTEND),  # frontend in shop runs on node-1 only
        ("node-1", Identity("cluster.local", "shop", "reviews")),
        ("node-1", Identity("cluster.local", "admin", "frontend")),
        ("node-3", FRONTEND),
    ],
)
def test_node_cannot_mint_identities_it_does_not_run(node, identity):
    with pytest.raises(SigningRefused) as caught:
        authorize_csr(node, identity, PODS)
    assert caught.value.reason == "not_on_node"
    assert node in str(caught.value)


def _count(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_sign_for_node_signs_and_counts(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca.pem")
    signed = _count("meshagent_controller_csr_signed_total")
    chain = sign_for_node(ca, "node-1", build_csr(new_key(), FRONTEND), FRONTEND, PODS, DAY)
    assert identity_from_certificate(chain.leaf()) == FRONTEND
    assert _count("meshagent_controller_csr_signed_total") == signed + 1


def test_sign_for_node_counts_refusals_by_reason(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca.pem")
    other = Identity("cluster.local", "shop", "reviews")
    name = "meshagent_controller_csr_refused_total"
    not_on_node = _count(name, reason="not_on_node")
    san = _count(name, reason="san_mismatch")
    with pytest.raises(SigningRefused):
        sign_for_node(ca, "node-2", build_csr(new_key(), FRONTEND), FRONTEND, PODS, DAY)
    with pytest.raises(SigningRefused):
        sign_for_node(ca, "node-1", build_csr(new_key(), other), FRONTEND, PODS, DAY)
    assert _count(name, reason="not_on_node") == not_on_node + 1
    assert _count(name, reason="san_mismatch") == san + 1


# -- bootstrap tokens ------------------------------------------------------------------------


def test_issued_token_authenticates_its_node(tmp_path):
    tokens = NodeTokenAuthenticator(tmp_path / "tokens.json")
    one, two = tokens.issue("node-1"), tokens.issue("node-2")
    assert one != two
    assert tokens.authenticate(one) == "node-1"
    assert tokens.authenticate(two) == "node-2"


@pytest.mark.parametrize("presented", ["", "not-a-token", "x" * 43])
def test_unknown_token_is_refused(tmp_path, presented):
    tokens = NodeTokenAuthenticator(tmp_path / "tokens.json")
    tokens.issue("node-1")
    with pytest.raises(AuthenticationFailed):
        tokens.authenticate(presented)


def test_tokens_survive_a_restart_and_the_file_is_private(tmp_path):
    path = tmp_path / "tokens.json"
    token = NodeTokenAuthenticator(path).issue("node-1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text()  # only digests are stored
    assert NodeTokenAuthenticator(path).authenticate(token) == "node-1"


def test_reissue_and_revoke_invalidate_old_tokens(tmp_path):
    path = tmp_path / "tokens.json"
    tokens = NodeTokenAuthenticator(path)
    old = tokens.issue("node-1")
    new = tokens.issue("node-1")
    with pytest.raises(AuthenticationFailed):
        tokens.authenticate(old)
    assert tokens.authenticate(new) == "node-1"
    tokens.revoke("node-1")
    with pytest.raises(AuthenticationFailed):
        NodeTokenAuthenticator(path).authenticate(new)
    assert tokens.nodes() == []


def test_corrupt_token_file_is_a_clear_error(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text('{"nodes": ["node-1"]}')
    with pytest.raises(ValueError, match=r"tokens\.json is unreadable"):
        NodeTokenAuthenticator(path)
