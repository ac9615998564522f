"""The HTTP engine's pure rules: when an attempt may be retried, how long to back off, and
which headers cross the proxy (no I/O)."""

from __future__ import annotations

import random

import pytest
from meshagent.agent.proxy.http.headers import (
    h2c_upgrade,
    is_h2c_upgrade,
    request_headers,
    response_headers,
    upgrade_protocol,
)
from meshagent.agent.proxy.http.retry import Outcome, backoff, retriable
from meshagent.agent.proxy.routing import DEFAULT_RETRY, RetryPolicy

ON_5XX = RetryPolicy(attempts=2, on_5xx=True, on_connect_failure=False, status_codes=frozenset())
GATEWAY = RetryPolicy(
    attempts=2, on_gateway_error=True, on_connect_failure=False, status_codes=frozenset()
)
RESET = RetryPolicy(attempts=2, on_reset=True, on_connect_failure=False, status_codes=frozenset())
CODES = RetryPolicy(attempts=2, on_connect_failure=False, status_codes=frozenset({409}))


@pytest.mark.parametrize(
    ("policy", "outcome", "status", "retry"),
    [
        # Istio's default: connect failures and 503 only.
        (DEFAULT_RETRY, Outcome.CONNECT_FAILURE, 0, True),
        (DEFAULT_RETRY, Outcome.STATUS, 503, True),
        (DEFAULT_RETRY, Outcome.STATUS, 500, False),
        (DEFAULT_RETRY, Outcome.RESET, 0, False),
        (DEFAULT_RETRY, Outcome.TIMEOUT, 0, False),
        # 5xx: every 5xx and every attempt without a response.
        (ON_5XX, Outcome.STATUS, 500, True),
        (ON_5XX, Outcome.STATUS, 404, False),
        (ON_5XX, Outcome.RESET, 0, True),
        (ON_5XX, Outcome.TIMEOUT, 0, True),
        (ON_5XX, Outcome.CONNECT_FAILURE, 0, True),
        (ON_5XX, Outcome.PROTOCOL, 0, True),
        # gateway-error: 502/503/504 and no response.
        (GATEWAY, Outcome.STATUS, 502, True),
        (GATEWAY, Outcome.STATUS, 500, False),
        (GATEWAY, Outcome.TIMEOUT, 0, True),
        # reset: no response at all (a connect failure included), never a status.
        (RESET, Outcome.RESET, 0, True),
        (RESET, Outcome.TIMEOUT, 0, True),
        (RESET, Outcome.CONNECT_FAILURE, 0, True),
        (RESET, Outcome.STATUS, 503, False),
        # retriable-status-codes
        (CODES, Outcome.STATUS, 409, True),
        (CODES, Outcome.STATUS, 503, False),
        (CODES, Outcome.CONNECT_FAILURE, 0, False),
        # A circuit breaker's overflow is never retried.
        (ON_5XX, Outcome.OVERFLOW, 0, False),
        (RESET, Outcome.OVERFLOW, 0, False),
    ],
)
def test_retry_conditions(policy, outcome, status, retry):
    assert retriable(policy, outcome, status) is retry


def test_backoff_is_jittered_exponential_and_capped():
    rand = random.Random(5)
    for retry, ceiling in ((1, 0.025), (2, 0.075), (3, 0.175), (4, 0.25), (30, 0.25)):
        waits = [backoff(retry, 0.025, 0.25, rand) for _ in range(200)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling * 0.8  # spread over the whole range


def test_request_headers_drop_hop_by_hop_and_keep_framing():
    headers = [
        (b"host", b"reviews"),
        (b"connection", b"keep-alive, x-secret"),
        (b"keep-alive", b"5"),
        (b"x-secret", b"1"),
        (b"te", b"trailers"),
        (b"proxy-connection", b"close"),
        (b"expect", b"100-continue"),
        (b"transfer-encoding", b"chunked"),
        (b"x-user", b"jo"),
        (b"upgrade", b"h2c"),
    ]
    assert request_headers(headers, default_host=b"x:80", upgrade=None) == [
        (b"host", b"reviews"),
        (b"expect", b"100-continue"),  # the server decides (the mesh never answers 100)
        (b"transfer-encoding", b"chunked"),
        (b"x-user", b"jo"),
    ]


def test_request_without_host_gets_the_service_authority():
    out = request_headers([(b"accept", b"*/*")], default_host=b"reviews.shop:9080", upgrade=None)
    assert out[0] == (b"host", b"reviews.shop:9080")


def test_upgrade_keeps_its_pair():
    headers = [(b"host", b"r"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    assert upgrade_protocol(headers) == b"websocket"
    assert upgrade_protocol([(b"upgrade", b"websocket")]) is None  # not named in Connection
    assert request_headers(headers, default_host=b"x", upgrade=b"websocket") == [
        (b"host", b"r"),
        (b"connection", b"upgrade"),
        (b"upgrade", b"websocket"),
    ]
    reply = [
        (b"connection", b"upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-accept", b"k"),
    ]
    assert response_headers(reply, upgrade=True) == [
        (b"sec-websocket-accept", b"k"),
        (b"connection", b"upgrade"),
        (b"upgrade", b"websocket"),
    ]


def test_response_headers_keep_framing_and_drop_hop_by_hop():
    reply = [
        (b"content-length", b"3"),
        (b"connection", b"close"),
        (b"keep-alive", b"timeout=5"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"upgrade", b"h2c"),
    ]
    assert response_headers(reply) == [
        (b"content-length", b"3"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


def test_an_h2c_upgrade_offer_is_removed_and_other_offers_stay():
    curl = [
        (b"host", b"reviews"),
        (b"connection", b"Upgrade, HTTP2-Settings"),
        (b"upgrade", b"h2c"),
        (b"http2-settings", b"AAMAAABk"),
    ]
    assert is_h2c_upgrade(curl)
    assert h2c_upgrade(curl) == [(b"host", b"reviews")]
    assert upgrade_protocol(h2c_upgrade(curl)) is None
    both = [(b"connection", b"upgrade, keep-alive"), (b"upgrade", b"websocket, h2c")]
    assert upgrade_protocol(h2c_upgrade(both)) == b"websocket"
    assert not is_h2c_upgrade([(b"connection", b"upgrade"), (b"upgrade", b"websocket")])
