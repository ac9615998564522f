"""What a matched HTTP route does to a request besides choosing its destination, as Istio
documents the VirtualService fields (https://istio.io/latest/docs/reference/config/networking/
virtual-service/) and Envoy carries them out.

What flows through: compiled once per snapshot from an `http[]` rule (agent/proxy/routing.py),
applied per request by the shared decisions (agent/proxy/http/decide.py) for both HTTP engines.

- `headers` (`HeaderOps`): remove, then set (replaces every value), then add (one more value),
  as Envoy's header parser. A destination's operations run before the rule's, so the rule's
  `set` wins (Envoy: the more specific level first).
- `rewrite.uri` (`Rewrite`): Envoy's prefix_rewrite. With a `uri.prefix` match the matched
  prefix is replaced (query string kept); with `exact` or `regex` the whole path is; a rule
  without a `uri` match is a `/` prefix route in Envoy, so its leading `/` is replaced (rewrite
  `/v2/` turns `/a` into `/v2/a`). A prefix without a trailing `/` rewritten to `/` also eats
  the slashes that follow (`/foo/bar` -> `/bar`, not `//bar`), as Istio translates it.
  `uriRegexRewrite`: every RE2 match in the path (not the query) is replaced, `\\1` naming a
  group. `authority` replaces the Host / `:authority` sent upstream.
- `redirect` (`Redirect`): a local 301 (or `redirectCode`) with a Location built from the
  request's URL: `uri` replaces the whole path (the query is kept unless `uri` has its own),
  `authority` the host, `port` the port, `scheme` the scheme (mesh traffic arrives as `http`).
  `derivePort: FROM_REQUEST_PORT` writes the service port; `FROM_PROTOCOL_DEFAULT` (and a
  scheme change without a port) drops a port that is the old or new scheme's default.
- `corsPolicy` (`Cors`), as Envoy's CORS filter (before faults): a request with an `Origin`
  that matches an allowed origin (or an allowed origin that matches `*`) is a CORS request; if
  it is a preflight (OPTIONS with `Access-Control-Request-Method`) the proxy answers 200 with
  Allow-Origin (the request's origin), Allow-Credentials, Allow-Methods, Allow-Headers and
  Max-Age; otherwise it is forwarded and its response gets Allow-Origin, Allow-Credentials and
  Expose-Headers. A preflight from another origin is forwarded (`unmatchedPreflights`
  FORWARD, the default) or answered 200 without CORS headers (IGNORE).
- `mirror`/`mirrors` (`Mirror`): a copy of the request, for the given share of requests, to
  another destination; its Host gets `-shadow` appended before any port, as Envoy does; the
  answer is read and dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshagent.common.istio import networking as net

if TYPE_CHECKING:
    from meshagent.agent.proxy.routing import ClusterSpec

HeaderList = list[tuple[bytes, bytes]]
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _pairs(values: dict[str, str]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in values.items())


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """One level's header operations (lower-case names)."""

    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    remove: frozenset[bytes] = frozenset()

    @classmethod
    def of(cls, ops: net.HeaderOperations | None) -> HeaderOps | None:
        if ops is None or not (ops.set or ops.add or ops.remove):
            return None
        return cls(
            _pairs(ops.set),
            _pairs(ops.add),
            frozenset(n.encode("latin-1") for n in ops.remove),
        )

    def apply(self, headers: HeaderList) -> HeaderList:
        """A new list: `headers` with these operations applied."""
        gone = self.remove | {name for name, _ in self.set}
        return [(n, v) for n, v in headers if n not in gone] + [*self.set, *self.add]


def apply_all(ops: Iterable[HeaderOps], headers: HeaderList) -> HeaderList:
    for op in ops:
        headers = op.apply(headers)
    return headers


def _split(target: str) -> tuple[str, str]:
    cut = target.find("?")
    return (target, "") if cut < 0 else (target[:cut], target[cut:])


@dataclass(frozen=True, slots=True)
class Rewrite:
    uri: str | None = None
    regex: Any = None  # a compiled RE2 pattern (uriRegexRewrite.match)
    substitution: str = ""
    authority: str | None = None

    @classmethod
    def of(cls, rw: net.HTTPRewrite | None) -> Rewrite | None:
        if rw is None:
            return None
        rx = rw.uri_regex_rewrite
        return cls(
            uri=rw.uri,
            regex=net.compile_regex(rx.match) if rx else None,
            substitution=rx.rewrite if rx else "",
            authority=rw.authority,
        )

    def target(self, target: str, prefix: str | None) -> str:
        """The request target after the URI rewrite. `prefix`: the `uri.prefix` the request
        matched ("/" for a rule without a uri match), None for an exact or regex match."""
        if self.regex is not None:
            path, query = _split(target)
            return self.regex.sub(self.substitution, path) + query
        if self.uri is None:
            return target
        if prefix is None:
            return self.uri + _split(target)[1]
        rest = target[len(prefix) :]
        if self.uri == "/" and not prefix.endswith("/"):
            rest = rest.lstrip("/")
        return self.uri + rest


