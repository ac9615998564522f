"""A connection's own drain (`Drain(parent)`): it ends that connection's keep-alive wait alone,
and every one of them when the proxy drains."""

from __future__ import annotations

import trio
from meshagent.agent.proxy.drain import Drain


async def test_a_child_drain_starts_alone_or_with_its_parent() -> None:
    proxy = Drain()
    first, second = Drain(proxy), Drain(proxy)
    waits = [trio.CancelScope() for _ in range(2)]
    first.watch(waits[0])
    second.watch(waits[1])
    first.start()  # e.g. the pod closed the connection that carried first's requests
    assert first.draining and waits[0].cancel_called
    assert not second.draining and not waits[1].cancel_called and not proxy.draining
    proxy.start()
    assert second.draining and waits[1].cancel_called
    assert Drain(proxy).draining  # born after the drain began: draining already
