"""A DENY AuthorizationPolicy the controller refuses fails closed (controller/failclosed.py):
the snapshot carries a deny-all `<name>.unenforceable` for exactly the workloads its
selector picks, which the agents' evaluator (common/authz.py) enforces; `/status`, the
gauge, the log and `meshctl status` say so."""

from __future__ import annotations

import json
import logging

from click.testing import CliRunner
from meshagent.common import authz
from meshagent.common.istio import parse_resource
from meshagent.controller import cli
from meshagent.controller.app import Controller, ControllerSettings
from meshagent.controller.compiler import compile_snapshot
from meshagent.controller.model import ClusterModel
from meshagent.controller.validation import Validator
from prometheus_client import REGISTRY

MESH_NS = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}


def pod(name: str, app: str, namespace: str = "shop") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {"nodeName": "node-1", "serviceAccountName": app},
        "status": {"phase": "Running", "podIP": f"10.244.1.{len(name)}"},
    }


def policy(name: str, spec: dict, namespace: str = "shop", **meta) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace, **meta},
        "spec": spec,
    }


# A DENY on /admin* for reviews, with a field outside the subset (a typo of `paths`).
BROKEN_DENY = policy(
    "deny-admin",
    {
        "selector": {"matchLabels": {"app": "reviews"}},
        "action": "DENY",
        "rules": [{"to": [{"operation": {"pathz": ["/admin*"]}}]}],
    },
)


def model_with(*policies: dict) -> ClusterModel:
    model = ClusterModel()
    model.replace("Namespace", [MESH_NS])
    model.replace("Pod", [pod("reviews-1", "reviews"), pod("ratings-1", "ratings")])
    model.replace("AuthorizationPolicy", list(policies))
    return model


def decide(model: ClusterModel, app: str, namespace: str = "shop") -> authz.Decision:
    """What an agent decides for a plain connection to a workload labelled app=``app``."""
    snapshot = compile_snapshot(model, "node-1")
    policies = [
        parse_resource(r) for r in snapshot.istio_resources if r["kind"] == "AuthorizationPolicy"
    ]
    request = authz.Request(
        source_principal="cluster.local/ns/shop/sa/frontend",
        source_namespace="shop",
        source_ip="10.244.1.9",
        destination_ip="10.244.1.5",
        destination_port=9080,
    )
    workload = authz.Workload(namespace, {"app": app})
    return authz.PolicySet(policies).evaluate(workload, request)


def test_a_refused_deny_denies_everything_to_the_workloads_it_selects() -> None:
    model = model_with(BROKEN_DENY)
    snapshot = compile_snapshot(model, "node-1")
    (synthetic,) = snapshot.istio_resources
    assert synthetic["metadata"]["name"] == "deny-admin.unenforceable"
    assert synthetic["metadata"]["namespace"] == "shop"
    assert synthetic["spec"] == {
        "action": "DENY",
        "rules": [{}],
        "selector": {"matchLabels": {"app": "reviews"}},
    }
    reason = synthetic["metadata"]["annotations"]["meshagent.io/unenforceable"]
    assert reason.startswith("spec.rules[0].to[0].operation.pathz: ")

    denied = decide(model, "reviews")
    assert not denied.allowed
    assert denied.policy == "shop/deny-admin.unenforceable"
    assert decide(model, "ratings").allowed  # not selected: untouched
    assert decide(model, "reviews", namespace="other").allowed  # another namespace


def test_a_valid_deny_is_compiled_as_written() -> None:
    fixed = policy(
        "deny-admin",
        {**BROKEN_DENY["spec"], "rules": [{"to": [{"operation": {"ports": ["9999"]}}]}]},
    )
    model = model_with(fixed)
    (kept,) = compile_snapshot(model, "node-1").istio_resources
    assert kept["metadata"]["name"] == "deny-admin"
    assert decide(model, "reviews").allowed  # to 9080: the rule (port 9999) does not match


