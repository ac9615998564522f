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
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class RecyclePolicy:
    growth: float  # fraction over the baseline that makes a worker grown; 0: never
    max_open: int  # connections a grown worker may still hold to be replaced

    @property
    def enabled(self) -> bool:
        return self.growth > 0


@dataclass
class MemoryWatch:
    """One worker process's memory against its baseline (times in seconds, RSS in bytes).

    The baseline is where the worker stands before a burst: its RSS 3 s after it listens,
    then again at each quiet time until its first burst. A worker's first use of each path
    (imports, TLS, caches, the allocator's first arenas) takes +10-17 % of a fresh worker in
    the lab and stays; that is the worker's own size, not a burst's leftovers, so it moves
    the baseline instead of counting as growth. From the first burst on the baseline stays
    put (bursts each leaving a little, taken as the new baseline, would add up), and once
    the burst is over a worker more than ``growth`` over it is replaced.

    A burst: more than ``max_open`` client connections open on 15001 at a look, or more than
    ``max_open`` connections accepted (15001 and 15008) between two looks. Quiet means the
    burst is over: at most ``max_open`` client connections open, at most ``max_open``
    accepted since the quiet time began, and at most ``QUIET_CPU`` of a core used between
    two looks (a benchmark's ten HTTP/2 connections at full speed are not quiet: replaced,
    they got GOAWAY mid-run), for ``QUIET_S``. Inbound connections open are not counted:
    peers' pooled HBONE connections and a same-node hop's pooled keep-alives stay open on a
    quiet node; at the drain the idle ones close (peers open new ones to the fresh worker)
    and busy ones finish in the old process."""

    ready_at: float
    fresh: int | None = None  # the baseline (None until FRESH_AFTER_S)
    burst_seen: bool = False  # a burst went through it since it started: the baseline stays
    quiet_since: float | None = None
    accepted_then: int = 0  # accepted connections when the quiet time began
    accepted_last: int | None = None  # accepted connections at the last look
    cpu_then: tuple[float, float] | None = None  # (time, CPU seconds) at the last look

    def grown(
        self,
        policy: RecyclePolicy,
        now: float,
        rss: int,
        open_connections: int,
        accepted: int,
        cpu: float = 0.0,
    ) -> bool:
        """Whether the worker should be replaced now (``rss`` and ``cpu``, its CPU seconds so
        far, read now; ``open_connections`` and ``accepted`` (a running total) as it last
        reported)."""
        age = now - self.ready_at
        last, self.cpu_then = self.cpu_then, (now, cpu)
        accepted_last, self.accepted_last = self.accepted_last, accepted
        if self.fresh is None:
            if age >= FRESH_AFTER_S:
                self.fresh = rss
            return False
        burst = open_connections > policy.max_open or (
            accepted_last is not None and accepted - accepted_last > policy.max_open
        )
        self.burst_seen = self.burst_seen or burst
        working = (
            last is not None and now > last[0] and (cpu - last[1]) / (now - last[0]) > QUIET_CPU
        )
        busy = burst or working
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
        if not self.burst_seen:
            self.fresh = rss  # first use, not a burst: where it stands before one
            return False
        return policy.enabled and age >= MIN_AGE_S and rss > self.fresh * (1 + policy.growth)


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
