"""Keeps the agent's snapshot current: one stream to the controller, reconnecting forever.

Says hello with the version it holds (so a resumed stream sends nothing it
already has), applies each pushed snapshot through the store and ACKs it, or
NACKs it with the reason and keeps the last good one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio
from meshagent.agent.state import SnapshotRejected, SnapshotStore
from meshagent.common.configwire import MessageStream, WireError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0


@dataclass
class ControllerLink:
    """What `meshagent status` shows about the controller connection."""

    address: str
    connected: bool = False
    since: float = 0.0
    last_error: str = ""
    snapshots_received: int = 0
    last_nack: str = ""


async def serve_config_client(
    store: SnapshotStore,
    host: str,
    port: int,
    token: str,
    link: ControllerLink,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    backoff = BACKOFF_MIN
    while True:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            link.connected, link.last_error = False, f"connect: {exc or 'timeout'}"
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            continue
        async with stream:
            wire = MessageStream(stream)
            try:
                await wire.send(
                    {"type": "hello", "node": store.node, "token": token, "version": store.version}
                )
                link.connected, link.since, link.last_error = True, time.time(), ""
                backoff = BACKOFF_MIN
                log.info("connected to controller %s:%d", host, port)
                await _receive_loop(wire, store, link)
                link.last_error = "controller closed the stream"
            except (WireError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                link.last_error = str(exc) or type(exc).__name__
            finally:
                link.connected = False
        log.warning("controller stream lost: %s", link.last_error)
        await trio.sleep(backoff)


async def _receive_loop(wire: MessageStream, store: SnapshotStore, link: ControllerLink) -> None:
    while True:
        message = await wire.receive()
        if message is None:
            return
        if message["type"] != "snapshot":
            raise WireError(f"unexpected message type {message['type']!r}")
        version = str(message.get("version", ""))
        link.snapshots_received += 1
        try:
            store.apply(message.get("snapshot") or {})
        except SnapshotRejected as exc:
            link.last_nack = str(exc)
            log.error("refused snapshot %s: %s", version, exc)
            await wire.send({"type": "nack", "version": version, "error": str(exc)})
            continue
        log.info("applied snapshot %s", version)
        await wire.send({"type": "ack", "version": version})
