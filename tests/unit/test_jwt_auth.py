"""RequestAuthentication (common/jwtauth.py) and the JWT attributes of AuthorizationPolicy
(common/authz.py), against Istio's documented semantics: a present token must verify (else
401), a missing one passes unauthenticated; `requestPrincipals` is `<iss>/<sub>`."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from meshagent.common import authz
from meshagent.common.istio import ResourceError, parse_resource
from meshagent.common.jwtauth import JwtPolicies

ISSUER = "https://issuer.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwks(*pairs: tuple[object, str]) -> str:
    keys = []
    for key, kid in pairs:
        algo = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
        jwk = json.loads(algo.to_jwk(key.public_key()))  # type: ignore[attr-defined]
        keys.append({**jwk, "kid": kid, "use": "sig"})
    return json.dumps({"keys": keys})


JWKS = _jwks((RSA_KEY, "rsa"), (EC_KEY, "ec"))


def _token(key: object = RSA_KEY, kid: str = "rsa", **claims: object) -> str:
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    body = {"iss": ISSUER, "sub": "alice", "exp": int(time.time()) + 600, **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})  # type: ignore[arg-type]


def _ra(rules: list[dict], name: str = "jwt", namespace: str = "shop", **spec: object):
    return parse_resource(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"jwtRules": rules, **spec},
        }
    )


def _auth(rule: dict | None = None, *, headers=(), target="/", jwks=None):
    rule = rule or {"issuer": ISSUER, "jwks": JWKS}
    policies = JwtPolicies([_ra([rule])], jwks)
    raw = [(n.encode(), v.encode()) for n, v in headers]
    return policies.for_workload("shop", {}).authenticate(raw, dict(headers), target)


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# Tokens are made when the test runs, not when the module is collected: the test command runs
# the e2e tests first, for longer than a token made at collection would stay valid.
@pytest.mark.parametrize(
    ("make_token", "error"),
    [
        (lambda: _token(), None),
        (lambda: _token(EC_KEY, "ec"), None),
        (lambda: _token(exp=int(time.time()) - 3600), "Jwt is expired"),
        (lambda: _token(nbf=int(time.time()) + 3600), "Jwt not yet valid"),
        (lambda: _token(iss="https://elsewhere"), "Jwt issuer is not configured"),
        (lambda: _token(OTHER_KEY, "rsa"), "Jwt verification fails"),
        (
            lambda: _token(OTHER_KEY, "unknown"),
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
        (lambda: "not-a-jwt", "Jwt is not in the form of Header.Payload.Signature"),
        (
            lambda: jwt.encode({"iss": ISSUER, "sub": "x"}, None, algorithm="none"),
            "Jwt verification fails",
        ),
    ],
    ids=[
        "rs256",
        "es256",
        "expired",
        "not-yet",
        "wrong-issuer",
        "bad-signature",
        "no-key",
        "junk",
        "alg-none",
    ],
)
def test_token_checks(make_token, error):
    result = _auth(headers=_bearer(make_token()))
    assert result.error == error
    if error is None:
        assert result.principal == f"{ISSUER}/alice"


def test_no_token_passes_unauthenticated():
    result = _auth(headers=[("x-other", "1")])
    assert result.error is None and result.principal is None


def test_audiences():
    rule = {"issuer": ISSUER, "jwks": JWKS, "audiences": ["shop", "cart"]}
    ok = _auth(rule, headers=_bearer(_token(aud=["other", "cart"])))
    assert ok.error is None and ok.audiences == ("other", "cart")
    wrong = _auth(rule, headers=_bearer(_token(aud="other")))
    assert wrong.error == "Audiences in Jwt are not allowed"
    missing = _auth(rule, headers=_bearer(_token()))
    assert missing.error == "Audiences in Jwt are not allowed"
    # without `audiences` in the rule, any aud is accepted (Envoy checks none)
    assert _auth(headers=_bearer(_token(aud="other"))).error is None


def test_from_headers_prefix_and_params():
    rule = {
        "issuer": ISSUER,
        "jwks": JWKS,
        "fromHeaders": [{"name": "X-Jwt-Assertion", "prefix": "Token "}],
        "fromParams": ["my_token"],
    }
    token = _token()
    assert _auth(rule, headers=[("x-jwt-assertion", f"Token {token}")]).principal
    # without the prefix the header carries no token: unauthenticated, not refused
    unprefixed = _auth(rule, headers=[("x-jwt-assertion", token)])
    assert unprefixed.error is None and unprefixed.principal is None
    # the default location is not read once fromHeaders is set
    assert _auth(rule, headers=_bearer(token)).principal is None
    assert _auth(rule, target=f"/a?x=1&my_token={token}").principal == f"{ISSUER}/alice"
    # the default query parameter works without fromHeaders/fromParams
    assert _auth(target=f"/a?access_token={token}").principal == f"{ISSUER}/alice"
    assert _auth(rule, headers=[("x-jwt-assertion", "Token junk")]).error is not None


def test_token_stripped_unless_forwarded_and_payload_header():
    token = _token(group="dev")
    stripped = _auth(headers=[*_bearer(token), ("x-a", "1")])
    assert stripped.headers == [(b"x-a", b"1")]
    rule = {
        "issuer": ISSUER,
        "jwks": JWKS,
        "forwardOriginalToken": True,
        "outputPayloadToHeader": "X-Payload",
    }
    kept = _auth(rule, headers=_bearer(token))
    assert kept.headers is not None
    names = [n for n, _ in kept.headers]
    assert names == [b"authorization", b"x-payload"]
    payload = kept.headers[1][1] + b"=" * (-len(kept.headers[1][1]) % 4)
    assert json.loads(base64.urlsafe_b64decode(payload))["group"] == "dev"


def test_fetched_jwks_and_fail_closed():
    rule = {"issuer": ISSUER, "jwksUri": "https://issuer.example/keys"}
    good = _auth(rule, headers=_bearer(_token()), jwks={"https://issuer.example/keys": JWKS})
    assert good.principal == f"{ISSUER}/alice"
    # not fetched (unreachable): tokens of that issuer are refused, missing ones still pass
    assert _auth(rule, headers=_bearer(_token())).error is not None
    assert _auth(rule).error is None


def test_selection_by_namespace_selector_and_root():
    rule = {"issuer": ISSUER, "jwks": JWKS}
    policies = JwtPolicies(
        [
            _ra([rule], selector={"matchLabels": {"app": "a"}}),
            _ra([{**rule, "issuer": "mesh"}], name="mesh", namespace="istio-system"),
        ]
    )
    assert len(policies.for_workload("shop", {"app": "a"}).rules) == 2
    assert len(policies.for_workload("shop", {"app": "b"}).rules) == 1
    assert policies.for_workload("other", {"app": "a"}).rules is not None
    assert len(policies.for_workload("other", {}).rules) == 1


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"jwks": JWKS}, "required field is missing"),
        ({"issuer": ISSUER, "jwks": "{}"}, "jwks"),
        ({"issuer": ISSUER, "jwks": JWKS, "jwksUri": "https://x/k"}, "only one of"),
        ({"issuer": ISSUER, "jwksUri": "file:///etc/keys"}, "http:// or https://"),
        ({"issuer": ISSUER, "timeout": "5s"}, "not supported by meshagent yet"),
    ],
)
def test_bad_rules_refused(rule, message):
    with pytest.raises(ResourceError, match="jwtRules") as caught:
        _ra([rule])
    assert message in str(caught.value)


# -- AuthorizationPolicy attributes ----------------------------------------------------------


def _decide(rules: list[dict], token: str | None, action: str = "ALLOW") -> bool:
    policy = parse_resource(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"action": action, "rules": rules},
        }
    )
    auth = _auth(headers=_bearer(token)) if token else _auth()
    assert auth.error is None
    request = authz.Request(
        None, None, "10.0.0.1", "10.0.0.2", 80, authz.HttpAttrs("GET", "/", "h", {}, auth)
    )
    decision = authz.PolicySet([policy]).evaluate(authz.Workload("shop", {}), request)
    return decision.allowed


def test_request_principals():
    rules = [{"from": [{"source": {"requestPrincipals": [f"{ISSUER}/alice"]}}]}]
    assert _decide(rules, _token())
    assert not _decide(rules, _token(sub="bob"))
    assert not _decide(rules, None)
    any_token = [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]
    assert _decide(any_token, _token(sub="bob"))
    assert not _decide(any_token, None)
    deny_anonymous = [{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}]
    assert not _decide(deny_anonymous, None, action="DENY")
    assert _decide(deny_anonymous, _token(), action="DENY")


@pytest.mark.parametrize(
    ("when", "claims", "allowed"),
    [
        ({"key": "request.auth.claims[group]", "values": ["dev"]}, {"group": "dev"}, True),
        ({"key": "request.auth.claims[group]", "values": ["dev"]}, {"group": ["ops", "dev"]}, True),
        ({"key": "request.auth.claims[group]", "values": ["dev"]}, {"group": "ops"}, False),
        ({"key": "request.auth.claims[group]", "values": ["dev"]}, {}, False),
        ({"key": "request.auth.claims[group]", "notValues": ["ops"]}, {"group": "dev"}, True),
        ({"key": "request.auth.claims[a][b]", "values": ["x*"]}, {"a": {"b": "xy"}}, True),
        ({"key": "request.auth.claims[admin]", "values": ["true"]}, {"admin": True}, False),
        ({"key": "request.auth.audiences", "values": ["shop"]}, {"aud": ["x", "shop"]}, True),
        ({"key": "request.auth.audiences", "values": ["shop"]}, {"aud": "x"}, False),
        ({"key": "request.auth.presenter", "values": ["web"]}, {"azp": "web"}, True),
        ({"key": "request.auth.principal", "values": [f"{ISSUER}/*"]}, {}, True),
        ({"key": "request.auth.principal", "values": ["https://other/*"]}, {}, False),
        ({"key": "request.auth.principal", "values": [f"{ISSUER}/alice"]}, {}, True),
    ],
)
def test_auth_conditions(when, claims, allowed):
    assert _decide([{"when": [when]}], _token(**claims)) is allowed


def test_request_principals_are_http_only_on_tcp():
    policy = parse_resource(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]},
        }
    )
    tcp = authz.Request(None, None, "10.0.0.1", "10.0.0.2", 80)
    # an ALLOW rule with HTTP-only fields never matches a TCP connection
    assert not authz.PolicySet([policy]).evaluate(authz.Workload("shop", {}), tcp).allowed


# -- the agent's filter step ------------------------------------------------------------------


def test_agent_tables_and_filter_step():
    from meshagent.agent.policy.requestauth import DestinationJwt, authenticate
    from meshagent.agent.proxy.http.types import RequestInfo
    from meshagent.agent.state import Tables
    from meshagent.common.snapshot import Snapshot, Workload

    url = "https://issuer.example/keys"
    ra = {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "shop"},
        "spec": {"jwtRules": [{"issuer": ISSUER, "jwksUri": url}]},
    }
    tables = Tables.build(Snapshot(node="n", istio_resources=[ra], jwks={url: JWKS}))
    pod = Workload(uid="u", namespace="shop", name="p", node="n", ips=["10.0.0.2"])
    rules = DestinationJwt(pod).get(tables.jwt)

    def request(token: str) -> RequestInfo:
        headers = [(b"authorization", f"Bearer {token}".encode()), (b"x-a", b"1")]
        return RequestInfo("GET", "/x?y=1", "reviews", headers)

    ok = request(_token())
    auth, refused = authenticate(rules, ok)
    assert refused is None and auth is not None and auth.principal == f"{ISSUER}/alice"
    assert ok.headers == [(b"x-a", b"1")] and "authorization" not in ok.header_map()
    auth, refused = authenticate(rules, request(_token(OTHER_KEY)))
    assert auth is None and refused is not None and refused.status == 401
    assert refused.body == b"Jwt verification fails"
    assert dict(refused.headers)[b"www-authenticate"].startswith(b"Bearer realm=")
    # a snapshot without the fetched keys: the same valid token is refused (fail closed)
    bare = Tables.build(Snapshot(node="n", istio_resources=[ra]))
    _, refused = authenticate(DestinationJwt(pod).get(bare.jwt), request(_token()))
    assert refused is not None and refused.status == 401


def test_explain_says_what_a_request_authentication_does():
    from meshagent.controller.describe import describe

    rule = {"issuer": ISSUER, "jwksUri": "https://issuer.example/keys", "audiences": ["shop"]}
    lines = describe(_ra([rule], selector={"matchLabels": {"app": "a"}}))
    assert "gets 401" in lines[0] and "without one goes on unauthenticated" in lines[0]
    assert "fetches from https://issuer.example/keys" in lines[1]
    assert (
        "aud one of ['shop']" in lines[1]
        and "removed from its header before forwarding" in lines[1]
    )


def test_from_cookies_and_claims_to_headers():
    rule = {
        "issuer": ISSUER,
        "jwks": JWKS,
        "fromCookies": ["auth-token"],
        "outputClaimToHeaders": [
            {"header": "X-Group", "claim": "group"},
            {"header": "x-admin", "claim": "admin"},
            {"header": "x-team", "claim": "org.team"},
            {"header": "x-list", "claim": "roles"},
        ],
    }
    token = _token(group="dev", admin=True, org={"team": "web"}, roles=["a"])
    cookie = ("cookie", f"theme=dark; auth-token={token}")
    result = _auth(rule, headers=[cookie, ("x-list", "forged"), ("x-group", "forged")])
    assert result.principal == f"{ISSUER}/alice"
    assert result.headers is not None
    out = dict(result.headers)
    assert out[b"x-group"] == b"dev" and out[b"x-admin"] == b"true"
    assert out[b"x-team"] == b"web"
    assert b"x-list" not in out  # a list claim is not copied; the client's header is dropped
    assert out[b"cookie"] == cookie[1].encode()  # a cookie token is left in place
    # the default location is not read once fromCookies is set
    assert _auth(rule, headers=_bearer(token)).principal is None


def test_authz_check_verifies_the_token_given_as_a_header():
    from meshagent.common.snapshot import Snapshot, Workload
    from meshagent.controller.explain import ExplainError, explain

    pods = [
        Workload(uid="f", namespace="shop", name="frontend", node="n", ips=["10.0.0.1"]),
        Workload(
            uid="r", namespace="shop", name="reviews", node="n", ips=["10.0.0.3"], meshed=True
        ),
    ]
    ra = _ra([{"issuer": ISSUER, "jwks": JWKS}]).model_dump(by_alias=True, exclude_none=True)
    require = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "require-jwt", "namespace": "shop"},
        "spec": {"rules": [{"from": [{"source": {"requestPrincipals": [f"{ISSUER}/alice"]}}]}]},
    }
    snap = Snapshot(node="", workloads=pods, istio_resources=[ra, require])

    def check(token: str | None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return explain(snap, "shop/frontend", "shop/reviews:80", path="/", headers=headers)

    assert check(_token()).decision.allowed
    assert not check(None).decision.allowed
    with pytest.raises(ExplainError, match="401 Unauthorized: Jwt verification fails"):
        check(_token(OTHER_KEY))
