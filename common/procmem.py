"""A process's memory as the kernel accounts it: RSS, PSS and USS from /proc/<pid>/smaps_rollup.

Why not RSS alone: the agent, its workers' fork server and the workers are forks of one
another (agent/workers/launch.py), so most of their pages are the same physical pages,
shared copy-on-write. RSS counts such a page in every process that maps it; summed over the
processes it counts the shared pages once per process. PSS (proportional set size) splits
each page between the processes that map it, so PSS adds up over processes to what they
hold together; USS (private pages: Private_Clean + Private_Dirty) is what the process alone
holds, what ending it would give back.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["Memory", "memory_report", "parse_smaps_rollup", "read_memory"]


class Memory(NamedTuple):
    """Bytes: resident, proportional, unique (private)."""

    rss: int
    pss: int
    uss: int


_FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty")


def parse_smaps_rollup(text: str) -> Memory:
    """The figures of the text of /proc/<pid>/smaps_rollup (lines ``Name:  <n> kB``); a
    kernel thread's (no mapping: no lines) are zeros."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep or name not in _FIELDS:
            continue
        value, _, unit = rest.strip().partition(" ")
        if unit.strip() != "kB":
            raise ValueError(f"smaps_rollup: {name} in unexpected unit {unit.strip()!r}")
        found[name] = int(value) * 1024
    if found and len(found) != len(_FIELDS):
        missing = ", ".join(f for f in _FIELDS if f not in found)
        raise ValueError(f"smaps_rollup: no {missing} line")
    return Memory(
        rss=found.get("Rss", 0),
        pss=found.get("Pss", 0),
        uss=found.get("Private_Clean", 0) + found.get("Private_Dirty", 0),
    )


def read_memory(pid: int, proc: Path = Path("/proc")) -> Memory:
    """The figures of ``pid``; raises OSError once it is gone (or another user's, unprivileged)."""
    return parse_smaps_rollup((proc / str(pid) / "smaps_rollup").read_text())


def memory_report(processes: Iterable[tuple[str, int]]) -> list[dict[str, Any]]:
    """``role``, ``pid``, ``rss_bytes``, ``pss_bytes``, ``uss_bytes`` of each (role, pid), in
    order; one gone (or unreadable) meanwhile is left out."""
    out = []
    for role, pid in processes:
        try:
            memory = read_memory(pid)
        except (OSError, ValueError):
            continue
        out.append(
            {
                "role": role,
                "pid": pid,
                "rss_bytes": memory.rss,
                "pss_bytes": memory.pss,
                "uss_bytes": memory.uss,
            }
        )
    return out
