"""The workers' fork server: imports a proxy worker's code once, then forks each worker.

Started by the agent (`launch.WorkerLaunch`) as ``python -m meshagent.agent.workers.forkserver``
with the workers' environment (allocator, ``PROMETHEUS_MULTIPROC_DIR``, the agent's settings)
and its end of a SOCK_SEQPACKET pair as fd ``$MESHAGENT_FORKSERVER_FD``. Each request is a
worker index with the worker's end of its own socket pair (SCM_RIGHTS); the answer is
"<index> <pid>" with the worker's pidfd. It exits when the agent closes the pair, so it never
outlives the agent (nor do the workers: each exits when its own pair closes).

It forks before anything that must not be shared: no thread runs here, trio is imported but never
run, and the metrics that exist (made at import, in the workers' storage) have no value yet:
prometheus_client opens a process's own files at its first use in that process. The agent learns of
a worker's exit from its pidfd; this server reaps exited workers at each request (a dead worker is
followed by a request for its successor, so zombies do not pile up), and not before it has opened
the new one's pidfd.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import threading
import traceback

from meshagent.agent.workers.launch import (
    FD_ENV,
    INDEX_ENV,
    MULTIPROC_ENV,
    SERVER_FD_ENV,
    prepare_to_fork,
)

# Imported by `meshagent run` before it forks the server (launch.WorkerLaunch.fork_server): what
# the agent and its workers both import, and the workers' own modules that make no metric when
# imported; then `import_workers_code` imports the rest with the workers' metric storage.
# prometheus_client is here: its storage is picked when a metric is made, from
# ``values.ValueClass``. Each module imported after a fork is held by both sides, and importing
# it writes to pages the fork shares with the agent (the reference counts of the interned names
# its code reuses): a worker's import after the fork copied ~12 MiB of the agent's heap. Demo
# lab, PSS per node, idle / after load: benchmarks/README.md (the node proxies' memory).
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


# The workers' metric storage made in the agent (`import_workers_code`), for the server it forks
_workers_values: type | None = None


def import_workers_code(metrics_env: dict[str, str]) -> None:
    """Import the rest of a worker's code here too (after `import_shared`, before the fork),
    with the workers' metric storage: the modules that make metrics when imported (proxy.live,
    proxy.lb, hbone.metrics, common.h2guard, ...) make them in the workers' files, as a
    prometheus_client application that imports its code before forking its workers does
    (multiprocess files in ``PROMETHEUS_MULTIPROC_DIR``, written by telemetry/workerstore.py's
    values: each writes to the files of the process that updates it). Then this
    process goes back to its own storage, in memory, for the metrics it makes later. The
    storage is what ``values.ValueClass`` holds when a metric is made: prometheus_client sets
    it from the environment at its import. No thread may run (the environment changes)."""
    from meshagent.agent.telemetry.workerstore import workers_value_class
    from prometheus_client import values

    global _workers_values
    agents_values = values.ValueClass
    saved = {key: os.environ.get(key) for key in metrics_env}
    os.environ.update(metrics_env)
    try:
        values.ValueClass = _workers_values = workers_value_class(os.environ[MULTIPROC_ENV])
        importlib.import_module("meshagent.agent.workers.worker")
    finally:
        values.ValueClass = agents_values
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def use_workers_metric_storage() -> None:
    """Make the metrics made from now on in this process use the workers' storage: the one
    the agent made for them before the fork (`import_workers_code`: one set of files per
    process for every metric), else the one the environment asks for
    (``PROMETHEUS_MULTIPROC_DIR``). tests/unit/test_worker_launch.py checks that the workers'
    metrics land in the files and the agent's do not."""
    from meshagent.agent.telemetry.workerstore import workers_value_class
    from prometheus_client import values

    if _workers_values is not None:
        values.ValueClass = _workers_values
    elif os.environ.get(MULTIPROC_ENV):
        values.ValueClass = workers_value_class(os.environ[MULTIPROC_ENV])
    else:
        values.ValueClass = values.get_value_class()


def run_forked(control: socket.socket, env: dict[str, str]) -> None:
    """The fork server as a fork of `meshagent run`: the workers' environment, their code (the
    rest of it), then serve; never returns."""
    code = 1
    try:
        os.environ.update(env)
        use_workers_metric_storage()  # for the metrics made from now on
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
    """The fork server as its own interpreter (`launch.WorkerLaunch.start_server`)."""
    control = socket.socket(fileno=int(os.environ[SERVER_FD_ENV]))
    use_workers_metric_storage()  # before the workers' code makes its metrics
    try:
        serve(control)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the agent died mid-answer
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
