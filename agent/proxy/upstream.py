"""Reaching an endpoint from the node proxy: directly on this node, through HBONE across nodes.

The one seam every outbound path uses (L4 relay and the HTTP engine alike):
`Connector.open(source, ip, port)` returns a byte stream to the pod. A pod on
this node is dialled directly (the node proxy is a trusted source, so STRICT
pods accept it). A meshed pod on another node is reached through an HBONE
tunnel to that node's proxy, presenting the source workload's certificate and
requiring the destination workload's identity. A pod whose mode is DISABLE,
or a destination outside the mesh, is dialled directly. A DestinationRule `tls` other than
ISTIO_MUTUAL dials directly too: DISABLE in plaintext (refused here when the destination's
PeerAuthentication is STRICT, as its node's kernel would), SIMPLE/MUTUAL with TLS originated
by this proxy (agent/proxy/tls_origin.py).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from meshagent.agent import sockio
from meshagent.agent.hbone.client import TunnelPool
from meshagent.agent.hbone.errors import SecureNamingError, TunnelFailed, TunnelRefused
from meshagent.agent.hbone.protocol import format_authority
from meshagent.agent.identity.manager import IdentityManager, IdentityUnavailable
from meshagent.agent.policy import authorization
from meshagent.agent.proxy import live
from meshagent.agent.proxy.inputs import ProxyInputs
from meshagent.agent.proxy.tls_origin import TlsOriginError, originate
from meshagent.agent.telemetry import local_hop_security

if TYPE_CHECKING:
    from meshagent.agent.proxy.inbound import Destination, InboundProxy
    from meshagent.agent.proxy.routing import Keepalive, Protocol
    from meshagent.common.istio.networking import ClientTLSSettings
from meshagent.common.snapshot import Workload
from meshagent.common.spiffe import workload_identity

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
CERT_WAIT = 5.0
HBONE_PORT = 15008


class UpstreamError(Exception):
    """The endpoint could not be reached. `kind` follows Envoy's retry vocabulary:
    connect-failure (nothing answered), refused (the peer proxy said no), reset."""

    def __init__(
        self, kind: str, message: str, status: int | None = None, transport: str = ""
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.transport = transport  # why TLS origination failed (Envoy's transport failure)


@dataclass(frozen=True)
class Upstream:
    stream: trio.abc.HalfCloseableStream
    security: str  # Istio's connection_security_policy ("mutual_tls", "none"): labels.py
    peer: Workload | None
    # What must still hold for the connection to go on (agent/proxy/live.py), for paths where
    # this proxy authorized it itself (same node) or chose plaintext (DISABLE); else None.
    check: live.Check | None = None
    tunnelled: bool = False  # through an HBONE tunnel (a same-node hop may be mutual_tls too)
    # Same-node HTTP to a meshed pod: the destination's per-request duties (its request
    # authentication, authorization and `reporter=destination` report), which the source's
    # HTTP engine performs around each request on this connection straight to the pod
    # (agent/proxy/http/localhop.py); None on every other path.
    duties: Destination | None = None


def set_keepalive(stream: trio.SocketStream, keepalive: Keepalive | None) -> None:
    """DestinationRule `tcp.tcpKeepalive` on a socket this proxy dialled: SO_KEEPALIVE, and
    the times and count it names (the kernel's defaults for those it leaves unset), as
    Envoy's upstream socket options do. None: the socket is left as the kernel made it."""
    if keepalive is None:
        return
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        (socket.TCP_KEEPIDLE, keepalive.time),
        (socket.TCP_KEEPINTVL, keepalive.interval),
        (socket.TCP_KEEPCNT, keepalive.probes),
    ):
        if value is not None:
            stream.setsockopt(socket.IPPROTO_TCP, option, value)


