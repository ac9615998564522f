"""The outbound capture listener (15001): connections the datapath redirected.

For each accepted connection: consume its original destination from the
orig_dst map (keyed by the client's ip:port), identify the source pod, resolve
a Service VIP:port to an endpoint (round robin over ready pods), connect, and
relay. A pod IP or any other destination is relayed as is.

A source already holding `Limits.max_connections` connections in this process is refused
(agent/proxy/limits.py): on an HTTP/1.1 port with a 503 naming why, otherwise by closing the
connection; counted in meshagent_proxy_refused_total{listener="pod"}.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import trio
from meshagent.agent import sockio
from meshagent.agent.datapath.join import SocketJoin
from meshagent.agent.proxy import live
from meshagent.agent.proxy.handoff import HandedConnection, HandoffSender, PolicyFacts
from meshagent.agent.proxy.hashkey import connection_key
from meshagent.agent.proxy.http import HttpContext, RequestRecord, serve_detected
from meshagent.agent.proxy.http.observer import Http1Observer
from meshagent.agent.proxy.inputs import ProxyInputs
from meshagent.agent.proxy.kjoin import joinable, relay_joined
from meshagent.agent.proxy.lb import CONNECT_FAILURE_CODE
from meshagent.agent.proxy.limits import IDLE_TIMEOUT, POD_LISTENER, SOURCE_CONNECTIONS
from meshagent.agent.proxy.observe_timeouts import relay_observed
from meshagent.agent.proxy.observing import http_observer, level_of_route, opens_with_h2_preface
from meshagent.agent.proxy.relay import RelayResult, can_pause, relay
from meshagent.agent.proxy.report import log_tcp, report_http
from meshagent.agent.proxy.routing import (
    ORIGINAL_DESTINATION,
    ClusterSpec,
    Protocol,
    port_protocol,
)
from meshagent.agent.proxy.sni import peek_server_name
from meshagent.agent.proxy.traffic import Traffic
from meshagent.agent.proxy.upstream import Connector, Upstream, UpstreamError
from meshagent.agent.state import ServicePortRoute, Tables
from meshagent.agent.telemetry import (
    UNKNOWN_PEER,
    UNKNOWN_SERVICE,
    ConnectionLabels,
    Peer,
    peer_from_workload,
    service_ref,
)
from meshagent.common.listeners import InFlight, serve_owned
from meshagent.common.snapshot import Endpoint, Service, Workload
from meshagent.common.spiffe import workload_identity

log = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 3  # distinct endpoints tried for one connection
# What a destination proxy answers a tunnel its policy denies, or to a pod not (or no longer)
# on its node (as ztunnel): another endpoint is still tried, but it is no health signal.
TUNNEL_REFUSED_STATUS = 401
# A connection over its source's limit, on an HTTP/1.1 port (agent/proxy/limits.py).
_REFUSAL_BODY = b"too many connections from this source\n"
_TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)
# The orig_dst entry is written before the client's final ACK leaves; this only
# covers a listener that accepts faster than the map update becomes visible.
ORIG_DST_RETRIES = 3


@dataclass
class ProxyStats:
    accepted: int = 0
    active: int = 0
    peak: int = 0  # most open at once since DataPlane.peak_connections last read it
    orig_dst_misses: int = 0
    upstream_failures: int = 0
    no_endpoints: int = 0
    mutual_tls: int = 0  # connections that left this node through an HBONE tunnel
    bytes_sent: int = 0
    bytes_received: int = 0
    by_destination: dict[str, int] = field(default_factory=dict)
    http_connections: int = 0
    http_requests: int = 0
    internal_errors: int = 0  # connections closed on an unexpected exception (a bug)
    kernel_joined: int = 0  # same-node L4 connections relayed in the kernel (kjoin.py)
    handed_out: int = 0  # connections handed to another proxy process at a drain (handoff.py)
    handed_in: int = 0  # connections taken from one

    def opened(self) -> None:
        """One more connection open; the peak follows (recycle.py's bursts)."""
        self.active += 1
        if self.active > self.peak:
            self.peak = self.active


OrigDstLookup = Callable[[str, int], "tuple[str, int] | None"]


def dial_address(tables: Tables | None, endpoint: Endpoint, dialled: str) -> str:
    """The endpoint's address in the family of the VIP the client dialled (as kube-proxy: an
    IPv6 VIP reaches IPv6 endpoints), else its primary address; the dialled address itself for
    a service whose endpoint is the original destination (routing.ORIGINAL_DESTINATION)."""
    if endpoint.ip == ORIGINAL_DESTINATION:  # ServiceEntry resolution NONE
        return dialled
    ipv6 = ":" in dialled
    if (":" in endpoint.ip) == ipv6:
        return endpoint.ip
    workload = tables.workload_by_uid.get(endpoint.workload_uid) if tables else None
    return (
        next((ip for ip in workload.ips if (":" in ip) == ipv6), endpoint.ip)
        if workload
        else endpoint.ip
    )


class _Serving:
    """One connection open here: counted while it is, closed after; a bug met on it ends it
    alone (logged with its traceback, counted). A class, not a generator context manager, as
    every open connection holds one while it waits (its generator and frame were ~0.5 KiB)."""

    __slots__ = ("client", "stats", "what")

    def __init__(self, stats: ProxyStats, client: trio.SocketStream, what: str) -> None:
        self.stats, self.client, self.what = stats, client, what

    async def __aenter__(self) -> None:
        self.stats.opened()

    async def __aexit__(self, kind: type[BaseException] | None, exc, tb) -> bool:
        try:
            if kind is not None and issubclass(kind, Exception):
                self.stats.internal_errors += 1
                log.error("%s closed on an internal error", self.what, exc_info=exc)
                return True
            return False
        finally:
            self.stats.active -= 1
            await sockio.close(self.client)


class OutboundProxy:
    def __init__(
        self, inputs: ProxyInputs, orig_dst: OrigDstLookup, connector: Connector, traffic: Traffic
    ) -> None:
        self.inputs = inputs
        self.traffic = traffic
        self.store = inputs.store
        self.orig_dst = orig_dst
        self.connector = connector
        self.stats = ProxyStats()
        # set by the data plane where the datapath can join sockets (agent/proxy/kjoin.py)
        self.kernel_join: SocketJoin | None = None
        self.handoff = HandoffSender()  # where its plain same-node relays go at a drain

    async def handle(self, client: trio.SocketStream) -> None:
        """Serve one redirected connection. A bug met on it closes this connection only
        (logged with its traceback, counted): it never takes the proxy down."""
        self.stats.accepted += 1
        async with _Serving(self.stats, client, "outbound connection"):
            await self._handle(client)

    async def resume(
        self, handed: HandedConnection, client: trio.SocketStream, upstream: trio.SocketStream
    ) -> None:
        """Relay on a connection another proxy process handed to this one (handoff.py): its
        counts, labels and policy as that process left them; closed here when it ends."""
        self.stats.handed_in += 1
        async with _Serving(self.stats, client, "handed-over connection"), upstream:
            labels, metrics = handed.labels, self.inputs.metrics
            metrics.tcp_handed_in(labels)
            result = RelayResult(
                sent=handed.sent,
                received=handed.received,
                on_progress=lambda up, down: metrics.tcp_bytes(labels, down, up),
                _reported_sent=handed.sent,
                _reported_received=handed.received,
                done=handed.done,
            )
            policy = handed.policy
            check = (
                policy.check(self.inputs.node, self.inputs.trust_domain)
                if policy is not None
                else live.all_of()
            )
            relayed = _Relayed(
                self,
                client,
                upstream,
                labels,
                client_address=handed.client,
                address=handed.upstream,
                start=handed.start,
                started=trio.current_time() - handed.age,
                timeout=handed.idle_timeout,
                check=check,
                who=labels.source.workload,
                facts=lambda: policy,
                handable=True,
            )
            # a snapshot swapped in while it moved was checked against it by neither side
            tables = self.store.tables
            if tables is not None and (verdict := check(tables)) is not None:
                description = f"{handed.client} -> {handed.upstream}"
                self.inputs.live.closed_now(description, verdict, tables.snapshot.version)
                relayed.report(result)
                return
            await relayed.run(result)

    async def _handle(self, client: trio.SocketStream) -> None:
        start, started = time.time(), trio.current_time()
        peer_ip, peer_port = client.socket.getpeername()[:2]
        orig = None
        for _ in range(ORIG_DST_RETRIES):
            orig = self.orig_dst(peer_ip, peer_port)
            if orig is not None:
                break
            await trio.sleep(0.001)
        if orig is None:
            self.stats.orig_dst_misses += 1
            log.warning("no original destination for %s:%d; closing", peer_ip, peer_port)
            return
        tables = self.store.tables
        source = tables.workload_by_ip.get(peer_ip) if tables else None
        route = tables.route_for(orig) if tables else None
        protocol = port_protocol(route.service_port) if route is not None else None
        limits = self.inputs.limits
        with limits.connection(source.uid if source else peer_ip) as admitted:
            if admitted:
                await self._serve(client, source, peer_ip, orig, route, protocol, start, started)
                return
        limits.refused(
            POD_LISTENER,
            SOURCE_CONNECTIONS,
            source.name if source else peer_ip,
            f"{limits.max_connections} connections of this source open",
        )
        if protocol == "http1":  # say why, where the client can read it
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await client.send_all(_TOO_MANY_CONNECTIONS)

    async def _serve(
        self,
        client: trio.SocketStream,
        source: Workload | None,
        peer_ip: str,
        orig: tuple[str, int],
        route: ServicePortRoute | None,
        protocol: Protocol | None,
        start: float,
        started: float,
    ) -> None:
        # the Service port's L7 level (issue 18): the engine at `full` (and for HTTP/2, which
        # `observe` cannot parse yet: also an HTTP/2 client on an HTTP/1.1 port), a relay
        # watched by a parser at `observe`, a relay at `l4`
        tables = self.store.tables
        level = level_of_route(tables.snapshot, route) if route and tables else "l4"
        engine = level == "full" or (
            level == "observe"
            and (
                protocol == "http2" or (protocol == "http1" and await opens_with_h2_preface(client))
            )
        )
        if route is not None and protocol in ("http1", "http2") and engine:
            await self._serve_http(client, source, route.service, orig, peer_ip, protocol)
            return
        # at `l4` an HTTP port is a TCP one, for the destination proxy too (the tunnel says so)
        relayed = "tcp" if level == "l4" and protocol is not None else protocol
        conn = _L4(self, client, source, peer_ip, orig, start, started, relayed)
        conn.observe = level == "observe" and protocol == "http1"
        if route is None:
            await conn.run_passthrough()
        else:
            await conn.run_service(route.service)

    async def _serve_http(
        self,
        client: trio.SocketStream,
        source: Workload | None,
        service: Service,
        orig: tuple[str, int],
        peer_ip: str,
        protocol: Protocol,
    ) -> None:
        """Per-request routing, balancing and resilience (VirtualService, DestinationRule),
        over HTTP/1.1 or HTTP/2 as the client speaks (`serve_detected`)."""
        port = orig[1]
        traffic = self.traffic
        hostname = service.hostname
        source_peer = self._peer(source)
        service_labels = service_ref(service)
        self.stats.http_connections += 1
        served: list[Protocol] = [protocol]  # HTTP/2 on an HTTP/1.1 port too, once detected

        async def connect(
            endpoint: Endpoint, pod_port: int, spec: ClusterSpec, h2: bool = False
        ) -> Upstream:
            ip = dial_address(self.store.tables, endpoint, orig[0])
            # the HTTP engines bound the whole open by the cluster's connectTimeout
            upstream = await self.connector.open(
                source,
                ip,
                pod_port,
                peer_ip,
                "http2" if h2 else served[0],
                connect_timeout=math.inf,
                tls=spec.policy.tls,
                hostname=spec.key.hostname,
                keepalive=spec.policy.keepalive,
                alpn=("h2",) if h2 else (),
                engine=True,  # the engine does a same-node destination's duties (localhop.py)
            )
            if upstream.tunnelled:
                self.stats.mutual_tls += 1
            return upstream

        async def connect_h2(endpoint: Endpoint, pod_port: int, spec: ClusterSpec) -> Upstream:
            """h2UpgradePolicy UPGRADE: the stream is HTTP/2 (h2c prior knowledge) to the pod,
            as the tunnel (or the same-node hop) names it."""
            return await connect(endpoint, pod_port, spec, h2=True)

        # labels by (destination workload, security): built once per connection, not per
        # request (peer_from_workload parses the pod's name and labels)
        known: dict[tuple[int, str], tuple[Workload | None, ConnectionLabels]] = {}

        def done(record: RequestRecord) -> None:
            info = record.upstream_info
            upstream = info if isinstance(info, Upstream) else None
            peer = upstream.peer if upstream else None
            security = upstream.security if upstream else "unknown"
            key = (id(peer), security)
            hit = known.get(key)
            if hit is not None and hit[0] is peer:
                labels = hit[1]
            else:
                labels = ConnectionLabels(
                    "source",
                    source_peer,
                    self._peer(peer),
                    service_labels,
                    request_protocol="http",
                    connection_security_policy=security,
                )
                known[key] = (peer, labels)
            self.stats.http_requests += 1
            if record.upstream:
                key = record.upstream
                self.stats.by_destination[key] = self.stats.by_destination.get(key, 0) + 1
            report_http(
                self.inputs,
                labels,
                record,
                source_address=peer_ip,
                destination_address=record.upstream or None,
            )

        ctx = HttpContext(
            routes=lambda: traffic.table.http_routes(hostname, port),
            clusters=traffic.clusters,
            pool=traffic.pool,
            connect=connect,
            connect_h2=connect_h2,
            pool_key=source.uid if source else peer_ip,
            on_request_done=done,
            peer=peer_ip,
            drain=self.inputs.drain,
            settings=self.inputs.http,
            limits=self.inputs.limits,
            source_key=source.uid if source else peer_ip,
            source=source,
        )
        await serve_detected(client, ctx, protocol, served)

    def _peer(self, workload: Workload | None) -> Peer:
        if workload is None:
            return UNKNOWN_PEER
        return peer_from_workload(workload, trust_domain=self.inputs.trust_domain)

    def _report(
        self,
        labels: ConnectionLabels,
        start: float,
        started: float,
        to_client: int,
        from_client: int,
        flags: str,
        client: str,
        upstream: str,
        error: str,
        opened: bool = False,
        unreported: tuple[int, int] | None = None,
    ) -> None:
        """The connection's access log line and, if it `opened`, its close in the metrics,
        with the bytes (to client, from client) they do not have yet (default: all)."""
        if opened:
            to_rest, from_rest = unreported or (to_client, from_client)
            self.inputs.metrics.tcp_closed(labels, to_rest, from_rest, flags)
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
            error=error or None,
        )


