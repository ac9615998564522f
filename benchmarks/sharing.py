"""Where a node's memory is: its agent's processes' anonymous pages by who shares them.

The agent, its workers' fork server and the workers are forks of one another (agent/workers/
launch.py): a page of the heap is one physical page for every process that has not written to
it since the fork, and a private copy in each that has. PSS splits the shared pages evenly, so
it says how much a node holds but not why. This reads each process's page map
(/proc/<pid>/pagemap: the physical frame behind each virtual page; root only) and groups the
frames of the anonymous mappings (the heap, anonymous maps, the stack) by the set of processes
that map them:

    agent | fork server + worker 0 + worker 1   the agent wrote to the page (its own copy);
                                                 the other three still share the original
    fork server                                  an original only the fork server keeps: every
                                                 process forked from it wrote to that page

``python -m benchmarks.sharing CGROUP`` (a node agent's cgroup, e.g.
/sys/fs/cgroup/unified/meshlab_mem/system/agent-node-1) or ``--node node-1`` (the running lab
of ``$MESHLAB_INSTANCE``); ``--json`` for scripts. Each row is a set of processes sharing
frames, and the MiB of frames they share; the node's anonymous memory is their sum (each frame
counted once). What the figures found is in benchmarks/README.md (issue 18, the node proxies'
memory).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from benchmarks import procstat

PAGE = 4096
_PRESENT = 1 << 63
_PFN_MASK = (1 << 55) - 1
# mappings whose pages are anonymous (copy-on-write between the forks); file-backed pages are
# shared with every process on the machine that maps the file and are left out
ANONYMOUS = ("", "[heap]", "[stack]")
ROLE_NAMES = {"main": "agent", "fork server": "fork server", "workers": "worker"}


def anonymous_ranges(maps: str) -> list[tuple[int, int]]:
    """(start, end) of the anonymous mappings in the text of /proc/<pid>/maps."""
    out = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        path = fields[5].strip() if len(fields) > 5 else ""
        if path in ANONYMOUS:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end))
    return out


def frames_of(entries: bytes, first_page: int) -> dict[int, int]:
    """{virtual page: physical frame} of the present pages in pagemap ``entries`` (8 bytes a
    page) read from ``first_page`` on."""
    out = {}
    for index, (entry,) in enumerate(struct.iter_unpack("<Q", entries)):
        if entry & _PRESENT:
            out[first_page + index] = entry & _PFN_MASK
    return out


def read_frames(pid: int) -> dict[int, int]:
    """{virtual page: physical frame} of a process's present anonymous pages (root: others
    read the frames as 0)."""
    out: dict[int, int] = {}
    ranges = anonymous_ranges(Path(f"/proc/{pid}/maps").read_text())
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for start, end in ranges:
            pagemap.seek(start // PAGE * 8)
            out.update(frames_of(pagemap.read((end - start) // PAGE * 8), start // PAGE))
    return out


def sharing(frames: Mapping[str, Mapping[int, int]]) -> Counter[tuple[str, ...]]:
    """Pages per set of processes sharing them: {name: {virtual page: frame}} of one process
    tree -> {(names sharing a frame, sorted): frames}. A frame mapped at several virtual pages
    of one process (rare) counts once."""
    holders: dict[int, set[str]] = {}
    for name, pages in frames.items():
        for frame in pages.values():
            holders.setdefault(frame, set()).add(name)
    return Counter(tuple(sorted(names)) for names in holders.values())


def named_roles(parents: Mapping[int, int]) -> dict[int, str]:
    """A readable name per pid of one node agent's cgroup: agent, fork server, worker 0, ..."""
    names = {}
    workers = 0
    for pid, role in sorted(procstat.roles(dict(parents)).items()):
        name = ROLE_NAMES[role]
        if role == "workers":
            name, workers = f"worker {workers}", workers + 1
        names[pid] = name
    return names


def report(groups: Counter[tuple[str, ...]], names: Iterable[str]) -> dict:
    """MiB per set of sharers, largest first; per process its own (unshared) frames and its
    proportional share; the node's total (each frame once)."""
    mib = PAGE / 2**20
    names = list(names)
    own = {name: groups.get((name,), 0) * mib for name in names}
    proportional = dict.fromkeys(names, 0.0)
    for sharers, count in groups.items():
        for name in sharers:
            proportional[name] += count * mib / len(sharers)
    return {
        "total_mib": round(sum(groups.values()) * mib, 1),
        "groups": [
            {"shared_by": list(sharers), "mib": round(count * mib, 1)}
            for sharers, count in groups.most_common()
        ],
        "processes": {
            name: {"own_mib": round(own[name], 1), "proportional_mib": round(proportional[name], 1)}
            for name in names
        },
    }


def node_cgroup(node: str) -> Path:
    from lab import cgroups

    return cgroups.system_cgroup(f"agent-{node}")


def measure(cgroup: Path) -> dict:
    parents = {}
    for pid in procstat.cgroup_pids(cgroup):
        try:
            parents[pid] = procstat.parent_pid(pid)
        except (OSError, ValueError):
            continue
    names = named_roles(parents)
    frames = {}
    for pid, name in names.items():
        try:
            frames[name] = read_frames(pid)
        except OSError:
            continue  # it ended in between
    out = report(sharing(frames), frames)
    out["pids"] = {name: pid for pid, name in names.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sharing",
        description="A node agent's anonymous memory by the processes that share each page.",
        epilog="Examples: python -m benchmarks.sharing --node node-1 | "
        "python -m benchmarks.sharing /sys/fs/cgroup/unified/meshlab_mem/system/agent-node-1",
    )
    parser.add_argument("cgroup", nargs="?", type=Path, help="the node agent's cgroup")
    parser.add_argument("--node", help="a node of the running lab ($MESHLAB_INSTANCE)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if (args.cgroup is None) == (args.node is None):
        parser.error("give a cgroup or --node")
    out = measure(args.cgroup if args.cgroup is not None else node_cgroup(args.node))
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"anonymous memory, each page once: {out['total_mib']} MiB")
    for group in out["groups"]:
        if group["mib"] >= 0.1:
            print(f"  {group['mib']:6.1f} MiB  {' + '.join(group['shared_by'])}")
    for name, figures in out["processes"].items():
        print(
            f"  {name:12} own {figures['own_mib']:5.1f} MiB, "
            f"proportional {figures['proportional_mib']:5.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
