"""When to replace a proxy worker that a burst left bigger than it started (issue #17).

A worker's heap keeps much of what a burst of connections took after they all closed (glibc
malloc, trimmed: +46-57 % of a fresh worker's RSS after 5,000 connections; launch.py has the
figures): live objects scattered over pages that can then not be returned. No allocator got
it back within 10 %, so the pool replaces such a worker instead: once a burst is over (at
most ``max_open`` client connections open and as many accepted, for ``QUIET_S`` in a row), a
worker whose RSS exceeds where it stood before the burst (its baseline: MemoryWatch) by more
than ``growth`` and that is at least ``MIN_AGE_S`` old gets a fresh one forked for its slot
and, once that one listens, drains as at an upgrade: it stops accepting (queued connections
move to the group's other sockets, tcp_migrate_req), closes idle keep-alive connections (busy
ones after their response) and exits after its last connection ends. This module is the
decision only; pool.py acts on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FRESH_AFTER_S = 3.0  # a worker's first baseline: its RSS this long after it listens
QUIET_S = 5.0  # at most max_open connections for this long: the burst is over
# ... and at most this share of a core of CPU meanwhile: a few connections can be very busy
# (an HTTP/2 or gRPC client multiplexes everything over one), and a drain would GOAWAY them
QUIET_CPU = 0.05
MIN_AGE_S = 30.0  # a worker younger than this is never replaced (bounds the churn)
# What a worker takes on first use, over its fresh figure (measured +10-17 %): allowed on top
# of the growth when the figure to compare with was taken before the worker served
FIRST_USE = 0.15
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class RecyclePolicy:
    growth: float  # fraction over where it stood that makes a worker grown; 0: never
    max_open: int  # connections a grown worker may still hold to be replaced

    @property
    def enabled(self) -> bool:
        return self.growth > 0


@dataclass
class MemoryWatch:
    """One worker process's memory against where it stood (times in seconds, RSS in bytes).

    Two figures. ``fresh``: its RSS 3 s after it listens. ``baseline``: where it stands
    before a burst: the fresh figure, then its RSS at each quiet time until its first burst.
    A worker's first use of each path (imports, TLS, caches, metric series, the allocator's
    first arenas) takes +10-17 % of a fresh worker in the lab (HTTP/1.1, h2c and gRPC, same
    node and cross node) and stays: the worker's own size, not a burst's leftovers, so it
    moves the baseline instead of counting as growth. From the first burst on the baseline
    stays put (bursts each leaving a little, taken as the new baseline, would add up).

    Once a burst is over, a worker is replaced when its RSS is more than ``growth`` over its
    baseline, if that was taken after it had served (warm); or, whatever grew it, more than
    ``growth`` + FIRST_USE over its fresh figure (a worker whose first traffic was the burst,
    and growth no burst flagged: from other nodes' connections arriving a few at a time).

    A burst: more than ``max_open`` connections (clients on 15001 and tunnels on 15008) open
    at once on top of those open at the last look; the worker reports the most it had open
    since then, so a burst of short ones shows though none is open when the agent looks.
    Connections one after another are no burst however many (each one's memory is free
    before the next takes it), nor are many kept open for long (peers' pooled tunnels). Quiet
    means the burst is over: at most ``max_open`` client connections open on 15001, at most
    ``max_open`` connections accepted (15001 and 15008) since the quiet time began, and at
    most ``QUIET_CPU`` of a core used between two looks (a benchmark's ten HTTP/2 connections
    at full speed are not quiet: replaced, they got GOAWAY mid-run), for ``QUIET_S``. Inbound
    connections open do not make a worker busy: peers' pooled HBONE connections and a
    same-node hop's pooled keep-alives stay open on a quiet node; at the drain the idle ones
    close (peers open new ones to the fresh worker) and busy ones finish in the old process."""

    ready_at: float
    fresh: int | None = None  # None until FRESH_AFTER_S
    baseline: int = 0
    warm: bool = False  # the baseline was taken after the worker had served
    accepted_fresh: int = 0  # connections accepted when the fresh figure was taken
    burst_seen: bool = False  # a burst went through it since it started: the baseline stays
    open_last: int = 0  # connections open (15001 and 15008) at the last look
    quiet_since: float | None = None
    accepted_then: int = 0  # accepted connections when the quiet time began
    cpu_then: tuple[float, float] | None = None  # (time, CPU seconds) at the last look

    def grown(
        self,
        policy: RecyclePolicy,
        now: float,
        rss: int,
        open_connections: int,
        accepted: int,
        cpu: float = 0.0,
        *,
        open_all: int = 0,
        peak: int = 0,
    ) -> bool:
        """Whether the worker should be replaced now (``rss`` and ``cpu``, its CPU seconds so
        far, read now; as it last reported: ``open_connections`` its clients open on 15001,
        ``accepted`` (a running total), ``open_all`` its connections open on 15001 and 15008;
        ``peak`` the most of those it had open at once since the last look)."""
        age = now - self.ready_at
        last, self.cpu_then = self.cpu_then, (now, cpu)
        open_last, self.open_last = self.open_last, open_all
        if self.fresh is None:
            if age >= FRESH_AFTER_S:
                self.fresh = self.baseline = rss
                self.accepted_fresh = accepted
            return False
        burst = peak - open_last > policy.max_open
        self.burst_seen = self.burst_seen or burst
        working = (
            last is not None and now > last[0] and (cpu - last[1]) / (now - last[0]) > QUIET_CPU
        )
        busy = burst or open_connections > policy.max_open or working
        if busy or (
            self.quiet_since is not None and accepted - self.accepted_then > policy.max_open
        ):
            self.quiet_since = None
            if busy:
                return False
        if self.quiet_since is None:
            self.quiet_since, self.accepted_then = now, accepted
        if now - self.quiet_since < QUIET_S:
            return False
        if not self.burst_seen:  # first use, not a burst: where it stands before one
            self.baseline = rss
            self.warm = self.warm or accepted > self.accepted_fresh
        if not policy.enabled or age < MIN_AGE_S:
            return False
        if rss > self.fresh * (1 + policy.growth + FIRST_USE):
            return True
        return self.burst_seen and self.warm and rss > self.baseline * (1 + policy.growth)


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of ``pid`` so far (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None
