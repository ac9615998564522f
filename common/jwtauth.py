"""JWT validation with Istio's RequestAuthentication semantics (Envoy's `jwt_authn` filter).

What flows through: RequestAuthentication models and the JWKS documents the controller fetched
(by URL, from the snapshot) are compiled once into a JwtPolicies; for every HTTP request to a
workload the proxy hands in the request's headers and query, and gets an AuthResult: the
verified token's identity (principal `<iss>/<sub>`, claims, audiences, presenter) for the
AuthorizationPolicy attributes `requestPrincipals` and `request.auth.*`, or the reason the
request is refused with 401. Pure logic: no I/O (the agent never fetches keys itself).

Semantics, as Istio documents them
(https://istio.io/latest/docs/reference/config/security/request_authentication/):

- A workload's rules are those of the RequestAuthentications of its namespace that select it
  (no selector: all of its workloads) and of the root namespace (mesh-wide).
- Token locations: each rule's `fromHeaders` (the value after `prefix`; a value without the
  prefix carries no token), `fromParams` and `fromCookies`; with none of them,
  `Authorization: Bearer <token>` and the `access_token` query parameter.
- No token anywhere: the request passes, unauthenticated (an AuthorizationPolicy decides).
  A token that is present must verify under a rule with its `iss` that reads that location,
  else 401: bad signature, unknown key, expired (`exp`) or not yet valid (`nbf`, both with
  Envoy's 60 s clock skew), unknown issuer, or an `aud` outside the rule's `audiences` (when
  set). Keys are the rule's inline `jwks` or the fetched `jwksUri` (or the issuer's OpenID
  discovery document); a rule whose keys could not be fetched refuses every token of its
  issuer (fail closed, as istiod does with its placeholder key). Several tokens: each must
  verify; the first verified one is the request's identity.
- After verification the token is removed from its header unless `forwardOriginalToken`
  (a query parameter or cookie is left as is, as in Envoy); `outputPayloadToHeader` sets that
  header to the base64url payload; `outputClaimToHeaders` sets each header to its claim (`a.b`:
  nested) when that is a string, integer or boolean (Envoy's claim_to_headers), and removes a
  header of that name the client sent otherwise.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import jwt
from jwt import PyJWK, PyJWKSet
from meshagent.common.istio.security import JwtRule, RequestAuthentication

log = logging.getLogger(__name__)

DEFAULT_ROOT_NAMESPACE = "istio-system"
CLOCK_SKEW = 60  # seconds, Envoy's default `clock_skew_seconds`
# Asymmetric algorithms only: a JWKS never holds an HMAC secret for us, and `none` is never safe.
ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_DEFAULT_HEADER = ("authorization", "Bearer ")
_DEFAULT_PARAM = "access_token"


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The outcome for one request: `error` set means 401; `principal` None means no token."""

    error: str | None = None
    principal: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    presenter: str | None = None
    # The request's headers as they go on (tokens stripped, payload headers set); None: unchanged.
    headers: list[tuple[bytes, bytes]] | None = None


NO_TOKEN = AuthResult()


def load_keys(text: str | None) -> list[PyJWK]:
    """The usable keys of a JWKS document; none for None or a document that does not load
    (then every token of the rule fails: closed)."""
    if not text:
        return []
    try:
        return list(PyJWKSet.from_json(text).keys)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        log.warning("unusable JWKS: %s", exc)
        return []


@dataclass(frozen=True, slots=True)
class _Rule:
    issuer: str
    audiences: frozenset[str]
    keys: tuple[PyJWK, ...]
    headers: tuple[tuple[str, str], ...]  # (lower-case name, prefix)
    params: tuple[str, ...]
    cookies: tuple[str, ...]
    payload_header: str | None
    claim_headers: tuple[tuple[bytes, tuple[str, ...]], ...]  # (header, claim path)
    forward: bool

    @classmethod
    def compile(cls, rule: JwtRule, jwks: Mapping[str, str]) -> _Rule:
        text = rule.jwks if rule.jwks is not None else jwks.get(rule.keys_url or "")
        headers = tuple((h.name.lower(), h.prefix) for h in rule.from_headers)
        params, cookies = rule.from_params, rule.from_cookies
        if not headers and not params and not cookies:
            headers, params = (_DEFAULT_HEADER,), (_DEFAULT_PARAM,)
        return cls(
            issuer=rule.issuer,
            audiences=frozenset(rule.audiences),
            keys=tuple(load_keys(text)),
            headers=headers,
            params=params,
            cookies=cookies,
            payload_header=rule.output_payload_to_header,
            claim_headers=tuple(
                (c.header.lower().encode("latin-1"), tuple(c.claim.split(".")))
                for c in rule.output_claim_to_headers
            ),
            forward=rule.forward_original_token,
        )


@dataclass(frozen=True, slots=True)
class _Found:
    token: str
    header: str | None  # the header it came from (None: a query parameter)


def parse_cookies(header: str | None) -> dict[str, str]:
    """A Cookie header's pairs (the first of a repeated name wins), quotes stripped."""
    out: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            out.setdefault(name, value.strip('"'))
    return out


def _extract(
    rules: Iterable[_Rule], headers: Mapping[str, str], query: Mapping[str, str]
) -> dict[_Found, list[_Rule]]:
    """Each token found, with the rules that read the location it was found in."""
    found: dict[_Found, list[_Rule]] = {}
    cookies = parse_cookies(headers.get("cookie")) if any(r.cookies for r in rules) else {}
    for rule in rules:
        for name, prefix in rule.headers:
            value = headers.get(name)
            if value is None or not value.startswith(prefix):
                continue
            token = value[len(prefix) :].strip()
            if token:
                found.setdefault(_Found(token, name), []).append(rule)
        for param in rule.params:
            token = query.get(param, "").strip()
            if token:
                found.setdefault(_Found(token, None), []).append(rule)
        for cookie in rule.cookies:
            token = cookies.get(cookie, "").strip()
            if token:
                found.setdefault(_Found(token, None), []).append(rule)
    return found


