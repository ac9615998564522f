"""When to replace a proxy worker that a burst left bigger than it started (issue #17).

A worker's heap keeps much of what a burst of connections took after they all closed (glibc
malloc, trimmed: +46-57 % of a fresh worker's RSS after 5,000 connections; launch.py has the
figures): live objects scattered over pages that can then not be returned. No allocator got
it back within 10 %, so the pool replaces such a worker instead: once a worker's RSS exceeds
its own fresh figure by more than ``growth`` while it is quiet (at most ``max_open`` client
connections open and as many accepted, for ``QUIET_S`` in a row) and at least ``MIN_AGE_S``
old, the pool forks a fresh one for its slot and, once that one listens, the old one drains
as at an upgrade: it stops accepting (queued connections move to the group's other sockets,
tcp_migrate_req), closes idle keep-alive connections (busy ones after their response) and
exits after its last connection ends. This module is the decision only; pool.py acts on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FRESH_AFTER_S = 3.0  # a worker's fresh figure: its RSS this long after it listens
QUIET_S = 5.0  # at most max_open connections for this long: the burst is over
MIN_AGE_S = 30.0  # a worker younger than this is never replaced (bounds the churn)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class RecyclePolicy:
    growth: float  # fraction over the fresh figure that makes a worker grown; 0: never
    max_open: int  # connections a grown worker may still hold to be replaced

    @property
    def enabled(self) -> bool:
        return self.growth > 0


@dataclass
class MemoryWatch:
    """One worker process's memory against its fresh figure (times in seconds, RSS in bytes).

    Quiet means the burst is over: at most ``max_open`` client connections open on 15001 and
    at most ``max_open`` connections accepted (15001 and 15008) since the quiet time began.
    Inbound connections open are not counted: peers' pooled HBONE connections and a same-node
    hop's pooled keep-alives stay open on a quiet node; at the drain the idle ones close
    (peers open new ones to the fresh worker) and busy ones finish in the old process."""

    ready_at: float
    fresh: int | None = None
    quiet_since: float | None = None
    accepted_then: int = 0  # accepted connections when the quiet time began

    def grown(
        self, policy: RecyclePolicy, now: float, rss: int, open_connections: int, accepted: int
    ) -> bool:
        """Whether the worker should be replaced now (``rss`` read now, ``open_connections``
        and ``accepted`` (a running total) as it last reported)."""
        age = now - self.ready_at
        if self.fresh is None:
            if age >= FRESH_AFTER_S:
                self.fresh = rss
            return False
        busy = open_connections > policy.max_open
        if busy or (
            self.quiet_since is not None and accepted - self.accepted_then > policy.max_open
        ):
            self.quiet_since = None
            if busy:
                return False
        if self.quiet_since is None:
            self.quiet_since, self.accepted_then = now, accepted
        return (
            policy.enabled
            and age >= MIN_AGE_S
            and now - self.quiet_since >= QUIET_S
            and rss > self.fresh * (1 + policy.growth)
        )


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None
