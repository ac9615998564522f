"""Schemas for `security.istio.io` resources: AuthorizationPolicy, PeerAuthentication and
RequestAuthentication.

Wire documents flow in; validated, immutable models flow out to the controller's compiler, to
`meshagent.common.authz` (which compiles AuthorizationPolicies into a fast evaluator) and to
`meshagent.common.jwtauth` (JWT validation). Only the documented subset is accepted: any other
field (targetRef, ...) is an error naming the field. Beyond shape, the
checks Istio's own admission webhook makes are repeated here, so a policy Istio would refuse is
refused here too.

Reference: https://istio.io/latest/docs/reference/config/security/authorization-policy/
and https://istio.io/latest/docs/reference/config/security/peer_authentication/
and https://istio.io/latest/docs/reference/config/security/request_authentication/
"""

from __future__ import annotations

import re
from typing import Literal

from jwt import PyJWKSet
from jwt.exceptions import PyJWKSetError
from meshagent.common.istio.base import (
    DRY_RUN_ANNOTATION,
    IpBlock,
    IstioModel,
    IstioResource,
    NonEmptyStr,
    ObjectMeta,
    Port,
    WorkloadSelector,
    check_ip_block,
    parse_go_bool,
)
from meshagent.common.pathtemplate import compile_template, is_template
from pydantic import Field, ValidationInfo, field_validator, model_validator

SECURITY_API_VERSIONS = frozenset({"security.istio.io/v1", "security.istio.io/v1beta1"})

Action = Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"]
MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]

# Condition keys of the supported subset (Istio's "Authorization Policy Conditions" page).
CONDITION_KEYS = frozenset(
    {
        "source.principal",
        "source.namespace",
        "source.ip",
        "remote.ip",
        "destination.port",
        "destination.ip",
    }
)
HEADER_CONDITION_RE = re.compile(r"request\.headers\[([^\[\]]+)\]")
# JWT attributes (set by RequestAuthentication): `request.auth.claims[a][b]` names a nested claim.
AUTH_CONDITION_KEYS = frozenset(
    {"request.auth.principal", "request.auth.audiences", "request.auth.presenter"}
)
CLAIM_CONDITION_RE = re.compile(r"request\.auth\.claims((?:\[[^\[\]]+\])+)")
_IP_KEYS = frozenset({"source.ip", "remote.ip", "destination.ip"})


def header_condition_name(key: str) -> str | None:
    """The header name of a `request.headers[NAME]` condition key (lower-cased), else None."""
    match = HEADER_CONDITION_RE.fullmatch(key)
    return match.group(1).lower() if match else None


def claim_condition_path(key: str) -> tuple[str, ...] | None:
    """The claim path of a `request.auth.claims[a][b]` condition key (`("a", "b")`), else None."""
    match = CLAIM_CONDITION_RE.fullmatch(key)
    return tuple(match.group(1)[1:-1].split("][")) if match else None


class Source(IstioModel):
    """`rules[].from[].source`: who the request comes from. Empty lists mean "not set"."""

    principals: tuple[NonEmptyStr, ...] = ()
    not_principals: tuple[NonEmptyStr, ...] = ()
    request_principals: tuple[NonEmptyStr, ...] = ()  # "<iss>/<sub>" of the request's JWT
    not_request_principals: tuple[NonEmptyStr, ...] = ()
    namespaces: tuple[NonEmptyStr, ...] = ()
    not_namespaces: tuple[NonEmptyStr, ...] = ()
    ip_blocks: tuple[IpBlock, ...] = ()
    not_ip_blocks: tuple[IpBlock, ...] = ()
    # The request's remote address: with no gateway in front (no trusted X-Forwarded-For hop,
    # Istio's default numTrustedProxies 0), the connection's peer, so the same as ipBlocks.
    remote_ip_blocks: tuple[IpBlock, ...] = ()
    not_remote_ip_blocks: tuple[IpBlock, ...] = ()

    @model_validator(mode="after")
    def _not_empty(self) -> Source:
        if not any(getattr(self, name) for name in type(self).model_fields):
            raise ValueError(
                "source must set at least one of principals, notPrincipals, requestPrincipals, "
                "notRequestPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks, "
                "remoteIpBlocks, notRemoteIpBlocks (omit `from` to match any source)"
            )
        return self

    @property
    def uses_http_fields(self) -> bool:
        """True when the source names the request's JWT principal (HTTP-only in Istio)."""
        return bool(self.request_principals or self.not_request_principals)


