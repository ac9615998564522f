"""External authorization with Envoy's gRPC check API (`envoyExtAuthzGrpc`), as Envoy's
ext_authz filter speaks it to OPA's Envoy plugin, Istio's sample and other ext_authz servers
(https://www.envoyproxy.io/docs/envoy/latest/api-v3/service/auth/v3/external_auth.proto):

- the CheckRequest carries the request's method, path (and query), host, scheme, protocol and
  every header (lower-case names, repeated ones joined with ","; `x-request-id` as its id),
  the source's and destination's address and SPIFFE principal;
- the call answers OK with `status.code` 0: allowed; `ok_response.headers` are set on the
  request going on (replacing a header of the same name unless `append` is true), and
  `ok_response.headers_to_remove` are removed;
- a non-zero `status.code`: denied; the client gets `denied_response.status` (403 when unset),
  its headers and body;
- the call failing (no answer within `timeout`, a transport error, a gRPC status other than OK
  for the call itself) is the provider failing: `failOpen`, else `statusOnError` (403).

The pure parts (request, verdict) and one unary call over HTTP/2 (the `h2` library) on a
stream the agent opened to the provider's pod (agent/policy/extauthz.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import h2.config
import h2.connection
import h2.events
import trio
from meshagent.common import extauthzproto as proto
from meshagent.common.extauthz import MAX_BODY, Verdict

MAX_MESSAGE = 1024 * 1024  # of a CheckResponse
_GRPC_OK = 0


class CallFailed(Exception):
    """The check call itself did not complete (the provider failed, not a verdict)."""


def _peer(peer, ip: str, port: int, principal: str | None) -> None:
    if ip:
        peer.address.socket_address.address = ip
        if port:
            peer.address.socket_address.port_value = port
    if principal:
        peer.principal = principal if "://" in principal else f"spiffe://{principal}"


def check_request(
    method: str,
    target: str,
    authority: str,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    protocol: str = "HTTP/1.1",
    source: tuple[str, int, str | None] = ("", 0, None),
    destination: tuple[str, int, str | None] = ("", 0, None),
) -> bytes:
    """The serialized CheckRequest for one client request (`target`: path and query;
    `source`/`destination`: ip, port, principal)."""
    request = proto.CheckRequest()
    attributes = request.attributes
    _peer(attributes.source, *source)
    _peer(attributes.destination, *destination)
    http = attributes.request.http
    http.method, http.path, http.host = method, target, authority
    http.scheme, http.protocol = "http", protocol
    joined: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        joined[key] = f"{joined[key]},{text}" if key in joined else text
    joined.setdefault(":authority", authority)
    for key, value in joined.items():
        entry = http.headers.add()
        entry.key, entry.value = key, value
    http.id = joined.get("x-request-id", "")
    return request.SerializeToString()


def verdict(message: bytes) -> Verdict:
    """What a CheckResponse means (see above). Raises CallFailed for bytes that do not parse."""
    try:
        response = proto.CheckResponse.FromString(message)
    except Exception as exc:  # protobuf's DecodeError (its class moved between versions)
        raise CallFailed(f"the CheckResponse does not parse: {exc}") from None
    if response.status.code == _GRPC_OK:
        ok = response.ok_response
        return Verdict(
            True,
            upstream_headers=_headers(h for h in ok.headers if not h.append.value),
            appended_headers=_headers(h for h in ok.headers if h.append.value),
            removed_headers=tuple(n.lower().encode("latin-1") for n in ok.headers_to_remove),
        )
    denied = response.denied_response
    status = denied.status.code or 403
    if not 200 <= status <= 599:
        status = 403
    return Verdict(
        False,
        status=status,
        headers=_headers(denied.headers),
        body=denied.body.encode()[:MAX_BODY],
    )


def _headers(options: Iterable) -> tuple[tuple[bytes, bytes], ...]:
    return tuple(
        (o.header.key.lower().encode("latin-1"), o.header.value.encode("latin-1"))
        for o in options
        if o.header.key
    )


def _frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


async def call(stream: trio.abc.Stream, authority: str, message: bytes, timeout: float) -> bytes:
    """One unary Check call over HTTP/2 (h2c prior knowledge) on `stream`; the response
    message. Raises CallFailed (or OSError/trio errors) when the call does not end OK."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    millis = max(1, int(timeout * 1000))
    conn.send_headers(
        stream_id,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", proto.CHECK_METHOD),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", f"{min(millis, 99_999_999)}m"),
        ],
    )
    conn.send_data(stream_id, _frame(message), end_stream=True)
    await stream.send_all(conn.data_to_send())
    body, status = bytearray(), None
    while True:
        data = await stream.receive_some(65536)
        if not data:
            raise CallFailed("the provider closed the connection mid-call")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                if len(body) > MAX_MESSAGE + 5:
                    raise CallFailed("the CheckResponse is too large")
            elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                found = dict(event.headers).get(b"grpc-status")
                if found is not None:
                    status = int(found)
            elif isinstance(event, h2.events.StreamReset):
                raise CallFailed(f"the provider reset the call (error {event.error_code})")
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                if status != _GRPC_OK:
                    raise CallFailed(f"the Check call ended with gRPC status {status}")
                if len(body) < 5:
                    raise CallFailed("the Check call returned no message")
                (length,) = struct.unpack(">I", body[1:5])
                return bytes(body[5 : 5 + length])
        if pending := conn.data_to_send():
            await stream.send_all(pending)