class _L4:
    """One L4 connection: pick an endpoint (TCP routes, balancer, circuit breaker), connect
    (retrying another endpoint on a failed connect), relay, and report."""

    def __init__(
        self,
        proxy: OutboundProxy,
        client: trio.SocketStream,
        source: Workload | None,
        peer_ip: str,
        orig: tuple[str, int],
        start: float,
        started: float,
        protocol: Protocol | None = None,
    ) -> None:
        self.proxy, self.client, self.source, self.peer_ip = proxy, client, source, peer_ip
        self.protocol = protocol  # the Service port's; None for a passthrough
        self.orig, self.start, self.started = orig, start, started
        self.source_peer = proxy._peer(source)
        self.observe = False  # the `observe` level: requests counted by a parser beside

    async def run_passthrough(self) -> None:
        ip, port = self.orig
        try:
            upstream = await self.proxy.connector.open(self.source, ip, port, self.peer_ip)
        except UpstreamError as exc:
            self._failed(UNKNOWN_SERVICE, f"{exc.kind}: {exc}", "UF")
            return
        await self._relay(upstream, UNKNOWN_SERVICE, f"{ip}:{port}")

    async def _joined(self, upstream: Upstream, result: RelayResult, timeout: float) -> bool:
        """Relay in the kernel if this is a same-node connection of plain bytes (kjoin.py);
        False: not joined, the caller relays."""
        proxy = self.proxy
        join = proxy.kernel_join
        if join is None or not joinable(self.client, upstream, proxy.inputs.node):
            return False
        if not await relay_joined(join, self.client, upstream.stream, result, idle_timeout=timeout):
            return False
        proxy.stats.kernel_joined += 1
        return True

    async def run_service(self, service: Service) -> None:
        proxy = self.proxy
        service_labels = service_ref(service)
        table = proxy.traffic.table
        routes = table.tcp_routes(service.hostname, self.orig[1])
        destinations = routes.destinations_for(self.source) if routes else None
        if (tls := table.tls_routes(service.hostname, self.orig[1])) is not None:
            sni = await peek_server_name(self.client)
            destinations = tls.destinations_for(sni, self.source) or destinations
        spec = destinations.pick() if destinations else None
        if spec is None or not spec.endpoints:
            proxy.stats.no_endpoints += 1
            self._failed(service_labels, "no healthy upstream", "UH")
            return
        state = proxy.traffic.clusters.get(spec)
        key = connection_key(spec.policy.hash, self.peer_ip)  # consistentHash useSourceIp
        tried: list = []
        error = ""
        for _ in range(CONNECT_ATTEMPTS):  # a failed connect moves on to another endpoint
            ep = state.pick(tried, key)
            if ep is None:
                break
            if not state.try_open(ep):
                self._failed(service_labels, "circuit breaker: too many connections", "UO")
                return
            target = ep.upstream
            try:
                ip = dial_address(proxy.store.tables, target.endpoint, self.orig[0])
                upstream = await self._open(ip, target.port, spec)
            except UpstreamError as exc:
                state.closed(ep)
                error = f"{exc.kind}: {exc}"
                if not (exc.kind == "refused" and exc.status == TUNNEL_REFUSED_STATUS):
                    # a 401 is the destination's policy (or a stale endpoint) saying no, not a
                    # sick endpoint: counting it would let a denied client eject healthy
                    # endpoints for every other client of this proxy
                    state.report(ep, CONNECT_FAILURE_CODE)
                tried.append(ep)
                proxy.stats.upstream_failures += 1
                log.warning("%s -> %s: %s", self.peer_ip, target.address, error)
                continue
            try:
                await self._relay(
                    upstream, service_labels, target.address, spec.policy.tcp_idle_timeout
                )
            finally:
                state.closed(ep)
            return
        self._failed(service_labels, error or "no healthy upstream", "UF" if error else "UH")

    async def _open(self, ip: str, port: int, spec: ClusterSpec) -> Upstream:
        """Open toward the endpoint within the DestinationRule's `connectTimeout` (Istio's
        default 10 s), as Envoy bounds a TCP cluster's connect, with its `tls`."""
        timeout = spec.policy.connect_timeout
        try:
            with trio.fail_after(timeout):
                return await self.proxy.connector.open(
                    self.source,
                    ip,
                    port,
                    self.peer_ip,
                    self.protocol or "tcp",
                    timeout,
                    tls=spec.policy.tls,
                    hostname=spec.key.hostname,
                    keepalive=spec.policy.keepalive,
                    local_http=False,  # l4/observe: not the same-node HTTP engine
                )
        except trio.TooSlowError:
            raise UpstreamError("connect-failure", f"{ip}:{port}: connect timeout") from None

    async def _relay(
        self, upstream: Upstream, service_labels, address: str, idle_timeout: float | None = None
    ) -> None:
        """Relay until either side ends, or no byte moved for `idle_timeout` s (the
        destination's DestinationRule `tcp.idleTimeout`; None: the agent's tcp_idle_timeout)."""
        proxy = self.proxy
        proxy.stats.by_destination[address] = proxy.stats.by_destination.get(address, 0) + 1
        if upstream.tunnelled:
            proxy.stats.mutual_tls += 1
        labels = ConnectionLabels(
            "source",
            self.source_peer,
            proxy._peer(upstream.peer),
            service_labels,
            connection_security_policy=upstream.security,
        )
        metrics = proxy.inputs.metrics
        metrics.tcp_opened(labels)
        # metrics: sent = to the client (upstream -> client), received = from the client
        result = RelayResult(on_progress=lambda up, down: metrics.tcp_bytes(labels, down, up))
        source = self.source
        # a same-node connection of plain bytes may move to another process at a drain
        handable = (
            not self.observe
            and joinable(self.client, upstream, proxy.inputs.node)
            and can_pause(self.client, upstream.stream)
        )
        relayed = _Relayed(
            proxy,
            self.client,
            upstream.stream,
            labels,
            client_address=self.peer_ip,
            address=address,
            start=self.start,
            started=self.started,
            timeout=proxy.inputs.tcp_idle_timeout if idle_timeout is None else idle_timeout,
            check=live.all_of(
                live.source_check(source) if source is not None and source.meshed else None,
                upstream.check,
            ),
            who=source.name if source else self.peer_ip,
            facts=partial(self._facts, upstream) if handable else None,  # built if handed on
            handable=handable,
        )
        tap = self._observer(upstream, service_labels, address) if self.observe else None
        async with upstream.stream:
            await relayed.run(
                result,
                tap=tap,
                join=partial(self._joined, upstream) if tap is None else None,
            )

    def _facts(self, upstream: Upstream) -> PolicyFacts:
        """What this same-node connection was let through on, for a process it is handed to."""
        source = self.source
        ip, port = upstream.stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
        td = self.proxy.inputs.trust_domain
        return PolicyFacts(
            source_uid=source.uid if source is not None and source.meshed else None,
            source_name=source.name if source else "",
            source_namespace=source.namespace if source else "",
            source_identity=workload_identity(source, td).uri if source else None,
            source_ip=self.peer_ip,
            ip=ip,
            port=port,
            destination=upstream.check is not None,
        )

    def _observer(self, upstream: Upstream, service_labels, address: str) -> Http1Observer:
        """The `observe` level's parser: requests reported by the source and, for a hop that
        stays on this node (no tunnel, no destination proxy to report), the destination."""
        proxy = self.proxy
        security = upstream.security
        labels = [
            ConnectionLabels(
                "source",
                self.source_peer,
                proxy._peer(upstream.peer),
                service_labels,
                request_protocol="http",
                connection_security_policy=security,
            )
        ]
        peer = upstream.peer
        if not upstream.tunnelled and peer is not None and peer.node == proxy.inputs.node:
            source = self.source
            identity = (
                workload_identity(source, proxy.inputs.trust_domain) if source is not None else None
            )
            labels.append(
                ConnectionLabels(
                    "destination",
                    self.source_peer.with_principal(identity),
                    proxy._peer(peer),
                    service_labels,
                    request_protocol="http",
                    connection_security_policy=security,
                )
            )
        stats = proxy.stats

        def count() -> None:
            stats.http_requests += 1

        return http_observer(
            proxy.inputs, labels, client=self.peer_ip, upstream=address, count=count
        )

    def _failed(self, service_labels, error: str, flags: str) -> None:
        labels = ConnectionLabels("source", self.source_peer, UNKNOWN_PEER, service_labels)
        self.proxy._report(
            labels,
            self.start,
            self.started,
            0,
            0,
            flags,
            self.peer_ip,
            f"{self.orig[0]}:{self.orig[1]}",
            error,
        )


