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

import importlib
import logging
import os
import socket
import sys
import threading
import traceback

from meshagent.agent.workers.launch import FD_ENV, INDEX_ENV, SERVER_FD_ENV, prepare_to_fork

# What both the agent and its workers import, none of it importing prometheus_client:
# imported by `meshagent run` before it forks the server (launch.WorkerLaunch.fork_server).
SHARED = (
    "trio",
    "meshagent.agent.state",
    "meshagent.agent.identity.manager",
    "meshagent.agent.identity.controller_signer",
    "meshagent.agent.identity.certstore",
    "meshagent.agent.configclient",
    "meshagent.agent.datapath.loader",
    "meshagent.agent.meshing",
    "meshagent.common.httpserve",
)


def import_shared() -> bool:
    """Import `SHARED` here; False if a fork now would share what it must not (a thread, or
    prometheus_client already imported with the agent's storage)."""
    for name in SHARED:
        importlib.import_module(name)
    return "prometheus_client" not in sys.modules and threading.active_count() == 1


def run_forked(control: socket.socket, env: dict[str, str]) -> None:
    """The fork server as a fork of `meshagent run`: the workers' environment, their code (the
    rest of it), then serve; never returns."""
    code = 1
    try:
        os.environ.update(env)  # before prometheus_client is imported: its storage
        logging.root.handlers.clear()  # the agent's; a worker sets up its own
        serve(control)
        code = 0
    except (BrokenPipeError, ConnectionResetError):
        code = 0  # the agent died mid-answer
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def _child(control: socket.socket, index: int, fd: int) -> None:
    """Become worker ``index`` on channel ``fd``; never returns."""
    from meshagent.agent.workers import worker  # imported by the server before any fork

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
    # The reason this process exists: what every worker imports, imported once before forking.
    from meshagent.agent.workers import worker  # noqa: F401

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
        prepare_to_fork()
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
