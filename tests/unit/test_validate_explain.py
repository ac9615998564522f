"""Honest validation (issue #21 items 4 and 5): what the mesh skips, warns about and refuses,
one message per cause, and `meshctl validate --explain`'s account of L4/L7 per port."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from meshagent.common.istio import ResourceError, ResourceSkipped, parse_resource
from meshagent.common.istio.support import warnings
from meshagent.controller import cli

VS = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
}


def vs(**spec) -> dict:
    return {**VS, "spec": {**VS["spec"], **spec}}


@pytest.mark.parametrize(
    ("spec", "path", "fragment"),
    [
        ({"gateways": ["istio-system/ingress"], "hosts": ["*"]}, "spec.gateways", "gateways"),
        ({"exportTo": ["."]}, "spec.exportTo", "exportTo"),
        ({"hosts": ["www.googleapis.com"]}, "spec.hosts", "not a Kubernetes Service"),
    ],
)
def test_resources_that_do_not_concern_the_mesh_are_skipped(spec, path, fragment) -> None:
    with pytest.raises(ResourceSkipped) as caught:
        parse_resource(vs(**spec))
    assert caught.value.problems == ((path, caught.value.message),)
    assert fragment in caught.value.message and "not applied" in caught.value.message


def test_export_to_everywhere_and_a_mesh_gateway_are_accepted() -> None:
    res = parse_resource(vs(exportTo=["*"], gateways=["mesh", "istio-system/ingress"]))
    assert [p for p, _ in warnings(res)] == ["spec.gateways"]


ROUTE = [{"destination": {"host": "reviews"}}]


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("queryParams", {"v": {"exact": "1"}}, "spec.http[0].match[0].queryParams"),
        ("withoutHeaders", {"x-a": {"exact": "1"}}, "spec.http[0].match[0].withoutHeaders"),
        ("authority", {"exact": "a"}, "spec.http[0].match[0].authority"),
    ],
)
def test_unsupported_fields_get_one_uniform_message(field, value, path) -> None:
    rule = {"match": [{"uri": {"prefix": "/"}, field: value}], "route": ROUTE}
    with pytest.raises(ResourceError) as caught:
        parse_resource(vs(http=[rule]))
    assert caught.value.problems == ((path, caught.value.message),)  # one message, one cause
    assert "not supported by meshagent yet" in str(caught.value)
    assert str(caught.value).startswith(f"VirtualService shop/reviews: {path}: ")


def test_destination_rule_tls_credential_name_is_refused_naming_its_path() -> None:
    dr = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {
            "host": "reviews",
            "trafficPolicy": {"tls": {"mode": "SIMPLE", "credentialName": "reviews-ca"}},
        },
    }
    with pytest.raises(ResourceError) as caught:
        parse_resource(dr)
    assert caught.value.path == "spec.trafficPolicy.tls.credentialName"
    assert "not supported by meshagent yet" in caught.value.message


def test_settings_the_data_path_does_not_honour_are_warned() -> None:
    rule = {
        "route": [{"destination": {"host": "api.example.com"}}],
        "retries": {"attempts": 2, "retryOn": "refused-stream"},
    }
    res = parse_resource(vs(http=[rule]))
    assert [p for p, _ in warnings(res)] == ["spec.http[0].route[0].destination.host"]


MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {ports: [{name: http-api, port: 8080}, {port: 5432}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: shop}
spec:
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [db]
  http: [{route: [{destination: {host: db}}], timeout: 2s}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ingress, namespace: shop}
spec:
  hosts: ["*"]
  gateways: [shop-gateway]
  http: [{route: [{destination: {host: db}}]}]
"""


def run_validate(tmp_path, *args: str):
    path = tmp_path / "m.yaml"
    path.write_text(MANIFESTS)
    return CliRunner().invoke(cli.main, ["validate", "-f", str(path), *args])


def test_explain_says_l7_and_l4_per_port(tmp_path) -> None:
    result = run_validate(tmp_path, "--explain")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "denies every connection there" in out  # DENY paths on a TCP port: deny all
    assert "on tcp/unnamed ports the rule never matches" in out  # ALLOW methods on TCP
    assert "on http/http2/grpc ports (db:8080)" in out
    assert "tcp/unnamed ports (db:5432): those ports go to the service itself" in out
    assert "skipped VirtualService shop/ingress: spec.gateways:" in out
    assert "3 ok, 0 rejected, 1 skipped (not for the mesh), 1 of other kinds skipped" in out


def test_validate_json(tmp_path) -> None:
    result = run_validate(tmp_path, "--json", "--explain")
    body = json.loads(result.output)
    outcomes = {r["name"]: r["outcome"] for r in body["resources"]}
    assert outcomes == {"deny-admin": "ok", "get-only": "ok", "db": "ok", "ingress": "skipped"}
    assert all(r["explain"] for r in body["resources"] if r["outcome"] == "ok")
    assert (body["ok"], body["rejected"], body["skipped"]) == (3, 0, 1)


