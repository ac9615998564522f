"""HBONE: mutual-TLS HTTP/2 CONNECT tunnels between node proxies (DESIGN.md section 1, 3-4).

Outbound, `open_tunnel_pool` gives a `TunnelPool` whose `open_stream` returns a byte stream
to a pod on another node, over pooled connections. Inbound, `serve_hbone` accepts those
tunnels on port 15008 and hands each to a handler as an `InboundTunnel`. `tls` builds the
contexts from PEM material; `tlsstream` runs TLS over a socket; `protocol` holds the sans-IO
HTTP/2 conventions; `connection` is the HTTP/2 multiplexer both sides share.

Choices worth knowing when using it:

- A tunnel closes like TCP. ``send_eof`` half-closes; `aclose` is graceful (what we sent
  stays readable, the peer is asked to stop sending); `trio.aclose_forcefully` (or a
  cancelled ``aclose``) resets the stream, and the peer gets `trio.BrokenResourceError`:
  that is how a proxy passes on a reset.
- Flow control gives window back only as the application reads, so a slow reader stops its
  sender. Windows are 4 MiB per stream and per connection (as ztunnel), so one stalled
  reader can also hold up the other tunnels of its connection (same source identity,
  destination identity and node) until it reads again.
- A server handler owns its tunnel until it returns; the tunnel is then reset unless both
  directions already ended.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshagent.agent.hbone.client import PoolKey, PoolKeyStats, TunnelPool, open_tunnel_pool
    from meshagent.agent.hbone.errors import (
        HboneError,
        PeerIdentityError,
        SecureNamingError,
        TunnelFailed,
        TunnelRefused,
    )
    from meshagent.agent.hbone.server import InboundTunnel, TunnelHandler, serve_hbone
    from meshagent.agent.hbone.tls import (
        ServerContextSelector,
        client_context,
        peer_identity,
        server_context_selector,
    )

_MODULES = {
    "client": ("PoolKey", "PoolKeyStats", "TunnelPool", "open_tunnel_pool"),
    "errors": (
        "HboneError",
        "PeerIdentityError",
        "SecureNamingError",
        "TunnelFailed",
        "TunnelRefused",
    ),
    "server": ("InboundTunnel", "TunnelHandler", "serve_hbone"),
    "tls": ("ServerContextSelector", "client_context", "peer_identity", "server_context_selector"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    """Imported on first use (PEP 562), so that a program needing one light submodule
    (`tls`, for `meshagent status` through the agent's state) does not import the client and
    server with h2 first."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "HboneError",
    "InboundTunnel",
    "PeerIdentityError",
    "PoolKey",
    "PoolKeyStats",
    "SecureNamingError",
    "ServerContextSelector",
    "TunnelFailed",
    "TunnelHandler",
    "TunnelPool",
    "TunnelRefused",
    "client_context",
    "open_tunnel_pool",
    "peer_identity",
    "serve_hbone",
    "server_context_selector",
]
