"""Load balancing, outlier detection and circuit breaking of one cluster (pure, fake clock).

Tests drive a ClusterState as the proxy does (pick, request_started/finished, opened/closed)
and check what an operator would: how picks spread, when an endpoint is ejected and for how
long, what `ejected()` and the metrics show, and when a request overflows.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import trio
import trio.testing
from meshagent.agent.proxy.lb import Clusters, ClusterState, Overflow
from meshagent.agent.proxy.routing import (
    ClusterKey,
    ClusterSpec,
    OutlierPolicy,
    RouteTable,
    TrafficPolicy,
    UpstreamEndpoint,
)
from meshagent.common.snapshot import Endpoint
from prometheus_client import REGISTRY


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoints(n: int) -> tuple[UpstreamEndpoint, ...]:
    return tuple(
        UpstreamEndpoint(
            Endpoint(ip=f"10.0.0.{i}", node="n1", workload_uid=f"w{i}", ports={80: 8080}), 8080
        )
        for i in range(1, n + 1)
    )


def cluster(n: int = 3, name: str = "lbtest", clock=None, seed: int = 1, **policy) -> ClusterState:
    spec = ClusterSpec(
        ClusterKey(f"{name}.ns.svc.cluster.local", 80), endpoints(n), TrafficPolicy(**policy)
    )
    return ClusterState(spec, clock=clock or FakeClock(), rng=random.Random(seed))


def ip(state) -> str:
    return state.endpoint.ip


def fail(c: ClusterState, ep, status: int = 503, times: int = 1) -> None:
    for _ in range(times):
        c.request_started(ep)
        c.request_finished(ep, status)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------------------------------------
# Picking


def test_round_robin_rotates_evenly():
    c = cluster(3, lb="ROUND_ROBIN")
    picks = [ip(c.pick()) for _ in range(9)]
    assert Counter(picks) == {"10.0.0.1": 3, "10.0.0.2": 3, "10.0.0.3": 3}
    assert picks[:3] == picks[3:6]  # a fixed rotation


def test_least_request_prefers_idle_endpoints():
    c = cluster(3, lb="LEAST_REQUEST")
    busy = c.endpoints[0]
    busy.active = 5
    picks = Counter(ip(c.pick()) for _ in range(900))
    # Power of two choices: the busy one only wins when drawn twice (1/9 of picks).
    assert abs(picks["10.0.0.1"] - 100) < 5 * math.sqrt(900 / 9 * 8 / 9)
    assert picks["10.0.0.2"] > 300 and picks["10.0.0.3"] > 300


def test_random_is_uniform():
    c = cluster(4, lb="RANDOM")
    picks = Counter(ip(c.pick()) for _ in range(4000))
    assert all(abs(n - 1000) < 5 * math.sqrt(4000 * 0.25 * 0.75) for n in picks.values())
    assert len(picks) == 4


@pytest.mark.parametrize("lb", ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"])
def test_exclude_avoids_tried_endpoints_while_any_is_left(lb):
    c = cluster(3, lb=lb)
    tried = [c.endpoints[0], c.endpoints[2]]
    assert {ip(c.pick(tried)) for _ in range(50)} == {"10.0.0.2"}
    assert c.pick(c.endpoints) is not None  # all tried: any will do


def test_empty_cluster_picks_nothing():
    assert cluster(0).pick() is None


# ---------------------------------------------------------------------------------------------
# Outlier detection


def test_consecutive_5xx_ejects_and_success_resets_the_count():
    clock = FakeClock()
    c = cluster(
        3, name="od1", clock=clock, outlier=OutlierPolicy(consecutive_5xx=3, base_ejection_time=30)
    )
    bad = c.endpoints[1]
    fail(c, bad, 500, 2)
    fail(c, bad, 200)  # resets
    fail(c, bad, 500, 2)
    assert c.ejected() == []
    fail(c, bad, 500)
    [ejection] = c.ejected()
    assert ejection.address == "10.0.0.2:8080" and ejection.workload_uid == "w2"
    assert ejection.ejections == 1 and ejection.until - ejection.ejected_at == pytest.approx(30)
    assert bad not in [c.pick() for _ in range(60)]
    clock.now += 29.9
    assert len(c.ejected()) == 1
    clock.now += 0.1
    assert c.ejected() == []
    assert bad in [c.pick() for _ in range(60)]


def test_gateway_errors_count_separately():
    c = cluster(3, name="od2", outlier=OutlierPolicy(consecutive_5xx=0, consecutive_gateway=2))
    ep = c.endpoints[0]
    fail(c, ep, 502)
    fail(c, ep, 500)  # a 5xx that is no gateway error breaks the gateway run
    fail(c, ep, 504)
    assert c.ejected() == []
    fail(c, ep, 503)
    assert [e.address for e in c.ejected()] == ["10.0.0.1:8080"]


def test_ejection_time_grows_with_each_ejection_and_decays():
    clock = FakeClock()
    od = OutlierPolicy(
        consecutive_5xx=1, interval=10, base_ejection_time=30, max_ejection_percent=100
    )
    c = cluster(2, name="od3", clock=clock, outlier=od)
    ep = c.endpoints[0]
    fail(c, ep)
    clock.now += 30
    assert c.ejected() == []
    fail(c, ep)  # ejected again at once: twice as long
    assert c.ejected()[0].until - c.ejected()[0].ejected_at == pytest.approx(60)
    clock.now += 60
    assert c.ejected() == []
    clock.now += 10 * 2  # two healthy intervals: the multiplier decays back to 0
    c.pick()
    fail(c, ep)
    assert c.ejected()[0].ejections == 1


def test_ejection_time_is_capped():
    clock = FakeClock()
    od = OutlierPolicy(consecutive_5xx=1, base_ejection_time=200, max_ejection_percent=100)
    c = cluster(2, name="od4", clock=clock, outlier=od)
    ep = c.endpoints[0]
    fail(c, ep)
    clock.now += 200
    fail(c, ep)
    assert c.ejected()[0].until - c.ejected()[0].ejected_at == pytest.approx(300)


def test_max_ejection_percent_but_always_one():
    od = OutlierPolicy(consecutive_5xx=1, max_ejection_percent=10)
    c = cluster(3, name="od5", outlier=od)
    for ep in c.endpoints:
        fail(c, ep)
    assert len(c.ejected()) == 1  # 10% of 3 rounds to none; Envoy still ejects one
    c = cluster(10, name="od6", outlier=OutlierPolicy(consecutive_5xx=1, max_ejection_percent=30))
    for ep in c.endpoints:
        fail(c, ep)
    assert len(c.ejected()) == 3
    assert len(c.healthy()) == 7


def test_every_endpoint_ejected_leaves_none_to_pick():
    c = cluster(2, name="od7", outlier=OutlierPolicy(consecutive_5xx=1, max_ejection_percent=100))
    for ep in c.endpoints:
        fail(c, ep)
    assert c.pick() is None


def test_no_outlier_policy_never_ejects():
    c = cluster(2, name="od8")
    fail(c, c.endpoints[0], 503, 100)
    assert c.ejected() == [] and len(c.healthy()) == 2


def test_ejection_metrics():
    clock = FakeClock()
    c = cluster(
        3, name="od9", clock=clock, outlier=OutlierPolicy(consecutive_5xx=1, base_ejection_time=5)
    )
    name = c.name
    before = metric("meshagent_outlier_cluster_ejections_total", cluster=name)
    fail(c, c.endpoints[0])
    assert metric("meshagent_outlier_ejected_endpoints", cluster=name) == 1
    assert metric("meshagent_outlier_cluster_ejections_total", cluster=name) == before + 1
    clock.now += 5
    c.pick()
    assert metric("meshagent_outlier_ejected_endpoints", cluster=name) == 0


def test_a_client_that_left_teaches_nothing():
    c = cluster(2, name="od10", outlier=OutlierPolicy(consecutive_5xx=1))
    ep = c.endpoints[0]
    c.request_started(ep)
    assert ep.active == 1
    c.request_finished(ep, None)
    assert ep.active == 0 and c.ejected() == []


# ---------------------------------------------------------------------------------------------
# Circuit breaking


def test_max_connections_with_one_always_allowed_per_endpoint():
    c = cluster(3, max_connections=1)
    a, b, _ = c.endpoints
    assert c.can_open(a)
    c.opened(a)
    assert not c.can_open(a)
    assert c.can_open(b)  # b has none: it may always open one (Envoy's pool rule)
    c.opened(b)
    c.closed(a)
    assert c.connections == 1 and not c.can_open(b) and c.can_open(a)


def test_l4_try_open_counts_overflows():
    c = cluster(1, max_connections=1)
    ep = c.endpoints[0]
    assert c.try_open(ep)
    assert not c.try_open(ep)
    assert c.stats.overflows == 1


async def test_pending_requests_wait_and_overflow():
    c = cluster(1, max_connections=1, max_pending_requests=2)
    ep = c.endpoints[0]
    c.opened(ep)
    woken: list[int] = []

    async def waiter(i: int) -> None:
        await c.wait_pending()
        woken.append(i)

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, 1)
            nursery.start_soon(waiter, 2)
            await trio.testing.wait_all_tasks_blocked()
            assert c.pending == 2
            with pytest.raises(Overflow):
                await c.wait_pending()
            assert c.stats.overflows == 1
            c.connection_released()
    assert sorted(woken) == [1, 2] and c.pending == 0


async def test_unlimited_pending_by_default():
    c = cluster(1, max_connections=1)
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(c.wait_pending)
            await trio.testing.wait_all_tasks_blocked()
            assert c.pending == 50
            c.connection_released()


# ---------------------------------------------------------------------------------------------
# Following snapshots


def test_sync_keeps_endpoint_state_and_retires_the_gone():
    clock = FakeClock()
    clusters = Clusters(clock=clock, rng=random.Random(3))
    key = ClusterKey("sync.ns.svc.cluster.local", 80)
    od = TrafficPolicy(outlier=OutlierPolicy(consecutive_5xx=1, max_ejection_percent=100))
    first = ClusterSpec(key, endpoints(3), od)
    retired = clusters.sync(RouteTable(clusters={key: first}))
    assert retired == []
    state = clusters.get(first)
    bad = state.endpoints[0]
    fail(state, bad)
    gone = state.endpoints[2]
    # The next snapshot drops 10.0.0.3 and adds 10.0.0.4; 10.0.0.1 stays ejected.
    second = ClusterSpec(key, (*endpoints(2), *endpoints(4)[3:]), od)
    retired = clusters.sync(RouteTable(clusters={key: second}))
    assert retired == [gone] and gone.retired
    assert clusters.get(second) is state
    assert [e.address for e in clusters.ejected()] == ["10.0.0.1:8080"]
    assert {ip(e) for e in state.endpoints} == {"10.0.0.1", "10.0.0.2", "10.0.0.4"}
    # A cluster that leaves the table is dropped, its endpoints retired, its gauge removed.
    retired = clusters.sync(RouteTable())
    assert len(retired) == 3 and all(e.retired for e in retired)
    assert list(clusters) == []
    assert (
        REGISTRY.get_sample_value("meshagent_outlier_ejected_endpoints", {"cluster": key.name})
        is None
    )


def test_get_creates_state_for_an_unknown_spec():
    clusters = Clusters()
    spec = ClusterSpec(ClusterKey("adhoc.ns.svc.cluster.local", 80, "inbound"), endpoints(1))
    assert clusters.get(spec) is clusters.get(spec)
    assert clusters.get(spec).pick().address == "10.0.0.1:8080"
