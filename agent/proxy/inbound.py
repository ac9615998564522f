"""The inbound side (15008): HBONE tunnels from other nodes' proxies to this node's pods.

For each CONNECT: the target must be a meshed pod on this node, and the identity
the client asked for (SNI) must be that pod's; then (authorization comes here)
the pod is dialled from the node, the tunnel answered 200 and bytes relayed.
A target that is not ours is refused 401; an unreachable pod 503, as ztunnel does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import trio
from meshagent.agent import sockio
from meshagent.agent.hbone.server import InboundTunnel
from meshagent.agent.policy import authorization, extauthz, requestauth
from meshagent.agent.proxy import live
from meshagent.agent.proxy.drain import Drain
from meshagent.agent.proxy.http import (
    ConnectionPool,
    HttpContext,
    LocalResponse,
    RequestInfo,
    RequestRecord,
    proxy_http1,
    proxy_http2,
)
from meshagent.agent.proxy.http import UpstreamError as HttpUpstreamError
from meshagent.agent.proxy.http.memstream import memory_stream_pair
from meshagent.agent.proxy.inputs import ProxyInputs
from meshagent.agent.proxy.lb import Clusters
from meshagent.agent.proxy.limits import IDLE_TIMEOUT, POD_LISTENER, SOURCE_CONNECTIONS
from meshagent.agent.proxy.observe_timeouts import relay_observed
from meshagent.agent.proxy.observing import http_observer, level_of_endpoint
from meshagent.agent.proxy.relay import RelayResult, relay
from meshagent.agent.proxy.report import log_tcp, report_http
from meshagent.agent.proxy.routing import ClusterSpec, Keepalive, single_endpoint_routes
from meshagent.agent.proxy.upstream import set_keepalive
from meshagent.agent.telemetry import (
    UNKNOWN_PEER,
    UNKNOWN_SERVICE,
    ConnectionLabels,
    local_hop_security,
    peer_from_workload,
    service_ref,
)
from meshagent.agent.telemetry.ratelog import RateLimitedLog, reason
from meshagent.common import authz
from meshagent.common.snapshot import Endpoint, Workload
from meshagent.common.spiffe import Identity, workload_identity

if TYPE_CHECKING:
    from meshagent.agent.proxy.upstream import Connector

log = logging.getLogger(__name__)
refusal_log = RateLimitedLog(log)

CONNECT_TIMEOUT = 5.0


@dataclass
class InboundStats:
    accepted: int = 0
    active: int = 0
    peak: int = 0  # most open at once since DataPlane.peak_connections last read it
    refused: dict[int, int] = field(default_factory=dict)  # status -> count
    bytes_in: int = 0
    bytes_out: int = 0
    peers: dict[str, int] = field(default_factory=dict)  # source principal -> connections

    def opened(self) -> None:
        """One more connection open; the peak follows (recycle.py's bursts)."""
        self.active += 1
        if self.active > self.peak:
            self.peak = self.active


class InboundProxy:
    def __init__(self, inputs: ProxyInputs, http_pool: ConnectionPool) -> None:
        self.inputs = inputs
        self.store = inputs.store
        self.stats = InboundStats()
        self.http_pool = http_pool
        self.clusters = Clusters()
        self.connector: Connector | None = None  # set by the data plane (ext-authz calls)

    async def _refuse(self, tunnel: InboundTunnel, status: int, why: str) -> None:
        self.stats.refused[status] = self.stats.refused.get(status, 0) + 1
        refusal_log.warning(  # a peer can cause these at will: rate-limited per status
            str(status),
            "tunnel from %s to %s refused %d: %s",
            tunnel.peer_identity.uri,
            tunnel.authority,
            status,
            why or "no reason given",
        )
        await tunnel.reject(status)

    async def handle(self, tunnel: InboundTunnel) -> None:
        """Decide and serve one tunnel; a source identity that holds `Limits.max_connections`
        tunnels in this process gets 429 for another (a refusal, not a sick endpoint)."""
        limits = self.inputs.limits
        principal = tunnel.peer_identity.uri
        with limits.connection(principal) as admitted:
            if admitted:
                await self._handle(tunnel)
                return
        limits.refused(
            "hbone",
            SOURCE_CONNECTIONS,
            principal,
            f"{limits.max_connections} tunnels of this identity open",
        )
        self.stats.refused[429] = self.stats.refused.get(429, 0) + 1
        await tunnel.reject(429)

    async def _handle(self, tunnel: InboundTunnel) -> None:
        start, started = time.time(), trio.current_time()
        ip, port = tunnel.target
        tables = self.store.tables
        target = tables.workload_by_ip.get(ip) if tables else None
        if tables is None or target is None or target.node != self.inputs.node or not target.meshed:
            await self._refuse(tunnel, 401, "not a meshed pod on this node")
            return
        if workload_identity(target, self.inputs.trust_domain) != tunnel.local_identity:
            await self._refuse(tunnel, 401, f"{ip} is not {tunnel.local_identity.uri}")
            return
        source_ip = tunnel.forwarded_for or tunnel.peer_address[0]
        # The protocol of the Service port the client dialled, as the source named it; else
        # guessed from the pod port (sources that predate the header).
        protocol = tunnel.request.protocol or tables.pod_protocol(ip, port)
        # the pod port's L7 level (issue 18): the HTTP engine at `full` (and where no Service
        # marks the port), the relay below at `l4`, and at `observe` for HTTP/1.1 with a parser
        level = level_of_endpoint(tables.snapshot, ip, port) or "full"
        observe = level == "observe" and protocol == "http1"
        if protocol in ("http1", "http2") and level != "l4" and not observe:
            # HTTP: authorization per request (403), not per connection. The pod is dialled
            # before the tunnel is answered, so a dead pod is a 503 on the tunnel (a connect
            # failure the source can retry elsewhere), as ztunnel does.
            try:
                first = await self.dial(ip, port)
            except (OSError, trio.TooSlowError) as exc:
                await self._refuse(tunnel, 503, f"pod unreachable: {reason(exc)}")
                return
            try:
                stream = await tunnel.accept()
            except trio.BrokenResourceError:
                await trio.aclose_forcefully(first)
                return
            await self.serve_http(
                stream,
                tunnel.peer_identity,
                source_ip,
                target,
                ip,
                port,
                "mutual_tls",
                first,
                protocol=protocol,
            )
            return
        source = tables.workload_by_ip.get(source_ip)
        service = tables.service_by_endpoint.get((ip, port))
        labels = ConnectionLabels(
            "destination",
            (
                peer_from_workload(source, trust_domain=self.inputs.trust_domain)
                if source
                else UNKNOWN_PEER
            ).with_principal(tunnel.peer_identity),
            peer_from_workload(target, trust_domain=self.inputs.trust_domain),
            service_ref(service) if service else UNKNOWN_SERVICE,
            connection_security_policy="mutual_tls",
        )
        decision = authorization.check(
            tables.authz,
            self.inputs.authz,
            source=tunnel.peer_identity,
            source_ip=source_ip,
            destination=target,
            destination_ip=ip,
            port=port,
        )
        self.inputs.metrics.policy_decision(decision)
        if not decision.allowed:
            await self._refuse(tunnel, 401, f"denied by {decision.policy or 'default'}")
            # counted as a connection that opened and closed with flag DENY, as ztunnel does,
            # so denials carry source and destination labels
            self.inputs.metrics.tcp_opened(labels)
            self.inputs.metrics.tcp_closed(labels, 0, 0, "DENY")
            self._log(labels, start, started, 0, 0, "DENY", source_ip, tunnel.authority, decision)
            return
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                pod = await sockio.connect(ip, port)
        except (OSError, trio.TooSlowError) as exc:
            await self._refuse(tunnel, 503, f"pod unreachable: {reason(exc)}")
            self._log(
                labels, start, started, 0, 0, "CONNECT", source_ip, tunnel.authority, decision
            )
            return
        principal = tunnel.peer_identity.uri
        self.stats.peers[principal] = self.stats.peers.get(principal, 0) + 1
        self.stats.accepted += 1
        self.stats.opened()
        metrics = self.inputs.metrics
        metrics.tcp_opened(labels)
        # metrics: sent = to the client (pod -> tunnel), received = from the client
        result = RelayResult(on_progress=lambda up, down: metrics.tcp_bytes(labels, down, up))
        try:
            async with pod:
                stream = await tunnel.accept()
                recheck = live.destination_check(
                    self.inputs.node,
                    self.inputs.trust_domain,
                    source=tunnel.peer_identity,
                    source_ip=source_ip,
                    ip=ip,
                    port=port,
                    local_identity=tunnel.local_identity,
                )
                description = f"{principal} ({source_ip}) -> {ip}:{port}"
                timeout = self.inputs.tcp_idle_timeout
                tap = None
                if observe:
                    http_labels = replace(labels, request_protocol="http")
                    tap = http_observer(
                        self.inputs, [http_labels], client=source_ip, upstream=f"{ip}:{port}"
                    )
                with self.inputs.live.track(description, recheck):
                    if tap is None:
                        await relay(stream, pod, result, idle_timeout=timeout)
                    else:
                        await relay_observed(
                            stream,
                            pod,
                            result,
                            tap,
                            self.inputs.http,
                            self.inputs.limits,
                            idle_timeout=timeout,
                            listener="hbone",
                            source=principal,
                        )
                if result.idle_timed_out:
                    self.inputs.limits.refused(
                        "hbone", IDLE_TIMEOUT, principal, f"no byte either way for {timeout:g} s"
                    )
        except trio.BrokenResourceError:
            pass
        finally:
            self.stats.active -= 1
            self.stats.bytes_in += result.sent
            self.stats.bytes_out += result.received
            # toward the client = what the pod sent back; from the client = what it received
            up, down = result.unreported()
            metrics.tcp_closed(labels, down, up)
            self._log(
                labels,
                start,
                started,
                result.received,
                result.sent,
                "-",
                source_ip,
                tunnel.authority,
                decision,
            )

    def destination(
        self,
        source_identity: Identity | None,
        source_ip: str,
        target: Workload,
        ip: str,
        port: int,
        security: str,
    ) -> Destination:
        """The destination's per-request duties for one connection from `source_identity`
        (at `source_ip`) to the local pod `target` at `ip:port` (`security`: the hop's
        connection_security_policy), counted as a peer of this node's inbound side."""
        destination = Destination(self, source_identity, source_ip, target, ip, port, security)
        principal = destination.principal
        self.stats.peers[principal] = self.stats.peers.get(principal, 0) + 1
        self.stats.accepted += 1
        return destination

    async def serve_http(
        self,
        stream: trio.abc.Stream,
        source_identity: Identity | None,
        source_ip: str,
        target: Workload,
        ip: str,
        port: int,
        security: str,
        first: trio.abc.HalfCloseableStream | None = None,
        *,
        protocol: str = "http1",
        keepalive: Keepalive | None = None,
    ) -> None:
        """Deliver HTTP (`protocol` http1 or http2, h2c to the pod) to a local pod (`first`: a
        connection to it already made), checking every request against the pod's
        AuthorizationPolicies (`Destination`): a denial is a 403 `RBAC: access denied` (a gRPC
        call: status 7 PERMISSION_DENIED) for that request only; the connection and its other
        requests go on. `keepalive`: the client's DestinationRule `tcp.tcpKeepalive` for the
        pod's connections (same node only; a tunnel does not carry it). Same-node requests of
        the HTTP engines do not come here: the source's engine does `Destination`'s duties."""
        tables = self.store.tables
        assert tables is not None
        service = tables.service_by_endpoint.get((ip, port))
        hostname = service.hostname if service else f"{ip}:{port}"
        endpoint = Endpoint(
            ip=ip, node=self.inputs.node, workload_uid=target.uid, ports={port: port}
        )
        routes = single_endpoint_routes(hostname, port, endpoint, port)
        destination = self.destination(source_identity, source_ip, target, ip, port, security)
        authorize = destination.authorize

        pending = [first] if first is not None else []

        async def request_filter(request: RequestInfo) -> LocalResponse | None:
            answer = await authorize(request)
            if answer is not None and pending and protocol != "http2":
                # The first request is answered without the pod (denied): this HTTP/1.1
                # connection closes after it (`Connection: close`, so the source does not pool
                # it), and with it the pod connection dialled for it (`finally` below); else
                # the pod's close of that unused connection would sit in CLOSE-WAIT while the
                # source kept this tunnel pooled, counted open.
                answer = replace(answer, headers=(*answer.headers, (b"connection", b"close")))
            return answer

        async def connect(
            ep: Endpoint, pod_port: int, _spec: ClusterSpec
        ) -> trio.abc.HalfCloseableStream:
            if pending:
                return pending.pop()
            try:
                dialled = await self.dial(ep.ip, pod_port)
            except (OSError, trio.TooSlowError) as exc:
                raise HttpUpstreamError("connect-failure", str(exc)) from None
            set_keepalive(dialled, keepalive)
            return dialled

        principal = destination.principal
        # One connection to the pod per tunnel (or same-node pair), pooled for its next
        # requests only: when the pod closes it while idle, this HTTP connection is closed
        # too (`drain`), so the source's pooled tunnel ends instead of staying open for nothing.
        pool_key = ("inbound", principal, object())
        drain = Drain(self.inputs.drain)
        undedicate = self.http_pool.dedicate(pool_key, drain.start)
        self.stats.opened()
        try:
            await (proxy_http2 if protocol == "http2" else proxy_http1)(
                stream,
                HttpContext(
                    routes=lambda: routes,
                    clusters=self.clusters,
                    pool=self.http_pool,
                    connect=connect,
                    pool_key=pool_key,
                    request_filter=request_filter,
                    on_request_done=destination.report,
                    peer=source_ip,
                    drain=drain,
                    settings=self.inputs.http,
                    limits=self.inputs.limits,
                    source_key=principal,
                    listener="hbone" if security == "mutual_tls" else POD_LISTENER,
                ),
            )
        finally:
            self.stats.active -= 1
            undedicate()
            for unused in pending:
                await trio.aclose_forcefully(unused)

    @staticmethod
    async def dial(ip: str, port: int) -> trio.SocketStream:
        with trio.fail_after(CONNECT_TIMEOUT):
            return await sockio.connect(ip, port)

    async def open_local_http(
        self,
        nursery: trio.Nursery,
        source_identity: Identity | None,
        source_ip: str,
        target: Workload,
        ip: str,
        port: int,
        protocol: str = "http1",
        keepalive: Keepalive | None = None,
    ) -> trio.abc.HalfCloseableStream:
        """Same-node HTTP (`protocol` http1 or http2) for a caller that is not an HTTP engine
        (an ext_authz provider's call, agent/policy/extauthz.py): a connected stream pair whose
        far end is served by `serve_http`, so its requests pass the same per-request checks as
        tunnelled ones. (The HTTP engines reach a local pod directly and do the destination's
        duties themselves, `Destination`.) The pair is in-process (`memstream`). The pod is
        dialled first: a dead pod is a connect failure here too (raises OSError)."""
        first = await self.dial(ip, port)
        set_keepalive(first, keepalive)
        near, far = memory_stream_pair()
        security = local_hop_security(source_identity is not None, target, self.inputs.node)

        async def serve() -> None:
            async with far:
                await self.serve_http(
                    far,
                    source_identity,
                    source_ip,
                    target,
                    ip,
                    port,
                    security,
                    first,
                    protocol=protocol,
                    keepalive=keepalive,
                )

        nursery.start_soon(serve)
        return near

    def _log(
        self, labels, start, started, to_client, from_client, flags, client, upstream, decision
    ) -> None:
        log_tcp(
            self.inputs,
            labels,
            start=start,
            started=started,
            bytes_sent=to_client,
            bytes_received=from_client,
            flags=flags,
            source_address=client,
            destination_address=upstream,
            decision=decision,
        )


class Destination:
    """What the destination does for each HTTP request to one of its pods, on one connection
    from one source: the pod's RequestAuthentication and AuthorizationPolicies (CUSTOM
    ext_authz first), read from the current tables at every request, and the request's
    `reporter=destination` metrics and access log line.

    Both HTTP paths to a local pod use it: the inbound engine (`serve_http`: a tunnel from
    another node) as its request filter and report, and the source's own engine for a
    same-node request (`Connector.open` hands it out as `Upstream.duties`, on a connection
    straight to the pod: the request is parsed once, by one engine; the engines call
    `authorize` before a request goes on that connection and `report` once it is done)."""

    __slots__ = (
        "connector",
        "inputs",
        "ip",
        "labels",
        "port",
        "principal",
        "source_identity",
        "source_ip",
        "store",
        "tables",
        "target",
        "target_jwt",
        "target_policies",
    )

    def __init__(
        self,
        inbound: InboundProxy,
        source_identity: Identity | None,
        source_ip: str,
        target: Workload,
        ip: str,
        port: int,
        security: str,
    ) -> None:
        self.inputs = inputs = inbound.inputs
        self.store = inbound.store
        self.connector = inbound.connector
        tables = self.store.tables
        assert tables is not None
        self.tables = tables  # the tables the connection began with (if none are current)
        self.source_identity = source_identity
        self.source_ip = source_ip
        self.target = target
        self.ip = ip
        self.port = port
        self.principal = source_identity.uri if source_identity else source_ip
        service = tables.service_by_endpoint.get((ip, port))
        source = tables.workload_by_ip.get(source_ip)
        td = inputs.trust_domain
        source_peer = peer_from_workload(source, trust_domain=td) if source else UNKNOWN_PEER
        if source_identity is not None:
            source_peer = source_peer.with_principal(source_identity)
        self.labels = ConnectionLabels(
            "destination",
            source_peer,
            peer_from_workload(target, trust_domain=td),
            service_ref(service) if service else UNKNOWN_SERVICE,
            request_protocol="http",
            connection_security_policy=security,
        )
        self.target_policies = authorization.DestinationPolicies(target)
        self.target_jwt = requestauth.DestinationJwt(target)

    async def authorize(self, request: RequestInfo) -> LocalResponse | None:
        """None when the request may go to the pod (its headers perhaps changed: a verified
        JWT removed, what an ext_authz provider set); else the answer it gets instead: 401
        for a token that does not verify, 403 `RBAC: access denied` (the engines make a
        gRPC call's PERMISSION_DENIED of it), or what a CUSTOM provider answered. The
        decision is counted and kept in `request.decision` for the access log."""
        current = self.store.tables or self.tables
        auth, refused = requestauth.authenticate(self.target_jwt.get(current.jwt), request)
        if refused is not None:
            return refused  # a present token that does not verify: 401
        selected = self.target_policies.get(current.authz)
        source_identity, source_ip, ip, port = (
            self.source_identity,
            self.source_ip,
            self.ip,
            self.port,
        )
        http = None  # with no policy selecting the pod, nothing reads the request
        if authorization.applies(selected):
            headers = request.header_map()
            http = authz.HttpAttrs(
                method=request.method,
                path=request.path,
                host=request.authority or headers.get("host", ""),
                headers=headers,
                auth=auth,
            )
        if http is not None and selected.custom:  # CUSTOM first: ask its provider
            attributes = authorization.attributes(source_identity, source_ip, ip, port, http)
            match = selected.custom_match(attributes)
            if match is not None:
                verdict, answer = await extauthz.consult(
                    match,
                    self.inputs.ext_authz,
                    self.connector,
                    current,
                    self.target,
                    request,
                    attributes,
                    self.inputs.trust_domain,
                )
                if answer is not None:
                    request.decision = verdict
                    return answer
                http = replace(http, headers=request.header_map())  # as the provider set
        decision = authorization.check(
            current.authz,
            self.inputs.authz,
            source=source_identity,
            source_ip=source_ip,
            destination=self.target,
            destination_ip=ip,
            port=port,
            http=http,
            selected=selected,
        )
        self.inputs.metrics.policy_decision(decision)
        request.decision = decision  # for the request's access log line
        if decision.allowed:
            return None
        return LocalResponse(403, b"RBAC: access denied", flags=("RBAC",))

    def report(self, record: RequestRecord) -> None:
        """The request's `reporter=destination` metrics and access log line."""
        report_http(
            self.inputs,
            self.labels,
            record,
            source_address=self.source_ip,
            destination_address=f"{self.ip}:{self.port}",
        )
