"""`meshctl authz check` explains decisions with the proxies' own evaluator."""

from __future__ import annotations

import pytest
from meshagent.common.snapshot import Snapshot, Workload
from meshagent.controller.explain import ExplainError, explain


def _snap(*policies: dict) -> Snapshot:
    workloads = [
        Workload(
            uid="f",
            namespace="shop",
            name="frontend",
            node="n1",
            ips=["10.0.0.1"],
            service_account="frontend",
            meshed=True,
        ),
        Workload(
            uid="x",
            namespace="shop",
            name="intruder",
            node="n1",
            ips=["10.0.0.2"],
            service_account="intruder",
            meshed=True,
        ),
        Workload(
            uid="r",
            namespace="shop",
            name="reviews",
            node="n2",
            ips=["10.0.0.3"],
            service_account="reviews",
            labels={"app": "reviews"},
            meshed=True,
        ),
    ]
    return Snapshot(node="", workloads=workloads, istio_resources=list(policies))


ALLOW = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "allow-frontend", "namespace": "shop"},
    "spec": {
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}]}]
    },
}
DENY_ADMIN = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-admin", "namespace": "shop"},
    "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]},
}


def test_allow_for_the_named_principal_and_deny_for_others():
    snap = _snap(ALLOW)
    assert explain(snap, "shop/frontend", "shop/reviews:9080").decision.allowed
    denied = explain(snap, "shop/intruder", "shop/reviews:9080")
    assert not denied.decision.allowed
    assert "shop/allow-frontend" in denied.render()


def test_a_deny_rule_on_paths_names_its_policy_and_rule():
    snap = _snap(DENY_ADMIN)
    result = explain(snap, "shop/frontend", "shop/reviews:9080", method="GET", path="/admin/x")
    assert not result.decision.allowed
    assert result.decision.policy == "shop/deny-admin" and result.decision.rule == 0
    assert result.render().startswith("DENY: GET /admin/x from shop/frontend to shop/reviews:9080")
    assert explain(
        snap, "shop/frontend", "shop/reviews:9080", method="GET", path="/"
    ).decision.allowed


def test_unknown_pods_and_bad_ports_are_clear_errors():
    with pytest.raises(ExplainError, match="no pod 'shop/nobody'"):
        explain(_snap(), "shop/nobody", "shop/reviews:9080")
    with pytest.raises(ExplainError, match="NAMESPACE/POD:PORT"):
        explain(_snap(), "shop/frontend", "shop/reviews")
