"""The lab's cgroup-v2 subtree: one folder per node (where the agent attaches its
programs) with a folder per pod, and a `system` folder for the lab's own daemons.

Every process the lab starts joins a folder here before it execs, so killing
the subtree (cgroup.kill) ends all of them, also after the lab itself crashed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from meshagent.lab.paths import lab_cgroup


def node_cgroup(node: str) -> Path:
    return lab_cgroup() / node


def pod_cgroup(node: str, namespace: str, name: str) -> Path:
    return node_cgroup(node) / f"pod-{namespace}-{name}"


def system_cgroup(name: str) -> Path:
    return lab_cgroup() / "system" / name


def create(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def joiner(path: Path) -> Callable[[], None]:
    """A preexec_fn that moves the child into `path` before it execs anything."""
    procs = str(path / "cgroup.procs")

    def join() -> None:
        with open(procs, "w") as f:
            f.write("0")

    return join


def pids(path: Path) -> list[int]:
    out: list[int] = []
    if not path.exists():
        return out
    for folder, _dirs, _files in os.walk(path):
        try:
            out.extend(int(p) for p in Path(folder, "cgroup.procs").read_text().split())
        except OSError:
            continue
    return out


def populated(path: Path) -> bool:
    """Whether any process (live, or exited but not yet reaped) is still in the subtree."""
    try:
        events = (path / "cgroup.events").read_text()
    except OSError:
        return False
    return "populated 1" in events


def kill_tree(path: Path, timeout: float = 15.0) -> None:
    """Kill every process under `path` (cgroup.kill) and wait until the subtree is empty.
    Processes whose parent has already exited are reaped by the machine's init, which may
    take a moment, so this waits on `cgroup.events` rather than on the process list."""
    if not path.exists():
        return
    deadline = time.monotonic() + timeout
    while populated(path) and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            (path / "cgroup.kill").write_text("1")
        time.sleep(0.1)


def remove_tree(path: Path, timeout: float = 10.0) -> None:
    """rmdir the subtree bottom-up (cgroup folders hold no files of ours), retrying while a
    folder is still busy."""
    deadline = time.monotonic() + timeout
    while path.exists():
        for folder, _dirs, _files in os.walk(path, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if not path.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.1)
