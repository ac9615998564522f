"""The admission webhook (controller/webhook.py): AdmissionReview v1 in, allowed or denied
with the field path out, served over TLS with a certificate from the controller's CA; and
the caBundle patch it keeps on its ValidatingWebhookConfiguration."""

from __future__ import annotations

import base64
import json
import ssl

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lightkube.models.admissionregistration_v1 import (
    ValidatingWebhook,
    WebhookClientConfig,
)
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.admissionregistration_v1 import ValidatingWebhookConfiguration
from meshagent.controller.app import new_root_pem
from meshagent.controller.push import StreamCertificate, controller_identity
from meshagent.controller.webhook import (
    ADMISSION_API_VERSION,
    ca_bundle_patch,
    review_response,
    serve_webhook,
    webhook_names,
)

DENY = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-admin", "namespace": "shop"},
    "spec": {
        "selector": {"matchLabels": {"app": "reviews"}},
        "action": "DENY",
        "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
    },
}


def review(obj: dict | None, operation: str = "CREATE", uid: str = "u-1") -> dict:
    kind = (obj or DENY)["kind"]
    return {
        "apiVersion": ADMISSION_API_VERSION,
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "security.istio.io", "version": "v1", "kind": kind},
            "resource": {
                "group": "security.istio.io",
                "version": "v1",
                "resource": "authorizationpolicies",
            },
            "name": "deny-admin",
            "namespace": "shop",
            "operation": operation,
            "userInfo": {"username": "admin"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
        },
    }


def with_spec(**changes) -> dict:
    return {**DENY, "spec": {**DENY["spec"], **changes}}


def test_a_valid_policy_is_allowed_with_the_request_uid() -> None:
    answer = review_response(review(DENY, uid="abc-123"))
    assert answer == {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": "abc-123", "allowed": True},
    }


def test_an_unknown_field_is_denied_naming_its_path() -> None:
    answer = review_response(review(with_spec(foo="bar")))["response"]
    assert answer["allowed"] is False
    assert answer["status"]["code"] == 422
    assert answer["status"]["reason"] == "Invalid"
    assert answer["status"]["message"].startswith("spec.foo: field is not supported by meshagent")


def test_every_problem_is_named_with_its_path() -> None:
    bad = with_spec(foo=1, rules=[{"to": [{"operation": {"paths": ["/a/{*}.x"], "ports": ["x"]}}]}])
    message = review_response(review(bad))["response"]["status"]["message"]
    assert "spec.foo:" in message
    assert "spec.rules[0].to[0].operation.paths:" in message
    assert "spec.rules[0].to[0].operation.ports[0]:" in message


def test_an_update_is_judged_and_a_delete_is_not() -> None:
    assert review_response(review(with_spec(foo=1), "UPDATE"))["response"]["allowed"] is False
    assert review_response(review(None, "DELETE"))["response"]["allowed"] is True


def test_the_namespace_comes_from_the_request_when_the_object_has_none() -> None:
    obj = {**DENY, "metadata": {"name": "x"}, "spec": {"action": "DENY"}}
    message = review_response(review(obj))["response"]["status"]["message"]
    assert message.startswith("spec.rules:")  # a DENY without rules never matches


def test_kinds_outside_the_subset_are_not_judged() -> None:
    other = {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "g"}}
    assert review_response(review(other))["response"]["allowed"] is True


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1", "request": {}},
        {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {}},
        {"kind": "Pod", "apiVersion": "v1"},
    ],
)
def test_what_is_not_an_admission_review_is_an_error(bad) -> None:
    with pytest.raises(ValueError):
        review_response(bad)


def test_webhook_names_are_the_services_and_the_given_ones() -> None:
    assert webhook_names("meshagent-system", ["127.0.0.1", "meshctl.meshagent-system.svc"]) == (
        "meshctl.meshagent-system.svc",
        "meshctl.meshagent-system.svc.cluster.local",
        "127.0.0.1",
    )


def _config(*bundles: str | None) -> ValidatingWebhookConfiguration:
    return ValidatingWebhookConfiguration(
        metadata=ObjectMeta(name="meshagent-validation"),
        webhooks=[
            ValidatingWebhook(
                name=f"w{i}.meshagent.io",
                admissionReviewVersions=["v1"],
                sideEffects="None",
                clientConfig=WebhookClientConfig(caBundle=bundle),
            )
            for i, bundle in enumerate(bundles)
        ],
    )


def test_ca_bundle_patch_sets_every_webhook_that_lacks_it_and_none_when_all_have_it() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    encoded = base64.b64encode(pem.encode()).decode()
    assert ca_bundle_patch(_config(None, encoded, "b2xk"), pem) == {
        "webhooks": [
            {"name": "w0.meshagent.io", "clientConfig": {"caBundle": encoded}},
            {"name": "w2.meshagent.io", "clientConfig": {"caBundle": encoded}},
        ]
    }
    assert ca_bundle_patch(_config(encoded), pem) is None


async def _post(port: int, root_pem: str, body: bytes, name: str = "127.0.0.1") -> tuple[int, dict]:
    context = ssl.create_default_context(cadata=root_pem)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname=name, https_compatible=True)
    async with stream:
        head = (
            f"POST /validate HTTP/1.1\r\nHost: {name}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        await stream.send_all(head + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    _headers, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload) if payload.startswith(b"{") else {}


def test_served_over_tls_with_a_certificate_of_the_controllers_ca() -> None:
    issuer = new_root_pem("cluster.local")
    root = x509.load_pem_x509_certificate(issuer).public_bytes(serialization.Encoding.PEM).decode()

    async def main() -> list[tuple[int, dict]]:
        certificate = StreamCertificate(
            issuer,
            controller_identity("cluster.local", "meshagent-system"),
            webhook_names("meshagent-system", ["127.0.0.1"]),
        )
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                sockets = await nursery.start(serve_webhook, "127.0.0.1", 0, certificate.context)
                port = sockets[0].socket.getsockname()[1]
                out = [
                    await _post(port, root, json.dumps(review(with_spec(foo=1))).encode()),
                    await _post(port, root, json.dumps(review(DENY)).encode()),
                    await _post(port, root, b"not json"),
                ]
                with pytest.raises(trio.BrokenResourceError):  # the Service name, not another
                    await _post(port, root, b"{}", name="elsewhere.example")
                nursery.cancel_scope.cancel()
        return out

    denied, allowed, garbage = trio.run(main)
    assert denied[0] == 200
    assert denied[1]["response"]["allowed"] is False
    assert denied[1]["response"]["status"]["message"].startswith("spec.foo: ")
    assert allowed == (200, {**allowed[1], "response": {"uid": "u-1", "allowed": True}})
    assert garbage[0] == 400
