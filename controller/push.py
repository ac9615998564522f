"""Serves agents their node's snapshot over one long-lived stream each, pushing changes.

Per connection: the agent says hello (node, last version it holds); the
controller sends the node's current snapshot if the versions differ, then
waits for either a model change (recompile, push if the node's version
changed) or the agent's ACK/NACK. Sessions are kept for `meshctl status`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio
from meshagent.common.configwire import MessageStream, WireError
from meshagent.common.snapshot import Snapshot
from meshagent.controller.compiler import compile_snapshot
from meshagent.controller.model import ClusterModel

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0


@dataclass
class AgentSession:
    node: str
    peer: str
    connected_at: float = field(default_factory=time.time)
    sent_version: str = ""
    acked_version: str = ""
    last_nack: str = ""
    connected: bool = True

    def as_dict(self) -> dict:
        return {
            "node": self.node,
            "peer": self.peer,
            "connected": self.connected,
            "connected_for_s": round(time.time() - self.connected_at, 1),
            "sent_version": self.sent_version,
            "acked_version": self.acked_version,
            "last_nack": self.last_nack,
        }


class PushServer:
    def __init__(self, model: ClusterModel, trust_bundle: str | None = None) -> None:
        self.model = model
        self.trust_bundle = trust_bundle
        self.sessions: dict[str, AgentSession] = {}
        self._cache: dict[str, tuple[int, Snapshot]] = {}

    def snapshot_for(self, node: str) -> Snapshot:
        cached = self._cache.get(node)
        if cached and cached[0] == self.model.generation:
            return cached[1]
        snap = compile_snapshot(self.model, node, self.trust_bundle)
        self._cache[node] = (self.model.generation, snap)
        return snap

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as nursery:
            task_status.started()
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        host, port = stream.socket.getpeername()[:2]
        peer = f"{host}:{port}"
        wire = MessageStream(stream)
        session = None
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                hello = await wire.receive()
            if not hello or hello.get("type") != "hello" or not hello.get("node"):
                raise WireError("expected hello with a node name")
            session = AgentSession(node=str(hello["node"]), peer=peer)
            session.acked_version = str(hello.get("version") or "")
            self.sessions[session.node] = session
            log.info(
                "agent %s connected from %s (has %r)", session.node, peer, session.acked_version
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_closed, self._read_acks(wire, session), nursery)
                nursery.start_soon(self._until_closed, self._push_loop(wire, session), nursery)
        except (WireError, trio.TooSlowError) as exc:
            log.warning("agent stream from %s closed: %s", peer, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if session is not None:
                session.connected = False
                log.info("agent %s disconnected", session.node)
            await trio.aclose_forcefully(stream)

    async def _until_closed(self, work, nursery: trio.Nursery) -> None:
        """Run one side of a session; whichever side ends or fails ends the session."""
        try:
            await work
        except (WireError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("agent stream closed: %s", exc or type(exc).__name__)
        finally:
            nursery.cancel_scope.cancel()

    async def _push_loop(self, wire: MessageStream, session: AgentSession) -> None:
        generation = -1
        while True:
            generation = self.model.generation
            snap = self.snapshot_for(session.node)
            if snap.version not in (session.sent_version, session.acked_version):
                session.sent_version = snap.version
                await wire.send(
                    {
                        "type": "snapshot",
                        "version": snap.version,
                        "snapshot": snap.model_dump(mode="json"),
                    }
                )
            await self.model.wait_changed(generation)

    async def _read_acks(self, wire: MessageStream, session: AgentSession) -> None:
        while True:
            message = await wire.receive()
            if message is None:
                return
            if message["type"] == "ack":
                session.acked_version = str(message.get("version", ""))
                session.last_nack = ""
            elif message["type"] == "nack":
                session.last_nack = str(message.get("error", ""))
                log.warning(
                    "agent %s refused %s: %s",
                    session.node,
                    message.get("version"),
                    session.last_nack,
                )
            else:
                raise WireError(f"unexpected message type {message['type']!r}")