class _Relayed:
    """One L4 relay and its report: run here from its start, or resumed from another process
    (`OutboundProxy.resume`), and possibly handed on at a drain (agent/proxy/handoff.py)."""

    def __init__(
        self,
        proxy: OutboundProxy,
        client: trio.SocketStream,
        upstream: trio.abc.HalfCloseableStream,
        labels: ConnectionLabels,
        *,
        client_address: str,
        address: str,
        start: float,
        started: float,
        timeout: float,
        check: live.Check,
        who: str,
        facts: Callable[[], PolicyFacts | None] | None = None,
        handable: bool = False,
    ) -> None:
        # ``facts`` builds what the connection was let through on (a system call and the
        # source's identity): only the rare connection that is handed on needs them
        self.proxy, self.client, self.upstream, self.labels = proxy, client, upstream, labels
        self.client_address, self.address = client_address, address
        self.start, self.started, self.timeout = start, started, timeout
        self.check, self.who = check, who
        self.facts, self.handable = facts, handable

    async def run(
        self,
        result: RelayResult,
        *,
        tap: Http1Observer | None = None,
        join: Callable[[RelayResult, float], Awaitable[bool]] | None = None,
    ) -> None:
        """Relay (watched by ``tap``, or joined in the kernel by ``join`` where it can, else
        by this process, handed on if asked), then report: the close, or the hand-off."""
        proxy = self.proxy
        before = (result.sent, result.received)  # a resumed connection's, reported already
        handed = False
        try:
            with proxy.inputs.live.track(f"{self.client_address} -> {self.address}", self.check):
                if tap is not None:
                    await relay_observed(
                        self.client,
                        self.upstream,
                        result,
                        tap,
                        proxy.inputs.http,
                        proxy.inputs.limits,
                        idle_timeout=self.timeout,
                        listener=POD_LISTENER,
                        source=self.who,
                    )
                elif join is None or not await join(result, self.timeout):
                    handed = await self._relay_or_hand(result)
            if result.idle_timed_out:
                proxy.inputs.limits.refused(
                    POD_LISTENER,
                    IDLE_TIMEOUT,
                    self.who,
                    f"no byte either way for {self.timeout:g} s",
                )
        finally:
            proxy.stats.bytes_sent += result.sent - before[0]
            proxy.stats.bytes_received += result.received - before[1]
            self.report(result, handed)

    def report(self, result: RelayResult, handed: bool = False) -> None:
        """Its close (the access log, the metrics), or that it went on elsewhere."""
        proxy = self.proxy
        up, down = result.unreported()
        if handed:
            proxy.stats.handed_out += 1
            proxy.inputs.metrics.tcp_handed_out(self.labels, down, up)
            return
        proxy._report(
            self.labels,
            self.start,
            self.started,
            result.received,
            result.sent,
            "-",
            self.client_address,
            self.address,
            "",
            opened=True,
            unreported=(down, up),
        )

    async def _relay_or_hand(self, result: RelayResult) -> bool:
        """Relay; True if the connection went to another process instead (its drain)."""
        sender = self.proxy.handoff
        if not self.handable:
            await relay(self.client, self.upstream, result, idle_timeout=self.timeout)
            return False
        upstream = self.upstream
        assert isinstance(upstream, trio.SocketStream)
        with sender.pausable() as pause:
            while True:
                await relay(self.client, upstream, result, idle_timeout=self.timeout, pause=pause)
                if not result.paused:
                    return False
                try:
                    facts = self.facts() if self.facts is not None else None
                except OSError:  # a socket that lost its peer while paused: it ends here
                    return False
                handed = HandedConnection(
                    labels=self.labels,
                    client=self.client_address,
                    upstream=self.address,
                    start=self.start,
                    age=trio.current_time() - self.started,
                    sent=result.sent,
                    received=result.received,
                    done=result.done,
                    idle_timeout=self.timeout,
                    policy=facts,
                )
                fds = (self.client.socket.fileno(), upstream.socket.fileno())
                if await sender.send(handed, fds):
                    return True
                pause.reset()  # nobody took it: relay on here


async def serve_outbound(
    proxy: OutboundProxy,
    listeners: Sequence[trio.abc.Listener[trio.SocketStream]],
    *,
    in_flight: InFlight | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept redirected connections on ``listeners`` (shared SO_REUSEPORT ones in the agent);
    ``in_flight`` counts each from its accept until `OutboundProxy.handle` counts it."""
    async with trio.open_nursery() as nursery:
        task_status.started()
        # proxy.handle closes each client itself (outbound._Serving)
        nursery.start_soon(partial(serve_owned, proxy.handle, list(listeners), in_flight=in_flight))
