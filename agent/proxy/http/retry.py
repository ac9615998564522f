"""Retry decisions: whether the outcome of one upstream attempt may be retried, and how long
to back off first. Pure functions of the route's RetryPolicy, as Envoy's router decides
(https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_filters/router_filter):

- `5xx`: any 5xx response, and any attempt that got no response (connect failure, reset,
  per-try timeout); `gateway-error`: 502/503/504 responses and the same no-response cases;
  `connect-failure`: a failed connect; `reset`: a reset, close or per-try timeout before the
  response; `refused-stream` (in Istio's default policy too): an HTTP/2 upstream's
  REFUSED_STREAM reset, which says the request was not processed; a status code listed in
  retryOn (or Istio's default 503) retries that status.
- A circuit-breaker overflow is never retried (Envoy answers 503 UO at once).
- Back-off: Envoy's jittered exponential back-off, uniform in [0, base x (2^n - 1)) for the
  n-th retry, capped.
"""

from __future__ import annotations

import enum
import random

from meshagent.agent.proxy.routing import RetryPolicy

_GATEWAY = frozenset({502, 503, 504})


class Outcome(enum.Enum):
    """How an attempt ended when it produced no response for the client."""

    CONNECT_FAILURE = "connect-failure"  # 503 UF
    RESET = "reset"  # 503 UC: closed or reset before a complete response head
    PROTOCOL = "protocol"  # 503 UPE: the response was not valid HTTP/1.1
    TIMEOUT = "timeout"  # 504 UT: the per-try timeout passed before the response head
    REFUSED = "refused-stream"  # 503 UC: an HTTP/2 upstream reset the stream REFUSED_STREAM
    OVERFLOW = "overflow"  # 503 UO: circuit breaker
    STATUS = "status"  # a response with a retriable status, dropped to retry


def retriable_status(policy: RetryPolicy, status: int) -> bool:
    return (
        (policy.on_5xx and status >= 500)
        or (policy.on_gateway_error and status in _GATEWAY)
        or status in policy.status_codes
    )


def retriable(policy: RetryPolicy, outcome: Outcome, status: int = 0) -> bool:
    if outcome is Outcome.STATUS:
        return retriable_status(policy, status)
    if outcome is Outcome.OVERFLOW:
        return False
    if policy.on_5xx or policy.on_gateway_error:
        return True
    if outcome is Outcome.CONNECT_FAILURE:
        return policy.on_connect_failure or policy.on_reset
    if outcome is Outcome.REFUSED:
        return policy.on_refused_stream or policy.on_reset
    return policy.on_reset


def retriable_grpc(policy: RetryPolicy, grpc_status: int | None) -> bool:
    """A gRPC status retryOn names (`cancelled`, `deadline-exceeded`, `internal`,
    `resource-exhausted`, `unavailable`), seen in a trailers-only response."""
    return grpc_status is not None and grpc_status in policy.grpc_codes


def backoff(retry: int, base: float, cap: float, rand: random.Random) -> float:
    """Seconds to wait before the `retry`-th retry (1 = the first)."""
    return min(cap, rand.random() * base * ((1 << min(retry, 16)) - 1))
