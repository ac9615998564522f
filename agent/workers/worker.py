"""One proxy worker process: a `DataPlane` fed by the agent over a socket pair.

Forked by the workers' fork server (`forkserver.py`, asked by `meshagent run` before the agent
imports itself and by `pool.WorkerPool` for restarts and replacements), which has imported
this module; `main` then runs with the agent's settings in ``$MESHAGENT_WORKER_CONFIG``
(JSON), the pair's end as fd ``$MESHAGENT_WORKER_FD`` and ``PROMETHEUS_MULTIPROC_DIR`` set.
It waits for the agent's first message (the datapath is in place by then) before it opens the
maps and listens. It exits
when the agent closes the pair (the agent stopped or died: a worker never outlives it) or
after a drain.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import trio
from meshagent.agent.config import AgentConfig
from meshagent.agent.datapath import loader
from meshagent.agent.dataplane import DataPlane
from meshagent.agent.proxy.mtls import WorkloadTls
from meshagent.agent.state import SnapshotRejected, SnapshotStore
from meshagent.agent.telemetry import AccessLogSettings, ProxyMetrics, open_access_log
from meshagent.agent.telemetry.flows import FlowTap, flow_socket, serve_flow_tap
from meshagent.agent.workers.launch import CONFIG_ENV, FD_ENV, INDEX_ENV
from meshagent.agent.workers.mirror import IdentityMirror
from meshagent.agent.workers.wire import parse_certs
from meshagent.common.configwire import MessageStream, WireError

log = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0


class Worker:
    def __init__(self, config: AgentConfig, channel: MessageStream, index: int) -> None:
        self.config = config
        self.channel = channel
        self.index = index
        self.store = SnapshotStore(
            config.node_name,
            config.state_dir,
            root_namespace=config.root_namespace,
            trust_domains=config.trust_domains,
        )
        self.identities = IdentityMirror()
        self._resyncing = False  # asked the agent for the whole snapshot after a delta failed
        self.applied = {"whole": 0, "delta": 0}  # snapshots applied, by how they came
        self.workload_tls = WorkloadTls(self.identities, config.trust_domain)

    async def run(self) -> None:
        cfg = self.config
        # Started before the agent has its datapath in place (launch.py): the agent's first
        # message says it is.
        first = await self._next_message()
        if first is None:
            return
        maps = loader.open_maps(loader.datapath_settings(cfg))
        try:
            tap = FlowTap()  # `meshagent observe`
            async with (
                open_access_log(
                    AccessLogSettings(output=cfg.access_log, sample=cfg.access_log_sample),
                    tap=tap,
                ) as access_log,
                trio.open_nursery() as tap_nursery,
            ):
                await tap_nursery.start(serve_flow_tap, tap, flow_socket(cfg.state_dir, self.index))
                self.dataplane = DataPlane(
                    cfg,
                    store=self.store,
                    identities=self.identities,
                    workload_tls=self.workload_tls,
                    pop_orig_dst=maps.pop_orig_dst,
                    metrics=ProxyMetrics(None),
                    access_log=access_log,
                )
                async with self.dataplane.open(), trio.open_nursery() as nursery:
                    self.nursery = nursery
                    self._handle(first)
                    nursery.start_soon(self._receive)
                    await self.dataplane.serve()
                    await self.channel.send({"type": "ready", "pid": os.getpid()})
                    log.info("proxy worker %d ready (pid %d)", self.index, os.getpid())
                    nursery.start_soon(self._report)
                tap_nursery.cancel_scope.cancel()  # the worker is done: so is its tap
        finally:
            maps.close()

    async def _next_message(self) -> dict | None:
        """The agent's next message; None once it closed the channel (or sent garbage)."""
        try:
            message = await self.channel.receive()
        except (WireError, trio.BrokenResourceError) as exc:
            log.error("worker %d: bad message from the agent: %s", self.index, exc)
            message = None
        if message is None:
            log.info("worker %d: the agent closed the channel; exiting", self.index)
        return message

    async def _receive(self) -> None:
        while (message := await self._next_message()) is not None:
            self._handle(message)
        self.nursery.cancel_scope.cancel()

    def _handle(self, message: dict) -> None:
        kind = message["type"]
        if kind == "snapshot":
            self._resyncing = False
            try:
                self.store.apply(message["snapshot"], save=False)
                self.applied["whole"] += 1
            except SnapshotRejected as exc:  # the agent validated it: should not happen
                log.error("worker %d: snapshot rejected: %s", self.index, exc)
        elif kind == "delta":
            self._apply_delta(message)
        elif kind == "certs":
            self.identities.replace(parse_certs(message))
        elif kind == "accepting":
            self.dataplane.set_accepting(bool(message["on"]))
        elif kind == "drain":
            self.nursery.start_soon(
                self._drain, float(message["timeout"]), list(message.get("handoff", []))
            )
        else:
            log.warning("worker %d: unknown message %r", self.index, kind)

    def _apply_delta(self, message: dict) -> None:
        """The next view from this worker's own, as the agent built its; if this worker
        cannot (it holds another version), it asks for the snapshot whole, once, and serves
        the view it holds until it comes."""
        if self._resyncing:
            return  # the whole snapshot is on its way: later deltas start from it
        try:
            self.store.apply_delta(
                message["base"], message["version"], message["changes"], save=False
            )
            self.applied["delta"] += 1
        except SnapshotRejected as exc:
            log.warning("worker %d: delta refused (%s): asking for the snapshot", self.index, exc)
            self._resyncing = True
            self.nursery.start_soon(
                self.channel.send, {"type": "resync", "version": self.store.version}
            )

    async def _drain(self, timeout: float, handoff_to: list[str]) -> None:
        left = await self.dataplane.drain(timeout, handoff_to)
        log.info("worker %d drained, %d connection(s) left open", self.index, left)
        await self.channel.send({"type": "drained", "left": left})
        self.nursery.cancel_scope.cancel()

    async def _report(self) -> None:
        while True:
            # its view apart from the data plane's figures, which the agent adds up
            view = {"version": self.store.version, "applied": self.applied}
            status, peak = self.dataplane.status(), self.dataplane.peak_connections()
            message = {"type": "status", "status": status, "view": view, "peak": peak}
            await self.channel.send(message)
            await trio.sleep(STATUS_INTERVAL)


def main() -> None:
    index = int(os.environ.get(INDEX_ENV, "0"))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [%(process)d] worker-{index} %(levelname)s %(name)s: %(message)s",
    )
    config = AgentConfig.model_validate_json(os.environ[CONFIG_ENV])
    sock = socket.socket(fileno=int(os.environ[FD_ENV]))

    async def run() -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        # SIGTERM is the agent's to handle: it drains workers through the channel.
        with trio.open_signal_receiver(15):
            await Worker(config, MessageStream(stream), index).run()

    try:
        trio.run(run)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
