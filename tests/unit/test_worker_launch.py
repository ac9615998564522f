"""Starting proxy workers (agent/workers/launch.py, forkserver.py): `meshagent run` calls it
before it imports the agent, so it must stay light; it owns the workers' metric folder, and a
fork server that imports a worker's code once forks the workers."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from meshagent.agent.workers import launch


def test_launching_workers_imports_nothing_heavy():
    code = (
        "import sys, meshagent.agent.workers.launch; "
        "print(sorted(m for m in ('trio', 'pydantic', 'prometheus_client', 'h2', 'cryptography')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_what_the_agent_imports_for_its_workers_makes_no_metric():
    """`forkserver.SHARED` is imported by the agent before the fork, with the agent's metrics
    storage: a metric made then would be in memory in every worker, not in their files."""
    code = (
        "import gc, json, sys\n"
        "from meshagent.agent.workers.forkserver import import_shared\n"
        "assert import_shared()\n"
        "from prometheus_client.metrics import MetricWrapperBase\n"
        "made = [o for o in gc.get_objects() if isinstance(o, MetricWrapperBase)]\n"
        "print(json.dumps({'metrics': len(made), 'modules': sorted(sys.modules)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    assert seen["metrics"] == 0
    makers = {"meshagent.agent.proxy.live", "meshagent.agent.proxy.lb", "meshagent.common.h2guard"}
    assert makers.isdisjoint(seen["modules"])
    assert {"prometheus_client", "meshagent.agent.telemetry.metrics"} <= set(seen["modules"])


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


def _answer(plan: launch.WorkerLaunch, index: int, timeout: float = 30.0) -> launch.Launched:
    """Worker ``index`` once the fork server has answered (it imports a worker's code first)."""
    deadline = time.monotonic() + timeout
    while (launched := plan.take(index)) is None:
        assert plan.control is not None
        left = deadline - time.monotonic()
        assert left > 0, f"no answer from the fork server for worker {index} in {timeout} s"
        if select.select([plan.control], [], [], left)[0]:
            try:
                plan.receive()
            except launch.ForkServerGone:
                plan.restart()
    return launched


def _gone(process: launch.WorkerProcess, timeout: float = 30.0) -> bool:
    return bool(select.select([process.pidfd], [], [], timeout)[0])


def test_the_fork_server_forks_workers_that_exit_with_their_channel(tmp_path):
    plan = launch.WorkerLaunch("{}", tmp_path, {launch.MULTIPROC_ENV: str(tmp_path)})
    try:
        for index in (0, 1):
            plan.request(index)
        workers = [_answer(plan, 1), _answer(plan, 0)]  # taken in any order
        assert plan.server is not None
        for w in workers:  # forked by the server, not started by the agent
            stat = Path(f"/proc/{w.process.pid}/stat").read_text()
            assert int(stat.rsplit(")", 1)[1].split()[1]) == plan.server.pid
            assert not w.process.exited()
        workers[0].channel.close()  # the agent's end: that worker exits, the other stays
        assert _gone(workers[0].process)
        assert not workers[1].process.exited()
        plan.request(0)  # a restart: forked at once from the imported server
        again = _answer(plan, 0)
        assert again.process.pid != workers[0].process.pid
        workers[0].process.close()
        plan.started[0], plan.started[1] = again, workers[1]
    finally:
        plan.close()
    assert plan.server is None and plan.control is None


def test_a_dead_fork_server_is_started_again_and_asked_again(tmp_path):
    plan = launch.WorkerLaunch("{}", tmp_path, {launch.MULTIPROC_ENV: str(tmp_path)})
    try:
        plan.start_server()
        assert plan.server is not None
        plan.server.kill()
        plan.server.wait()
        plan.request(0)  # the dead one's socket: it fails, or is never answered
        with pytest.raises(launch.ForkServerGone):
            assert plan.control is not None
            select.select([plan.control], [], [], 30)
            plan.receive()
        assert plan.server is None and 0 in plan.asked
        plan.restart()  # asked again
        w = _answer(plan, 0)
        assert plan.server is not None
        assert not w.process.exited()
        plan.started[0] = w
    finally:
        plan.close()


def test_workers_not_taken_are_killed_on_close(tmp_path):
    plan = launch.WorkerLaunch("{}", tmp_path, {})
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    a, b = socket.socketpair()
    b.close()
    process = launch.WorkerProcess(sleeper.pid, os.pidfd_open(sleeper.pid))
    plan.started[0] = launch.Launched(0, process, a)
    plan.close()
    assert sleeper.wait(timeout=10) == -9 and plan.started == {}
    assert a.fileno() == -1 and process.pidfd == -1


FORKED = """
import json, os, select, sys, tempfile
from pathlib import Path
from meshagent.agent.workers import launch
folder = Path(tempfile.mkdtemp())
plan = launch.WorkerLaunch("{}", folder, {launch.MULTIPROC_ENV: str(folder)})
forked = plan.fork_server()
plan.request(0)
while (w := plan.take(0)) is None:
    select.select([plan.control], [], [], 30)
    plan.receive()
def parent(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
out = {"forked": forked, "server_parent": parent(plan.server.pid), "me": os.getpid(),
       "worker_parent": parent(w.process.pid), "server": plan.server.pid, "worker": w.process.pid,
       "prometheus_here": "prometheus_client" in sys.modules,
       "metric_files": sorted(p.name for p in folder.glob("*.db"))}
if forked:
    from prometheus_client import Counter
    from prometheus_client.multiprocess import MultiProcessCollector
    from meshagent.agent.telemetry.exposition import in_multiprocess_mode
    out["agent_multiprocess"] = in_multiprocess_mode()
    Counter("meshtest_agent_made", "made by the agent after the fork").inc()  # in memory
    out["files_after_agent_metric"] = sorted(p.name for p in folder.glob("*.db"))
    out["families_in_files"] = sorted(
        m.name for m in MultiProcessCollector(None, path=str(folder)).collect())
plan.started[0] = w
plan.close()
print(json.dumps(out))
"""


def _run_forked(env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", FORKED], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_fork_server_is_a_fork_of_the_agent_on_the_workers_allocator():
    seen = _run_forked({**os.environ, **launch.WORKER_ALLOCATOR})
    assert seen["forked"] and seen["server_parent"] == seen["me"]
    assert seen["worker_parent"] == seen["server"]
    # imported once, before the fork, for both (issue 18 item 4: less memory per node) ...
    assert seen["prometheus_here"]
    # ... yet the metrics the server's imports made write to the workers' files, under the
    # agent's pid (the workers' code imported before the fork: zeros), the server's or the
    # worker's, and a metric the agent makes after the fork stays in the agent's memory
    forks = (f"_{seen['me']}.db", f"_{seen['server']}.db", f"_{seen['worker']}.db")
    assert seen["metric_files"] and all(name.endswith(forks) for name in seen["metric_files"])
    assert seen["files_after_agent_metric"] == seen["metric_files"]
    assert not seen["agent_multiprocess"]
    assert "meshagent_hbone_inbound_connections" in seen["families_in_files"]
    assert "meshtest_agent_made" not in seen["families_in_files"]


def test_on_another_allocator_the_fork_server_is_its_own_interpreter():
    env = {k: v for k, v in os.environ.items() if k not in launch.WORKER_ALLOCATOR}
    seen = _run_forked(env)
    assert not seen["forked"] and seen["worker_parent"] == seen["server"]
