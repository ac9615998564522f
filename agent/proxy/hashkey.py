"""The consistent-hash key of a request or connection (DestinationRule `consistentHash`).

What Envoy hashes, as Istio configures it: `httpHeaderName` the header's value (repeated
headers joined with ','), `httpCookie` the cookie's value, `httpQueryParameterName` the first
value of the parameter as written (not decoded), `useSourceIp` the client's address. No value:
no key, and the balancer picks at random. On a TCP port only `useSourceIp` has a key (per
connection). A `httpCookie` with a `ttl` that the request lacks is generated, as Envoy does:
the request is hashed on the new value and the response sets it (`name="value"`, `Max-Age`
when the ttl is not 0, `Path`, `HttpOnly`). Envoy derives the value from the client's address
and port; we draw 16 random hex digits (ours has no port: one per pod would pin a whole pod).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from meshagent.agent.proxy.route_actions import HeaderOps
from meshagent.common.jwtauth import parse_cookies

if TYPE_CHECKING:
    from meshagent.agent.proxy.http.types import RequestInfo
    from meshagent.agent.proxy.routing import HashPolicy


def connection_key(policy: HashPolicy | None, peer: str) -> bytes | None:
    """The key of an L4 connection from `peer`: only `useSourceIp` hashes connections."""
    if policy is None or policy.kind != "source_ip" or not peer:
        return None
    return peer.encode()


def request_key(
    policy: HashPolicy, info: RequestInfo, peer: str, rng: random.Random
) -> tuple[bytes | None, HeaderOps | None]:
    """(the key of a request from `peer` or None, the response's Set-Cookie operation when
    one is made)."""
    if policy.kind == "source_ip":
        return connection_key(policy, peer), None
    if policy.kind == "header":
        value = info.header_map().get(policy.name)
        return (None if value is None else value.encode("latin-1")), None
    if policy.kind == "query":
        return _query_value(info.target, policy.name), None
    raw = "; ".join(v.decode("latin-1") for n, v in info.headers if n == b"cookie")
    value = parse_cookies(raw).get(policy.name)
    if value is not None:
        return value.encode("latin-1"), None
    if policy.ttl is None:
        return None, None
    made = f"{rng.getrandbits(64):016x}"
    return made.encode(), HeaderOps(add=((b"set-cookie", _set_cookie(policy, made)),))


def _query_value(target: str, name: str) -> bytes | None:
    _, sep, query = target.partition("?")
    if not sep:
        return None
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == name:
            return value.encode("latin-1")
    return None


def _set_cookie(policy: HashPolicy, value: str) -> bytes:
    text = f'{policy.name}="{value}"'
    if policy.ttl:
        text += f"; Max-Age={int(policy.ttl)}"
    if policy.path:
        text += f"; Path={policy.path}"
    return (text + "; HttpOnly").encode("latin-1")
