"""agent/proxy/trim.py: memory is trimmed once after a burst of connections ended and the count
held still, never during the fall nor under steady load."""

from __future__ import annotations

import trio
from meshagent.agent.proxy import trim


async def test_a_trim_comes_once_the_burst_is_over_and_never_under_steady_load(
    autojump_clock, monkeypatch
):
    trims: list[int] = []
    count = [0]
    monkeypatch.setattr(trim, "malloc_trim", lambda: trims.append(count[0]) or True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trim.trim_after_bursts, lambda: count[0])
        count[0] = 100
        await trio.sleep(30)  # steady load: nothing to give back
        assert trims == []
        count[0] = 5000  # a burst
        await trio.sleep(5)
        for left in (4000, 2000, 900, 300):  # it ends, the pool closing what it left in steps
            count[0] = left
            await trio.sleep(2)
        assert trims == []  # not during the fall
        count[0] = 64
        await trio.sleep(trim.SETTLE + 2 * trim.INTERVAL)
        assert trims == [64]  # once it held still
        await trio.sleep(60)
        assert trims == [64]  # and not again without another burst
        nursery.cancel_scope.cancel()


def test_malloc_trim_runs_here():
    assert trim.malloc_trim() in (True, False)  # glibc: it ran; elsewhere: a no-op
