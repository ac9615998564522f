"""common/heap.py's fill_heap_holes: before a fork, the heap's free chunks are taken so that the
fork's allocations go to fresh pages instead of copying pages it shares with its parent. Run in
a child interpreter on glibc's malloc (PYTHONMALLOC=malloc, as the agent and its workers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from meshagent.agent.workers import launch

HOLES = """
import json
from meshagent.common import heap
keep = [bytes(100) for _ in range(20000)]
del keep[::2]  # 10,000 free chunks scattered between live ones
before = heap._free_below_top()
taken = heap.fill_heap_holes()
print(json.dumps({"before": before, "taken": taken, "after": heap._free_below_top()}))
"""


def test_the_free_chunks_below_the_top_are_taken():
    env = {**os.environ, **launch.WORKER_ALLOCATOR}
    out = subprocess.run(
        [sys.executable, "-c", HOLES], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["before"] > 10_000 * 100  # the holes are there
    assert seen["taken"] >= seen["before"] * 0.9
    assert seen["after"] < 64 * 1024  # what is left: free chunks no 24-byte request takes
