"""What can go wrong with an HBONE tunnel, as exceptions the proxy can act on.

`TunnelRefused` carries the peer's answer (401 denied, 503 unreachable, ...): the proxy resets
the application's connection. `TunnelFailed` means no answer came at all (connect, TLS, HTTP/2
or timeout); `SecureNamingError` is the one failure that must never be retried against the
same node without new information, since the node presented the wrong identity.
"""

from __future__ import annotations

from meshagent.common.spiffe import Identity

__all__ = [
    "HboneError",
    "PeerIdentityError",
    "SecureNamingError",
    "TunnelFailed",
    "TunnelRefused",
]


class HboneError(Exception):
    """Base of every HBONE error."""


class TunnelFailed(HboneError):
    """No tunnel: the connection, TLS handshake, HTTP/2 exchange or a timeout failed."""


class SecureNamingError(TunnelFailed):
    """The destination node's proxy proved an identity other than the one expected."""

    def __init__(self, expected: Identity, actual: Identity) -> None:
        super().__init__(f"secure naming: expected server identity {expected}, peer is {actual}")
        self.expected = expected
        self.actual = actual


class TunnelRefused(HboneError):
    """The peer answered the CONNECT with a non-200 status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"tunnel refused by peer with status {status}")
        self.status = status


class PeerIdentityError(HboneError):
    """The peer's certificate does not carry exactly one workload SPIFFE ID."""
