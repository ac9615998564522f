"""How many proxy workers an agent runs when told "one per core" (proxy_workers: 0)."""

from __future__ import annotations

import os
from pathlib import Path

from meshagent.agent.config import MAX_AUTO_WORKERS, AgentConfig, available_cores


def _own_cgroup() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line.split("::", 1)[1]
    return "/"


def test_a_container_cpu_limit_caps_the_cores(tmp_path) -> None:
    folder = tmp_path / _own_cgroup().lstrip("/")
    folder.mkdir(parents=True, exist_ok=True)
    affinity = len(os.sched_getaffinity(0))
    (folder / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: two workers at most
    assert available_cores(tmp_path) == min(affinity, 2)
    (folder / "cpu.max").write_text("max 100000\n")  # no limit: the affinity decides
    assert available_cores(tmp_path) == affinity
    (folder / "cpu.max").write_text("10000 100000\n")  # a tenth of a CPU: still one worker
    assert available_cores(tmp_path) == 1


def test_no_cgroup_file_means_the_affinity_and_explicit_counts_win(tmp_path) -> None:
    assert available_cores(tmp_path / "none") == len(os.sched_getaffinity(0))
    assert AgentConfig(proxy_workers=3).worker_count == 3
    assert 1 <= AgentConfig().worker_count <= MAX_AUTO_WORKERS
