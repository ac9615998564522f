"""Per-cluster upstream state: load balancing, circuit breaking and outlier detection.

What flows through: the proxy asks a ClusterState (one per ClusterSpec of the RouteTable) for
an endpoint, tells it when a request starts and how it ended, and when upstream connections
open and close. The state answers with Envoy's behaviour, as Istio configures it:

- Load balancing (`loadBalancer.simple`): LEAST_REQUEST (the default) is Envoy's power of two
  choices: two endpoints drawn at random (with replacement), the one with fewer active requests
  wins. ROUND_ROBIN rotates from a random start; RANDOM draws one. `exclude` (the endpoints a
  request already tried) is honoured while another endpoint is left, as Envoy's previous_hosts
  retry predicate, which Istio installs.
- Consistent hashing (`loadBalancer.consistentHash`): a request's (or connection's) hash key
  (agent/proxy/hashkey.py) picks the healthy endpoint with the highest rendezvous weight
  blake2b(key, address): the same key sticks to one endpoint while it stays healthy, and an
  endpoint leaving moves only its own keys, as Envoy's ring hash and Maglev promise (their
  table sizes tune a table we do not need, so they are accepted and change nothing). A retry
  takes the next highest. No key (header absent): a random endpoint, as Envoy's ring.
- Circuit breaking (`connectionPool`): `tcp.maxConnections` bounds the cluster's open upstream
  connections, but, as Envoy's pools, an endpoint with no connection may always open one (else
  its pending requests could never run); a request that finds no connection waits as pending,
  and beyond `http.http1MaxPendingRequests` pending requests it overflows (Overflow: 503, UO).
  `http.http2MaxRequests` bounds the requests in flight to the cluster (both HTTP versions:
  from taking a connection, pending included, to the end of the exchange); one more
  overflows. `http.maxRetries` bounds the retries in flight: beyond it a failed attempt is
  not retried, its response (or failure) goes to the client.
- Outlier detection (`outlierDetection`): `consecutive5xxErrors` 5xx results in a row, or
  `consecutiveGatewayErrors` 502/503/504 in a row, eject the endpoint for baseEjectionTime x
  the number of times it was ejected (capped at max(300 s, base), Envoy's max_ejection_time);
  each `interval` it stays healthy that multiplier decays by one. At most maxEjectionPercent
  of the endpoints are ejected, but always at least one may be (Envoy >= 1.20). Locally
  originated failures count as Envoy maps them: connect failure or reset = 503, timeout = 504.
  Unlike Envoy, an endpoint returns exactly when its time is up, not at the next interval tick.
  No panic mode: with every endpoint ejected, `pick` finds none (Istio disables panic mode).

State is per proxy process: with several workers (agent/workers/) each one counts errors,
ejects and balances on what it sees itself, as each Linkerd proxy keeps its own failure
accrual (Envoy instead shares ejections between its worker threads).

Ejections are exposed by `Clusters.ejected()` (for `meshagent status`) and the metrics
`meshagent_outlier_cluster_ejections_total` and `meshagent_outlier_ejected_endpoints`.

On an L4 port the same state serves connections: `ep = state.pick(tried)`, then
`state.try_open(ep)` (False: overflow, close the client, UO), connect (on failure
`state.report(ep, CONNECT_FAILURE_CODE)`, `state.closed(ep)`, try the next endpoint), and
`state.closed(ep)` when the relay ends. Call `Clusters.sync(table)` on every new RouteTable.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

import trio
from meshagent.agent.proxy.routing import ClusterSpec, RouteTable, UpstreamEndpoint
from meshagent.common import locality
from meshagent.common.snapshot import Endpoint
from prometheus_client import Counter, Gauge

OUTLIER_EJECTIONS = Counter(
    "meshagent_outlier_cluster_ejections",
    "Endpoints ejected by outlier detection, by cluster (outbound|port|subset|host).",
    ["cluster"],
)
OUTLIER_EJECTED = Gauge(
    "meshagent_outlier_ejected_endpoints",
    "Endpoints currently ejected by outlier detection, by cluster.",
    ["cluster"],
    multiprocess_mode="livemax",  # per proxy worker: the most any live worker has ejected
)

MAX_EJECTION_TIME = 300.0  # Envoy's default max_ejection_time
_GATEWAY_ERRORS = frozenset({502, 503, 504})
# Local-origin failures as HTTP codes for outlier detection (Envoy, split_external_local_
# origin_errors off, which Istio leaves).
CONNECT_FAILURE_CODE = 503
RESET_CODE = 503
TIMEOUT_CODE = 504

Clock = Callable[[], float]


def _weight(key: bytes, address: str) -> bytes:
    """Rendezvous weight: stable across processes and restarts (unlike hash())."""
    return hashlib.blake2b(key + b"|" + address.encode(), digest_size=8).digest()


class Overflow(Exception):
    """A circuit breaker refused the request (Envoy's UO: 503, upstream overflow)."""


@dataclass(eq=False, slots=True)
class EndpointState:
    """One endpoint of one cluster, with the counters the balancer and detector keep."""

    upstream: UpstreamEndpoint
    active: int = 0  # requests in flight
    connections: int = 0  # open (or opening) upstream connections
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejections: int = 0  # Envoy's ejection multiplier
    ejected_at: float | None = None
    ejected_until: float | None = None
    decay_from: float = 0.0
    retired: bool = False  # gone from the snapshot; its connections are not reused
    # Locality balancing (common/locality.py): failover priority, or locality and its share
    priority: int = 0
    locality: str = ""
    share: float = 0.0

    @property
    def endpoint(self) -> Endpoint:
        return self.upstream.endpoint

    @property
    def port(self) -> int:
        return self.upstream.port

    @property
    def address(self) -> str:
        return self.upstream.address


@dataclass(frozen=True, slots=True)
class Ejection:
    """An ejected endpoint, for `meshagent status`; times are wall-clock (time.time())."""

    cluster: str
    address: str
    workload_uid: str
    ejected_at: float
    until: float
    ejections: int


@dataclass(slots=True)
class ClusterStats:
    overflows: int = 0
    ejections: int = 0


class ClusterState:
    """The live side of one ClusterSpec. Not thread-safe: the trio proxy is one thread."""

    def __init__(
        self, spec: ClusterSpec, *, clock: Clock = time.monotonic, rng: random.Random | None = None
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self.spec = spec
        self.endpoints: list[EndpointState] = []
        self._by_address: dict[str, EndpointState] = {}
        self._healthy: list[EndpointState] = []
        self._rr = 0
        self._next_check = float("inf")
        self.connections = 0
        self.pending = 0
        self.requests = 0  # request slots taken (take_request_slot): http2MaxRequests
        self.retries = 0  # retries in flight (RetrySlot): maxRetries
        self.stats = ClusterStats()
        self._capacity = trio.lowlevel.ParkingLot()
        self.update(spec)
        self._rr = self._rng.randrange(max(1, len(self.endpoints)))

    @property
    def name(self) -> str:
        return self.spec.name

    def update(self, spec: ClusterSpec) -> list[EndpointState]:
        """Switch to a new spec (a new snapshot), keeping the state of endpoints that stay.
        Returns the endpoints that left, so their idle connections can be closed."""
        self.spec = spec
        previous = self._by_address
        self.endpoints = []
        self._by_address = {}
        for i, upstream in enumerate(spec.endpoints):
            state = previous.pop(upstream.address, None)
            if state is None:
                state = EndpointState(upstream)
            else:
                state.upstream = upstream
            state.priority = spec.priorities[i] if spec.priorities else 0
            state.locality = spec.localities[i] if spec.localities else ""
            state.share = spec.shares[i] if spec.shares else 0.0
            self.endpoints.append(state)
            self._by_address[upstream.address] = state
        for gone in previous.values():
            gone.retired = True
        # endpoints per failover level and per locality: they change only with the spec
        self._level_totals: dict[int, int] = {}
        self._locality_totals: dict[str, int] = {}
        for ep in self.endpoints:
            self._level_totals[ep.priority] = self._level_totals.get(ep.priority, 0) + 1
            self._locality_totals[ep.locality] = self._locality_totals.get(ep.locality, 0) + 1
        self._levels = sorted(self._level_totals)
        self._recompute()
        return list(previous.values())

    # -- picking --------------------------------------------------------------------------

    def pick(
        self, exclude: Collection[EndpointState] = (), key: bytes | None = None
    ) -> EndpointState | None:
        """The endpoint for the next request or attempt; None when none is healthy. `key`:
        the request's consistent-hash key, when the cluster's policy hashes."""
        now = self._clock()
        if now >= self._next_check:
            self._refresh(now)
        hosts = self._healthy
        if exclude:
            fresh = [h for h in hosts if h not in exclude]
            if fresh:
                hosts = fresh
        if self.spec.priorities:
            hosts = self._priority_level(hosts)
        elif self.spec.shares:
            hosts = self._weighted_locality(hosts)
        n = len(hosts)
        if n <= 1:
            return hosts[0] if hosts else None
        if key is not None and self.spec.policy.hash is not None:
            return max(hosts, key=lambda h: _weight(key, h.address))
        algorithm = self.spec.policy.lb
        if algorithm == "LEAST_REQUEST":
            first = hosts[int(self._rng.random() * n)]
            second = hosts[int(self._rng.random() * n)]
            return second if second.active < first.active else first
        if algorithm == "ROUND_ROBIN":
            self._rr += 1
            return hosts[self._rr % n]
        return hosts[int(self._rng.random() * n)]

    def _priority_level(self, hosts: list[EndpointState]) -> list[EndpointState]:
        """The hosts of one failover priority, drawn by Envoy's priority load."""
        levels, totals = self._levels, self._level_totals
        usable = dict.fromkeys(levels, 0)
        for ep in hosts:
            usable[ep.priority] += 1
        loads = locality.level_loads([(usable[lv], totals[lv]) for lv in levels])
        chosen = self._draw(levels, loads)
        return hosts if chosen is None else [ep for ep in hosts if ep.priority == chosen]

    def _weighted_locality(self, hosts: list[EndpointState]) -> list[EndpointState]:
        """The hosts of one locality, drawn by its `distribute` share x its healthy fraction."""
        totals = self._locality_totals
        weights: dict[str, float] = {}
        for ep in hosts:
            weights[ep.locality] = weights.get(ep.locality, 0.0) + ep.share / totals[ep.locality]
        names = list(weights)
        chosen = self._draw(names, [weights[n] for n in names])
        return hosts if chosen is None else [ep for ep in hosts if ep.locality == chosen]

    def _draw(self, items: list, weights: list[float]):
        """One of `items` with probability proportional to its weight; None if all are 0."""
        total = sum(weights)
        if total <= 0:
            return None
        point = self._rng.random() * total
        for item, weight in zip(items, weights, strict=True):
            point -= weight
            if point < 0 and weight > 0:
                return item
        return next(item for item, weight in zip(items, weights, strict=True) if weight > 0)

    def healthy(self) -> list[EndpointState]:
        now = self._clock()
        if now >= self._next_check:
            self._refresh(now)
        return list(self._healthy)

    # -- requests and outlier detection ---------------------------------------------------

    def request_started(self, ep: EndpointState) -> None:
        ep.active += 1

    def request_finished(self, ep: EndpointState, status: int | None) -> None:
        """An attempt on `ep` ended with `status` (an upstream's code, or one of the *_CODE
        constants for a local-origin failure; None when it says nothing about the endpoint,
        e.g. the client went away)."""
        ep.active -= 1
        if status is not None:
            self.report(ep, status)

    def report(self, ep: EndpointState, status: int) -> None:
        if status < 500:
            ep.consecutive_5xx = 0
            ep.consecutive_gateway = 0
            return
        if status in _GATEWAY_ERRORS:
            ep.consecutive_gateway += 1
        else:
            ep.consecutive_gateway = 0
        ep.consecutive_5xx += 1
        od = self.spec.policy.outlier
        if od is None or ep.retired:
            return
        if (od.consecutive_5xx and ep.consecutive_5xx >= od.consecutive_5xx) or (
            od.consecutive_gateway and ep.consecutive_gateway >= od.consecutive_gateway
        ):
            if ep.ejected_until is not None:
                self._refresh(self._clock())  # its ejection may be over by now
                if ep.ejected_until is not None:
                    return  # late results of requests sent before it was ejected
            ep.consecutive_5xx = 0
            ep.consecutive_gateway = 0
            self._try_eject(ep, od.base_ejection_time, od.max_ejection_percent)

    def _try_eject(self, ep: EndpointState, base: float, max_percent: int) -> None:
        now = self._clock()
        self._refresh(now)
        ejected = len(self.endpoints) - len(self._healthy)
        if ejected and 100 * (ejected + 1) > max_percent * len(self.endpoints):
            return
        ep.ejections += 1
        ep.ejected_at = now
        ep.ejected_until = now + min(base * ep.ejections, max(MAX_EJECTION_TIME, base))
        self.stats.ejections += 1
        OUTLIER_EJECTIONS.labels(self.name).inc()
        self._recompute()

    def _refresh(self, now: float) -> None:
        """Return endpoints whose ejection is over; decay healthy endpoints' multipliers."""
        od = self.spec.policy.outlier
        interval = od.interval if od else None
        changed = False
        for ep in self.endpoints:
            if ep.ejected_until is not None:
                if now >= ep.ejected_until:
                    ep.decay_from = ep.ejected_until
                    ep.ejected_at = ep.ejected_until = None
                    changed = True
            elif ep.ejections and interval:
                steps = int((now - ep.decay_from) // interval)
                if steps > 0:
                    ep.ejections = max(0, ep.ejections - steps)
                    ep.decay_from += steps * interval
        if changed:
            self._recompute()
        else:
            self._schedule()

    def _recompute(self) -> None:
        self._healthy = [ep for ep in self.endpoints if ep.ejected_until is None]
        OUTLIER_EJECTED.labels(self.name).set(len(self.endpoints) - len(self._healthy))
        self._schedule()

    def _schedule(self) -> None:
        od = self.spec.policy.outlier
        times = [ep.ejected_until for ep in self.endpoints if ep.ejected_until is not None]
        if od:
            times += [ep.decay_from + od.interval for ep in self.endpoints if ep.ejections]
        self._next_check = min(times, default=float("inf"))

    def ejected(self) -> list[Ejection]:
        now = self._clock()
        self._refresh(now)
        offset = time.time() - now
        return [
            Ejection(
                cluster=self.name,
                address=ep.address,
                workload_uid=ep.endpoint.workload_uid,
                ejected_at=ep.ejected_at + offset,
                until=ep.ejected_until + offset,
                ejections=ep.ejections,
            )
            for ep in self.endpoints
            if ep.ejected_until is not None and ep.ejected_at is not None
        ]

    # -- circuit breaking -----------------------------------------------------------------

    def can_open(self, ep: EndpointState) -> bool:
        """Whether a new connection to `ep` is within `maxConnections` (always, for an
        endpoint that has none: Envoy's pools make the same exception)."""
        limit = self.spec.policy.max_connections
        return limit is None or self.connections < limit or ep.connections == 0

    def opened(self, ep: EndpointState) -> None:
        self.connections += 1
        ep.connections += 1

    def closed(self, ep: EndpointState) -> None:
        self.connections -= 1
        ep.connections -= 1
        self._capacity.unpark_all()

    def connection_released(self) -> None:
        """A connection went back to its idle pool: pending requests may take it."""
        self._capacity.unpark_all()

    def try_open(self, ep: EndpointState) -> bool:
        """For L4: count a new connection, or refuse it (overflow) at maxConnections."""
        if not self.can_open(ep):
            self.stats.overflows += 1
            return False
        self.opened(ep)
        return True

    def take_request_slot(self) -> None:
        """Count one more request (an attempt, a retry, a mirror copy) going to the cluster, or
        raise Overflow (counted) when `http.http2MaxRequests` are already in flight: Envoy's
        max_requests circuit breaker, which Istio sets from it for HTTP/1.1 and HTTP/2 alike.
        The caller gives the slot back with `free_request_slot` when the request is done."""
        limit = self.spec.policy.max_requests
        if limit is not None and self.requests >= limit:
            self.stats.overflows += 1
            raise Overflow(f"{self.name}: {self.requests} requests in flight (limit {limit})")
        self.requests += 1

    def free_request_slot(self) -> None:
        self.requests -= 1

    def retry_slot(self) -> RetrySlot:
        """A request's hold on this cluster's retry budget (`http.maxRetries`)."""
        return RetrySlot(self)

    async def wait_pending(self) -> None:
        """Wait, as a pending request, until a connection is released or closed.
        Raises Overflow (counted) when `http1MaxPendingRequests` are already waiting."""
        limit = self.spec.policy.max_pending_requests
        if limit is not None and self.pending >= limit:
            self.stats.overflows += 1
            raise Overflow(f"{self.name}: {self.pending} requests pending (limit {limit})")
        self.pending += 1
        try:
            await self._capacity.park()
        finally:
            self.pending -= 1


class RetrySlot:
    """One request's share of its cluster's `http.maxRetries` (Envoy's max_retries circuit
    breaker: retries in flight to the cluster), as Envoy's retry state holds it: taken when a
    retry is decided, given back at the request's next retry decision or its end."""

    __slots__ = ("cluster", "held")

    def __init__(self, cluster: ClusterState) -> None:
        self.cluster = cluster
        self.held = False

    def take(self) -> bool:
        """Whether another retry may go: the slot held for the previous one goes back first,
        then one is taken if fewer than maxRetries retries are in flight. False: the failed
        attempt's response (or failure) goes to the client."""
        self.release()
        cluster = self.cluster
        limit = cluster.spec.policy.max_retries
        if limit is not None and cluster.retries >= limit:
            cluster.stats.overflows += 1
            return False
        cluster.retries += 1
        self.held = True
        return True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.cluster.retries -= 1


@dataclass
class Clusters:
    """Every ClusterState of one proxy, kept in step with the RouteTable by `sync`."""

    clock: Clock = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    _states: dict = field(default_factory=dict, repr=False)

    def get(self, spec: ClusterSpec) -> ClusterState:
        """The state for `spec`'s cluster; one not known yet (an ad-hoc spec, or a request
        that started on an older table) gets a fresh state."""
        state = self._states.get(spec.key)
        if state is None:
            state = ClusterState(spec, clock=self.clock, rng=self.rng)
            self._states[spec.key] = state
        return state

    def sync(self, table: RouteTable) -> list[EndpointState]:
        """Adopt a new RouteTable: update kept clusters, drop the others. Returns every
        endpoint state that left (pass them to the connection pool's `discard`)."""
        retired: list[EndpointState] = []
        for key in list(self._states):
            if key not in table.clusters:
                state = self._states.pop(key)
                retired.extend(state.update(ClusterSpec(key, ())))
                OUTLIER_EJECTED.remove(state.name)
        for key, spec in table.clusters.items():
            state = self._states.get(key)
            if state is None:
                self._states[key] = ClusterState(spec, clock=self.clock, rng=self.rng)
            elif state.spec is not spec:  # the next view keeps an unchanged cluster as is
                retired.extend(state.update(spec))
        return retired

    def __iter__(self) -> Iterator[ClusterState]:
        return iter(list(self._states.values()))

    def ejected(self) -> list[Ejection]:
        return [e for state in self for e in state.ejected()]
