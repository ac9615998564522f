"""A TCP port's connect honours the DestinationRule's `connectionPool.tcp.connectTimeout`
(issue #21: it was a fixed 5 s direct, 10 s through HBONE, whatever the policy said)."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from meshagent.agent.proxy.outbound import _L4
from meshagent.agent.proxy.routing import ClusterKey, ClusterSpec, TrafficPolicy
from meshagent.agent.proxy.upstream import UpstreamError


class SlowConnector:
    """Never answers; records the direct-dial bound it was given."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    async def open(self, source, ip, port, client_ip, protocol=None, connect_timeout=5.0, **_):
        self.timeouts.append(connect_timeout)
        await trio.sleep_forever()


def l4_with(connector: SlowConnector) -> _L4:
    l4 = object.__new__(_L4)
    l4.proxy = type("P", (), {"connector": connector})()
    l4.source, l4.peer_ip, l4.protocol = None, "10.0.0.1", "tcp"
    return l4


@pytest.mark.parametrize("timeout", [0.25, 2.0, 30.0])
def test_the_policy_timeout_bounds_the_connect(timeout: float) -> None:
    connector = SlowConnector()
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> float:
        start = trio.current_time()
        with pytest.raises(UpstreamError) as caught:
            spec = ClusterSpec(ClusterKey("db", 5432), (), TrafficPolicy(connect_timeout=timeout))
            await l4_with(connector)._open("10.0.0.9", 5432, spec)
        assert caught.value.kind == "connect-failure"
        assert "connect timeout" in str(caught.value)
        return trio.current_time() - start

    elapsed = trio.run(main, clock=clock)
    assert math.isclose(elapsed, timeout)
    assert connector.timeouts == [timeout]  # a direct dial gets the same bound, not 5 s
