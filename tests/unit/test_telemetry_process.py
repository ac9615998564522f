"""Process figures per proxy worker, read from /proc at scrape time."""

import os
import subprocess
import sys

from meshagent.agent.telemetry import NodeMetrics, ProcessCollector
from meshagent.agent.telemetry.process import read_process, seconds_since_start
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families


def _samples(node: NodeMetrics) -> dict[tuple[str, str], float]:
    page = generate_latest(node.registry).decode()
    return {
        (s.name, s.labels.get("worker", "")): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name.startswith("meshagent_process_")
    }


def test_this_process_is_read_from_proc():
    figures = read_process(os.getpid())
    assert figures.cpu_seconds > 0
    assert figures.resident_bytes > 1 << 20
    assert figures.open_fds >= 3


def test_a_process_age_counts_from_its_start_not_from_its_first_line():
    """What the agent's start-to-ready figure is measured from: a child started now is
    younger than this process (which has run this test session's imports)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert 0 <= seconds_since_start(child.pid) < seconds_since_start()
    finally:
        child.kill()
        child.wait()


def test_each_worker_is_a_label_and_a_gone_one_is_left_out():
    gone = 2**22 + 12345  # above any pid_max default: no such process
    node = NodeMetrics(include_default_registry=False)
    node.local_registry.register(
        ProcessCollector(lambda: {"agent": os.getpid(), "0": os.getpid(), "1": gone})
    )
    samples = _samples(node)
    for worker in ("agent", "0"):
        assert samples[("meshagent_process_cpu_seconds_total", worker)] > 0
        assert samples[("meshagent_process_resident_memory_bytes", worker)] > 1 << 20
        assert samples[("meshagent_process_open_fds", worker)] >= 3
    assert not any(worker == "1" for _, worker in samples)


def test_a_failing_listing_leaves_the_rest_of_the_page():
    def broken():
        raise RuntimeError("no pool yet")

    node = NodeMetrics(include_default_registry=False, build_version="x")
    node.local_registry.register(ProcessCollector(broken))
    page = generate_latest(node.registry).decode()
    assert "meshagent_build_info" in page and "meshagent_process_" not in page
