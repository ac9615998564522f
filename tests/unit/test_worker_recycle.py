"""When a proxy worker that grew is replaced (agent/workers/recycle.py): only once a burst is
over (few connections and little CPU for a while), past where it stood before the burst by
more than the growth set (what first use takes moves that figure), never while young, never
with the policy off."""

from __future__ import annotations

import os
import time

from meshagent.agent.workers.recycle import (
    FRESH_AFTER_S,
    MIN_AGE_S,
    QUIET_CPU,
    QUIET_S,
    MemoryWatch,
    RecyclePolicy,
    cpu_seconds,
    rss_bytes,
)

MIB = 2**20
POLICY = RecyclePolicy(growth=0.10, max_open=16)
BURST = 500  # client connections open at a look: more than max_open


def _fresh_watch(fresh: int = 60 * MIB) -> MemoryWatch:
    watch = MemoryWatch(ready_at=0.0)
    assert not watch.grown(POLICY, FRESH_AFTER_S - 0.5, 10 * MIB, 0, 0)  # too early to tell
    assert watch.fresh is None
    assert not watch.grown(POLICY, FRESH_AFTER_S, fresh, 0, 0)
    assert watch.fresh == fresh
    return watch


def _quiet_for(watch: MemoryWatch, start: float, rss: int, accepted: int = 0) -> float:
    """Looks a second apart, quiet (3 connections open, nothing accepted) for QUIET_S less a
    second, none of which replaces it; returns the time of the look that completes QUIET_S."""
    for t in range(int(QUIET_S)):
        assert not watch.grown(POLICY, start + t, rss, 3, accepted)
    return start + QUIET_S


def test_a_worker_a_burst_left_grown_is_replaced_once_quiet_for_a_while():
    watch = _fresh_watch()
    grown = 90 * MIB
    assert not watch.grown(POLICY, MIN_AGE_S - 1, grown, BURST, 0)
    assert watch.grown(POLICY, _quiet_for(watch, MIN_AGE_S, grown), grown, 3, 0)


def test_first_use_moves_the_baseline_a_burst_does_not():
    """What a worker takes when it first serves (few connections at a time) is its own size:
    no replacement for it, and a burst is measured from there. A burst that leaves less than
    the growth keeps the baseline where it was, so a second burst's leftovers add to it."""
    watch = _fresh_watch(60 * MIB)
    used = 69 * MIB  # +15 % over fresh: first use
    assert not watch.grown(POLICY, 40.0, used, 10, 10)  # few at a time, 10 accepted
    assert not watch.grown(POLICY, _quiet_for(watch, 41.0, used, 10), used, 3, 10)
    assert watch.fresh == used
    assert not watch.grown(POLICY, 60.0, 90 * MIB, BURST, 10)
    after_one = 75 * MIB  # +8.7 % over 69: within the growth, kept
    assert not watch.grown(POLICY, _quiet_for(watch, 61.0, after_one, 10), after_one, 3, 10)
    assert not watch.grown(POLICY, 100.0, after_one, 3, 10)
    assert watch.fresh == used  # a burst went through: the baseline stays
    assert not watch.grown(POLICY, 120.0, 90 * MIB, BURST, 10)
    after_two = 76 * MIB  # +10.1 % over 69
    assert watch.grown(POLICY, _quiet_for(watch, 121.0, after_two, 10), after_two, 3, 10)


def test_a_busy_worker_is_kept_and_its_quiet_time_starts_again():
    watch = _fresh_watch()
    grown = 90 * MIB
    assert not watch.grown(POLICY, 100.0, grown, BURST, 0)
    assert not watch.grown(POLICY, 101.0, grown, 0, 0)
    assert not watch.grown(POLICY, 103.0, grown, BURST, 0)  # a burst again
    assert not watch.grown(POLICY, 104.0, grown, 0, 0)
    assert not watch.grown(POLICY, 104.0 + QUIET_S - 0.5, grown, 0, 0)
    assert watch.grown(POLICY, 104.0 + QUIET_S, grown, 0, 0)


def test_a_burst_of_new_connections_is_not_quiet_even_if_they_close_at_once():
    watch = _fresh_watch()
    grown = 90 * MIB
    assert not watch.grown(POLICY, 100.0, grown, 0, 1000)  # 1000 accepted since the last look
    assert not watch.grown(POLICY, 103.0, grown, 0, 1500)  # 500 accepted and closed: a burst
    assert not watch.grown(POLICY, 104.0, grown, 0, 1516)  # 16 since: quiet from now on
    assert not watch.grown(POLICY, 104.0 + QUIET_S - 0.5, grown, 0, 1516)
    assert watch.grown(POLICY, 104.0 + QUIET_S, grown, 0, 1516)


def test_growth_within_the_bound_or_a_young_worker_or_the_policy_off_keeps_it():
    within = _fresh_watch(60 * MIB)
    assert not within.grown(POLICY, 100.0, 66 * MIB, BURST, 0)
    assert not within.grown(POLICY, 101.0, 66 * MIB, 0, 0)
    assert not within.grown(POLICY, 200.0, 66 * MIB, 0, 0)  # 10 %: not more than 10 %
    young = _fresh_watch()
    assert not young.grown(POLICY, FRESH_AFTER_S + 1, 90 * MIB, BURST, 0)
    assert not young.grown(POLICY, FRESH_AFTER_S + 2, 90 * MIB, 0, 0)  # quiet from now on
    assert not young.grown(POLICY, MIN_AGE_S - 0.5, 90 * MIB, 0, 0)
    assert young.grown(POLICY, MIN_AGE_S, 90 * MIB, 0, 0)
    off = RecyclePolicy(growth=0.0, max_open=16)
    assert not off.enabled
    idle = _fresh_watch()
    assert not idle.grown(off, 99.0, 900 * MIB, BURST, 0)
    assert not idle.grown(off, 100.0, 900 * MIB, 0, 0)
    assert not idle.grown(off, 200.0, 900 * MIB, 0, 0)


def test_a_worker_busy_on_few_connections_is_kept():
    """Ten HTTP/2 connections at full speed are few connections but not a quiet worker: its CPU
    keeps it; once its CPU falls under QUIET_CPU of a core the quiet time starts."""
    watch, grown = _fresh_watch(), 90 * MIB
    assert not watch.grown(POLICY, 99.0, grown, BURST, 0)  # then a burst's ten survivors
    cpu = 1.0
    for t in range(100, 100 + 3 * int(QUIET_S)):  # a look a second, half a core each
        cpu += 0.5
        assert not watch.grown(POLICY, float(t), grown, 10, 0, cpu)
    t0 = 100 + 3 * int(QUIET_S)
    for t in range(t0, t0 + int(QUIET_S)):  # idle: a little CPU a second
        cpu += QUIET_CPU / 2
        assert not watch.grown(POLICY, float(t), grown, 10, 0, cpu)
    assert watch.grown(POLICY, float(t0 + QUIET_S), grown, 10, 0, cpu + QUIET_CPU / 2)


def test_cpu_of_this_process_and_of_none():
    spent = cpu_seconds(os.getpid())
    deadline = time.monotonic() + 10
    while cpu_seconds(os.getpid()) == spent and time.monotonic() < deadline:
        sum(i * i for i in range(100_000))  # CPU until the next clock tick (10 ms) counts it
    assert cpu_seconds(os.getpid()) > spent >= 0
    assert cpu_seconds(2**22 + 11) is None


def test_rss_of_this_process_and_of_none():
    assert rss_bytes(os.getpid()) > MIB
    assert rss_bytes(2**22 + 11) is None
