"""CPU time and memory of the proxies under test, read from /proc: the processes of a cgroup
(the lab puts each node agent and each pod in its own) in, CPU seconds and resident bytes out.

CPU comes from /proc/<pid>/stat (utime + stime: every thread of the process); memory from
/proc/<pid>/smaps_rollup (meshagent.common.procmem): RSS and PSS. The node agent's fork server
and workers are forks of the agent and share most of their pages with it, copy-on-write: RSS
summed over the processes counts each shared page once per process, PSS splits it between
them, so the sum of PSS is what the processes hold together (the honest figure; RSS is kept
beside it). Processes that end between two samples drop out of the sum, so a proxy that forks
short-lived workers would be under-counted; the node agent and HAProxy do not.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from meshagent.common.procmem import Memory, parse_smaps_rollup, read_memory

__all__ = [
    "CLOCK_TICKS",
    "ROLES",
    "Memory",
    "Sample",
    "cgroup_pids",
    "memory_by_role",
    "parent_pid",
    "parse_smaps_rollup",
    "parse_stat_cpu_ticks",
    "parse_stat_ppid",
    "parse_status_rss",
    "roles",
    "sample",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_stat_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/<pid>/stat. The command name (field 2)
    may hold spaces and parentheses, so fields are counted after its last ')'."""
    _, sep, rest = stat.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 13:
        raise ValueError(f"not a /proc/<pid>/stat line: {stat[:80]!r}")
    # after the name: state(3) ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    # cmajflt utime(14) stime(15)
    return int(fields[11]) + int(fields[12])


def parse_stat_ppid(stat: str) -> int:
    """The parent's pid from the text of /proc/<pid>/stat."""
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 2:
        raise ValueError(f"not a /proc/<pid>/stat line: {stat[:80]!r}")
    return int(fields[1])


def parent_pid(pid: int) -> int:
    return parse_stat_ppid(Path(f"/proc/{pid}/stat").read_text())


def parse_status_rss(status: str) -> int:
    """VmRSS in bytes from the text of /proc/<pid>/status (0 for a kernel thread or zombie)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"VmRSS in unexpected unit {unit!r}")
            return int(value) * 1024
    return 0


def cgroup_pids(cgroup: Path) -> list[int]:
    """Every process in a cgroup and the cgroups below it."""
    out: list[int] = []
    for folder, _dirs, _files in os.walk(cgroup):
        try:
            out.extend(int(p) for p in Path(folder, "cgroup.procs").read_text().split())
        except OSError:
            continue
    return out


@dataclass(frozen=True)
class Sample:
    cpu_s: float
    rss_bytes: int
    pids: int
    pss_bytes: int = 0


def sample(cgroups: Iterable[Path]) -> Sample:
    """CPU seconds used so far and memory now (RSS and PSS), summed over the cgroups'
    processes."""
    ticks = rss = pss = count = 0
    for cgroup in cgroups:
        for pid in cgroup_pids(cgroup):
            try:
                ticks += parse_stat_cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
                memory = read_memory(pid)
            except (OSError, ValueError):
                continue  # it ended in between
            rss, pss, count = rss + memory.rss, pss + memory.pss, count + 1
    return Sample(cpu_s=ticks / CLOCK_TICKS, rss_bytes=rss, pids=count, pss_bytes=pss)


# A proxy's processes by their place in its process tree: the one whose parent is outside the
# cgroup (the node agent; HAProxy's master), one with a parent and children inside (the agent's
# workers' fork server), and the leaves below (proxy workers; HAProxy's workers).
ROLES = ("main", "fork server", "workers")


def roles(parents: dict[int, int]) -> dict[int, str]:
    """Each pid's role (`ROLES`) from {pid: parent pid} of one cgroup's processes."""
    with_children = set(parents.values())
    out = {}
    for pid, ppid in parents.items():
        if ppid not in parents:
            out[pid] = "main"
        else:
            out[pid] = "fork server" if pid in with_children else "workers"
    return out


def memory_by_role(cgroup: Path) -> dict[str, Memory]:
    """RSS, PSS and USS summed per role (`ROLES`; absent roles are zeros) over a cgroup's
    processes: for a node agent, the agent / its fork server / its workers."""
    parents = {}
    for pid in cgroup_pids(cgroup):
        try:
            parents[pid] = parent_pid(pid)
        except (OSError, ValueError):
            continue
    totals = {role: Memory(0, 0, 0) for role in ROLES}
    for pid, role in roles(parents).items():
        try:
            memory = read_memory(pid)
        except (OSError, ValueError):
            continue
        totals[role] = Memory(*(a + b for a, b in zip(totals[role], memory, strict=True)))
    return totals