def _host_port(authority: str) -> tuple[str, int | None]:
    """(host, port) of an authority; an IPv6 literal keeps its brackets."""
    if authority.startswith("["):
        end = authority.find("]") + 1
        rest = authority[end:]
        if rest[:1] == ":" and rest[1:].isdigit():
            return authority[:end], int(rest[1:])
        return authority, None
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return authority, None


@dataclass(frozen=True, slots=True)
class Redirect:
    status: int = 301
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    from_request_port: bool = False
    scheme: str | None = None

    @classmethod
    def of(cls, rd: net.HTTPRedirect | None) -> Redirect | None:
        if rd is None:
            return None
        return cls(
            status=rd.redirect_code or 301,
            uri=rd.uri,
            authority=rd.authority,
            port=rd.port,
            from_request_port=rd.derive_port == "FROM_REQUEST_PORT",
            scheme=rd.scheme,
        )

    def location(self, target: str, authority: str, service_port: int) -> str:
        """The Location for a request to `target` with Host `authority`, on `service_port`."""
        old_scheme = "http"
        scheme = self.scheme or old_scheme
        host, port = _host_port(self.authority or authority)
        if self.port is not None:
            port = self.port
        elif self.from_request_port:
            port = service_port
        elif scheme != old_scheme and port in (_DEFAULT_PORTS[old_scheme], _DEFAULT_PORTS[scheme]):
            port = None
        if port is not None and port != _DEFAULT_PORTS[scheme]:
            host = f"{host}:{port}"
        if self.uri is None:
            path = target
        elif "?" in self.uri:
            path = self.uri
        else:
            path = self.uri + _split(target)[1]
        return f"{scheme}://{host}{path}"


def shadow_authority(authority: str) -> str:
    """Envoy's shadow host: `-shadow` appended to the host, before any port."""
    host, port = _host_port(authority)
    return f"{host}-shadow" if port is None else f"{host}-shadow:{port}"


@dataclass(frozen=True, slots=True)
class Cors:
    origins: tuple[Callable[[str], bool], ...]  # the allowed origins' matchers
    allow_methods: bytes = b""
    allow_headers: bytes = b""
    expose_headers: bytes = b""
    max_age: bytes = b""
    credentials: bool = False
    forward_unmatched: bool = True

    @classmethod
    def of(
        cls, policy: net.CorsPolicy | None, matchers: tuple[Callable[[str], bool], ...]
    ) -> Cors | None:
        """`matchers`: `policy.origins` compiled (routing's string matchers)."""
        if policy is None:
            return None
        return cls(
            origins=matchers,
            allow_methods=",".join(policy.allow_methods).encode("latin-1"),
            allow_headers=",".join(policy.allow_headers).encode("latin-1"),
            expose_headers=",".join(policy.expose_headers).encode("latin-1"),
            max_age=b"" if policy.max_age is None else str(int(policy.max_age)).encode(),
            credentials=bool(policy.allow_credentials),
            forward_unmatched=policy.unmatched_preflights != "IGNORE",
        )

    def allows(self, origin: str) -> bool:
        return any(match("*") or match(origin) for match in self.origins)

    def _common(self, origin: str) -> list[tuple[bytes, bytes]]:
        out = [(b"access-control-allow-origin", origin.encode("latin-1"))]
        if self.credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        return out

    def preflight_headers(self, origin: str) -> tuple[tuple[bytes, bytes], ...]:
        """The headers of the proxy's answer to a preflight from an allowed `origin`."""
        out = self._common(origin)
        for name, value in (
            (b"access-control-allow-methods", self.allow_methods),
            (b"access-control-allow-headers", self.allow_headers),
            (b"access-control-max-age", self.max_age),
        ):
            if value:
                out.append((name, value))
        return tuple(out)

    def response_ops(self, origin: str) -> HeaderOps:
        """What the response to a CORS request from an allowed `origin` gets."""
        out = self._common(origin)
        if self.expose_headers:
            out.append((b"access-control-expose-headers", self.expose_headers))
        return HeaderOps(set=tuple(out))


@dataclass(frozen=True, slots=True)
class Mirror:
    cluster: ClusterSpec | None  # None: the destination names nothing known (not mirrored)
    percent: float = 100.0
