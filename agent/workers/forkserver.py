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

# Imported by `meshagent run` before it forks the server (launch.WorkerLaunch.fork_server): what
# the agent and its workers both import, and the workers' own modules that make no metric when
# imported. prometheus_client is among them: its storage is picked when a metric is made, from
# ``values.ValueClass``, which the server sets for the workers (`use_workers_metric_storage`)
# before it imports the modules that make metrics at import (proxy.live, proxy.lb, hbone.metrics,
# common.h2guard, ...: tests/unit/test_worker_launch.py checks that none of these is here).
# Each module imported after a fork is held by both sides, and importing it writes to pages the
# fork shares with the agent (the reference counts of the interned names its code reuses): a
# worker's import after the fork copied ~12 MiB of the agent's heap. Demo lab, PSS per node,
# idle / after load: benchmarks/README.md (the node proxies' memory).
SHARED = (
    "prometheus_client",
    "prometheus_client.multiprocess",
    "trio",
    "meshagent.agent.state",
    "meshagent.agent.identity.manager",
    "meshagent.agent.identity.controller_signer",
    "meshagent.agent.identity.certstore",
    "meshagent.agent.configclient",
    "meshagent.agent.datapath.loader",
    "meshagent.agent.meshing",
    "meshagent.common.httpserve",
    "meshagent.common.heap",
    "meshagent.common.listeners",
    "meshagent.agent.telemetry.metrics",
    "meshagent.agent.telemetry.page",
    "meshagent.agent.telemetry.exposition",
    "meshagent.agent.telemetry.process",
    "meshagent.agent.telemetry.accesslog",
    "meshagent.agent.telemetry.flows",
    "meshagent.agent.workers.wire",
    # the workers' alone
    "h2.connection",
    "httptools",
    "meshagent.agent.hbone.protocol",
    "meshagent.agent.hbone.tlsstream",
    "meshagent.agent.proxy.limits",
    "meshagent.agent.proxy.mtls",
    "meshagent.agent.proxy.tls_origin",
    "meshagent.agent.proxy.sni",
    "meshagent.agent.proxy.trim",
    "meshagent.agent.workers.mirror",
    "meshagent.agent.datapath.join",
    "meshagent.agent.policy.authorization",
    "meshagent.common.extauthz",
)


def import_shared() -> bool:
    """Import `SHARED` here; False if a fork now would share what it must not (a thread, or
    prometheus_client imported before, by code that may have made metrics with the agent's
    storage)."""
    imported_before = "prometheus_client" in sys.modules
    for name in SHARED:
        importlib.import_module(name)
    return not imported_before and threading.active_count() == 1


def use_workers_metric_storage() -> None:
    """Make the metrics made from now on in this process use the storage its environment asks
    for (``PROMETHEUS_MULTIPROC_DIR``: the workers' files). prometheus_client reads the
    environment once, at its import, into ``values.ValueClass``, which every metric made later
    calls for its values; the agent imported it before forking this server, without that
    environment, so the server sets it again before it imports any module that makes metrics.
    tests/unit/test_worker_launch.py checks that the forked server's metrics land in the
    files and the agent's do not."""
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


def run_forked(control: socket.socket, env: dict[str, str]) -> None:
    """The fork server as a fork of `meshagent run`: the workers' environment, their code (the
    rest of it), then serve; never returns."""
    code = 1
    try:
        os.environ.update(env)
        use_workers_metric_storage()  # before a module that makes metrics is imported
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
