"""Issue #21: AuthorizationPolicy `action: CUSTOM` consults an ext-authz server declared in the
mesh config (the agents' `extension_providers`, as Istio's meshConfig), over Envoy's HTTP or
gRPC check API, and follows its verdict: real curl from a pod, the provider a stdlib server
(HTTP) or Debian's grpcio (gRPC) on the other node, reached through HBONE as the destination
workload."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import meshlab, render_manifest
from tests.waiting import wait_until

MANIFESTS = Path(__file__).parent / "manifests"
URL = "http://echo.shop:8080"
PROVIDERS = [
    {
        "name": "sample-ext-authz-http",
        "envoyExtAuthzHttp": {
            "service": "ext-authz.shop.svc.cluster.local",
            "port": "8000",
            "includeRequestHeadersInCheck": ["x-ext-authz"],
            "headersToUpstreamOnAllow": ["x-ext-authz-check-result"],
            "headersToDownstreamOnDeny": ["x-ext-authz-check-result"],
        },
    },
    {
        "name": "sample-ext-authz-grpc",
        "envoyExtAuthzGrpc": {"service": "ext-authz-grpc.shop.svc.cluster.local", "port": 9000},
    },
    {  # a Service port nothing serves: the provider cannot be asked
        "name": "unreachable",
        "envoyExtAuthzHttp": {
            "service": "ext-authz.shop.svc.cluster.local",
            "port": 9999,
            "timeout": "2s",
        },
    },
]


@pytest.fixture(scope="module")
def ext_lab(lab_factory, tmp_path_factory) -> Iterator:
    before = os.environ.get("MESHLAB_AGENT_SETTINGS")
    os.environ["MESHLAB_AGENT_SETTINGS"] = json.dumps({"extension_providers": PROVIDERS})
    try:
        folder = tmp_path_factory.mktemp("ext-authz")
        yield lab_factory(render_manifest(MANIFESTS / "ext-authz.yaml", folder), nodes=2)
    finally:
        if before is None:
            os.environ.pop("MESHLAB_AGENT_SETTINGS", None)
        else:
            os.environ["MESHLAB_AGENT_SETTINGS"] = before


def _policy(provider: str) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "ext-authz", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "echo"}},
            "action": "CUSTOM",
            "provider": {"name": provider},
            "rules": [{"to": [{"operation": {"paths": ["/checked/*"]}}]}],
        },
    }


def _apply(tmp_path: Path, doc: dict, verb: str = "apply") -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    meshlab(verb, "-f", str(path))


def _get(lab, path: str, *extra: str) -> tuple[str, str]:
    """(status, response headers and body) of a GET from the client pod."""
    return lab.curl("shop/client", URL + path, "-i", *extra, timeout=10)


def test_custom_policy_follows_the_providers_verdict(ext_lab, tmp_path):
    _apply(tmp_path, _policy("sample-ext-authz-http"))
    try:
        code, text = wait_until(
            lambda: _get(ext_lab, "/checked/a", "-H", "x-ext-authz: deny"),
            lambda got: got[0] == "403",
            what="the provider's denial reaches the client once the CUSTOM policy is in",
        )
        assert "denied by ext_authz for not found header" in text
        assert "x-ext-authz-check-result: denied" in text.lower()  # headersToDownstreamOnDeny
        code, text = _get(ext_lab, "/checked/a?q=1", "-H", "x-ext-authz: allow")
        assert code == "200"
        # the echo server shows what reached it: the provider's header (headersToUpstreamOnAllow)
        assert "GET /checked/a?q=1 HTTP/1.1" in text
        assert "x-ext-authz-check-result: allowed" in text.lower()
        # a request the policy does not match never goes to the provider
        code, text = _get(ext_lab, "/other", "-H", "x-ext-authz: deny")
        assert code == "200" and "x-ext-authz-check-result" not in text.lower()
    finally:
        _apply(tmp_path, _policy("sample-ext-authz-http"), "delete")


def test_custom_policy_follows_a_grpc_providers_verdict(ext_lab, tmp_path):
    _apply(tmp_path, _policy("sample-ext-authz-grpc"))
    try:
        code, text = wait_until(
            lambda: _get(ext_lab, "/checked/g", "-H", "x-ext-authz: deny"),
            lambda got: got[0] == "403",
            what="the gRPC provider's denial reaches the client once the CUSTOM policy is in",
        )
        assert "denied by ext_authz for not found header" in text
        assert "x-ext-authz-check-result: denied" in text.lower()  # denied_response headers
        code, text = _get(
            ext_lab, "/checked/g?q=1", "-H", "x-ext-authz: allow", "-H", "x-strip-me: 1"
        )
        assert code == "200", text
        seen = text.lower()  # what reached the echo server
        assert "get /checked/g?q=1 http/1.1" in seen
        assert "x-ext-authz-check-result: allowed" in seen  # ok_response headers
        assert "x-ext-authz-path: /checked/g?q=1" in seen  # the provider saw path and query
        # the CheckRequest named the client by its SPIFFE identity (mTLS, cross node)
        assert "x-ext-authz-source: spiffe://cluster.local/ns/shop/sa/client" in seen
        assert "x-strip-me" not in seen  # headers_to_remove
    finally:
        _apply(tmp_path, _policy("sample-ext-authz-grpc"), "delete")


@pytest.mark.parametrize("provider", ["unreachable", "not-declared"])
def test_provider_that_cannot_answer_fails_closed(ext_lab, tmp_path, provider):
    _apply(tmp_path, _policy(provider))
    try:
        wait_until(
            lambda: _get(ext_lab, "/checked/a", "-H", "x-ext-authz: allow")[0],
            lambda code: code == "403",
            what=f"provider {provider}: matched requests are denied",
        )
        assert _get(ext_lab, "/other")[0] == "200"
    finally:
        _apply(tmp_path, _policy(provider), "delete")
