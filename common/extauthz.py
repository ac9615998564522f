"""External authorization (AuthorizationPolicy `action: CUSTOM`) with Envoy's HTTP check API.

The providers are declared in the mesh config, as Istio's `meshConfig.extensionProviders[]`
with `envoyExtAuthzHttp` (here: `extension_providers` in the agent config; camelCase or
snake_case field names). For a request a CUSTOM policy matches, the destination's proxy sends
the provider a check request and follows its verdict, as Envoy's ext_authz HTTP service does
(https://www.envoyproxy.io/docs/envoy/latest/api-v3/extensions/filters/http/ext_authz/v3/ext_authz.proto
and https://istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/#MeshConfig-ExtensionProvider-EnvoyExternalAuthorizationHttpProvider):

- the check request has the original method, `pathPrefix` + the original path and query, the
  Host, `content-length: 0` (no body), the request headers `includeRequestHeadersInCheck` names
  (exact, `prefix*` or `*suffix`, case-insensitive) and `includeAdditionalHeadersInCheck`;
- 200 allows (Envoy's rule: any other status, 2xx included, is a denial); the check response's
  headers named by `headersToUpstreamOnAllow` are set on the request going on;
- a 5xx is the provider failing, as no answer within `timeout` (Istio's default 600 s) or
  none at all: `failOpen` lets the request go on, else the client gets `statusOnError`
  (default 403);
- anything else is the answer to the client: the check response's status and body, with its
  headers named by `headersToDownstreamOnDeny` (all of them, less hop-by-hop ones, when none
  is named, as Envoy).

Pure parts here (models, the check request, the verdict); the agent reaches the provider's
Service through the mesh (agent/policy/extauthz.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import h11
import trio
from meshagent.common.extauthz_provider import (
    EnvoyExtAuthzHttp,
    ExtensionProvider,
    Provider,
)

MAX_BODY = 64 * 1024  # of a check response kept for the client
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"content-length",
        b"proxy-connection",
    }
)


def _matcher(patterns: Iterable[str]):
    exact, prefixes, suffixes = set(), [], []
    for p in (p.lower() for p in patterns):
        if p.endswith("*"):
            prefixes.append(p[:-1])
        elif p.startswith("*"):
            suffixes.append(p[1:])
        else:
            exact.add(p)
    prefix_t, suffix_t = tuple(prefixes), tuple(suffixes)

    def match(name: str) -> bool:
        return name in exact or name.startswith(prefix_t) or name.endswith(suffix_t)

    return match


@dataclass(frozen=True, slots=True)
class Verdict:
    """The provider's answer: `allowed` with headers to set on the request, or the response
    (`status`, `headers`, `body`) the client gets."""

    allowed: bool
    upstream_headers: tuple[tuple[bytes, bytes], ...] = ()  # set, replacing same-named ones
    status: int = 0
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    # gRPC providers also add headers beside the request's and remove some
    appended_headers: tuple[tuple[bytes, bytes], ...] = ()
    removed_headers: tuple[bytes, ...] = ()


def check_request(
    provider: EnvoyExtAuthzHttp,
    method: str,
    target: str,
    authority: str,
    headers: Iterable[tuple[bytes, bytes]],
) -> h11.Request:
    """The check request for one client request (`target`: path and query)."""
    wanted = _matcher(provider.include_request_headers_in_check)
    out = [(b"host", authority.encode("latin-1")), (b"content-length", b"0")]
    for name, value in headers:
        text = name.decode("latin-1")
        if text not in ("host", "content-length") and wanted(text):
            out.append((name, value))
    for name, value in provider.include_additional_headers_in_check.items():
        out.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    path = (provider.path_prefix.rstrip("/") + target) if provider.path_prefix else target
    return h11.Request(method=method, target=path.encode("latin-1"), headers=out)


def verdict(
    provider: EnvoyExtAuthzHttp,
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
) -> Verdict:
    """What the check response means (Envoy's ext_authz HTTP rules, see above)."""
    headers = [(n.lower(), v) for n, v in headers]
    if 500 <= status <= 599:
        return on_error(provider)  # Envoy: the authorization server failed, not a verdict
    if status == 200:
        upstream = _matcher(provider.headers_to_upstream_on_allow)
        keep = tuple((n, v) for n, v in headers if upstream(n.decode("latin-1")))
        return Verdict(True, keep if provider.headers_to_upstream_on_allow else ())
    if provider.headers_to_downstream_on_deny:
        downstream = _matcher(provider.headers_to_downstream_on_deny)
        sent = tuple((n, v) for n, v in headers if downstream(n.decode("latin-1")))
    else:
        sent = tuple((n, v) for n, v in headers if n not in _HOP_BY_HOP)
    return Verdict(False, status=status, headers=sent, body=body[:MAX_BODY])


def on_error(provider: Provider) -> Verdict:
    """The provider could not be asked: failOpen, else statusOnError."""
    if provider.fail_open:
        return Verdict(True)
    return Verdict(False, status=provider.status_on_error)


async def ask(
    stream: trio.abc.Stream, request: h11.Request
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One HTTP/1.1 exchange on `stream`: (status, headers, body up to MAX_BODY). Raises
    OSError/trio errors/h11.ProtocolError when the provider does not answer properly."""
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    status, headers, body = 0, [], bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            status, headers = event.status_code, list(event.headers)
        elif isinstance(event, h11.Data):
            if len(body) < MAX_BODY:
                body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("the provider closed the connection")


def providers(declared: Iterable[Mapping | ExtensionProvider]) -> dict[str, Provider]:
    """The declared providers by name (validated; raises pydantic's ValidationError)."""
    out = {}
    for item in declared:
        provider = (
            item if isinstance(item, ExtensionProvider) else ExtensionProvider.model_validate(item)
        )
        out[provider.name] = provider.provider
    return out
