"""Starting proxy worker processes, light enough to run before the agent imports itself.

A restarted agent's time to serve is mostly Python importing: the agent's own modules, then
its workers' (each a fresh interpreter). `meshagent run` therefore starts the workers first
(`start_workers`, right after reading its config) and imports the agent while they import
theirs; `pool.WorkerPool` adopts them, and starts later ones (restarts) the same way. A worker
opens the pinned maps only once the agent has sent it its first message, that is once the
datapath is in place (a first start builds it meanwhile). This module imports nothing heavy.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_ENV = "MESHAGENT_WORKER_CONFIG"
FD_ENV = "MESHAGENT_WORKER_FD"
INDEX_ENV = "MESHAGENT_WORKER_INDEX"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's (telemetry.exposition)
# A worker allocates with libc's malloc, not CPython's small-object allocator: pymalloc returns
# an arena only when wholly empty, so a few survivors per arena keep most of what a burst took.
# Buffers of 64 KiB and more are mmapped (a fixed threshold: glibc's own grows to 32 MiB, which
# puts them in the heap among small objects that outlive them) and two arenas at most, so
# malloc_trim (agent/proxy/trim.py) gives back what a burst took. Lab, 5,000 connections held
# through a 2-worker node (tests/e2e/test_abuse_limits.py): a fresh worker 60 MiB, about 190 at
# the peak, after it 157 (pymalloc) / 84-91 (this); the HTTP/1.1 parse+answer loop (h11) costs
# 2-4 % more CPU per request. Not back within 10 % of fresh: what remains are objects that
# outlive the burst scattered over the heap's pages. jemalloc 5.3 (Debian libjemalloc2 in the
# workers' LD_PRELOAD, background purging, 1 s dirty decay) was measured against this, same lab,
# three bursts each: fresh 61-62 MiB, after a burst 73-78 (+18-26 %) against 89-96 (+46-57 %)
# here; with one arena, no thread cache and immediate purging 75-81. Closer, still not within
# 10 %, so not adopted (a new library in every worker for a partial gain). An operator's own
# environment wins (LD_PRELOAD and MALLOC_CONF included).
WORKER_ALLOCATOR = {
    "PYTHONMALLOC": "malloc",
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_ARENA_MAX": "2",
}


@dataclass
class Launched:
    """A worker process and the agent's end of its socket pair."""

    index: int
    process: subprocess.Popen
    channel: socket.socket


@dataclass
class WorkerLaunch:
    """What the pool needs to start workers, and those already started."""

    config_json: str
    metrics_dir: Path
    metrics_env: dict[str, str]
    started: dict[int, Launched] = field(default_factory=dict)

    def start(self, index: int) -> Launched:
        return launch(self.config_json, index, self.metrics_env)

    def take(self, index: int) -> Launched:
        """The worker started early for ``index`` (once), else a new one."""
        return self.started.pop(index, None) or self.start(index)

    def close(self) -> None:
        """Kill the workers started early and never taken (the agent failed before)."""
        for launched in self.started.values():
            launched.process.kill()
            launched.process.wait()
            launched.channel.close()
        self.started.clear()


def prepare_worker_metrics(parent: Path, folder: Path) -> dict[str, str]:
    """This agent's workers' metric folder (created mode 0700, or emptied: stale files would be
    summed into this run's counters), next to those of other agents on the node (a surge
    upgrade runs two); folders of agents gone are removed. Returns the workers' environment."""
    if parent.is_dir():
        for other in parent.iterdir():
            if (
                other.name.isdigit()
                and other != folder
                and not Path(f"/proc/{other.name}").exists()
            ):
                shutil.rmtree(other, ignore_errors=True)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
    return {MULTIPROC_ENV: str(folder)}


def launch(config_json: str, index: int, env: Mapping[str, str]) -> Launched:
    """``python -m meshagent.agent.workers.worker`` with its end of a new socket pair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "meshagent.agent.workers.worker"],
            env={
                **WORKER_ALLOCATOR,
                **os.environ,
                **env,
                CONFIG_ENV: config_json,
                FD_ENV: str(theirs.fileno()),
                INDEX_ENV: str(index),
            },
            pass_fds=(theirs.fileno(),),
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return Launched(index, process, ours)


def start_workers(config_json: str, count: int, metrics_parent: Path) -> WorkerLaunch | None:
    """Prepare this agent's metric folder and start its ``count`` workers (None for one: the
    agent is then the proxy itself)."""
    if count <= 1:
        return None
    folder = metrics_parent / str(os.getpid())
    plan = WorkerLaunch(config_json, folder, prepare_worker_metrics(metrics_parent, folder))
    try:
        for index in range(count):
            plan.started[index] = plan.start(index)
    except BaseException:
        plan.close()
        raise
    return plan