def test_refused_allow_audit_and_dry_run_deny_are_only_left_out() -> None:
    bad_rules = BROKEN_DENY["spec"]["rules"]
    model = model_with(
        policy("allow", {"action": "ALLOW", "rules": bad_rules}),
        policy("audit", {"action": "AUDIT", "rules": bad_rules}),
        policy(
            "dry",
            {"action": "DENY", "rules": bad_rules},
            annotations={"istio.io/dry-run": "true"},
        ),
        policy("custom", {"action": "CUSTOM", "rules": bad_rules}),
    )
    assert compile_snapshot(model, "node-1").istio_resources == []
    assert decide(model, "reviews").allowed


def test_an_unreadable_selector_denies_every_workload_of_the_namespace() -> None:
    broken = policy(
        "deny-x",
        {"selector": {"matchLabel": {"app": "reviews"}}, "action": "DENY", "rules": [{}]},
    )
    model = model_with(broken)
    (synthetic,) = compile_snapshot(model, "node-1").istio_resources
    assert "selector" not in synthetic["spec"]
    assert not decide(model, "reviews").allowed
    assert not decide(model, "ratings").allowed
    assert decide(model, "reviews", namespace="other").allowed


def test_a_refused_deny_in_the_root_namespace_holds_mesh_wide() -> None:
    root = {**BROKEN_DENY, "metadata": {"name": "deny-admin", "namespace": "istio-system"}}
    model = model_with(root)
    assert not decide(model, "reviews").allowed
    assert not decide(model, "reviews", namespace="other").allowed
    assert decide(model, "ratings").allowed


def unenforceable_gauge(namespace: str, name: str) -> float | None:
    return REGISTRY.get_sample_value(
        "meshagent_controller_unenforceable_policies", {"namespace": namespace, "name": name}
    )


def test_validator_counts_logs_and_clears_it(caplog) -> None:
    model = model_with(BROKEN_DENY)
    validator = Validator()
    with caplog.at_level(logging.INFO, logger="meshagent.controller.validation"):
        validator.run(model)
        validator.run(model)  # logged once, not on every change
    assert [u.name for u in validator.unenforceable] == ["deny-admin"]
    assert unenforceable_gauge("shop", "deny-admin") == 1
    fail_closed = [r for r in caplog.records if "fail closed" in r.getMessage()]
    assert len(fail_closed) == 1
    assert "workloads with labels {'app': 'reviews'}" in fail_closed[0].getMessage()

    model.replace("AuthorizationPolicy", [])
    validator.run(model)
    assert validator.unenforceable == []
    assert unenforceable_gauge("shop", "deny-admin") is None


def test_status_lists_it_with_the_pods_it_now_denies(tmp_path) -> None:
    controller = Controller(ControllerSettings(manifest_dir=tmp_path))
    controller.model = model_with(BROKEN_DENY)
    controller.validator.run(controller.model)
    (entry,) = controller.status()["unenforceable"]
    assert entry["resource"] == "AuthorizationPolicy shop/deny-admin"
    assert entry["policy"] == "shop/deny-admin.unenforceable"
    assert entry["selector"] == {"app": "reviews"}
    assert entry["workloads"] == ["shop/reviews-1"]
    assert entry["reason"].startswith("spec.rules[0].to[0].operation.pathz: ")
    json.dumps(controller.status())


def test_meshctl_status_prints_the_unenforceable_policies(monkeypatch) -> None:
    status = {
        "generation": 1,
        "agents": [],
        "rejected": [],
        "unenforceable": [
            {
                "resource": "AuthorizationPolicy shop/deny-admin",
                "policy": "shop/deny-admin.unenforceable",
                "namespace": "shop",
                "selector": {"app": "reviews"},
                "selector_readable": True,
                "workloads": ["shop/reviews-1"],
                "reason": "spec.rules[0].to[0].operation.pathz: field is not supported",
            }
        ],
    }

    async def fake_get(host, port, path):
        return 200, json.dumps(status).encode()

    monkeypatch.setattr(cli, "http_get", fake_get)
    monkeypatch.delenv("MESHAGENT_CONFIG", raising=False)
    output = CliRunner().invoke(cli.main, ["status"]).output
    assert "UNENFORCEABLE DENY POLICIES" in output
    assert "AuthorizationPolicy shop/deny-admin -> shop/deny-admin.unenforceable" in output
    assert "selects: app=reviews" in output
    assert "now denies: shop/reviews-1" in output
