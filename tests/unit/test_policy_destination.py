"""The inbound path's per-connection policy selection (agent/policy/authorization.py): kept
while the snapshot's PolicySet stays, recomputed with a new one, and decisions unchanged."""

from __future__ import annotations

from meshagent.agent.policy import authorization
from meshagent.common import authz
from meshagent.common.snapshot import Workload

from tests.unit.test_authz_table import deny, op

POD = Workload(
    uid="u1",
    namespace="shop",
    name="reviews-1",
    node="node-1",
    ips=["10.0.0.9"],
    service_account="reviews",
    labels={"app": "reviews"},
    meshed=True,
)


def _check(policies, selected, method: str) -> authz.Decision:
    return authorization.check(
        policies,
        authorization.AuthzStats(),
        source=None,
        source_ip="10.0.0.1",
        destination=POD,
        destination_ip="10.0.0.9",
        port=8080,
        http=authz.HttpAttrs(method=method, path="/", host="r", headers={}),
        selected=selected,
    )


def test_selection_is_kept_per_policy_set_and_decides_as_the_set_does():
    none = authz.PolicySet([])
    some = authz.PolicySet([deny("no-post", op(methods=["POST"]))])
    kept = authorization.DestinationPolicies(POD)
    first = kept.get(none)
    assert kept.get(none) is first and not authorization.applies(first)
    chosen = kept.get(some)
    assert chosen is not first and authorization.applies(chosen)
    for method in ("GET", "POST"):
        assert _check(some, chosen, method) == _check(some, None, method)
    assert not _check(some, chosen, "POST").allowed
