"""The pure decisions of the make-before-break datapath swap (agent/datapath/swap.py)."""

from __future__ import annotations

from pathlib import Path

from meshagent.agent.datapath import swap
from meshagent.agent.datapath.bpfsys import MapInfo


def test_staging_folder_is_inside_the_pin_folder():
    """Whatever removes the pin folder (uninstall, `meshlab down`) removes a staged build."""
    pin_dir = Path("/sys/fs/bpf/meshagent/node-1")
    assert swap.staging_dir(pin_dir) == pin_dir / "staging"
    assert swap.staging_dir(pin_dir).parent == pin_dir


def test_our_attached_program_is_replaced_in_place():
    assert swap.plan_hook([7], {7}) == swap.HookPlan(replace=7)


def test_nothing_of_ours_attached_means_attach_afresh_and_leave_others_alone():
    assert swap.plan_hook([], {7}) == swap.HookPlan(replace=None)
    assert swap.plan_hook([3, 4], {7}) == swap.HookPlan(replace=None)  # another tool's
    assert swap.plan_hook([3, 4], set()) == swap.HookPlan(replace=None)


def test_a_swap_cut_short_leaves_two_of_ours_one_is_replaced_the_other_detached():
    """Live pin 7 and staged pin 9 both attached (a crash): one swapped, the other detached;
    program 3 (not ours) untouched."""
    assert swap.plan_hook([3, 7, 9], {7, 9}) == swap.HookPlan(replace=7, detach=(9,))


def test_leftovers_after_promotion_are_the_old_key_and_pins_of_an_older_layout():
    present = ["prog_a", "mesh_netns", "key-old", "key-new", "staging", "gone_map"]
    assert swap.leftover_entries(present, ["prog_a", "mesh_netns"], "key-new") == [
        "gone_map",
        "key-old",
    ]
    assert swap.leftover_entries(["prog_a", "key-new"], ["prog_a"], "key-new") == []


def test_maps_are_copied_only_when_key_and_value_layout_match():
    hash_map = MapInfo(id=1, type=1, key_size=8, value_size=20, max_entries=1024)
    bigger = MapInfo(id=2, type=1, key_size=8, value_size=20, max_entries=4096)
    grown = MapInfo(id=3, type=1, key_size=8, value_size=24, max_entries=1024)
    lru = MapInfo(id=4, type=9, key_size=8, value_size=20, max_entries=1024)
    assert hash_map.same_layout(bigger)
    assert not hash_map.same_layout(grown)
    assert not hash_map.same_layout(lru)
