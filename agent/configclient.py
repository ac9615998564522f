"""Keeps the agent's snapshot current and carries its CSRs: one stream to the controller,
reconnecting forever. Connects over TLS, checking the controller's certificate against the
configured mesh root by the name or IP it dials; says hello with the node token (read again
at every connect, so a rotated token is picked up) and the version it holds (so a resumed
stream sends nothing it already has). Then it applies each pushed snapshot, or delta from
the version it holds, through the store and ACKs it, or NACKs it with the reason and keeps
the last good one, while CSR answers go to the `ControllerSigner`, which sends its requests
on the same connection. A controller that refuses the node's credential says why in an
`error` line; the agent shows it in `meshagent status` and retries after the longest
backoff.

Several controller replicas all serve agents (only the leader writes cluster state). Given
several addresses, an agent starts at the one its node name hashes to (so agents spread
evenly and each keeps its replica across restarts) and moves on to the next whenever a
connect fails or its stream ends (a `goodbye` at a replica's shutdown, a crash), resuming
from the version it holds: the new replica sends nothing if that is current, else a whole
snapshot (delta history is per stream). Away from its own replica for `REBALANCE_AFTER`, it
goes back to it (else a rollout would leave every agent on the replica updated first). In a
cluster one Service address suffices: each connect lands on a live replica.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
from meshagent.agent.config import AgentConfig
from meshagent.agent.identity.controller_signer import ControllerSigner
from meshagent.agent.state import SnapshotRejected, SnapshotStore
from meshagent.common.configwire import MessageStream, WireError

log = logging.getLogger(__name__)

# Covers the TCP connect and the TLS handshake.
CONNECT_TIMEOUT = 5.0
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0
# Away from its own replica this long (plus up to a fifth, so agents do not all move at
# once), an agent goes back to it: the spread recovers after a replica's outage or a rollout.
REBALANCE_AFTER = 300.0


@dataclass
class ControllerLink:
    """What `meshagent status` shows about the controller connection."""

    address: str
    connected: bool = False
    tls: bool = False
    since: float = 0.0
    last_error: str = ""
    snapshots_received: int = 0
    last_nack: str = ""


class ControllerGone(Exception):
    """The controller said goodbye (it is shutting down): try the next replica at once."""


class ControllerRefused(Exception):
    """The controller closed the stream saying why (e.g. the node token is not valid)."""


def controller_tls_context(ca_file: Path) -> ssl.SSLContext:
    """A client context that trusts only the mesh root in ``ca_file`` and checks the
    controller's certificate names the host or IP dialled. Raises ValueError if the file
    holds no usable certificate."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"controller CA file {ca_file} is unusable: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def replica_order(addresses: Sequence[tuple[str, int]], node: str) -> list[tuple[str, int]]:
    """``addresses`` rotated to start at the one ``node`` hashes to: a stable, even spread of
    agents over replicas (not Python's per-process salted hash)."""
    if not addresses:
        raise ValueError("no controller address given")
    digest = hashlib.md5(node.encode(), usedforsecurity=False).digest()
    start = int.from_bytes(digest[:8], "big") % len(addresses)
    return [*addresses[start:], *addresses[:start]]


def token_reader(path: Path | None) -> Callable[[], str]:
    """Reads the node token from ``path`` at each call ("" if there is none)."""

    def read() -> str:
        if path is None:
            return ""
        try:
            return path.read_text().strip()
        except OSError as exc:
            log.warning("node token %s unreadable: %s", path, exc)
            return ""

    return read