class Connector:
    def __init__(
        self,
        inputs: ProxyInputs,
        pool: TunnelPool | None,
        identities: IdentityManager | None,
        hbone_port: int = HBONE_PORT,
    ) -> None:
        self.inputs = inputs
        self.store = inputs.store
        self.node = inputs.node
        self.trust_domain = inputs.trust_domain
        self.pool = pool
        self.identities = identities
        self.hbone_port = hbone_port
        self._local: tuple[InboundProxy, trio.Nursery] | None = None

    def _tunnel_target(self, source: Workload | None, ip: str, port: int) -> Workload | None:
        """The destination workload when the connection must go through HBONE."""
        tables = self.store.tables
        if tables is None or source is None or self.pool is None:
            return None
        dest = tables.workload_by_ip.get(ip)
        if dest is None or not dest.meshed or dest.node == self.node:
            return None
        if tables.mtls_for(dest).mode_for(port) == "DISABLE":
            return None
        return dest

    def _authorize_local(self, source: Workload | None, ip: str, port: int, client_ip: str) -> None:
        """Same-node traffic skips the tunnel but not the destination's policy."""
        tables = self.store.tables
        dest = tables.workload_by_ip.get(ip) if tables else None
        if tables is None or dest is None or not dest.meshed or dest.node != self.node:
            return
        decision = authorization.check(
            tables.authz,
            self.inputs.authz,
            source=workload_identity(source, self.trust_domain) if source else None,
            source_ip=client_ip,
            destination=dest,
            destination_ip=ip,
            port=port,
        )
        self.inputs.metrics.policy_decision(decision)
        if not decision.allowed:
            raise UpstreamError("refused", f"denied by {decision.policy or 'default'}", 401)

    def _direct_check(
        self, source: Workload | None, peer: Workload | None, ip: str, port: int, client_ip: str
    ) -> live.Check | None:
        """What a directly dialled connection to a meshed pod was let through on."""
        if peer is None or not peer.meshed:
            return None
        if peer.node == self.node:
            return live.destination_check(
                self.node,
                self.trust_domain,
                source=workload_identity(source, self.trust_domain) if source else None,
                source_ip=client_ip,
                ip=ip,
                port=port,
            )
        return live.plaintext_check(self.node, ip, port) if source is not None else None

    def _refuse_plaintext_to_strict(
        self, dest: Workload | None, ip: str, port: int, mode: str
    ) -> None:
        """DestinationRule tls other than ISTIO_MUTUAL toward a STRICT pod: refused here, as
        the destination's node would drop a connection that is not HBONE (a same-node hop
        would otherwise pass as trusted)."""
        tables = self.store.tables
        if tables is None or dest is None or not dest.meshed:
            return
        if tables.mtls_for(dest).mode_for(port) == "STRICT":
            raise UpstreamError(
                "refused",
                f"{ip}:{port}: DestinationRule tls mode {mode} is not the mesh's mTLS, which "
                f"the destination's STRICT PeerAuthentication requires",
            )

    def attach_local(self, inbound: InboundProxy, nursery: trio.Nursery) -> None:
        """Same-node HTTP gets this node's inbound duties per request: carried by the Upstream
        for an HTTP engine (`Upstream.duties`), else through the inbound engine (`nursery`)."""
        self._local = (inbound, nursery)

    async def open(
        self,
        source: Workload | None,
        ip: str,
        port: int,
        client_ip: str,
        protocol: Protocol | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        tls: ClientTLSSettings | None = None,
        hostname: str | None = None,
        keepalive: Keepalive | None = None,
        local_http: bool = True,
        alpn: tuple[str, ...] = (),
        engine: bool = False,
    ) -> Upstream:
        """A stream to pod `ip:port` for a client connection of `protocol` (the Service port's,
        `routing.port_protocol`; None: guessed from the pod port). `connect_timeout` bounds a
        direct dial (DestinationRule `connectionPool.tcp.connectTimeout` when the caller has
        one; math.inf when the caller bounds the whole open itself). `tls` is the cluster's
        DestinationRule `tls` (None: the mesh's own), `hostname` its default SNI, `keepalive`
        its `tcp.tcpKeepalive` for the socket to the endpoint when this proxy dials it (not
        through HBONE: the destination's node dials the pod). `local_http` False: a same-node
        HTTP pod is dialled directly, authorized per connection (the `l4` and `observe` levels);
        True: it is dialled too, its Upstream carrying the destination's per-request duties
        (`duties`) when the caller is an HTTP `engine` that performs them per request
        (agent/proxy/http/localhop.py); for any other caller (an ext_authz call) the stream
        is served by this node's inbound HTTP engine, which does. `alpn`: the protocols a TLS
        origination (`tls` SIMPLE/MUTUAL) offers. Raises UpstreamError."""
        dest = self._tunnel_target(source, ip, port) if tls is None else None
        tables = self.store.tables
        local = tables.workload_by_ip.get(ip) if tables else None
        if tls is not None:
            self._refuse_plaintext_to_strict(local, ip, port, tls.mode)
        if protocol is None and tables is not None:
            protocol = tables.pod_protocol(ip, port)
        if (
            dest is None
            and tls is None
            and local_http
            and self._local is not None
            and local is not None
            and local.meshed
            and local.node == self.node
            and protocol in ("http1", "http2")
        ):
            inbound, nursery = self._local
            security = local_hop_security(source is not None, local, self.node)
            source_id = workload_identity(source, self.trust_domain) if source else None
            try:
                if not engine:
                    stream = await inbound.open_local_http(
                        nursery, source_id, client_ip, local, ip, port, protocol, keepalive
                    )
                    return Upstream(stream, security, local)
                # One engine: the pod is dialled here, as the destination would (its
                # keepalive), and the connection carries the destination's duties, which the
                # caller's engine performs per request: parsed once, checked each time.
                stream = await inbound.dial(ip, port)
            except (OSError, trio.TooSlowError) as exc:
                raise UpstreamError("connect-failure", f"{ip}:{port}: {exc or 'timeout'}") from None
            set_keepalive(stream, keepalive)
            duties = inbound.destination(source_id, client_ip, local, ip, port, security)
            return Upstream(stream, security, local, duties=duties)
        if dest is None:
            self._authorize_local(source, ip, port, client_ip)
            try:
                with trio.fail_after(connect_timeout):
                    stream = await sockio.connect(ip, port)
            except (OSError, trio.TooSlowError) as exc:
                raise UpstreamError("connect-failure", f"{ip}:{port}: {exc or 'timeout'}") from None
            set_keepalive(stream, keepalive)  # values the schema checked: the kernel takes them
            if tls is not None and tls.mode in ("SIMPLE", "MUTUAL"):
                stream = await self._originate(
                    stream, tls, hostname, ip, port, connect_timeout, alpn
                )
            tables = self.store.tables
            peer = tables.workload_by_ip.get(ip) if tables else None
            security = local_hop_security(source is not None, peer, self.node)
            return Upstream(
                stream, security, peer, self._direct_check(source, peer, ip, port, client_ip)
            )
        assert source is not None and self.pool is not None and self.identities is not None
        src_id = workload_identity(source, self.trust_domain)
        try:
            await self.identities.wait_for(src_id, CERT_WAIT)
        except IdentityUnavailable as exc:
            raise UpstreamError(
                "connect-failure", f"no certificate for {src_id.uri}: {exc}"
            ) from None
        node_ip = self.store.tables.node_address.get(dest.node) if self.store.tables else None
        if node_ip is None:
            raise UpstreamError("connect-failure", f"no address for node {dest.node}")
        try:
            stream = await self.pool.open_stream(
                source=src_id,
                destination=workload_identity(dest, self.trust_domain),
                node_addr=(node_ip, self.hbone_port),
                authority=format_authority(ip, port),
                forwarded_for=client_ip,
                protocol=protocol,
            )
        except TunnelRefused as exc:
            raise UpstreamError("refused", str(exc), getattr(exc, "status", None)) from None
        except (TunnelFailed, SecureNamingError) as exc:
            raise UpstreamError("connect-failure", str(exc)) from None
        return Upstream(stream, "mutual_tls", dest, tunnelled=True)

    @staticmethod
    async def _originate(
        stream: trio.SocketStream,
        tls: ClientTLSSettings,
        hostname: str | None,
        ip: str,
        port: int,
        timeout: float,
        alpn: tuple[str, ...] = (),
    ) -> trio.abc.HalfCloseableStream:
        """TLS over a fresh direct connection; closed again if the handshake fails."""
        try:
            with trio.fail_after(timeout):
                return await originate(stream, tls, hostname, alpn)
        except (TlsOriginError, trio.TooSlowError) as exc:
            await trio.aclose_forcefully(stream)
            reason = str(exc) if isinstance(exc, TlsOriginError) else "TLS handshake timeout"
            raise UpstreamError(
                "connect-failure", f"{ip}:{port}: {reason}", transport=reason
            ) from None
