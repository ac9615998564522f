"""CPU, memory and descriptors of the agent and of each proxy worker process, read at scrape time.

What flows through: at each scrape the agent's `WorkerProcesses` callable names the processes
that proxy on this node (``agent``: the agent itself, which is the proxy when it runs no
workers; ``0``, ``1``, ...: the worker processes by index) with their pids; this collector reads
``/proc/<pid>/stat`` and ``/proc/<pid>/fd`` of each and yields three families labelled by
``worker``:

- ``meshagent_process_cpu_seconds_total``: user plus system CPU time (a counter: it starts
  again from 0 when a worker is restarted, which ``rate()`` takes as a counter reset);
- ``meshagent_process_resident_memory_bytes``;
- ``meshagent_process_open_fds``.

prometheus_client's own ``process_*`` figures cover only the process serving the scrape (the
agent): in multiprocess mode a worker's ``process_*`` are never written to its files, hence
these. A process that is gone between the listing and the read is left out of that scrape.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

__all__ = ["ProcessCollector", "ProcessFigures", "read_process", "seconds_since_start"]

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

WorkerProcesses = Callable[[], Mapping[str, int]]  # worker label -> pid


class ProcessFigures(NamedTuple):
    cpu_seconds: float
    resident_bytes: int
    open_fds: int


def _stat_fields(pid: int | str, proc: Path) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on: fields[0] is field 3."""
    stat = (proc / str(pid) / "stat").read_text()
    # comm (field 2) may hold spaces and parentheses: fields after its last ")" are fixed.
    return stat[stat.rindex(")") + 2 :].split()


def seconds_since_start(pid: int | str = "self", proc: Path = Path("/proc")) -> float:
    """How long ago the kernel started `pid` (its fork, before the interpreter and imports),
    on the boot clock /proc counts in; raises OSError if it is gone."""
    started = int(_stat_fields(pid, proc)[19]) / _TICKS
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started


def read_process(pid: int, proc: Path = Path("/proc")) -> ProcessFigures:
    """The figures of `pid`; raises OSError if it is gone (or not readable)."""
    fields = _stat_fields(pid, proc)
    utime, stime, rss_pages = int(fields[11]), int(fields[12]), int(fields[21])
    fds = sum(1 for _ in os.scandir(proc / str(pid) / "fd"))
    return ProcessFigures((utime + stime) / _TICKS, rss_pages * _PAGE, fds)


class ProcessCollector:
    """A prometheus_client collector for the processes `processes` names (module doc)."""

    def __init__(self, processes: WorkerProcesses, proc: Path = Path("/proc")) -> None:
        self._processes = processes
        self._proc = proc

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        cpu = CounterMetricFamily(
            "meshagent_process_cpu_seconds",
            "User and system CPU time of the agent and of each proxy worker process.",
            labels=("worker",),
        )
        rss = GaugeMetricFamily(
            "meshagent_process_resident_memory_bytes",
            "Resident memory of the agent and of each proxy worker process.",
            labels=("worker",),
        )
        fds = GaugeMetricFamily(
            "meshagent_process_open_fds",
            "Open file descriptors (connections among them) of the agent and of each proxy"
            " worker process.",
            labels=("worker",),
        )
        try:
            processes = dict(self._processes())
        except Exception as exc:  # the rest of the page stays
            log.warning("cannot list proxy processes: %s", exc)
            return []
        for worker, pid in sorted(processes.items()):
            try:
                figures = read_process(pid, self._proc)
            except (OSError, ValueError, IndexError):
                continue  # gone since it was listed
            cpu.add_metric((worker,), figures.cpu_seconds)
            rss.add_metric((worker,), figures.resident_bytes)
            fds.add_metric((worker,), figures.open_fds)
        return [cpu, rss, fds]