async def serve_controller_link(
    config: AgentConfig,
    store: SnapshotStore,
    link: ControllerLink,
    signer: ControllerSigner | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`serve_config_client` set up from the agent's config: its controller address, token
    file and controller CA file (plaintext, with a warning, when no CA file is configured)."""
    (host, port), *more = config.controller_addrs
    tls = None
    if config.controller_ca_file is not None:
        tls = controller_tls_context(config.controller_ca_file)
    else:
        log.warning("no controller_ca_file configured: talking to the controller in plaintext")
    await serve_config_client(
        store,
        host,
        port,
        token_reader(config.token_file),
        link,
        tls=tls,
        signer=signer,
        more=more,
        task_status=task_status,
    )


async def serve_config_client(
    store: SnapshotStore,
    host: str,
    port: int,
    token: str | Callable[[], str],
    link: ControllerLink,
    *,
    tls: ssl.SSLContext | None = None,
    signer: ControllerSigner | None = None,
    more: Sequence[tuple[str, int]] = (),
    rebalance_after: float = REBALANCE_AFTER,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Follow the controller at ``host:port`` until cancelled (see module docstring).

    ``token`` is the node credential, or a function reading it; ``tls`` the client context
    (None: plaintext); ``signer`` gets the stream while it is up; ``more`` are further
    replicas (the agent starts at the one its node hashes to, moves on when one goes, and
    goes back to it ``rebalance_after`` seconds later).
    """
    task_status.started()
    addresses = replica_order([(host, port), *more], store.node)
    turn = 0
    backoff = BACKOFF_MIN
    while True:
        index = turn % len(addresses)
        host, port = addresses[index]
        turn += 1
        link.address = f"{host}:{port}"
        try:
            stream = await _connect(host, port, tls)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            link.connected, link.last_error = False, f"connect: {_describe(exc)}"
            log.warning("controller %s:%d unreachable: %s", host, port, link.last_error)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            continue
        refused = gone = home = False
        async with stream:
            wire = MessageStream(stream)
            try:
                credential = token() if callable(token) else token
                await wire.send(
                    {
                        "type": "hello",
                        "node": store.node,
                        "token": credential,
                        "version": store.version,
                    }
                )
                link.connected, link.since, link.last_error = True, time.time(), ""
                link.tls = tls is not None
                backoff = BACKOFF_MIN
                log.info("connected to controller %s:%d", host, port)
                if signer is not None:
                    signer.attach(wire.send)
                away = rebalance_after * random.uniform(1, 1.2) if index else math.inf
                with trio.move_on_after(away) as timer:
                    await _receive_loop(wire, store, link, signer)
                home = timer.cancelled_caught
                link.last_error = (
                    "back to its own replica" if home else "controller closed the stream"
                )
            except ControllerGone as exc:
                gone = True
                link.last_error = f"controller said goodbye: {exc}"
            except ControllerRefused as exc:
                refused = True
                link.last_error = f"refused by the controller: {exc}"
            except (WireError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                link.last_error = _describe(exc)
            finally:
                link.connected = False
                if signer is not None:
                    signer.detach(link.last_error or "agent stopping")
        if home:
            log.info(
                "leaving controller %s:%d for its own replica %s:%d", host, port, *addresses[0]
            )
            turn = 0
            continue
        log.warning("controller %s:%d stream lost: %s", host, port, link.last_error)
        if not gone or len(addresses) == 1:  # a goodbye with another replica: go there now
            await trio.sleep(BACKOFF_MAX if refused else backoff)


async def _connect(host: str, port: int, tls: ssl.SSLContext | None) -> trio.abc.Stream:
    with trio.fail_after(CONNECT_TIMEOUT):
        if tls is None:
            return await trio.open_tcp_stream(host, port)
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=tls)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        return f"TLS: {exc.__cause__}"  # e.g. the certificate did not verify
    return str(exc) or type(exc).__name__


async def _receive_loop(
    wire: MessageStream,
    store: SnapshotStore,
    link: ControllerLink,
    signer: ControllerSigner | None,
) -> None:
    while True:
        message = await wire.receive()
        if message is None:
            return
        kind = message["type"]
        if kind in ("snapshot", "delta"):
            await _apply(wire, store, link, message)
        elif kind in ("certificate", "csr_refused") and signer is not None:
            try:
                signer.deliver(message)
            except ValueError as exc:
                raise WireError(str(exc)) from None
        elif kind == "goodbye":
            raise ControllerGone(str(message.get("reason") or "no reason given"))
        elif kind == "error":
            raise ControllerRefused(str(message.get("error") or "no reason given"))
        else:
            raise WireError(f"unexpected message type {kind!r}")


async def _apply(
    wire: MessageStream, store: SnapshotStore, link: ControllerLink, message: dict
) -> None:
    version = str(message.get("version", ""))
    link.snapshots_received += 1
    try:
        if message["type"] == "delta":
            store.apply_delta(str(message.get("base", "")), version, message.get("changes") or {})
        else:
            store.apply(message.get("snapshot") or {})
    except SnapshotRejected as exc:
        link.last_nack = str(exc)
        log.error("refused snapshot %s: %s", version, exc)
        await wire.send({"type": "nack", "version": version, "error": str(exc)})
        return
    log.info("applied snapshot %s", version)
    await wire.send({"type": "ack", "version": version})
