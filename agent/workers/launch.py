"""Starting proxy worker processes: the agent's side of the workers' fork server.

A restarted agent's time to serve is mostly Python importing. A worker's code is imported
once, by a fork server (`forkserver.py`, its own interpreter started with the workers'
allocator and metrics environment), which then forks each worker: N workers cost one import
instead of N, and a worker started later (a restart, a recycle) serves in milliseconds.
`meshagent run` starts the fork server and asks for its workers first (`start_workers`,
right after reading its config), then imports the agent while the server imports theirs;
`pool.WorkerPool` takes them, and asks for later ones the same way. A worker opens the pinned
maps only once the agent has sent it its first message, that is once the datapath is in place
(a first start builds it meanwhile). This module imports nothing heavy.

Why a separate server and not a fork of the agent: prometheus_client's storage (multiprocess
files or memory) must be picked before any metric is made and glibc/CPython pick the allocator
at process start, and those differ between the agent and its workers.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_ENV = "MESHAGENT_WORKER_CONFIG"
FD_ENV = "MESHAGENT_WORKER_FD"
INDEX_ENV = "MESHAGENT_WORKER_INDEX"
SERVER_FD_ENV = "MESHAGENT_FORKSERVER_FD"
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
# 10 %, so not adopted (a new library in every worker for a partial gain); what gets a node
# back to its fresh figure is replacing a grown worker once it is idle (pool.py, recycling).
# An operator's own environment wins (LD_PRELOAD and MALLOC_CONF included).
WORKER_ALLOCATOR = {
    "PYTHONMALLOC": "malloc",
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_ARENA_MAX": "2",
}


class ForkServerGone(RuntimeError):
    """The fork server exited (its own error is in the log)."""


@dataclass
class WorkerProcess:
    """A worker the fork server forked: not the agent's child, so it is watched and signalled
    through its pidfd (which the server sent right after the fork: no pid-reuse race)."""

    pid: int
    pidfd: int

    def exited(self) -> bool:
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


@dataclass
class Launched:
    """A worker process and the agent's end of its socket pair."""

    index: int
    process: WorkerProcess
    channel: socket.socket


