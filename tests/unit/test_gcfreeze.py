"""HeapKeeper: long-lived objects move out of the collector's reach once enough piled up, so
a full collection walks only what came since (controller/gcfreeze.py)."""

from __future__ import annotations

import gc

import pytest
from meshagent.controller.gcfreeze import HeapKeeper


@pytest.fixture
def unfrozen():
    """The test process's collector as it was: whatever a test froze is walked again, at
    the thresholds it had."""
    thresholds = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_a_publish_freezes_the_long_lived_objects_once_enough_piled_up(unfrozen) -> None:
    gc.collect()  # what lives now is in the oldest generation
    keeper = HeapKeeper(freeze_at=len(gc.get_objects(generation=2)) + 10_000, look_every=3)
    assert not keeper.after_publish()  # the first publish looks: too few yet
    kept = [[i] for i in range(20_000)]  # a cluster's worth of long-lived containers
    gc.collect()
    assert not keeper.after_publish()  # the second publish does not look
    assert keeper.after_publish()  # the third looks and freezes
    assert gc.get_freeze_count() >= len(kept)
    assert len(gc.get_objects(generation=2)) < 1_000  # a full collection walks little now
    assert keeper.freezes == 1
    # the sixth publish looks again: nothing new piled up since
    assert not any(keeper.after_publish() for _ in range(3))
    del kept


def test_frozen_objects_are_still_freed_when_dropped(unfrozen) -> None:
    keeper = HeapKeeper(freeze_at=0)
    kept = [[i] for i in range(1_000)]
    assert keeper.after_publish()
    frozen = gc.get_freeze_count()
    del kept  # no cycle: reference counting frees them, frozen or not
    assert gc.get_freeze_count() <= frozen - 1_000
