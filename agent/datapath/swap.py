"""Make-before-break replacement of a pinned, attached datapath by a newly built one.

Detaching the old programs before attaching new ones would leave the node's connects
unsteered for as long as that takes: a `fail-mode: closed` pod would reach its
destination straight, past mTLS and policy. So a new build is pinned under a staging
folder (``<pin_dir>/staging``, inside the pin folder so whatever removes the pin folder
removes it too), its maps are filled from the previous maps wherever their layout is the
same (pod membership and fail modes, heartbeat, ports, peer authentication, in-flight
connects, counters) before any of its programs is attached, then each hook's old program
is swapped for the new one in one step (BPF_F_REPLACE), so every hook has exactly one of
our programs attached at every instant. Last, the staged pins take the live names and the
previous pins and key go.

A crash part-way leaves every hook with one working program (old or new) and a pin folder
whose key is not the new one (or no key), so the next start builds again: it counts the
programs pinned in the staging folder as its own too, swaps them out in place as well, and
removes the stale staging folder (`loader.build`).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshagent.agent.datapath import bpfsys
from meshagent.agent.datapath.maps import possible_cpus

log = logging.getLogger(__name__)

STAGING_DIR = "staging"
_PERCPU_MAP_TYPES = {5, 6, 10}  # BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH


def staging_dir(pin_dir: Path) -> Path:
    """Where a build is pinned until it is attached (module doc)."""
    return pin_dir / STAGING_DIR


@dataclass(frozen=True)
class HookPlan:
    """What to do at one attach point: swap ``replace`` for the new program in place (None:
    nothing of ours is attached there, attach afresh), then detach ``detach`` (extra
    programs of ours, left attached by a crash in the middle of an earlier swap)."""

    replace: int | None
    detach: tuple[int, ...] = ()


def plan_hook(attached: Sequence[int], ours: Collection[int]) -> HookPlan:
    """The plan for a hook whose attached program ids are ``attached`` (the kernel's order)
    when ``ours`` are the ids of our pinned programs (live and staged). Programs that are
    not ours (another tool's) are left alone."""
    mine = [prog_id for prog_id in attached if prog_id in ours]
    return HookPlan(mine[0] if mine else None, tuple(mine[1:]))


def leftover_entries(present: Iterable[str], new_names: Collection[str], key_dir: str) -> list[str]:
    """The entries of the pin folder to remove once the staged pins took their names: every
    one that is not part of the new build (the old key folder, pins of an older layout),
    sorted; the staging folder goes on its own (last)."""
    keep = {*new_names, key_dir, STAGING_DIR}
    return sorted(name for name in present if name not in keep)


def attach_in_place(cgroup_fd: int, attach_type: int, prog_fd: int, ours: Collection[int]) -> None:
    """Attach ``prog_fd`` at one hook: in place of our program there if any (one step),
    else afresh; then detach any extra program of ours."""
    plan = plan_hook(bpfsys.prog_query(cgroup_fd, attach_type), ours)
    if plan.replace is None:
        bpfsys.prog_attach(prog_fd, cgroup_fd, attach_type)
    else:
        old_fd = bpfsys.prog_fd_by_id(plan.replace)
        try:
            bpfsys.prog_replace(prog_fd, cgroup_fd, attach_type, old_fd)
        finally:
            os.close(old_fd)
    for prog_id in plan.detach:
        fd = bpfsys.prog_fd_by_id(prog_id)
        try:
            bpfsys.prog_detach(fd, cgroup_fd, attach_type)
        finally:
            os.close(fd)


def _value_buffer_size(info: bpfsys.MapInfo) -> int:
    if info.type in _PERCPU_MAP_TYPES:
        return (info.value_size + 7) // 8 * 8 * possible_cpus()
    return info.value_size


def copy_map(old_path: Path, new_fd: int) -> int | None:
    """Copy every entry of the map pinned at ``old_path`` into ``new_fd``; the number
    copied, or None when there is no old map or its layout differs (the new map then starts
    empty and the agent fills it from its own state)."""
    try:
        old_fd = bpfsys.obj_get(str(old_path))
    except OSError:
        return None
    try:
        old, new = bpfsys.map_info(old_fd), bpfsys.map_info(new_fd)
        if not old.same_layout(new):
            log.info("datapath: %s changed layout; the new one starts empty", old_path.name)
            return None
        key_type = ctypes.c_uint8 * old.key_size
        value = (ctypes.c_uint8 * _value_buffer_size(old))()
        copied, key = 0, None
        while True:
            nxt = key_type()
            if not bpfsys.map_next_key(old_fd, key, nxt):
                return copied
            key = nxt
            if not bpfsys.map_lookup(old_fd, nxt, value):
                continue  # gone meanwhile
            try:
                bpfsys.map_update(new_fd, nxt, value)
            except bpfsys.BpfError as exc:
                if exc.errno in (errno.E2BIG, errno.ENOSPC):
                    log.warning(
                        "datapath: the new %s is full after %d entries", old_path.name, copied
                    )
                    return copied
                raise
            copied += 1
    finally:
        os.close(old_fd)


def promote(pin_dir: Path, new_names: Collection[str], key_dir: str) -> None:
    """The staged pins take the live names (each rename replaces the old pin in one step),
    the previous build's other entries and key go, the new key is written, the staging
    folder is removed."""
    staging = staging_dir(pin_dir)
    for name in new_names:
        os.replace(staging / name, pin_dir / name)
    for name in leftover_entries(os.listdir(pin_dir), new_names, key_dir):
        path = pin_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    (pin_dir / key_dir).mkdir(exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
