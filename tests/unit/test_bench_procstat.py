"""benchmarks/procstat.py: CPU and memory of a cgroup's processes, read from /proc."""

from __future__ import annotations

import os

import pytest

from benchmarks import procstat

# a command name with a space and a parenthesis, as /proc shows it
STAT = (
    "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 1180 0 0 0 250 130 0 0 20 0 3 0 "
    "1234 100000000 5000 18446744073709551615"
)


def test_stat_cpu_ticks_counted_after_the_name():
    assert procstat.parse_stat_cpu_ticks(STAT) == 250 + 130
    assert procstat.parse_stat_ppid(STAT) == 1


def test_stat_that_is_not_one():
    with pytest.raises(ValueError, match="not a /proc"):
        procstat.parse_stat_cpu_ticks("garbage")


def test_status_rss_in_bytes():
    status = "Name:\thaproxy\nVmPeak:\t  200000 kB\nVmRSS:\t   17360 kB\nThreads:\t3\n"
    assert procstat.parse_status_rss(status) == 17360 * 1024
    assert procstat.parse_status_rss("Name:\tkthreadd\n") == 0


def test_sample_sums_the_processes_of_a_cgroup_tree(tmp_path):
    """A fake cgroup folder listing this test's own process (twice, in two levels)."""
    (tmp_path / "cgroup.procs").write_text(f"{os.getpid()}\n")
    (tmp_path / "child").mkdir()
    (tmp_path / "child" / "cgroup.procs").write_text(f"{os.getpid()}\n999999999\n")
    sum(i * i for i in range(200_000))  # burn a little CPU
    s = procstat.sample([tmp_path])
    assert s.pids == 2  # the pid that does not exist is skipped
    assert s.cpu_s > 0
    one = procstat.sample([tmp_path / "child"])
    assert s.rss_bytes >= one.rss_bytes > 10 * 2**20  # a Python process: well over 10 MiB