class JwtError(Exception):
    """A present token that does not verify; the message is Envoy's 401 body."""


def _verify(token: str, rules: list[_Rule]) -> tuple[_Rule, dict[str, Any]]:
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise JwtError("Jwt is not in the form of Header.Payload.Signature") from None
    issuer = unverified.get("iss")
    rule = next((r for r in rules if r.issuer == issuer), None)
    if rule is None:
        raise JwtError("Jwt issuer is not configured")
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in ALGORITHMS:
        raise JwtError("Jwt verification fails")
    keys = [k for k in rule.keys if kid is None or k.key_id is None or k.key_id == kid]
    if not keys:
        raise JwtError("Jwks doesn't have key to match kid or alg from Jwt")
    claims = None
    for key in keys:
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                leeway=CLOCK_SKEW,
                options={"verify_aud": False, "verify_iss": False},
            )
            break
        except jwt.ExpiredSignatureError:
            raise JwtError("Jwt is expired") from None
        except jwt.ImmatureSignatureError:
            raise JwtError("Jwt not yet valid") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            continue  # another key of the set may match
    if claims is None:
        raise JwtError("Jwt verification fails")
    if rule.audiences and not rule.audiences.intersection(_audiences(claims)):
        raise JwtError("Audiences in Jwt are not allowed")
    return rule, claims


def _audiences(claims: Mapping[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list):
        return tuple(a for a in aud if isinstance(a, str))
    return ()


def _claim_text(claims: Mapping[str, Any], path: tuple[str, ...]) -> bytes | None:
    value: Any = claims
    for part in path:
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int | str):
        return str(value).encode("utf-8")
    return None


def _b64(payload: Mapping[str, Any]) -> bytes:
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


class WorkloadJwt:
    """The JWT rules of one workload."""

    __slots__ = ("rules",)

    def __init__(self, rules: tuple[_Rule, ...]) -> None:
        self.rules = rules

    def __bool__(self) -> bool:
        return bool(self.rules)

    def authenticate(
        self, headers: list[tuple[bytes, bytes]], header_map: Mapping[str, str], target: str
    ) -> AuthResult:
        """Verify the request's tokens (`headers` as sent, `header_map` by lower-case name,
        `target` the path with its query)."""
        cut = target.find("?")
        query = dict(parse_qsl(target[cut + 1 :], keep_blank_values=True)) if cut >= 0 else {}
        found = _extract(self.rules, header_map, query)
        if not found:
            return NO_TOKEN
        first: tuple[_Rule, dict[str, Any]] | None = None
        strip: set[bytes] = set()
        for where, rules in found.items():
            try:
                rule, claims = _verify(where.token, rules)
            except JwtError as exc:
                return AuthResult(error=str(exc))
            first = first or (rule, claims)
            if not rule.forward and where.header is not None:
                strip.add(where.header.encode("latin-1"))
        assert first is not None
        rule, claims = first
        out = [(n, v) for n, v in headers if n not in strip]
        added = [(h, _claim_text(claims, path)) for h, path in rule.claim_headers]
        if rule.payload_header:
            added.append((rule.payload_header.lower().encode("latin-1"), _b64(claims)))
        if added:
            names = {name for name, _ in added}
            out = [(n, v) for n, v in out if n not in names]
            out += [(name, value) for name, value in added if value is not None]
        presenter = claims.get("azp")
        return AuthResult(
            principal=f"{claims.get('iss', '')}/{claims.get('sub', '')}",
            claims=claims,
            audiences=_audiences(claims),
            presenter=presenter if isinstance(presenter, str) else None,
            headers=out if strip or added else None,
        )


_NONE = WorkloadJwt(())


@dataclass(frozen=True, slots=True)
class _Policy:
    namespace: str
    selector: tuple[tuple[str, str], ...] | None
    rules: tuple[_Rule, ...]

    def selects(self, labels: Mapping[str, str]) -> bool:
        return self.selector is None or all(labels.get(k) == v for k, v in self.selector)


class JwtPolicies:
    """Every RequestAuthentication of a snapshot, compiled; `jwks` maps a rule's keys URL
    (`JwtRule.keys_url`) to the JWKS the controller fetched from it (absent: not fetched)."""

    def __init__(
        self,
        resources: Iterable[RequestAuthentication],
        jwks: Mapping[str, str] | None = None,
        *,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    ) -> None:
        self.root_namespace = root_namespace
        jwks = jwks or {}
        self._policies = tuple(
            _Policy(
                namespace=r.namespace,
                selector=tuple(sorted(r.spec.selector.match_labels.items()))
                if r.spec.selector is not None
                else None,
                rules=tuple(_Rule.compile(rule, jwks) for rule in r.spec.jwt_rules),
            )
            for r in resources
        )

    def for_workload(self, namespace: str, labels: Mapping[str, str]) -> WorkloadJwt:
        """The rules of the workload: mesh-wide ones first, then its namespace's."""
        rules: list[_Rule] = []
        for scope in dict.fromkeys((self.root_namespace, namespace)):
            for policy in self._policies:
                if policy.namespace == scope and policy.selects(labels):
                    rules.extend(policy.rules)
        return WorkloadJwt(tuple(rules)) if rules else _NONE
