"""Starting proxy workers early (agent/workers/launch.py): `meshagent run` calls it before it
imports the agent, so it must stay light, and it owns the workers' metric folder."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from meshagent.agent.workers import launch


def test_launching_workers_imports_nothing_heavy():
    code = (
        "import sys, meshagent.agent.workers.launch; "
        "print(sorted(m for m in ('trio', 'pydantic', 'prometheus_client', 'h2', 'cryptography')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_worker_means_none_started():
    assert launch.start_workers("{}", 1, Path("/nonexistent")) is None


def test_metric_folder_is_emptied_and_dead_agents_folders_go(tmp_path):
    parent = tmp_path / "workers"
    ours, dead, alive = parent / "4242", parent / str(2**22 + 7), parent / "1"  # pid 1 lives
    for folder in (ours, dead, alive):
        folder.mkdir(parents=True)
        (folder / "counter_1.db").write_bytes(b"x")
    env = launch.prepare_worker_metrics(parent, ours)
    assert env == {launch.MULTIPROC_ENV: str(ours)}
    assert list(ours.iterdir()) == []  # stale files would add to this run's counters
    assert not dead.exists()
    assert (alive / "counter_1.db").exists()


def test_workers_not_taken_are_killed_on_close(tmp_path):
    plan = launch.WorkerLaunch("{}", tmp_path, {})
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    a, b = socket.socketpair()
    b.close()
    plan.started[0] = launch.Launched(0, sleeper, a)
    plan.close()
    assert sleeper.returncode is not None and plan.started == {}
    assert a.fileno() == -1
