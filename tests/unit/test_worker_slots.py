"""agent/workers/pool.py: a replaced worker stays visible in its slot until it has exited.

`meshagent status` and the memory watch read a slot's processes (`current` and `retiring`);
a worker being replaced must be in one of them at every scheduler step, or a status read
shows it gone before it has drained and the memory watch may replace another meanwhile."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import trio
import trio.testing
from meshagent.agent.workers.pool import WorkerPool, _Worker


def test_a_replaced_worker_is_in_its_slot_from_the_step_it_is_replaced_until_it_exits():
    seen: list[tuple[str, list[int]]] = []
    pids = itertools.count(101)

    async def main() -> None:
        pool = WorkerPool.__new__(WorkerPool)  # the slot's supervision alone
        pool.stopping = False
        slot = _Worker(0)

        async def spawn(index: int) -> SimpleNamespace:
            return SimpleNamespace(process=SimpleNamespace(pid=next(pids)))

        async def run_once(w: _Worker, p, launched) -> None:
            seen.append(("run", [q.pid for q in w.processes]))
            await trio.sleep_forever()

        async def retire(w: _Worker, old, new) -> None:
            seen.append(("retire", [q.pid for q in w.processes]))
            try:
                await trio.sleep_forever()
            finally:
                if old in w.retiring:
                    w.retiring.remove(old)

        pool._spawn, pool._run_once, pool._retire = spawn, run_once, retire
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool._supervise, slot)
            await trio.testing.wait_all_tasks_blocked()
            slot.recycle.set()  # replace pid 101 by 102
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert seen[0] == ("run", [101])
    assert sorted(seen[1:]) == [("retire", [102, 101]), ("run", [102, 101])]
