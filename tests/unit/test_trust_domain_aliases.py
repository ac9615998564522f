"""Istio's `meshConfig.trustDomainAliases` (agent config `trust_domain_aliases`): policy principals
are rewritten for the mesh's trust domain and each alias, as istiod does.

The table re-states Istio's own cases (pilot/pkg/security/trustdomain/bundle_test.go,
`TestReplaceTrustDomainAliases`; the bundle is the mesh's trust domain first, then its aliases);
the decisions below show what a user sees: a policy written for the old trust domain admits the
peer once the old domain is an alias, and not before.
"""

from __future__ import annotations

import pytest
from meshagent.agent.config import AgentConfig
from meshagent.common.authz import PolicySet, Request, Workload
from meshagent.common.istio import parse_resource
from meshagent.common.trustdomain import expand_principals
from pydantic import ValidationError

ISTIO_CASES = [
    # (name, trust domain, aliases, principals, expected)
    ("no alias, no change", "cluster.local", [], ["cluster.local/ns/foo/sa/bar"],
     ["cluster.local/ns/foo/sa/bar"]),
    ("principal *", "cluster.local", [], ["*"], ["*"]),
    ("principal with * trust domain", "cluster.local", [], ["*/ns/foo/sa/bar"],
     ["*/ns/foo/sa/bar"]),
    ("one alias, one principal", "td2", ["td1"], ["td1/ns/foo/sa/bar"],
     ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"]),
    ("one alias, two principals", "td1", ["cluster.local"],
     ["cluster.local/ns/foo/sa/bar", "cluster.local/ns/yyy/sa/zzz"],
     ["td1/ns/foo/sa/bar", "cluster.local/ns/foo/sa/bar", "td1/ns/yyy/sa/zzz",
      "cluster.local/ns/yyy/sa/zzz"]),
    ("one alias, * principals kept", "td1", ["cluster.local"],
     ["*/ns/foo/sa/bar", "*sa/zzz", "*"], ["*/ns/foo/sa/bar", "*sa/zzz", "*"]),
    ("two aliases, two principals", "td2", ["td1", "cluster.local"],
     ["cluster.local/ns/foo/sa/bar", "td1/ns/yyy/sa/zzz"],
     ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar", "cluster.local/ns/foo/sa/bar",
      "td2/ns/yyy/sa/zzz", "td1/ns/yyy/sa/zzz", "cluster.local/ns/yyy/sa/zzz"]),
    ("* prefix in the principal's trust domain", "td2", ["foo-td1", "cluster.local"],
     ["*-td1/ns/foo/sa/bar"],
     ["td2/ns/foo/sa/bar", "*-td1/ns/foo/sa/bar", "cluster.local/ns/foo/sa/bar"]),
    ("no trust domain of the bundle", "td1", ["td2"], ["some-td/ns/foo/sa/bar"],
     ["some-td/ns/foo/sa/bar"]),
    ("matches one alias", "td1", ["td2", "some-td"], ["some-td/ns/foo/sa/bar"],
     ["td1/ns/foo/sa/bar", "td2/ns/foo/sa/bar", "some-td/ns/foo/sa/bar"]),
    ("one of two principals matches an alias", "new-td", ["td2", "td3"],
     ["td1/ns/some-ns/sa/some-sa", "td2/ns/foo/sa/bar"],
     ["td1/ns/some-ns/sa/some-sa", "new-td/ns/foo/sa/bar", "td2/ns/foo/sa/bar",
      "td3/ns/foo/sa/bar"]),
    ("empty trust domain", "new-td", ["td2", "td3"], ["/ns/some-ns/sa/some-sa"],
     ["/ns/some-ns/sa/some-sa"]),
    ("no duplicates for a prefix", "new-td", ["old-td"], ["*-td/ns/some-ns/sa/some-sa"],
     ["*-td/ns/some-ns/sa/some-sa"]),
    # not in Istio's table: cluster.local means the mesh's own domain even without an alias
    ("cluster.local is the mesh's domain", "new-td", [], ["cluster.local/ns/foo/sa/bar"],
     ["new-td/ns/foo/sa/bar"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("trust_domain", "aliases", "principals", "expected"),
    [case[1:] for case in ISTIO_CASES],
    ids=[case[0] for case in ISTIO_CASES],
)
def test_principals_are_rewritten_as_istio_does(trust_domain, aliases, principals, expected):
    assert expand_principals(principals, (trust_domain, *aliases)) == tuple(expected)


FRONTEND_NEW = "new-td/ns/shop/sa/frontend"  # the peer's certificate, in the mesh's new domain
REVIEWS = Workload("shop", {"app": "reviews"})


def _policy(spec: dict):
    return parse_resource(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": spec,
        }
    )


def _allowed(spec: dict, trust_domains: tuple[str, ...], principal=FRONTEND_NEW) -> bool:
    request = Request(principal, "shop", "10.1.0.5", "10.2.0.9", 9080)
    return (
        PolicySet([_policy(spec)], trust_domains=trust_domains).evaluate(REVIEWS, request).allowed
    )


ALLOW_OLD = {"rules": [{"from": [{"source": {"principals": ["old-td/ns/shop/sa/frontend"]}}]}]}
DENY_OLD_NOT = {
    "action": "DENY",
    "rules": [{"from": [{"source": {"notPrincipals": ["old-td/ns/shop/sa/frontend"]}}]}],
}
ALLOW_OLD_CONDITION = {
    "rules": [{"when": [{"key": "source.principal", "values": ["old-td/ns/shop/sa/frontend"]}]}]
}


@pytest.mark.parametrize(
    ("spec", "aliases", "allowed"),
    [
        (ALLOW_OLD, (), False),  # old-td is no domain of the mesh: matches only old-td peers
        (ALLOW_OLD, ("old-td",), True),
        (DENY_OLD_NOT, (), False),  # the peer is not old-td/...: denied
        (DENY_OLD_NOT, ("old-td",), True),  # notPrincipals are rewritten too
        (ALLOW_OLD_CONDITION, (), False),
        (ALLOW_OLD_CONDITION, ("old-td",), True),  # and the source.principal condition
        (ALLOW_OLD, ("other-td",), False),
    ],
    ids=["allow-no-alias", "allow-alias", "notPrincipals-no-alias", "notPrincipals-alias",
         "condition-no-alias", "condition-alias", "another-alias"],
)  # fmt: skip
def test_a_policy_for_the_old_trust_domain_admits_the_peer_once_it_is_an_alias(
    spec, aliases, allowed
):
    assert _allowed(spec, ("new-td", *aliases)) is allowed


def test_an_old_domain_peer_is_admitted_by_a_policy_for_the_new_domain_with_the_alias():
    spec = {"rules": [{"from": [{"source": {"principals": [FRONTEND_NEW]}}]}]}
    old_peer = "old-td/ns/shop/sa/frontend"
    assert not _allowed(spec, ("new-td",), principal=old_peer)
    assert _allowed(spec, ("new-td", "old-td"), principal=old_peer)


def test_a_cluster_local_policy_means_the_mesh_s_own_domain():
    spec = {
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}]}]
    }
    assert _allowed(spec, ("new-td",))
    assert not _allowed(spec, ("new-td",), principal="cluster.local/ns/shop/sa/other")


def test_agent_config_bundle_puts_the_mesh_s_domain_first_and_refuses_bad_aliases():
    config = AgentConfig(
        node_name="n", trust_domain="new-td", trust_domain_aliases=["old-td", "new-td"]
    )
    assert config.trust_domains == ("new-td", "old-td")
    assert AgentConfig(node_name="n").trust_domains == ("cluster.local",)
    with pytest.raises(ValidationError, match=r"trust domain 'Old_TD/x' is not valid"):
        AgentConfig(node_name="n", trust_domain_aliases=["Old_TD/x"])