class Operation(IstioModel):
    """`rules[].to[].operation`: what is being accessed. Empty lists mean "not set"."""

    ports: tuple[Port, ...] = ()
    not_ports: tuple[Port, ...] = ()
    methods: tuple[NonEmptyStr, ...] = ()
    not_methods: tuple[NonEmptyStr, ...] = ()
    paths: tuple[NonEmptyStr, ...] = ()
    not_paths: tuple[NonEmptyStr, ...] = ()
    hosts: tuple[NonEmptyStr, ...] = ()
    not_hosts: tuple[NonEmptyStr, ...] = ()

    @field_validator("paths", "not_paths")
    @classmethod
    def _valid_path_templates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if is_template(path):
                compile_template(path)  # ValueError: Istio refuses it, Envoy would NACK it
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Operation:
        if not any(getattr(self, name) for name in type(self).model_fields):
            raise ValueError(
                "operation must set at least one of ports, notPorts, methods, notMethods, "
                "paths, notPaths, hosts, notHosts (omit `to` to match any operation)"
            )
        return self

    @property
    def uses_http_fields(self) -> bool:
        """True when the operation names HTTP-only attributes (methods, paths, hosts)."""
        return bool(
            self.methods
            or self.not_methods
            or self.paths
            or self.not_paths
            or self.hosts
            or self.not_hosts
        )


class From(IstioModel):
    source: Source


class To(IstioModel):
    operation: Operation


