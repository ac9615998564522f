"""AuthorizationPolicy evaluation, case by case, with the decision Istio's semantics give.

Each case: the policies in force (as users write them), the destination workload, the request,
and the expected decision (allowed, deciding policy and rule, audit mark, dry-run denials).
The workload is `reviews` (labels app=reviews, version=v1) in namespace `shop` unless a case
says otherwise; requests come from `frontend` over mTLS unless a case says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from meshagent.common.authz import HttpAttrs, PolicySet, Request, Workload
from meshagent.common.istio import parse_resource

FRONTEND = "cluster.local/ns/shop/sa/frontend"
REVIEWS = Workload("shop", {"app": "reviews", "version": "v1"})


def policy(name: str, spec: dict[str, Any], *, ns: str = "shop", dry_run: bool = False):
    metadata: dict[str, Any] = {"name": name, "namespace": ns}
    if dry_run:
        metadata["annotations"] = {"istio.io/dry-run": "true"}
    return parse_resource(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": metadata,
            "spec": spec,
        }
    )


def allow(name: str, *rules: dict, **kw):
    return policy(name, {"action": "ALLOW", "rules": list(rules)}, **kw)


def deny(name: str, *rules: dict, **kw):
    return policy(name, {"action": "DENY", "rules": list(rules)}, **kw)


def audit(name: str, *rules: dict, **kw):
    return policy(name, {"action": "AUDIT", "rules": list(rules)}, **kw)


def src(**fields) -> dict:
    return {"from": [{"source": fields}]}


def op(**fields) -> dict:
    return {"to": [{"operation": fields}]}


def when(key: str, values=None, not_values=None) -> dict:
    condition: dict[str, Any] = {"key": key}
    if values is not None:
        condition["values"] = values
    if not_values is not None:
        condition["notValues"] = not_values
    return {"when": [condition]}


def http(method="GET", path="/", host="reviews.shop:9080", headers=None, **kw) -> Request:
    return tcp(http=HttpAttrs(method, path, host, headers or {}), **kw)


def tcp(
    principal=FRONTEND,
    namespace="shop",
    source_ip="10.1.0.5",
    destination_ip="10.2.0.9",
    port=9080,
    http=None,
) -> Request:
    return Request(principal, namespace, source_ip, destination_ip, port, http)


PLAINTEXT = {"principal": None, "namespace": None}


@dataclass
class Case:
    id: str
    policies: list
    request: Request
    allowed: bool
    policy: str | None = None
    rule: int | None = None
    workload: Workload = REVIEWS
    audit: bool = False
    dry_run: tuple = ()  # (policy, rule) of each expected dry-run denial
    root: str = "istio-system"


CASES = [
    # --- evaluation order and policy presence -------------------------------------------------
    Case("no-policy-allows", [], http(), True),
    Case("allow-nothing-denies", [policy("allow-nothing", {})], http(), False),
    Case(
        "allow-all-empty-rule-allows", [allow("allow-all", {})], http(), True, "shop/allow-all", 0
    ),
    Case(
        "deny-all-beats-allow-all",
        [allow("allow-all", {}), deny("deny-all", {})],
        http(),
        False,
        "shop/deny-all",
        0,
    ),
    Case(
        "deny-before-allow",
        [allow("all", {}), deny("no-admin", op(paths=["/admin"]))],
        http(path="/admin"),
        False,
        "shop/no-admin",
        0,
    ),
    Case(
        "deny-not-matching-and-no-allow-allows",
        [deny("no-admin", op(paths=["/admin"]))],
        http(path="/home"),
        True,
    ),
    Case(
        "allow-present-none-matching-denies",
        [allow("get-only", op(methods=["GET"]))],
        http(method="POST"),
        False,
    ),
    Case(
        "second-allow-policy-matches",
        [allow("a-post", op(methods=["POST"])), allow("b-get", op(methods=["GET"]))],
        http(method="GET"),
        True,
        "shop/b-get",
        0,
    ),
    Case(
        "second-rule-matches-reports-index",
        [allow("p", op(methods=["POST"]), op(methods=["GET"]))],
        http(method="GET"),
        True,
        "shop/p",
        1,
    ),
    # --- selectors and namespaces --------------------------------------------------------------
    Case(
        "selector-other-app-does-not-apply",
        [policy("ratings-only", {"selector": {"matchLabels": {"app": "ratings"}}})],
        http(),
        True,
    ),
    Case(
        "selector-all-labels-match-applies",
        [policy("v1-only", {"selector": {"matchLabels": {"app": "reviews", "version": "v1"}}})],
        http(),
        False,
    ),
    Case(
        "selector-one-label-differs-does-not-apply",
        [policy("v2-only", {"selector": {"matchLabels": {"app": "reviews", "version": "v2"}}})],
        http(),
        True,
    ),
    Case(
        "policy-in-other-namespace-does-not-apply",
        [policy("allow-nothing", {}, ns="other")],
        http(),
        True,
    ),
    Case(
        "root-namespace-policy-applies-mesh-wide",
        [deny("deny-all", {}, ns="istio-system")],
        http(),
        False,
        "istio-system/deny-all",
        0,
    ),
    Case(
        "root-namespace-selector-matches-other-namespace",
        [
            policy(
                "lock-reviews", {"selector": {"matchLabels": {"app": "reviews"}}}, ns="istio-system"
            )
        ],
        http(),
        False,
    ),
    Case(
        "root-namespace-selector-mismatch-does-not-apply",
        [
            policy(
                "lock-ratings", {"selector": {"matchLabels": {"app": "ratings"}}}, ns="istio-system"
            )
        ],
        http(),
        True,
    ),
    Case(
        "configured-root-namespace",
        [deny("deny-all", {}, ns="mesh-root")],
        http(),
        False,
        "mesh-root/deny-all",
        0,
        root="mesh-root",
    ),
    Case(
        "istio-system-not-root-when-configured-otherwise",
        [deny("deny-all", {}, ns="istio-system")],
        http(),
        True,
        root="mesh-root",
    ),
    # --- source fields and match forms -----------------------------------------------------------
    Case("principal-exact", [allow("p", src(principals=[FRONTEND]))], http(), True, "shop/p", 0),
    Case(
        "principal-exact-other-identity",
        [allow("p", src(principals=["cluster.local/ns/shop/sa/admin"]))],
        http(),
        False,
    ),
    Case(
        "principal-prefix",
        [allow("p", src(principals=["cluster.local/ns/shop/*"]))],
        http(),
        True,
        "shop/p",
        0,
    ),
    Case(
        "principal-suffix",
        [allow("p", src(principals=["*/sa/frontend"]))],
        http(),
        True,
        "shop/p",
        0,
    ),
    Case(
        "principal-suffix-mismatch", [allow("p", src(principals=["*/sa/backend"]))], http(), False
    ),
    Case("principal-presence-mtls", [allow("p", src(principals=["*"]))], http(), True, "shop/p", 0),
    Case(
        "principal-presence-plaintext-does-not-match",
        [allow("p", src(principals=["*"]))],
        http(**PLAINTEXT),
        False,
    ),
    Case("not-principals-excludes", [allow("p", src(notPrincipals=[FRONTEND]))], http(), False),
    Case(
        "deny-not-principals-star-blocks-plaintext",
        [deny("mtls-only", src(notPrincipals=["*"]))],
        http(**PLAINTEXT),
        False,
        "shop/mtls-only",
        0,
    ),
    Case(
        "deny-not-principals-star-lets-mtls-through",
        [deny("mtls-only", src(notPrincipals=["*"]))],
        http(),
        True,
    ),
    Case("namespaces-match", [allow("p", src(namespaces=["shop"]))], http(), True, "shop/p", 0),
    Case("namespaces-prefix", [allow("p", src(namespaces=["sh*"]))], http(), True, "shop/p", 0),
    Case(
        "not-namespaces-matches-plaintext-as-empty",
        [deny("not-foo", src(notNamespaces=["foo"]))],
        http(**PLAINTEXT),
        False,
        "shop/not-foo",
        0,
    ),
    Case("ip-blocks-cidr", [allow("p", src(ipBlocks=["10.1.0.0/16"]))], http(), True, "shop/p", 0),
    Case("ip-blocks-single-ip-mismatch", [allow("p", src(ipBlocks=["10.1.0.6"]))], http(), False),
    Case("not-ip-blocks-excludes", [allow("p", src(notIpBlocks=["10.0.0.0/8"]))], http(), False),
    Case(
        "ipv6-cidr-admits-ipv6-source",
        [allow("p", src(ipBlocks=["fd00:10:244::/48"]))],
        http(source_ip="fd00:10:244:1::a"),
        True,
        "shop/p",
        0,
    ),
    Case(
        "not-ipv6-cidr-excludes-ipv6-source",
        [allow("p", src(notIpBlocks=["fd00:10:244:1::/64"]))],
        http(source_ip="fd00:10:244:1::a"),
        False,
    ),
    Case(
        "ipv4-source-outside-ipv6-block",
        [allow("p", src(ipBlocks=["fd00::/8"]))],
        http(),
        False,
    ),
    Case(
        "ipv6-source-outside-ipv4-block",
        [allow("p", src(ipBlocks=["10.0.0.0/8"]))],
        http(source_ip="fd00::5"),
        False,
    ),
    # remoteIpBlocks: no trusted X-Forwarded-For hop (Istio's default numTrustedProxies 0), so
    # the remote address is the peer's, as ipBlocks; a client-set X-Forwarded-For is no proof
    Case(
        "remote-ip-blocks-match-the-peer-address",
        [allow("p", src(remoteIpBlocks=["10.1.0.0/16"]))],
        http(),
        True,
        "shop/p",
        0,
    ),
    Case(
        "remote-ip-blocks-ignore-x-forwarded-for",
        [allow("p", src(remoteIpBlocks=["203.0.113.0/24"]))],
        http(headers={"x-forwarded-for": "203.0.113.7"}),
        False,
    ),
    Case(
        "not-remote-ip-blocks-deny-the-peer",
        [deny("p", src(notRemoteIpBlocks=["10.9.0.0/16"]))],
        http(headers={"x-forwarded-for": "10.9.0.1"}),
        False,
        "shop/p",
        0,
    ),
    Case(
        "remote-ip-blocks-hold-on-tcp",
        [allow("p", src(remoteIpBlocks=["10.1.0.5"]))],
        tcp(),
        True,
        "shop/p",
        0,
    ),
    Case(
        "when-remote-ip",
        [deny("p", when("remote.ip", ["10.1.0.0/24"]))],
        tcp(),
        False,
        "shop/p",
        0,
    ),
    Case(
        "source-fields-all-must-match",
        [allow("p", src(principals=[FRONTEND], namespaces=["other"]))],
        http(),
        False,
    ),
    Case(
        "any-source-entry-may-match",
        [
            allow(
                "p",
                {
                    "from": [
                        {"source": {"namespaces": ["other"]}},
                        {"source": {"principals": [FRONTEND]}},
                    ]
                },
            )
        ],
        http(),
        True,
        "shop/p",
        0,
    ),
    Case(
        "from-and-to-both-required",
        [allow("p", {**src(principals=[FRONTEND]), **op(methods=["POST"])})],
        http(method="GET"),
        False,
    ),
    # --- operation fields -----------------------------------------------------------------------
    Case("ports-match", [allow("p", op(ports=["9080"]))], http(), True, "shop/p", 0),
    Case("ports-mismatch", [allow("p", op(ports=["8080"]))], http(), False),
    Case("not-ports-excludes", [allow("p", op(notPorts=["9080"]))], http(), False),
    Case(
        "methods-exact",
        [allow("p", op(methods=["GET", "HEAD"]))],
        http(method="HEAD"),
        True,
        "shop/p",
        0,
    ),
    Case(
        "not-methods-excludes",
        [allow("p", op(notMethods=["DELETE"]))],
        http(method="DELETE"),
        False,
    ),
    Case(
        "paths-prefix",
        [allow("p", op(paths=["/api/*"]))],
        http(path="/api/v1/items"),
        True,
        "shop/p",
        0,
    ),
    Case(
        "paths-suffix",
        [allow("p", op(paths=["*/info"]))],
        http(path="/books/info"),
        True,
        "shop/p",
        0,
    ),
    Case(
        "paths-ignore-query-string",
        [deny("no-admin", op(paths=["/admin"]))],
        http(path="/admin?debug=1"),
        False,
        "shop/no-admin",
        0,
    ),
    Case(
        "not-paths-excludes", [allow("p", op(notPaths=["/healthz"]))], http(path="/healthz"), False
    ),
    Case(
        "hosts-case-insensitive",
        [allow("p", op(hosts=["Reviews.Shop:9080"]))],
        http(host="reviews.shop:9080"),
        True,
        "shop/p",
        0,
    ),
    Case(
        "not-hosts-excludes",
        [allow("p", op(notHosts=["*.internal"]))],
        http(host="admin.internal"),
        False,
    ),
    # --- HTTP-only fields on a non-HTTP (L4) connection ---------------------------------------
    Case(
        "tcp-allow-rule-with-methods-is-ignored",
        [allow("p", op(methods=["GET"], ports=["9080"]))],
        tcp(),
        False,
    ),
    Case(
        "tcp-allow-other-rule-still-matches",
        [allow("p", op(methods=["GET"]), op(ports=["9080"]))],
        tcp(),
        True,
        "shop/p",
        1,
    ),
    Case(
        "tcp-allow-rule-with-header-condition-is-ignored",
        [allow("p", when("request.headers[x-env]", ["prod"]))],
        tcp(),
        False,
    ),
    Case(
        "tcp-deny-methods-only-denies-everything",
        [deny("no-get", op(methods=["GET"]))],
        tcp(),
        False,
        "shop/no-get",
        0,
    ),
    Case(
        "tcp-deny-methods-and-ports-other-port-allowed",
        [deny("p", op(methods=["GET"], ports=["9000"]))],
        tcp(port=9001),
        True,
    ),
    Case(
        "tcp-deny-methods-and-ports-same-port-denied",
        [deny("p", op(methods=["GET"], ports=["9000"]))],
        tcp(port=9000),
        False,
        "shop/p",
        0,
    ),
    Case(
        "tcp-deny-header-condition-dropped",
        [deny("p", {**src(namespaces=["shop"]), **when("request.headers[x-env]", ["prod"])})],
        tcp(),
        False,
        "shop/p",
        0,
    ),
    Case(
        "http-deny-header-condition-kept",
        [deny("p", {**src(namespaces=["shop"]), **when("request.headers[x-env]", ["prod"])})],
        http(headers={"x-env": "dev"}),
        True,
    ),
    # --- when conditions --------------------------------------------------------------------------
    Case(
        "when-header-exact",
        [allow("p", when("request.headers[X-Env]", ["prod"]))],
        http(headers={"x-env": "prod"}),
        True,
        "shop/p",
        0,
    ),
    Case(
        "when-header-absent-does-not-match-values",
        [allow("p", when("request.headers[x-env]", ["prod"]))],
        http(),
        False,
    ),
    Case(
        "when-header-absent-matches-not-values",
        [allow("p", when("request.headers[x-env]", not_values=["test"]))],
        http(),
        True,
        "shop/p",
        0,
    ),
    Case(
        "when-header-presence",
        [allow("p", when("request.headers[x-token]", ["*"]))],
        http(headers={"x-token": "abc"}),
        True,
        "shop/p",
        0,
    ),
    Case(
        "when-header-prefix",
        [allow("p", when("request.headers[user-agent]", ["curl/*"]))],
        http(headers={"user-agent": "curl/8.5"}),
        True,
        "shop/p",
        0,
    ),
    Case(
        "when-source-ip-cidr",
        [allow("p", when("source.ip", ["10.1.0.0/24"]))],
        http(),
        True,
        "shop/p",
        0,
    ),
    Case(
        "when-destination-ip", [allow("p", when("destination.ip", ["10.3.0.0/16"]))], http(), False
    ),
    Case(
        "when-destination-port-not-values",
        [allow("p", when("destination.port", not_values=["9080"]))],
        http(),
        False,
    ),
    Case(
        "when-source-principal",
        [allow("p", when("source.principal", [FRONTEND]))],
        tcp(),
        True,
        "shop/p",
        0,
    ),
    Case(
        "when-source-namespace-not-values-plaintext",
        [deny("p", when("source.namespace", not_values=["shop"]))],
        tcp(**PLAINTEXT),
        False,
        "shop/p",
        0,
    ),
    # --- dry run and audit ------------------------------------------------------------------------
    Case(
        "dry-run-deny-reported-not-enforced",
        [deny("dry-deny", {}, dry_run=True)],
        http(),
        True,
        dry_run=(("shop/dry-deny", 0),),
    ),
    Case(
        "dry-run-allow-nothing-reported-not-enforced",
        [policy("dry-lock", {}, dry_run=True)],
        http(),
        True,
        dry_run=((None, None),),
    ),
    Case(
        "dry-run-allow-matching-reports-nothing",
        [allow("dry-get", op(methods=["GET"]), dry_run=True)],
        http(),
        True,
    ),
    Case(
        "dry-run-beside-enforced-deny",
        [deny("deny-all", {}), deny("dry-admin", op(paths=["/admin"]), dry_run=True)],
        http(path="/admin"),
        False,
        "shop/deny-all",
        0,
        dry_run=(("shop/dry-admin", 0),),
    ),
    Case(
        "audit-match-marks-without-deciding",
        [audit("log-posts", op(methods=["POST"]))],
        http(method="POST"),
        True,
        audit=True,
    ),
    Case(
        "audit-no-match-no-mark",
        [audit("log-posts", op(methods=["POST"]))],
        http(method="GET"),
        True,
    ),
    Case(
        "audit-marks-denied-requests-too",
        [audit("log-all", {}), policy("allow-nothing", {})],
        http(),
        False,
        audit=True,
    ),
    Case(
        "tcp-audit-drops-http-fields-like-deny",
        [audit("log-gets", op(methods=["GET"]))],
        tcp(),
        True,
        audit=True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_authorization_decision(case: Case):
    decision = PolicySet(case.policies, root_namespace=case.root).evaluate(
        case.workload, case.request
    )

    assert decision.allowed is case.allowed
    assert decision.action == ("ALLOW" if case.allowed else "DENY")
    assert (decision.policy, decision.rule) == (case.policy, case.rule)
    assert decision.audit is case.audit
    assert tuple((d.policy, d.rule) for d in decision.dry_run_denials) == case.dry_run


def test_case_ids_are_unique_and_plenty():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


# --- the API around the table ---------------------------------------------------------------


def test_decision_reason_names_policy_and_rule_for_the_log_and_explain():
    policies = PolicySet([deny("deny-admin", op(methods=["POST"]), op(paths=["/admin*"]))])

    decision = policies.evaluate(REVIEWS, http(path="/admin/users"))

    assert (decision.policy, decision.rule) == ("shop/deny-admin", 1)
    assert "shop/deny-admin" in decision.reason and "rule 1" in decision.reason


def test_default_deny_reason_lists_the_allow_policies_checked():
    policies = PolicySet([allow("a", op(methods=["PUT"])), allow("b", op(methods=["POST"]))])

    decision = policies.evaluate(REVIEWS, http())

    assert decision.reason == "denied: no ALLOW policy matched (checked shop/a, shop/b)"


def test_for_workload_can_be_kept_and_reused():
    policies = PolicySet([allow("get-only", op(methods=["GET"]))])
    reviews = policies.for_workload(REVIEWS)

    assert reviews.evaluate(http(method="GET")).allowed
    assert not reviews.evaluate(http(method="POST")).allowed
    assert policies.for_workload(Workload("other", {})).evaluate(http(method="POST")).allowed


def test_dry_run_never_changes_the_enforced_outcome():
    enforced = [deny("no-post", op(methods=["POST"])), allow("shop-only", src(namespaces=["shop"]))]
    shadows = [policy("dry-lock", {}, dry_run=True), deny("dry-deny-all", {}, dry_run=True)]
    requests = [http(method=m, **kw) for m in ("GET", "POST") for kw in ({}, PLAINTEXT)] + [
        tcp(),
        tcp(**PLAINTEXT),
    ]

    for request in requests:
        plain = PolicySet(enforced).evaluate(REVIEWS, request)
        with_dry_run = PolicySet(enforced + shadows).evaluate(REVIEWS, request)
        assert (with_dry_run.allowed, with_dry_run.policy, with_dry_run.rule) == (
            plain.allowed,
            plain.policy,
            plain.rule,
        )
        assert with_dry_run.dry_run_denials  # deny-all and the allow-nothing lock both would deny


def test_malformed_request_ip_is_a_clear_error():
    policies = PolicySet([allow("p", src(ipBlocks=["10.0.0.0/8"]))])

    with pytest.raises(ValueError, match="not-an-ip"):
        policies.evaluate(REVIEWS, http(source_ip="not-an-ip"))
