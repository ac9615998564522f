"""lab/upgrade.py's watcher: the kubelet's SIGKILL at a retired agent pod's grace deadline."""

from __future__ import annotations

import subprocess
import sys
import time

from meshagent.lab import upgrade

from tests.waiting import wait_until


def _watcher(pid: int, start: str, deadline: float) -> subprocess.Popen:
    argv = [sys.executable, "-c", upgrade._WATCHER, str(pid), start, str(deadline)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def test_the_watcher_kills_the_process_at_its_deadline_not_before():
    target = subprocess.Popen(["sleep", "60"])
    try:
        start = upgrade._start_time(target.pid)
        assert start is not None
        watcher = _watcher(target.pid, start, time.time() + 1.0)
        assert target.poll() is None  # not before the deadline
        assert target.wait(timeout=10) == -9
        out, _ = watcher.communicate(timeout=10)
        assert "grace period over, SIGKILL" in out
    finally:
        target.kill()


def test_the_watcher_leaves_as_soon_as_the_process_exits_and_never_kills_a_reused_pid():
    target = subprocess.Popen(["sleep", "60"])
    try:
        # another start time: a process that reused the pid, not the retired agent
        watcher = _watcher(target.pid, "1", time.time())
        assert watcher.wait(timeout=10) == 0
        assert target.poll() is None
        start = upgrade._start_time(target.pid)
        assert start is not None
        watcher = _watcher(target.pid, start, time.time() + 600)
        target.terminate()
        target.wait(timeout=10)
        wait_until(watcher.poll, lambda rc: rc == 0, what="the watcher leaves", timeout=10)
    finally:
        target.kill()
