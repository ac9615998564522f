"""What one source may hold in a proxy process, and the record of what the proxy refused.

A node proxy serves every pod on its node: one misbehaving source (a leak of connections, a
client that never reads its responses, a slowloris) must not take the room the others need.
So each source gets at most `max_connections` open connections and `max_pending_requests`
requests in flight at once, per proxy process (the workers share a node's connections by
SO_REUSEPORT, so a node admits up to that many times its worker count). The source is the
pod as the proxy knows it: on 15001 its workload (else its address), on 15008 the identity in
its certificate (the one thing a peer cannot forge; pods sharing a service account share it).

Every refusal (these, a request head not complete in time or not HTTP, and a TCP relay closed
for its idle timeout) is counted in
`meshagent_proxy_refused_total{listener,reason}` and logged with its reason, at a bounded rate:
a flood of refusals must not become a flood of log lines. Counts are dropped when they reach
zero, so a burst of sources leaves nothing behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

from meshagent.agent.config import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING_REQUESTS
from meshagent.agent.telemetry.ratelog import RateLimitedLog, reason

__all__ = ["DEFAULT_MAX_CONNECTIONS", "DEFAULT_MAX_PENDING_REQUESTS", "Limits"]

log = logging.getLogger(__name__)

# The `listener` label of 15001, a pod's own connections: its refusals, idle closes and HTTP/2
# abuse, by the L4 relay and the HTTP engine alike (the L4 ones were once labelled "outbound").
POD_LISTENER = "pod"

# The `reason` label of meshagent_proxy_refused_total (a small fixed set).
SOURCE_CONNECTIONS = "source_connections"
SOURCE_PENDING_REQUESTS = "source_pending_requests"
HEADER_TIMEOUT = "header_timeout"
BAD_REQUEST = "bad_request"
IDLE_TIMEOUT = "idle_timeout"  # a close, not a refusal: a TCP relay idle too long


def _no_count(listener: str, why: str) -> None:
    pass


class Limits:
    """Per-source counters with their bounds, and the refusal record (metric and log).

    `count(listener, reason)` is called once per refusal (the agent's `ProxyMetrics.refused`).
    """

    def __init__(
        self,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_pending_requests: int = DEFAULT_MAX_PENDING_REQUESTS,
        count: Callable[[str, str], None] = _no_count,
        refusal_log: RateLimitedLog | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.max_pending_requests = max_pending_requests
        self.count = count
        self.log = refusal_log or RateLimitedLog(log)
        self.connections: dict[Hashable, int] = {}
        self.pending: dict[Hashable, int] = {}

    def connection(self, source: Hashable) -> _Held:
        """Hold one of `source`'s connections while inside; yields False (nothing held) when
        it already has `max_connections`."""
        return _Held(self.connections, source, self.max_connections)

    def pending_request(self, source: Hashable) -> _Held:
        """Hold one of `source`'s requests in flight while inside; yields False (nothing
        held) when it already has `max_pending_requests`."""
        return _Held(self.pending, source, self.max_pending_requests)

    def refused(self, listener: str, why: str, source: object, detail: str | None) -> None:
        """Count and log (rate-limited per listener and reason) one refusal. `why` is the
        metric's reason label; `detail` says it in words (never logged empty)."""
        self.count(listener, why)
        self.log.warning(
            f"{listener}-{why}",
            "%s: refused %s from %s: %s",
            listener,
            why,
            source or "?",
            reason(detail),
        )


class _Held:
    """One of ``key``'s counts held while inside (``as``: whether it was admitted). A small
    class rather than a generator context manager: every connection holds one while open."""

    __slots__ = ("admitted", "counts", "key", "limit")

    def __init__(self, counts: dict[Hashable, int], key: Hashable, limit: int) -> None:
        self.counts, self.key, self.limit = counts, key, limit
        self.admitted = False

    def __enter__(self) -> bool:
        held = self.counts.get(self.key, 0)
        self.admitted = held < self.limit
        if self.admitted:
            self.counts[self.key] = held + 1
        return self.admitted

    def __exit__(self, *_exc: object) -> None:
        if self.admitted:
            self.admitted = False
            left = self.counts[self.key] - 1
            if left:
                self.counts[self.key] = left
            else:
                del self.counts[self.key]
