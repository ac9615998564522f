"""The ext-authz provider models of the mesh config (`extension_providers`; common/extauthz.py
says what they mean).

Apart from the check itself (common/extauthz.py imports h11 and trio) so that the agent's
config, which declares them, loads with pydantic and the Istio base types only: `meshagent
run` reads its config before it starts its proxy workers.
"""

from __future__ import annotations

from meshagent.common.istio.base import IstioModel, NonEmptyStr, Port, parse_duration
from pydantic import field_validator

__all__ = ["EnvoyExtAuthzHttp", "ExtensionProvider"]


class EnvoyExtAuthzHttp(IstioModel):
    """`envoyExtAuthzHttp`: where the check API is served and what it sees and returns."""

    service: NonEmptyStr  # a Service host: name.namespace.svc.cluster.local (or a short form)
    port: Port
    timeout: NonEmptyStr = "600s"  # kept as written: the config is handed to workers as JSON
    path_prefix: str = ""
    fail_open: bool = False
    status_on_error: int = 403
    include_request_headers_in_check: tuple[NonEmptyStr, ...] = ()
    include_additional_headers_in_check: dict[str, str] = {}
    headers_to_upstream_on_allow: tuple[NonEmptyStr, ...] = ()
    headers_to_downstream_on_deny: tuple[NonEmptyStr, ...] = ()

    @field_validator("timeout")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @property
    def timeout_s(self) -> float:
        return parse_duration(self.timeout)


class ExtensionProvider(IstioModel):
    """One of `meshConfig.extensionProviders[]`; only the HTTP ext-authz kind is supported."""

    name: NonEmptyStr
    envoy_ext_authz_http: EnvoyExtAuthzHttp