class Condition(IstioModel):
    """`rules[].when[]`: an extra condition on one attribute."""

    key: str
    values: tuple[NonEmptyStr, ...] = ()
    not_values: tuple[NonEmptyStr, ...] = ()

    @field_validator("key")
    @classmethod
    def _supported_key(cls, value: str) -> str:
        if (
            value not in CONDITION_KEYS
            and value not in AUTH_CONDITION_KEYS
            and header_condition_name(value) is None
            and claim_condition_path(value) is None
        ):
            supported = ", ".join(
                [
                    *sorted(CONDITION_KEYS | AUTH_CONDITION_KEYS),
                    "request.headers[NAME]",
                    "request.auth.claims[NAME]",
                ]
            )
            raise ValueError(
                f"condition key {value!r} is not supported by meshagent yet "
                f"(supported: {supported})"
            )
        return value

    @field_validator("values", "not_values")
    @classmethod
    def _values_fit_key(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        key = info.data.get("key")  # absent when the key itself was invalid
        for item in value:
            if key in _IP_KEYS:
                check_ip_block(item)
            elif key == "destination.port" and not (item.isascii() and item.isdigit()):
                raise ValueError(f"{key} values must be port numbers, got {item!r}")
        return value

    @model_validator(mode="after")
    def _has_values(self) -> Condition:
        if not self.values and not self.not_values:
            raise ValueError(f"at least one of values or notValues must be set for key {self.key}")
        return self

    @property
    def is_http_only(self) -> bool:
        return header_condition_name(self.key) is not None or self.key.startswith("request.auth.")


class Rule(IstioModel):
    """One rule: matches when every one of from / to / when matches (absent = any)."""

    from_: tuple[From, ...] | None = Field(None, alias="from")
    to: tuple[To, ...] | None = None
    when: tuple[Condition, ...] = ()

    @field_validator("from_", "to")
    @classmethod
    def _not_empty_list(cls, value: tuple | None, info: ValidationInfo) -> tuple | None:
        if value is not None and not value:
            wire = "from" if info.field_name == "from_" else "to"
            raise ValueError(f"`{wire}` must not be an empty list (omit it to match anything)")
        return value

    @property
    def uses_http_fields(self) -> bool:
        """True when the rule needs HTTP attributes (Istio's "HTTP-only fields")."""
        return (
            any(t.operation.uses_http_fields for t in self.to or ())
            or any(f.source.uses_http_fields for f in self.from_ or ())
            or any(c.is_http_only for c in self.when)
        )


class Provider(IstioModel):
    """`provider` of a CUSTOM policy: an extension provider of the mesh config, by name."""

    name: NonEmptyStr


class AuthorizationPolicySpec(IstioModel):
    selector: WorkloadSelector | None = None
    action: Action = "ALLOW"
    provider: Provider | None = None
    rules: tuple[Rule, ...] | None = Field(None, validate_default=True)

    @model_validator(mode="after")
    def _provider_with_custom(self) -> AuthorizationPolicySpec:
        # Istio's webhook: CUSTOM needs a provider, and a provider means CUSTOM.
        if self.action == "CUSTOM" and self.provider is None:
            raise ValueError("action CUSTOM needs `provider.name` (an extension provider)")
        if self.action != "CUSTOM" and self.provider is not None:
            raise ValueError(f"`provider` is only allowed with action CUSTOM, not {self.action}")
        return self

    @field_validator("rules")
    @classmethod
    def _deny_needs_rules(
        cls, value: tuple[Rule, ...] | None, info: ValidationInfo
    ) -> tuple[Rule, ...] | None:
        # Istio's webhook refuses this: such a policy would never trigger.
        if info.data.get("action") == "DENY" and not value:
            raise ValueError(
                "a DENY policy without rules never matches; add an empty rule `- {}` "
                "to deny every request"
            )
        return value


class AuthorizationPolicy(IstioResource):
    """An Istio AuthorizationPolicy (ALLOW, DENY, AUDIT, or CUSTOM with an ext-authz provider)."""

    API_VERSIONS = SECURITY_API_VERSIONS

    kind: Literal["AuthorizationPolicy"]
    spec: AuthorizationPolicySpec = AuthorizationPolicySpec()

    @classmethod
    def _supports_dry_run(cls) -> bool:
        return True

    @field_validator("metadata")
    @classmethod
    def _dry_run_value(cls, value: ObjectMeta) -> ObjectMeta:
        raw = value.annotations.get(DRY_RUN_ANNOTATION)
        if raw is not None and parse_go_bool(raw) is None:
            raise ValueError(
                f"annotation {DRY_RUN_ANNOTATION} must be 'true' or 'false', got {raw!r}"
            )
        return value

    @model_validator(mode="after")
    def _dry_run_action(self) -> AuthorizationPolicy:
        action = self.spec.action
        if DRY_RUN_ANNOTATION in self.metadata.annotations and action in ("AUDIT", "CUSTOM"):
            raise ValueError(
                f"annotation {DRY_RUN_ANNOTATION} only supports actions ALLOW and DENY, "
                f"found {action}"
            )
        return self

    @property
    def dry_run(self) -> bool:
        """True when annotated `istio.io/dry-run: "true"`: evaluated and reported, not enforced."""
        return bool(parse_go_bool(self.metadata.annotations.get(DRY_RUN_ANNOTATION, "")))


class PeerMtls(IstioModel):
    mode: MtlsMode = "UNSET"


class PeerAuthenticationSpec(IstioModel):
    selector: WorkloadSelector | None = None
    mtls: PeerMtls | None = None
    port_level_mtls: dict[Port, PeerMtls] | None = Field(None, validate_default=True)

    @field_validator("port_level_mtls")
    @classmethod
    def _port_level_needs_selector(
        cls, value: dict[int, PeerMtls] | None, info: ValidationInfo
    ) -> dict[int, PeerMtls] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("portLevelMtls, when set, must name at least one port")
        selector = info.data.get("selector")
        if selector is None or not selector.match_labels:
            raise ValueError(
                "portLevelMtls needs a workload selector (Istio refuses port-level mTLS "
                "on mesh-wide and namespace-wide policies)"
            )
        return value


class PeerAuthentication(IstioResource):
    """An Istio PeerAuthentication: which mTLS mode a workload accepts, optionally per port."""

    API_VERSIONS = SECURITY_API_VERSIONS

    kind: Literal["PeerAuthentication"]
    spec: PeerAuthenticationSpec = PeerAuthenticationSpec()

    @property
    def mode(self) -> MtlsMode:
        """The workload-level mode; UNSET means "inherit from the namespace or mesh"."""
        return self.spec.mtls.mode if self.spec.mtls else "UNSET"


class JwtHeader(IstioModel):
    """`jwtRules[].fromHeaders[]`: a header carrying the token, after an optional prefix."""

    name: NonEmptyStr
    prefix: str = ""


def _check_jwks(text: str) -> str:
    """Refuse an inline JWKS that does not load: Istio's webhook refuses it too."""
    try:
        keys = PyJWKSet.from_json(text)
    except (PyJWKSetError, ValueError, TypeError) as exc:
        raise ValueError(f"jwks is not a usable JSON Web Key Set: {exc}") from None
    if not keys.keys:
        raise ValueError("jwks holds no usable key")
    return text


class ClaimToHeader(IstioModel):
    """`jwtRules[].outputClaimToHeaders[]`: copy one claim (`a.b` for a nested one) to a header."""

    header: NonEmptyStr
    claim: NonEmptyStr


class JwtRule(IstioModel):
    """`jwtRules[]`: how to find and check tokens of one issuer."""

    issuer: NonEmptyStr
    audiences: tuple[NonEmptyStr, ...] = ()
    jwks_uri: NonEmptyStr | None = None
    jwks: NonEmptyStr | None = None
    from_headers: tuple[JwtHeader, ...] = ()
    from_params: tuple[NonEmptyStr, ...] = ()
    from_cookies: tuple[NonEmptyStr, ...] = ()
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    output_payload_to_header: NonEmptyStr | None = None
    forward_original_token: bool = False

    @field_validator("jwks_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/?#\s]+", value):
            raise ValueError(f"jwksUri must be an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("jwks")
    @classmethod
    def _inline(cls, value: str | None) -> str | None:
        return None if value is None else _check_jwks(value)

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtRule:
        if self.jwks is not None and self.jwks_uri is not None:
            raise ValueError("set only one of jwks and jwksUri")
        return self

    @property
    def keys_url(self) -> str | None:
        """Where the controller fetches this rule's keys (None: inline `jwks`): `jwksUri`, else
        the issuer's OpenID discovery document, as istiod does."""
        if self.jwks is not None:
            return None
        return self.jwks_uri or self.issuer.rstrip("/") + "/.well-known/openid-configuration"


class RequestAuthenticationSpec(IstioModel):
    selector: WorkloadSelector | None = None
    jwt_rules: tuple[JwtRule, ...] = ()


class RequestAuthentication(IstioResource):
    """An Istio RequestAuthentication: which JWTs a workload accepts (a present but invalid
    token is refused with 401; a request without one passes, unauthenticated)."""

    API_VERSIONS = SECURITY_API_VERSIONS

    kind: Literal["RequestAuthentication"]
    spec: RequestAuthenticationSpec = RequestAuthenticationSpec()