def test_external_looking_two_label_hosts_are_warned() -> None:
    rule = {
        "route": [{"destination": {"host": "httpbin.org"}}],
        "retries": {"attempts": 2, "perTryTimeout": "1s"},
    }
    res = parse_resource(vs(hosts=["httpbin.org"], http=[rule]))
    found = dict(warnings(res))
    assert "namespace org" in found["spec.hosts[0]"]
    assert "spec.http[0].retries.perTryTimeout" not in found  # both engines apply it


def test_a_second_virtual_service_for_a_host_is_warned_as_shadowed(tmp_path) -> None:
    from meshagent.controller.checkfiles import check_files

    docs = []
    for name, ns in (("b", "shop"), ("a", "other"), ("b", "shop")):  # b twice: one object
        docs.append(
            yaml_doc(
                {**VS, "metadata": {"name": name, "namespace": ns}},
                hosts=["reviews.shop.svc.cluster.local"],
            )
        )
    path = tmp_path / "two.yaml"
    path.write_text("---\n".join(docs))
    warned = {v.name: [m for _p, m in v.warnings] for v in check_files([path]).verdicts}
    assert warned["b"] == []  # the Service's own namespace wins
    assert warned["a"] == [
        "reviews.shop.svc.cluster.local: VirtualService shop/b applies to it instead "
        "(one VirtualService per host; they are not merged)"
    ]


def yaml_doc(doc: dict, **spec) -> str:
    import yaml

    return yaml.safe_dump({**doc, "spec": {**doc["spec"], **spec}})


def test_the_webhook_admits_a_skipped_resource_with_a_warning() -> None:
    from meshagent.controller.webhook import ADMISSION_API_VERSION, review_response

    gateway_vs = vs(gateways=["istio-system/ingress"], hosts=["*"])
    request = {"uid": "u", "operation": "CREATE", "namespace": "shop", "object": gateway_vs}
    answer = review_response(
        {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "request": request}
    )["response"]
    assert answer["allowed"] is True
    assert answer["warnings"][0].startswith("meshagent skips this resource: spec.gateways: ")


def test_the_controller_skips_with_one_warning_and_no_rejection(caplog) -> None:
    import logging

    from meshagent.controller.compiler import compile_istio
    from meshagent.controller.model import ClusterModel
    from meshagent.controller.validation import Validator

    model = ClusterModel()
    skipped = vs(gateways=["istio-system/ingress"], hosts=["*"])
    model.replace("VirtualService", [VS, {**skipped, "metadata": {"name": "gw"}}])
    validator = Validator()
    with caplog.at_level(logging.WARNING, logger="meshagent.controller.validation"):
        validator.run(model)
        validator.run(model)  # unchanged: not logged again
    assert validator.rejected == []
    assert [(e.name, e.path) for e in validator.skipped] == [("gw", "spec.gateways")]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "skipped VirtualService default/gw"
    ]
    assert [m["metadata"]["name"] for m in compile_istio(model)] == ["reviews"]  # not applied


def test_http_rules_for_a_service_without_an_l7_port_are_warned(tmp_path) -> None:
    from meshagent.controller.checkfiles import check_files

    service = (
        "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\n"
        "spec: {ports: [{port: 9080}, {name: tcp-x, port: 9081}]}\n"
    )
    path = tmp_path / "m.yaml"
    path.write_text(service + "---\n" + yaml_doc(VS))
    [verdict] = check_files([path]).verdicts
    [(field, message)] = verdict.warnings
    assert field == "spec.hosts[0]"
    assert "9080 (unnamed), 9081 (tcp-x)" in message and "never apply" in message


def test_explain_names_the_ports_a_rule_is_limited_to() -> None:
    from meshagent.controller.describe import describe

    ap = parse_resource(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "tcp", "namespace": "foo"},
            "spec": {"rules": [{"to": [{"operation": {"ports": ["9000", "9001"]}}]}]},
        }
    )
    [scope, rule] = describe(ap)
    assert scope == "ALLOW policy for every workload in namespace foo."
    assert rule.endswith("It matches pod ports 9000, 9001 only.")
    assert "on every port" not in rule


def test_explain_says_remote_ip_blocks_match_the_clients_own_address() -> None:
    """Issue #21: remoteIpBlocks are accepted with ipBlocks' meaning, and --explain says why."""
    from meshagent.controller.describe import describe

    ap = parse_resource(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "remote", "namespace": "foo"},
            "spec": {
                "action": "DENY",
                "rules": [{"from": [{"source": {"remoteIpBlocks": ["203.0.113.0/24"]}}]}],
            },
        }
    )
    [_, rule] = describe(ap)
    assert "numTrustedProxies 0" in rule and "as ipBlocks/source.ip do" in rule
    assert warnings(ap) == []


def test_explain_reads_path_templates_out() -> None:
    from meshagent.controller.describe import describe

    ap = parse_resource(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "templates", "namespace": "foo"},
            "spec": {"rules": [{"to": [{"operation": {"paths": ["/foo/{*}/bar", "/x*"]}}]}]},
        }
    )
    [_, rule] = describe(ap)
    assert "Path templates ['/foo/{*}/bar']: {*} is one path segment" in rule
