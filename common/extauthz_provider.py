"""The ext-authz provider models of the mesh config (`extension_providers`; common/extauthz.py
says what they mean).

Apart from the check itself (common/extauthz.py imports h11 and trio) so that the agent's
config, which declares them, loads with pydantic and the Istio base types only: `meshagent
run` reads its config before it starts its proxy workers.
"""

from __future__ import annotations

from meshagent.common.istio.base import IstioModel, NonEmptyStr, Port, parse_duration
from pydantic import field_validator, model_validator

__all__ = ["EnvoyExtAuthzGrpc", "EnvoyExtAuthzHttp", "ExtensionProvider", "Provider"]


class _ExtAuthzService(IstioModel):
    """What both provider kinds share: where the check is served and what a failure means."""

    service: NonEmptyStr  # a Service host: name.namespace.svc.cluster.local (or a short form)
    port: Port
    timeout: NonEmptyStr = "600s"  # kept as written: the config is handed to workers as JSON
    fail_open: bool = False
    status_on_error: int = 403

    @field_validator("timeout")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @property
    def timeout_s(self) -> float:
        return parse_duration(self.timeout)


class EnvoyExtAuthzHttp(_ExtAuthzService):
    """`envoyExtAuthzHttp`: where the check API is served and what it sees and returns."""

    path_prefix: str = ""
    include_request_headers_in_check: tuple[NonEmptyStr, ...] = ()
    include_additional_headers_in_check: dict[str, str] = {}
    headers_to_upstream_on_allow: tuple[NonEmptyStr, ...] = ()
    headers_to_downstream_on_deny: tuple[NonEmptyStr, ...] = ()


class EnvoyExtAuthzGrpc(_ExtAuthzService):
    """`envoyExtAuthzGrpc`: Envoy's gRPC check API (envoy.service.auth.v3.Authorization/Check)
    served by the provider's Service port; what the answer means: common/extauthz_grpc.py."""


Provider = EnvoyExtAuthzHttp | EnvoyExtAuthzGrpc


class ExtensionProvider(IstioModel):
    """One of `meshConfig.extensionProviders[]`: an ext-authz provider, HTTP or gRPC."""

    name: NonEmptyStr
    envoy_ext_authz_http: EnvoyExtAuthzHttp | None = None
    envoy_ext_authz_grpc: EnvoyExtAuthzGrpc | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ExtensionProvider:
        if (self.envoy_ext_authz_http is None) == (self.envoy_ext_authz_grpc is None):
            raise ValueError("set exactly one of envoyExtAuthzHttp and envoyExtAuthzGrpc")
        return self

    @property
    def provider(self) -> Provider:
        return self.envoy_ext_authz_http or self.envoy_ext_authz_grpc  # type: ignore[return-value]
