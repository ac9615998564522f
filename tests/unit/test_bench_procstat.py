"""benchmarks/procstat.py: CPU and memory of a cgroup's processes, read from /proc."""

from __future__ import annotations

import os
import time

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


# /proc/<pid>/smaps_rollup of a forked worker (Linux 6.x; fields the parse does not use left in)
SMAPS_ROLLUP = """\
55d0c6b2c000-7ffd8a3f5000 ---p 00000000 00:00 0                          [rollup]
Rss:               52916 kB
Pss:               23964 kB
Pss_Dirty:         21180 kB
Pss_Anon:          20904 kB
Pss_File:           3060 kB
Pss_Shmem:             0 kB
Shared_Clean:       9896 kB
Shared_Dirty:      27276 kB
Private_Clean:       180 kB
Private_Dirty:     15564 kB
Referenced:        52916 kB
Anonymous:         42076 kB
Swap:                  0 kB
"""


def test_smaps_rollup_rss_pss_and_private_pages_in_bytes():
    memory = procstat.parse_smaps_rollup(SMAPS_ROLLUP)
    assert memory == procstat.Memory(52916 * 1024, 23964 * 1024, (180 + 15564) * 1024)
    assert procstat.parse_smaps_rollup("") == procstat.Memory(0, 0, 0)  # a kernel thread


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (SMAPS_ROLLUP.replace("Pss:               23964 kB\n", ""), "no Pss line"),
        (SMAPS_ROLLUP.replace("52916 kB", "52916 MB", 1), "unexpected unit 'MB'"),
    ],
)
def test_smaps_rollup_that_is_not_one(text, error):
    with pytest.raises(ValueError, match=error):
        procstat.parse_smaps_rollup(text)


def test_roles_by_place_in_the_process_tree():
    # the agent (parent outside), its fork server, two workers; HAProxy: master and worker
    agent = {10: 1, 11: 10, 12: 11, 13: 11}
    assert procstat.roles(agent) == {10: "main", 11: "fork server", 12: "workers", 13: "workers"}
    assert procstat.roles({20: 1, 21: 20}) == {20: "main", 21: "workers"}
    assert procstat.roles({30: 1}) == {30: "main"}  # proxy_workers: 1


def test_memory_by_role_splits_a_forked_child_from_its_parent(tmp_path):
    """This process and a fork of it in a fake cgroup: the child is a worker that shares most
    pages with its parent, so PSS summed is well under RSS summed."""
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only waits to be killed
        time.sleep(60)
        os._exit(0)
    try:
        (tmp_path / "cgroup.procs").write_text(f"{os.getpid()}\n{child}\n")
        split = procstat.memory_by_role(tmp_path)
        assert set(split) == set(procstat.ROLES)
        main, worker = split["main"], split["workers"]
        assert split["fork server"] == procstat.Memory(0, 0, 0)
        assert worker.rss > 10 * 2**20 and main.rss > 10 * 2**20
        # copy-on-write pages counted half (or less): PSS is its own pages plus half the shared
        # ones at most (the fresh child's own pages, USS, were 2 MiB in a CI run)
        shared = worker.rss - worker.uss
        assert worker.pss <= worker.uss + shared / 2 + 2**20
        assert worker.pss < 0.75 * worker.rss  # most of the child is its parent's pages
        assert worker.uss < worker.pss
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
