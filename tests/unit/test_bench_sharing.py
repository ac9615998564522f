"""benchmarks/sharing.py: a node agent's anonymous pages grouped by the processes sharing them."""

from __future__ import annotations

import struct

from benchmarks import sharing

MAPS = """\
55d0c0a00000-55d0c0a02000 r--p 00000000 08:01 131 /usr/bin/python3.11
55d0c1000000-55d0c1003000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000001000 rw-p 00000000 00:00 0
7f0000100000-7f0000101000 rw-p 00001000 08:01 77 /usr/lib/libc.so.6
7ffd00000000-7ffd00002000 rw-p 00000000 00:00 0                          [stack]
7ffd10000000-7ffd10001000 r--p 00000000 00:00 0                          [vvar]
"""


def test_anonymous_mappings_are_the_heap_anonymous_maps_and_the_stack():
    assert sharing.anonymous_ranges(MAPS) == [
        (0x55D0C1000000, 0x55D0C1003000),
        (0x7F0000000000, 0x7F0000001000),
        (0x7FFD00000000, 0x7FFD00002000),
    ]


def test_frames_of_present_pages_only():
    present = 1 << 63
    entries = struct.pack("<3Q", present | 7, 0, present | (1 << 62) | 9)  # swapped bit set too
    assert sharing.frames_of(entries, 100) == {100: 7, 102: 9}


def test_pages_grouped_by_who_shares_each_frame():
    """The agent copied page 1, both workers copied page 2 (the fork server keeps its
    original alone), page 3 is shared by all, page 4 is a worker's own."""
    frames = {
        "agent": {1: 11, 2: 20, 3: 30},
        "fork server": {1: 10, 2: 20, 3: 30},
        "worker 0": {1: 10, 2: 21, 3: 30, 4: 40},
        "worker 1": {1: 10, 2: 22, 3: 30},
    }
    groups = sharing.sharing(frames)
    assert groups == {
        ("agent",): 1,
        ("fork server", "worker 0", "worker 1"): 1,
        ("agent", "fork server"): 1,
        ("worker 0",): 2,
        ("worker 1",): 1,
        ("agent", "fork server", "worker 0", "worker 1"): 1,
    }
    out = sharing.report(groups, frames)
    mib = 4096 / 2**20
    assert out["total_mib"] == round(7 * mib, 1)
    assert out["processes"]["worker 0"]["own_mib"] == round(2 * mib, 1)
    # the proportional shares add up to the total: each frame counted once
    total = sum(p["proportional_mib"] for p in out["processes"].values())
    assert abs(total - 7 * mib) < 0.2


def test_roles_named_from_the_process_tree():
    # the agent (its parent outside the cgroup), its fork server, two workers
    parents = {100: 1, 200: 100, 301: 200, 302: 200}
    assert sharing.named_roles(parents) == {
        100: "agent",
        200: "fork server",
        301: "worker 0",
        302: "worker 1",
    }
