"""The workers' fork server: imports a proxy worker's code once, then forks each worker.

Started by the agent (`launch.WorkerLaunch`) as ``python -m meshagent.agent.workers.forkserver``
with the workers' environment (allocator, ``PROMETHEUS_MULTIPROC_DIR``, the agent's settings)
and its end of a SOCK_SEQPACKET pair as fd ``$MESHAGENT_FORKSERVER_FD``. Each request is a
worker index with the worker's end of its own socket pair (SCM_RIGHTS); the answer is
"<index> <pid>" with the worker's pidfd. It exits when the agent closes the pair, so it never
outlives the agent (nor do the workers: each exits when its own pair closes).

It forks before anything that must not be shared: no thread runs here, trio is imported but
never run, no metric exists yet (a worker makes its own after the fork, and prometheus_client
resets its files when it sees a new pid). The agent learns of a worker's exit from its pidfd;
this server reaps exited workers at each request (a dead worker is followed by a request for
its successor, so zombies do not pile up), and not before it has opened the new one's pidfd.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import traceback

# The reason this process exists: what every worker imports, imported once before forking.
from meshagent.agent.workers import worker
from meshagent.agent.workers.launch import FD_ENV, INDEX_ENV, SERVER_FD_ENV


def _child(control: socket.socket, index: int, fd: int) -> None:
    """Become worker ``index`` on channel ``fd``; never returns."""
    code = 1
    try:
        control.close()
        os.environ[INDEX_ENV], os.environ[FD_ENV] = str(index), str(fd)
        worker.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(control: socket.socket) -> None:
    """Fork a worker per request until the agent closes ``control``."""
    if threading.active_count() != 1:  # a thread would be half-copied into every worker
        raise RuntimeError(f"fork server: {threading.active_count()} threads before forking")
    while True:
        data, fds, _flags, _addr = socket.recv_fds(control, 64, 1)
        if not data:
            return  # the agent is gone
        if len(fds) != 1:
            print(f"fork server: request {data!r} without its socket", file=sys.stderr)
            for fd in fds:
                os.close(fd)
            continue
        index, fd = int(data), fds[0]
        pid = os.fork()
        if pid == 0:
            _child(control, index, fd)
        os.close(fd)
        pidfd = os.pidfd_open(pid)  # not reaped yet: the pid is still this child's
        try:
            socket.send_fds(control, [f"{index} {pid}".encode()], [pidfd])
        finally:
            os.close(pidfd)
        _reap()


def _reap() -> None:
    """Collect every exited worker (their pidfds already told the agent)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> None:
    control = socket.socket(fileno=int(os.environ[SERVER_FD_ENV]))
    try:
        serve(control)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the agent died mid-answer
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
