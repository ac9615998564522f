"""AuthorizationPolicy `action: CUSTOM` (common/authz.py, common/extauthz.py): Istio's
validation, its place before DENY/ALLOW, TCP fails closed, and Envoy's HTTP check API
(check request, 200 allows, anything else is the answer) against a real loopback server."""

from __future__ import annotations

from functools import partial

import pytest
import trio
from meshagent.agent.config import AgentConfig
from meshagent.common import authz, extauthz
from meshagent.common.extauthz_provider import EnvoyExtAuthzGrpc
from meshagent.common.httpserve import Request, Response, serve_http
from meshagent.common.istio import ResourceError, parse_resource
from pydantic import ValidationError

PROVIDER = extauthz.EnvoyExtAuthzHttp.model_validate(
    {
        "service": "ext-authz.foo.svc.cluster.local",
        "port": "8000",
        "pathPrefix": "/check",
        "includeRequestHeadersInCheck": ["x-ext-authz", "x-user-*"],
        "includeAdditionalHeadersInCheck": {"x-from": "mesh"},
        "headersToUpstreamOnAllow": ["x-auth-*"],
        "headersToDownstreamOnDeny": ["x-reason"],
    }
)


def _policy(spec: dict, annotations: dict | None = None):
    return parse_resource(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "foo", "annotations": annotations or {}},
            "spec": spec,
        }
    )


CUSTOM = {
    "action": "CUSTOM",
    "provider": {"name": "ext"},
    "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
}


@pytest.mark.parametrize(
    ("spec", "annotations", "message"),
    [
        ({"action": "CUSTOM", "rules": [{}]}, None, "action CUSTOM needs `provider.name`"),
        ({"provider": {"name": "ext"}, "rules": [{}]}, None, "only allowed with action CUSTOM"),
        (CUSTOM, {"istio.io/dry-run": "true"}, "only supports actions ALLOW and DENY"),
    ],
)
def test_istio_validation(spec, annotations, message):
    with pytest.raises(ResourceError, match=message):
        _policy(spec, annotations)


def _request(path: str | None) -> authz.Request:
    http = authz.HttpAttrs("GET", path, "h") if path is not None else None
    return authz.Request(None, None, "10.0.0.1", "10.0.0.2", 80, http)


def test_custom_match_and_tcp_fails_closed():
    allow_all = _policy({"rules": [{}]})
    selected = authz.PolicySet([_policy(CUSTOM), allow_all]).for_workload(authz.Workload("foo", {}))
    assert selected.custom_match(_request("/admin/x")) == ("ext", "foo/p", 0)
    assert selected.custom_match(_request("/public")) is None
    # CUSTOM does not decide by itself: the other policies still do after the provider allows
    assert selected.evaluate(_request("/admin/x")).allowed
    # on a TCP connection the HTTP fields are dropped (as DENY) and an HTTP check API cannot
    # judge it: denied
    decision = selected.evaluate(_request(None))
    assert not decision.allowed and "CUSTOM policy foo/p" in decision.reason


def test_check_request_carries_what_envoy_sends():
    headers = [
        (b"host", b"reviews"),
        (b"x-ext-authz", b"allow"),
        (b"x-user-id", b"7"),
        (b"cookie", b"secret"),
        (b"content-length", b"12"),
    ]
    req = extauthz.check_request(PROVIDER, "POST", "/a?b=1", "reviews:9080", headers)
    assert req.method == b"POST" and req.target == b"/check/a?b=1"
    sent = dict(req.headers)
    assert sent[b"host"] == b"reviews:9080" and sent[b"content-length"] == b"0"
    assert sent[b"x-ext-authz"] == b"allow" and sent[b"x-user-id"] == b"7"
    assert sent[b"x-from"] == b"mesh" and b"cookie" not in sent