@dataclass
class WorkerLaunch:
    """The fork server, the workers asked of it and those it started and nobody took yet.

    ``request`` sends (non-blocking) the worker's end of a new socket pair; ``receive`` reads
    one answer (the worker's pid and pidfd) once ``control`` is readable; ``take`` hands a
    started worker over. Answers may come in any order. A dead server (``receive`` raises
    ForkServerGone) is started again by ``restart`` (the pool waits a back-off first: a server
    that cannot import would otherwise be started in a loop)."""

    config_json: str
    metrics_dir: Path
    metrics_env: dict[str, str]
    server: subprocess.Popen | ForkedServer | None = None
    control: socket.socket | None = None
    asked: dict[int, socket.socket] = field(default_factory=dict)  # index -> agent's end
    started: dict[int, Launched] = field(default_factory=dict)

    def start_server(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "meshagent.agent.workers.forkserver"],
                env={
                    **WORKER_ALLOCATOR,
                    **os.environ,
                    **self.metrics_env,
                    CONFIG_ENV: self.config_json,
                    SERVER_FD_ENV: str(theirs.fileno()),
                },
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.control = ours

    def fork_server(self) -> bool:
        """Start the fork server as a fork of this process (`meshagent run`, before trio runs):
        it first imports here what the agent and its workers both import, so that is done once, and
        the rest of a worker's code, its metrics made in the workers' storage
        (forkserver.import_workers_code: each module is then held once per node). Only where this
        process already runs on the workers' allocator and has not imported prometheus_client (code
        that did may have made metrics with the agent's storage); False if not (then
        ``start_server`` execs one)."""
        if not allocator_in_force():
            return False
        from meshagent.agent.workers.forkserver import import_shared, import_workers_code

        if not import_shared():
            return False
        import_workers_code(self.metrics_env)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        prepare_to_fork()
        pid = os.fork()
        if pid == 0:  # the fork server; never returns
            ours.close()
            from meshagent.agent.workers.forkserver import run_forked

            run_forked(theirs, {**self.metrics_env, CONFIG_ENV: self.config_json})
        theirs.close()
        self.server, self.control = ForkedServer(pid), ours
        return True

    def request(self, index: int) -> None:
        """Ask the fork server for worker ``index`` (answered through ``receive``)."""
        if self.control is None:
            self.restart()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.asked[index] = ours
        # if it died, the next ``receive`` says so
        with contextlib.closing(theirs), contextlib.suppress(OSError):
            self._send(index, theirs)

    def _send(self, index: int, theirs: socket.socket) -> None:
        assert self.control is not None
        socket.send_fds(self.control, [str(index).encode()], [theirs.fileno()])

    def receive(self) -> None:
        """Read one answer of the fork server (``control`` is readable). Raises ForkServerGone
        if it exited (its error is in the log): ``restart`` then starts a new one."""
        assert self.control is not None
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.control, 64, 1)
        except OSError:
            data, fds = b"", []
        if not data or not fds:
            for fd in fds:
                os.close(fd)
            self._stop_server()
            raise ForkServerGone("the workers' fork server exited")
        index, pid = (int(part) for part in data.split())
        channel = self.asked.pop(index)
        self.started[index] = Launched(index, WorkerProcess(pid, fds[0]), channel)

    def restart(self) -> None:
        """Start a (new) fork server and ask it again for every worker not yet answered."""
        self._stop_server()
        self.start_server()
        for index in list(self.asked):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.asked[index].close()
            self.asked[index] = ours
            with contextlib.closing(theirs):
                self._send(index, theirs)

    def take(self, index: int) -> Launched | None:
        """Worker ``index`` if the server has started it (once), else None."""
        return self.started.pop(index, None)

    def _stop_server(self) -> None:
        if self.control is not None:
            self.control.close()  # the server exits when it reads the end
            self.control = None
        if self.server is not None:
            self.server.kill()
            self.server.wait()
            self.server = None

    def close(self) -> None:
        """Kill the workers started and never taken, and the fork server (the agent stops)."""
        for launched in self.started.values():
            launched.process.kill()
            launched.process.close()
            launched.channel.close()
        self.started.clear()
        for channel in self.asked.values():
            channel.close()
        self.asked.clear()
        self._stop_server()


def prepare_to_fork() -> None:
    """Keep what a fork inherits shared: the garbage collector leaves this process's objects
    alone from now on (gc.freeze: a collection in the fork would write to every one of them,
    copying their pages), and the heap's free chunks are taken (common/heap.py: a fork's
    allocations would land in them, copying their pages). For a process on the workers'
    allocator, before `os.fork`. Demo lab, PSS per node after 500 requests: 108 MiB without
    either, 105 with gc.freeze, 101 with both; idle 101, 100, 91. In a fork that collects
    (a worker does after a burst: proxy/trim.py) gc.freeze keeps ~29 MiB shared."""
    from meshagent.common.heap import fill_heap_holes

    gc.freeze()
    fill_heap_holes()


def allocator_in_force() -> bool:
    """Whether this process runs with the allocator settings its workers get (set before it
    started: they cannot change in a running interpreter)."""
    return all(key in os.environ for key in WORKER_ALLOCATOR)


class ForkedServer:
    """The fork server when it is this process's fork: what the agent needs of a Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


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


def start_workers(
    config_json: str, count: int, metrics_parent: Path, *, fork_here: bool = False
) -> WorkerLaunch | None:
    """Prepare this agent's metric folder, start the fork server and ask it for ``count``
    workers (None for one: the agent is then the proxy itself). ``fork_here``: the server may
    be a fork of this process (`WorkerLaunch.fork_server`: no thread may run yet)."""
    if count <= 1:
        return None
    folder = metrics_parent / str(os.getpid())
    plan = WorkerLaunch(config_json, folder, prepare_worker_metrics(metrics_parent, folder))
    try:
        if fork_here:
            plan.fork_server()
        for index in range(count):
            plan.request(index)
    except BaseException:
        plan.close()
        raise
    return plan
