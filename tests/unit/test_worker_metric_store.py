"""The workers' metric values (agent/telemetry/workerstore.py): what they write is what
prometheus_client's own multiprocess values would have written, read by the same readers,
across forks, file growth and a pid's files found again."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from meshagent.agent.telemetry.page import NodePage, WorkerFiles
from meshagent.agent.telemetry.workerstore import workers_value_class
from prometheus_client import Counter, Gauge, Histogram, values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead


def _made_with(value_class, make):
    """`make()` with `value_class` as prometheus_client's storage: a labelled metric makes a
    value when a child is first asked for, so updates run inside too (in a worker, the
    storage stays the workers')."""
    saved = values.ValueClass
    values.ValueClass = value_class
    try:
        return make()
    finally:
        values.ValueClass = saved


def _metrics():
    return {
        "requests": Counter("t_requests", "Requests.", ["code", "peer"], registry=None),
        "duration": Histogram(
            "t_duration", "Duration.", ["code"], buckets=(1, 5, 25, 100), registry=None
        ),
        "open": Gauge("t_open", "Open.", ["peer"], multiprocess_mode="livesum", registry=None),
        "recent": Gauge("t_recent", "Recent.", multiprocess_mode="mostrecent", registry=None),
    }


def _apply(metrics, ops):
    for op, label, amount in ops:
        if op == "inc":
            metrics["requests"].labels(str(label), "p").inc(amount)
        elif op == "observe":
            metrics["duration"].labels(str(label)).observe(amount)
        elif op == "gauge":
            metrics["open"].labels(f"p{label}").inc(amount - 50)
        else:
            metrics["recent"].set(amount)


def _collected(folder: Path) -> set[tuple]:
    return {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in MultiProcessCollector(None, path=str(folder)).collect()
        for s in family.samples
    }


def _ops(seed: int, count: int) -> list[tuple[str, int, float]]:
    rng = random.Random(seed)
    kinds = ("inc", "observe", "gauge", "set")
    return [(rng.choice(kinds), rng.randrange(5), float(rng.randrange(120))) for _ in range(count)]


@pytest.mark.parametrize("seed", range(5))
def test_same_samples_as_prometheus_clients_own_multiprocess_values(tmp_path, seed):
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir()
    ours.mkdir()
    ops = _ops(seed, 300)
    saved = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(theirs)  # where theirs write, when made
    try:
        _made_with(values.MultiProcessValue(), lambda: _apply(_metrics(), ops))
    finally:
        if saved is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR")
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved
    _made_with(workers_value_class(str(ours)), lambda: _apply(_metrics(), ops))
    expected = _collected(theirs)
    # theirs write a zero for every series made; ours write what was updated: the same here
    assert _collected(ours) == expected
    assert any(name == "t_duration_bucket" for name, _, _ in expected)


def test_the_agents_page_reads_them(tmp_path):
    ops = [("inc", 1, 3.0), ("observe", 2, 7.0), ("gauge", 0, 52.0)]
    _made_with(workers_value_class(str(tmp_path)), lambda: _apply(_metrics(), ops))
    text = NodePage([], WorkerFiles(tmp_path)).render().decode()
    assert 't_requests_total{code="1",peer="p"} 3.0' in text
    assert 't_duration_bucket{code="2",le="25.0"} 1.0' in text
    assert 't_duration_bucket{code="2",le="5.0"} 0.0' in text
    assert 't_open{peer="p0"} 2.0' in text


def test_a_fork_counts_in_its_own_files_from_zero(tmp_path):
    metrics = _made_with(workers_value_class(str(tmp_path)), _metrics)
    used, unused, live = _made_with(
        workers_value_class(str(tmp_path)),
        lambda: (
            metrics["requests"].labels("200", "p"),
            metrics["requests"].labels("500", "p"),  # made, never updated, before the fork
            metrics["open"].labels("p1"),
        ),
    )
    used.inc(5)  # bound in the parent before the fork
    pid = os.fork()
    if pid == 0:  # the child: as a worker forked from the fork server
        code = 1
        try:
            used.inc(2)
            unused.inc(3)
            live.inc(4)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    used.inc(1)

    child = {
        k: v for k, v, *_ in MmapedDict.read_all_values_from_file(tmp_path / f"counter_{pid}.db")
    }
    assert sorted(child.values()) == [2.0, 3.0]  # not 5 + 2: the parent's count stays its own
    parent = {
        k: v
        for k, v, *_ in MmapedDict.read_all_values_from_file(tmp_path / f"counter_{os.getpid()}.db")
    }
    assert sorted(parent.values()) == [0.0, 6.0]  # the one made before the fork: entered
    samples = _collected(tmp_path)
    assert ("t_requests_total", (("code", "200"), ("peer", "p")), 8.0) in samples
    assert ("t_requests_total", (("code", "500"), ("peer", "p")), 3.0) in samples
    assert ("t_open", (("peer", "p1"),), 4.0) in samples
    mark_process_dead(pid, str(tmp_path))  # the child's live gauges go, its counters stay
    samples = _collected(tmp_path)
    assert ("t_open", (("peer", "p1"),), 0.0) in samples  # the parent's entry alone
    assert ("t_requests_total", (("code", "500"), ("peer", "p")), 3.0) in samples


def test_a_value_bound_before_its_file_grew_still_writes_to_it(tmp_path):
    def make_and_update() -> None:
        counter = Counter("t_many", "Many series.", ["peer"], registry=None)
        first = counter.labels("first")
        first.inc()
        for i in range(2_000):  # ~170 bytes an entry: the file grows from 64 KiB, remapped
            counter.labels(f"peer-{i:05d}-" + "x" * 80).inc(i)
        first.inc()

    _made_with(workers_value_class(str(tmp_path)), make_and_update)
    path = tmp_path / f"counter_{os.getpid()}.db"
    assert path.stat().st_size > 1 << 16
    samples = _collected(tmp_path)
    assert ("t_many_total", (("peer", "first"),), 2.0) in samples
    assert ("t_many_total", (("peer", "peer-01999-" + "x" * 80),), 1999.0) in samples
    assert len(samples) == 2_001


def test_a_file_left_by_the_same_pid_is_gone_on_from(tmp_path):
    """Pids are reused: a worker given a dead one's pid goes on from its file, as
    prometheus_client's values do, so the node's totals never go backwards."""
    first = _made_with(
        workers_value_class(str(tmp_path)),
        lambda: Counter("t_reused", "Reused.", registry=None),
    )
    first.inc(4)
    again = _made_with(
        workers_value_class(str(tmp_path)),
        lambda: Counter("t_reused", "Reused.", registry=None),
    )
    again.inc(1)
    assert ("t_reused_total", (), 5.0) in _collected(tmp_path)
    # the same entry, updated in place: not a second one with the same key
    path = tmp_path / f"counter_{os.getpid()}.db"
    keys = [key for key, *_ in MmapedDict.read_all_values_from_file(path)]
    assert len(keys) == len(set(keys)) == 1