def test_verdicts():
    allowed = extauthz.verdict(PROVIDER, 200, [(b"X-Auth-User", b"alice"), (b"x-other", b"1")], b"")
    assert allowed.allowed and allowed.upstream_headers == ((b"x-auth-user", b"alice"),)
    # only 200 allows (Envoy): a 204 is an answer to the client
    assert not extauthz.verdict(PROVIDER, 204, [], b"").allowed
    denied = extauthz.verdict(PROVIDER, 401, [(b"x-reason", b"no"), (b"x-other", b"1")], b"go")
    assert (denied.status, denied.headers, denied.body) == (401, ((b"x-reason", b"no"),), b"go")
    bare = extauthz.EnvoyExtAuthzHttp(service="a", port=1)
    all_headers = extauthz.verdict(bare, 403, [(b"x-a", b"1"), (b"connection", b"close")], b"")
    assert all_headers.headers == ((b"x-a", b"1"),)  # none named: all but hop-by-hop ones
    assert extauthz.on_error(bare) == extauthz.Verdict(False, status=403)
    # a 5xx is the provider failing (Envoy), not an answer for the client
    assert extauthz.verdict(bare, 503, [(b"x-a", b"1")], b"down") == extauthz.on_error(bare)
    fail_open = bare.model_copy(update={"fail_open": True})
    assert extauthz.on_error(fail_open).allowed


async def test_ask_a_real_server():
    async def guard(request: Request) -> Response | None:
        if request.headers.get("x-ext-authz") == "allow":
            return Response(200, b"", headers=(("x-auth-user", "alice"),))
        return Response(403, b"nope", headers=(("x-reason", "header missing"),))

    async def never(_query: str) -> Response:
        return Response(500, b"")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_http, listeners, {"/check/x": never}, guard=guard))
        for value, expected in ((b"allow", True), (b"deny", False)):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            req = extauthz.check_request(PROVIDER, "GET", "/x", "h", [(b"x-ext-authz", value)])
            with trio.fail_after(5):
                status, headers, body = await extauthz.ask(stream, req)
            await stream.aclose()
            result = extauthz.verdict(PROVIDER, status, headers, body)
            assert result.allowed is expected
            if not expected:
                assert (result.status, result.body) == (403, b"nope")
                assert result.headers == ((b"x-reason", b"header missing"),)
        nursery.cancel_scope.cancel()


def test_providers_in_the_agent_config():
    declared = [{"name": "ext", "envoyExtAuthzHttp": {"service": "a.b", "port": 80}}]
    config = AgentConfig(extension_providers=declared)
    again = AgentConfig.model_validate_json(config.model_dump_json())  # as workers get it
    assert extauthz.providers(again.extension_providers)["ext"].port == 80
    grpc = [{"name": "g", "envoyExtAuthzGrpc": {"service": "a.b", "port": 9000}}]
    assert extauthz.providers(AgentConfig(extension_providers=grpc).extension_providers)[
        "g"
    ] == EnvoyExtAuthzGrpc(service="a.b", port=9000)
    both = {**declared[0], "envoyExtAuthzGrpc": {"service": "a", "port": 1}}
    for wrong in ({"name": "n"}, both):
        with pytest.raises(ValidationError, match="exactly one of envoyExtAuthzHttp and"):
            AgentConfig(extension_providers=[wrong])


def test_authz_check_says_the_provider_is_asked_first():
    from meshagent.common.snapshot import Snapshot, Workload
    from meshagent.controller.explain import explain

    pods = [
        Workload(uid="c", namespace="foo", name="client", node="n", ips=["10.0.0.1"]),
        Workload(uid="s", namespace="foo", name="server", node="n", ips=["10.0.0.3"]),
    ]
    custom = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "foo"},
        "spec": CUSTOM,
    }
    snap = Snapshot(node="", workloads=pods, istio_resources=[custom])
    asked = explain(snap, "foo/client", "foo/server:80", path="/admin/x")
    assert asked.custom == ("ext", "foo/p", 0) and asked.decision.allowed
    assert "first asked of provider 'ext'" in asked.render()
    assert explain(snap, "foo/client", "foo/server:80", path="/public").custom is None
    tcp = explain(snap, "foo/client", "foo/server:80")
    assert not tcp.decision.allowed and tcp.custom is None
