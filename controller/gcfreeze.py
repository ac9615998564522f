"""Keeps the controller's garbage collections short while it holds a large cluster.

CPython's full collection walks every container object the process holds; at 1,000 nodes x
30 pods (the model's pod dicts, their compiled workloads, a snapshot per node) that is
~0.15 s at 12,000 pods and over 0.5 s at 30,000, and under churn (a version per push round,
each leaving per-node snapshots behind in the sessions) one ran about once a second, each a
stall of the whole event loop (benchmarks.push_latency reports the pauses). Objects that
have lived through a publish are moved out of the collector's reach (`gc.freeze`) once
enough of them piled up: a full collection then walks only what came since. Frozen objects
are still freed by reference counting when the model drops them (pods, workloads and
snapshots hold no reference cycles); only a frozen object that later dies in a cycle is
never reclaimed, so each freeze is preceded by a collection, which by then has little to
walk.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

# Long-lived objects the collector may walk before they are frozen: a full collection of
# this many costs a few milliseconds.
FREEZE_AT = 50_000
# The young generation keeps CPython's threshold (700): raised to 20,000 it spared the loop
# most young collections at 400 agents, but at 1,000 agents x 30 pods each walked so much
# that they took 7-8 s of a 60 s churn run (p99 4.8-8.6 s, against 0.68 s at 700).

# Publishes between two looks at the oldest generation's size (counting it walks a list).
LOOK_EVERY = 8


class HeapKeeper:
    """`after_publish()` after each published version (the first freezes the initial
    load)."""

    def __init__(self, freeze_at: int = FREEZE_AT, look_every: int = LOOK_EVERY) -> None:
        self.freeze_at = freeze_at
        self.look_every = look_every
        self.freezes = 0
        self._publishes = 0

    def after_publish(self) -> bool:
        """Freeze the long-lived objects if enough piled up; returns whether it did."""
        self._publishes += 1
        if self._publishes > 1 and self._publishes % self.look_every:
            return False
        if len(gc.get_objects(generation=2)) < self.freeze_at:
            return False
        began = time.perf_counter()
        gc.collect()
        gc.freeze()
        self.freezes += 1
        log.debug(
            "froze %d long-lived objects in %.3f s",
            gc.get_freeze_count(),
            time.perf_counter() - began,
        )
        return True
