"""Prometheus counters for HBONE, both directions (exposed on 15020 with the rest).

Inbound: handshakes that completed or failed, connections dropped for malformed TLS/HTTP/2,
and CONNECT streams by the status they were answered with (200 = accepted). Outbound: TLS
connections opened, dial failures by stage, and streams by the status the peer answered
(``error`` when no answer came). Pool occupancy is a snapshot, read from `TunnelPool.stats`.
"""

from __future__ import annotations

from prometheus_client import Counter

__all__ = [
    "INBOUND_CONNECTIONS",
    "INBOUND_HANDSHAKE_FAILURES",
    "INBOUND_PROTOCOL_ERRORS",
    "INBOUND_STREAMS",
    "OUTBOUND_CONNECTIONS",
    "OUTBOUND_CONNECT_FAILURES",
    "OUTBOUND_STREAMS",
    "count_stream",
]

INBOUND_CONNECTIONS = Counter(
    "meshagent_hbone_inbound_connections",
    "HBONE connections accepted (mutual TLS handshake completed).",
)
INBOUND_HANDSHAKE_FAILURES = Counter(
    "meshagent_hbone_inbound_handshake_failures",
    "HBONE connections refused during the handshake (bad, expired or missing client"
    " certificate, unknown SNI, no ALPN h2, garbage, timeout).",
)
INBOUND_PROTOCOL_ERRORS = Counter(
    "meshagent_hbone_inbound_protocol_errors",
    "HBONE connections closed because the peer sent malformed TLS records or HTTP/2.",
)
INBOUND_STREAMS = Counter(
    "meshagent_hbone_inbound_streams",
    "HBONE CONNECT streams answered, by response status (200 = tunnel accepted).",
    ["status"],
)
OUTBOUND_CONNECTIONS = Counter(
    "meshagent_hbone_outbound_connections",
    "HBONE connections opened to other nodes' proxies.",
)
OUTBOUND_CONNECT_FAILURES = Counter(
    "meshagent_hbone_outbound_connect_failures",
    "HBONE connections that could not be set up, by stage (connect, tls, secure_naming, timeout).",
    ["stage"],
)
OUTBOUND_STREAMS = Counter(
    "meshagent_hbone_outbound_streams",
    "HBONE CONNECT streams opened, by the peer's response status (error = no response).",
    ["status"],
)


_STATUS_CHILDREN: dict[tuple[Counter, str], Counter] = {}


def count_stream(counter: Counter, status: str) -> None:
    """One stream more in ``counter`` (INBOUND_STREAMS or OUTBOUND_STREAMS) for ``status``.

    Each tunnel counts one: its labelled child is found once per process and status
    (prometheus_client's ``labels()`` checks and builds the label tuple on every call)."""
    key = (counter, status)  # a Counter hashes by identity
    child = _STATUS_CHILDREN.get(key)
    if child is None:
        child = _STATUS_CHILDREN[key] = counter.labels(status=status)
    child.inc()
