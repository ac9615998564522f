"""Serves agents their node's snapshot and workload certificates over one TLS stream each.

Per connection: TLS (a server certificate the controller issues itself, `StreamCertificate`),
then the agent's hello. Its token is checked by a `NodeAuthenticator` (bootstrap tokens in
the lab, TokenReview in a cluster); the node it belongs to is the session's node, and a hello
claiming another node is refused. A refusal sends one `error` line, closes the stream and
counts in `meshagent_controller_auth_failures_total`. Then the controller sends the node's
current snapshot if the versions differ, pushes again whenever a model change alters the
node's snapshot (a burst of changes is coalesced into one published version: compiled once,
`COALESCE_WINDOW` after its first change, or later while the previous version is still being
delivered, up to `COALESCE_MAX`; a node whose snapshot version did not change gets nothing),
records ACK/NACKs,
and answers CSRs with `sign_for_node`: only identities of pods scheduled (and not finished)
on the session's node. Sessions are kept for
`meshctl status`. Message types: `meshagent.common.configwire`; on a clean shutdown
(`close_streams`) every agent gets ``{"type": "goodbye", "reason": ...}`` before its stream
ends, and an agent connecting after that gets only the goodbye, so agents reconnect (to
another replica) at once and say why.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import httpx2
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lightkube import AsyncClient
from lightkube.models.authentication_v1 import TokenReviewSpec
from lightkube.resources.authentication_v1 import TokenReview
from meshagent.common import snapshotdelta
from meshagent.common.configwire import MessageStream, WireError, encode_snapshot_message
from meshagent.common.snapshot import Snapshot
from meshagent.common.spiffe import Identity, InvalidIdentity
from meshagent.controller.ca import CertificateAuthority, SigningRefused
from meshagent.controller.compiler import SharedSnapshot
from meshagent.controller.gcfreeze import HeapKeeper
from meshagent.controller.incremental import IncrementalCompiler
from meshagent.controller.model import ClusterModel
from meshagent.controller.signing import (
    CSR_REFUSED,
    AuthenticationFailed,
    NodeTokenAuthenticator,
    sign_for_node,
)
from prometheus_client import Counter

log = logging.getLogger(__name__)

# Covers the TLS handshake, the hello and its authentication.
HELLO_TIMEOUT = 10.0
# How long a goodbye may take to send at shutdown (a stuck agent must not hold it up).
GOODBYE_TIMEOUT = 2.0
# A burst of model changes (a rollout's Pod and EndpointSlice events arrive within
# milliseconds of each other) is compiled and pushed once: after a change, sessions wait this
# long for the rest of the burst. It is also the most a lone change waits before its push,
# and under steady churn it caps compiles at one per window.
COALESCE_WINDOW = 0.1
# Under churn the window grows while the previous version is still in flight (more agents
# than `STRAGGLERS` have not answered it): one version per push round instead of one per
# window, so a round that takes longer than the window is not followed by a queue of versions
# each costing a send and an ACK per agent. A stuck agent holds a version back at most this
# long; a few slow ones (1 % of the agents) do not hold it back at all (one snapshot in
# flight per agent already spares them the versions they miss).
COALESCE_MAX = 1.0
STRAGGLERS = 0.01
# Pairs of compiles whose shared changes are kept, least recently used first out. Under churn
# agents hold different versions (one in flight each, stragglers behind): a pair evicted while
# agents still need it costs a diff of every workload per agent (seconds at 30,000 pods).
DELTA_CACHE_SIZE = 64
# Whole snapshots being encoded and sent at once (each session otherwise holds its own copy,
# plus TLS's, of a body that lists the whole cluster: ~10 MB at 30,000 pods).
WHOLE_SENDS = 8
DEFAULT_CERT_LIFETIME = timedelta(hours=24)
SERVER_CERT_LIFETIME = timedelta(days=30)
# The controller's own identity: spiffe://<td>/ns/<namespace>/sa/meshctl.
CONTROLLER_SERVICE_ACCOUNT = "meshctl"
# What the agents' projected tokens are addressed to (daemonset/base/agent.yaml).
TOKEN_AUDIENCE = "meshagent-controller"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
_FINISHED_PHASES = ("Succeeded", "Failed")

AUTH_FAILURES = Counter(
    "meshagent_controller_auth_failures_total",
    "Agent streams refused before a session began, by reason: missing_token, invalid_token, "
    "node_mismatch, unavailable (the credential could not be checked), bad_hello.",
    ["reason"],
)


# -- node authentication -------------------------------------------------------------------


class AuthenticationUnavailable(Exception):
    """The credential could not be checked at all (the API server did not answer)."""


class NodeAuthenticator(Protocol):
    """Turns a node credential into the name of the node it belongs to."""

    async def authenticate(self, token: str) -> str:
        """The node's name; raises `AuthenticationFailed` or `AuthenticationUnavailable`."""
        ...


class TokenFileAuthenticator:
    """The lab's bootstrap tokens (`NodeTokenAuthenticator`'s file), re-read when it changes:
    the lab issues a node's token when it starts that node's agent, after the controller."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None
        self._tokens: NodeTokenAuthenticator | None = None

    async def authenticate(self, token: str) -> str:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise AuthenticationFailed(f"no node tokens issued yet ({self.path})") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._seen or self._tokens is None:
            self._tokens = NodeTokenAuthenticator(self.path)
            self._seen = stamp
        return self._tokens.authenticate(token)


class TokenReviewAuthenticator:
    """A cluster's agents: their projected service-account token, checked by TokenReview.

    The token must be addressed to ``audience``, belong to the agents' service account
    (``namespace/name``; any pod can ask for a token with any audience, so the audience alone
    proves nothing) and be bound to a pod, whose node the API server names in the user's
    extra field `authentication.kubernetes.io/node-name`.
    """

    def __init__(
        self, client: AsyncClient, service_account: str, audience: str = TOKEN_AUDIENCE
    ) -> None:
        namespace, _, name = service_account.partition("/")
        if not namespace or not name:
            raise ValueError(
                f"agent service account must be namespace/name, got {service_account!r}"
            )
        self._client = client
        self._username = f"system:serviceaccount:{namespace}:{name}"
        self._audience = audience

    async def authenticate(self, token: str) -> str:
        user = await reviewed_user(self._client, token, self._audience)
        username = user.username if user else None
        if username != self._username:
            raise AuthenticationFailed(
                f"token belongs to {username!r}, not the agents' {self._username!r}"
            )
        nodes = ((user.extra if user else None) or {}).get(NODE_NAME_EXTRA) or []
        if len(nodes) != 1 or not nodes[0]:
            raise AuthenticationFailed(
                "token is not bound to a pod on a node (no node name in the TokenReview;"
                " the agent must use a projected service-account token)"
            )
        return str(nodes[0])


async def reviewed_user(client: AsyncClient, token: str, audience: str) -> Any:
    """Who the API server's TokenReview says `token` belongs to (its `UserInfo`), once it is
    authenticated and addressed to `audience`. Raises AuthenticationFailed, or
    AuthenticationUnavailable when the API cannot be asked."""
    review = TokenReview(spec=TokenReviewSpec(token=token, audiences=[audience]))
    try:
        answer = await client.create(review)
    except (httpx2.HTTPError, ValueError) as exc:
        raise AuthenticationUnavailable(f"TokenReview failed: {exc}") from None
    status = answer.status
    if status is None or not status.authenticated:
        why = (status.error if status else None) or "not authenticated"
        raise AuthenticationFailed(f"token rejected by TokenReview: {why}")
    if audience not in (status.audiences or []):
        raise AuthenticationFailed(f"token is not addressed to audience {audience!r}")
    return status.user


# -- the stream's server certificate -------------------------------------------------------


def controller_identity(trust_domain: str, namespace: str) -> Identity:
    return Identity(trust_domain, namespace, CONTROLLER_SERVICE_ACCOUNT)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to ``data`` that never touches a disk (`ssl` loads keys only from files)."""
    fd = os.memfd_create("meshctl-tls", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


class StreamCertificate:
    """The TLS server side of 15012: a certificate the controller issues itself, with its own
    SPIFFE identity and the names agents dial (DNS names or IPs), renewed at half life into
    the same `context` (new handshakes get the new certificate).

    ``issuer_pem`` holds the issuing CA certificate and its private key (the root CA file or
    Secret). Raises ValueError if it does not.
    """

    def __init__(
        self,
        issuer_pem: bytes,
        identity: Identity,
        names: Sequence[str],
        lifetime: timedelta = SERVER_CERT_LIFETIME,
    ) -> None:
        try:
            self._issuer = x509.load_pem_x509_certificate(issuer_pem)
            key = serialization.load_pem_private_key(issuer_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"CA material for the stream certificate is unusable: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"the CA key must be ECDSA, got {type(key).__name__}")
        self._issuer_key = key
        self.identity = identity
        self.names = tuple(names)
        self._sans = [x509.UniformResourceIdentifier(identity.uri), *map(_san, self.names)]
        self.lifetime = lifetime
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.not_after = self._issue()

    def _issue(self) -> datetime:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        not_after = min(now + self.lifetime, self._issuer.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshctl")]))
            .issuer_name(self._issuer.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(self._sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._issuer_key.public_key()),
                critical=False,
            )
            .sign(self._issuer_key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with _memory_file(chain) as chain_path, _memory_file(key_pem) as key_path:
            self.context.load_cert_chain(chain_path, key_path)
        log.info(
            "stream certificate for %s (%s) valid until %s",
            self.identity,
            ", ".join(self.names) or "no names",
            not_after.isoformat(),
        )
        return not_after

    async def serve_renewal(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            left = (self.not_after - datetime.now(UTC)).total_seconds()
            await trio.sleep(max(left / 2, 1.0))
            self.not_after = self._issue()


# -- sessions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduledPod:
    """A pod as node-scoped signing sees it (`signing.PodInfo`)."""

    namespace: str
    name: str
    node: str
    service_account: str


def scheduled_pods(model: ClusterModel, node: str) -> list[ScheduledPod]:
    """Pods scheduled on ``node`` that have not finished: the identities it may have signed."""
    out = []
    for pod in model.objects("Pod"):
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        if spec.get("nodeName") != node:
            continue
        if (pod.get("status") or {}).get("phase") in _FINISHED_PHASES:
            continue
        out.append(
            ScheduledPod(
                namespace=meta.get("namespace") or "default",
                name=meta.get("name", ""),
                node=node,
                service_account=spec.get("serviceAccountName") or "default",
            )
        )
    return out


@dataclass
class AgentSession:
    node: str
    peer: str
    tls: bool = False
    connected_at: float = field(default_factory=time.time)
    sent_version: str = ""
    acked_version: str = ""
    # The newest model generation whose content the agent holds (acked) and the one the
    # version in flight stands for: how far behind the cluster a node is, whatever
    # coalescing merged (benchmarks.push_latency measures by it).
    acked_generation: int = 0
    sent_generation: int = 0
    nacked_version: str = ""
    # Set by the agent's ACK or NACK: one snapshot is in flight per stream at a time.
    answered: trio.Event = field(default_factory=trio.Event, repr=False)
    # The snapshot in flight and the one the agent ACKed on this stream (deltas start there)
    in_flight: Snapshot | None = field(default=None, repr=False)
    in_flight_delta: bool = False
    held: Snapshot | None = field(default=None, repr=False)
    deltas_sent: int = 0
    full_sent: int = 0
    bytes_sent: int = 0
    last_nack: str = ""
    connected: bool = True
    csr_signed: int = 0
    csr_refused: int = 0
    last_csr_refusal: str = ""

    def as_dict(self) -> dict:
        return {
            "node": self.node,
            "peer": self.peer,
            "tls": self.tls,
            "connected": self.connected,
            "connected_for_s": round(time.time() - self.connected_at, 1),
            "sent_version": self.sent_version,
            "acked_version": self.acked_version,
            "last_nack": self.last_nack,
            "csr_signed": self.csr_signed,
            "csr_refused": self.csr_refused,
            "last_csr_refusal": self.last_csr_refusal,
        }


class _Refused(Exception):
    """The stream is refused before a session begins; ``reason`` labels the metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _peer(stream: trio.abc.Stream) -> str:
    socket_stream = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    try:
        host, port = socket_stream.socket.getpeername()[:2]
    except (AttributeError, OSError):
        return "?"
    return f"{host}:{port}"


@dataclass
class _Version:
    """One published compile: what every session pushes until the next is published. What
    all nodes share is encoded once here, not per session."""

    generation: int
    shared: SharedSnapshot
    snapshots: dict[str, Snapshot] = field(default_factory=dict)  # per node, made on demand
    body: bytes | None = None  # the shared part as a whole snapshot carries it

    def for_node(self, node: str) -> Snapshot:
        snap = self.snapshots.get(node)
        if snap is None:
            snap = self.snapshots[node] = self.shared.for_node(node)
        return snap

    def shared_body(self) -> bytes:
        if self.body is None:
            body = self.shared.snapshot.model_dump(
                mode="json", exclude={"node", "version", "local_workloads"}
            )
            self.body = json.dumps(body, separators=(",", ":")).encode()
        return self.body


class PushServer:
    """The agent stream server (see module docstring).

    ``ca`` signs workload certificates (without one every CSR is refused); ``tls`` is the
    server context (None serves plaintext, for development only: agents cannot then check
    whom they talk to).
    """

    def __init__(
        self,
        model: ClusterModel,
        *,
        authenticator: NodeAuthenticator,
        ca: CertificateAuthority | None = None,
        tls: ssl.SSLContext | None = None,
        cert_lifetime: timedelta = DEFAULT_CERT_LIFETIME,
        coalesce: float = COALESCE_WINDOW,
        coalesce_max: float = COALESCE_MAX,
        heap: HeapKeeper | None = None,
    ) -> None:
        if cert_lifetime <= timedelta(0):
            raise ValueError(f"certificate lifetime must be positive, got {cert_lifetime}")
        self.model = model
        self.authenticator = authenticator
        self.ca = ca
        self.tls = tls
        self.cert_lifetime = cert_lifetime
        self.trust_bundle = ca.trust_bundle_pem if ca is not None else None
        self._sessions: dict[str, list[AgentSession]] = {}  # node -> live ones, last closed
        self.auth_failures = 0
        self.last_auth_failure = ""
        self._cache: dict[str, tuple[int, Snapshot]] = {}
        self._delta_cache: dict[tuple[int, int], tuple[list, list, bytes]] = {}
        self._shared: tuple[int, SharedSnapshot] | None = None
        self._compiler = IncrementalCompiler()  # kept between changes: work per change
        # the process's collector, kept to short full collections (the controller's own
        # push server has one; tests leave the process's collector alone)
        self._heap = heap
        self._wires: dict[int, MessageStream] = {}  # id(session) -> its stream, while open
        self._closing: str | None = None  # the goodbye reason, once close_streams began
        self.coalesce = coalesce
        self.coalesce_max = max(coalesce, coalesce_max)
        self._whole_sends = trio.Semaphore(WHOLE_SENDS)
        self._version: _Version | None = None  # what sessions push (see _settle)
        self._settled = trio.Event()
        # sessions with a snapshot or delta sent and not yet answered (see _settle), and
        # set when few are
        self._in_flight: set[int] = set()
        self._drained = trio.Event()

    def snapshot_for(self, node: str) -> Snapshot:
        """The node's snapshot of the model as it is now (sessions push the published version,
        which catches up within the coalescing window)."""
        generation = self.model.generation
        if self._version is not None and self._version.generation == generation:
            return self._version.for_node(node)
        cached = self._cache.get(node)
        if cached and cached[0] == generation:
            return cached[1]
        snap = self._compile()[1].for_node(node)
        self._cache[node] = (generation, snap)
        return snap

    def _compile(self) -> tuple[int, SharedSnapshot]:
        """The compile of the model as it is now, once per model generation."""
        generation = self.model.generation
        if self._shared is None or self._shared[0] != generation:
            self._shared = (generation, self._compiler.compile(self.model, self.trust_bundle))
        return self._shared

    def _current(self) -> _Version:
        """The published version sessions push; the first is published on first use."""
        if self._version is None:
            self._publish()
        assert self._version is not None
        return self._version

    def _publish(self) -> None:
        """Make the model as it is now the version sessions push, and wake them."""
        generation, shared = self._compile()
        self._version = _Version(generation, shared)
        self._cache.clear()
        self._settled.set()
        self._settled = trio.Event()
        if self._heap is not None:
            self._heap.after_publish()

    @property
    def sessions(self) -> dict[str, AgentSession]:
        """Per node, its newest connected session, else the last one that closed (a node may
        have several streams for a moment, e.g. an agent reconnecting before the old
        connection timed out)."""
        out = {}
        for node, sessions in self._sessions.items():
            live = [s for s in sessions if s.connected]
            out[node] = (live or sessions)[-1]
        return out

    def _opened(self, session: AgentSession) -> None:
        self._sessions.setdefault(session.node, []).append(session)

    def _closed(self, session: AgentSession) -> None:
        session.connected = False
        sessions = self._sessions[session.node]
        sessions[:] = [s for s in sessions if s.connected or s is session]
        if len(sessions) > 1:
            sessions.remove(session)  # others are live: they speak for the node

    def status(self) -> dict[str, Any]:
        return {
            "tls": self.tls is not None,
            "auth_failures": self.auth_failures,
            "last_auth_failure": self.last_auth_failure,
        }

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept agents on ``host:port`` until cancelled; says started with the listening
        sockets (port 0 picks a free port)."""
        sockets = await trio.open_tcp_listeners(port, host=host)
        listeners: list[trio.abc.Listener] = list(sockets)
        if self.tls is not None:
            listeners = [trio.SSLListener(lst, self.tls) for lst in sockets]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._settle)
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(sockets)

    async def close_streams(self, reason: str, *, timeout: float = GOODBYE_TIMEOUT) -> int:
        """Say goodbye (with ``reason``) on every agent stream, and to any agent that
        connects from now on; returns how many were told. The streams close when the
        server is cancelled."""
        self._closing = reason
        wires = list(self._wires.values())
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for wire in wires:
                    nursery.start_soon(self._goodbye, wire)
        log.info("told %d agent(s) goodbye: %s", len(wires), reason)
        return len(wires)

    async def _goodbye(self, wire: MessageStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await wire.send({"type": "goodbye", "reason": self._closing})

    async def _handle(self, stream: trio.abc.Stream) -> None:
        peer = _peer(stream)
        wire = MessageStream(stream)
        session = None
        if self._closing is not None:
            with trio.move_on_after(GOODBYE_TIMEOUT):
                await self._goodbye(wire)
            await trio.aclose_forcefully(stream)
            return
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                if isinstance(stream, trio.SSLStream):
                    await stream.do_handshake()
                hello = await wire.receive()
                if hello is None:
                    return
                node = await self._admit(hello)
            session = AgentSession(node=node, peer=peer, tls=isinstance(stream, trio.SSLStream))
            session.acked_version = str(hello.get("version") or "")
            self._opened(session)
            self._wires[id(session)] = wire
            log.info("agent %s connected from %s (has %r)", node, peer, session.acked_version)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_closed, self._read_agent(wire, session), nursery)
                nursery.start_soon(self._until_closed, self._push_loop(wire, session), nursery)
        except _Refused as refusal:
            await self._refuse(wire, peer, refusal)
        except (WireError, trio.TooSlowError) as exc:
            log.warning("agent stream from %s closed: %s", peer, exc or "hello timeout")
        except trio.BrokenResourceError as exc:
            if session is None:
                log.info("agent stream from %s failed before hello: %s", peer, exc.__cause__ or exc)
        except trio.ClosedResourceError:
            pass
        finally:
            if session is not None:
                self._wires.pop(id(session), None)
                self._flight_ends(session)
                self._closed(session)
                log.info("agent %s disconnected from %s", session.node, peer)
            await trio.aclose_forcefully(stream)

    async def _admit(self, hello: dict) -> str:
        """The authenticated node of this stream; raises `_Refused`."""
        if hello.get("type") != "hello":
            raise _Refused("bad_hello", f"expected a hello, got {hello.get('type')!r}")
        token, claimed = hello.get("token"), hello.get("node")
        if not isinstance(token, str) or not token:
            raise _Refused("missing_token", "the hello carries no node token")
        try:
            node = await self.authenticator.authenticate(token)
        except AuthenticationFailed as exc:
            raise _Refused("invalid_token", str(exc)) from None
        except AuthenticationUnavailable as exc:
            raise _Refused("unavailable", f"node token could not be checked: {exc}") from None
        if claimed not in (None, "", node):
            raise _Refused(
                "node_mismatch", f"the token is node {node!r}'s, the hello claims {claimed!r}"
            )
        return node

    async def _refuse(self, wire: MessageStream, peer: str, refusal: _Refused) -> None:
        """Count the refusal and tell the agent why, before the stream closes."""
        AUTH_FAILURES.labels(reason=refusal.reason).inc()
        self.auth_failures += 1
        self.last_auth_failure = f"{peer}: {refusal}"
        log.warning("agent stream from %s refused: %s", peer, refusal)
        with (
            trio.move_on_after(HELLO_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await wire.send({"type": "error", "error": f"authentication failed: {refusal}"})

    async def _until_closed(self, work: Awaitable[None], nursery: trio.Nursery) -> None:
        """Run one side of a session; whichever side ends or fails ends the session."""
        try:
            await work
        except (WireError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("agent stream closed: %s", exc or type(exc).__name__)
        finally:
            nursery.cancel_scope.cancel()

    async def _push_loop(self, wire: MessageStream, session: AgentSession) -> None:
        """Send the node its snapshot of the published version whenever that changes, with
        one in flight at a time (as xDS waits for the ACK): an agent slower than the churn
        gets fewer, newer snapshots instead of a growing queue of stale ones. Once the agent
        has ACKed a snapshot on this stream, only the changes from it travel (a delta)."""
        while True:
            version = self._current()
            snap = version.for_node(session.node)
            if snap.version == session.acked_version:
                session.acked_generation = version.generation  # nothing new for this node
            elif snap.version == session.sent_version:
                session.sent_generation = version.generation  # in flight, and still current
            else:
                session.sent_version, session.sent_generation = snap.version, version.generation
                session.answered = trio.Event()
                session.in_flight = snap
                self._flight_begins(session)
                message = self._delta_for(session, snap)
                session.in_flight_delta = message is not None
                if message is not None:
                    session.deltas_sent += 1
                    session.bytes_sent += len(message)
                    await wire.send_encoded(message)
                else:
                    # a whole snapshot is the size of the cluster: a reconnect storm sends
                    # a few at a time instead of holding every agent's copy at once
                    async with self._whole_sends:
                        message = self._whole_message(version, snap)
                        session.full_sent += 1
                        session.bytes_sent += len(message)
                        await wire.send_encoded(message)
                        del message
            if session.sent_version not in (session.acked_version, session.nacked_version):
                await session.answered.wait()
                continue  # look again: newer content, or the whole snapshot after a NACK
            await self._wait_settled(version.generation)

    def _delta_for(self, session: AgentSession, snap: Snapshot) -> bytes | None:
        """The encoded delta taking the node from what it holds to `snap`, None when it holds
        nothing this stream can build on (it gets the whole snapshot). A delta carries only
        changed items, so it is never much larger than the whole snapshot. The shared part's
        changes are encoded once per pair of versions; only the node's own are encoded here."""
        held = session.held
        if held is None or held.version != session.acked_version:
            return None
        parts = [self._shared_changes(held, snap)]
        local = snapshotdelta.diff(held, snap, ("local_workloads",))
        if local:
            parts.append(json.dumps(local, separators=(",", ":"))[1:-1].encode())
        head = json.dumps({"type": "delta", "version": snap.version, "base": held.version})
        changes = b",".join(p for p in parts if p)
        return b"".join((head[:-1].encode(), b',"changes":{', changes, b"}}"))

    def _whole_message(self, version: _Version, snap: Snapshot) -> bytes:
        local = [w.model_dump(mode="json") for w in snap.local_workloads]
        return encode_snapshot_message(snap.version, snap.node, version.shared_body(), local)

    def _shared_changes(self, old: Snapshot, new: Snapshot) -> bytes:
        """The changes to the part every node shares as the members of a JSON object (without
        braces), computed and encoded once per pair of compiles (a node's snapshot shares its
        lists with the compile it came from)."""
        key = (id(old.workloads), id(new.workloads))
        hit = self._delta_cache.pop(key, None)
        if hit is not None:
            self._delta_cache[key] = hit  # the most recently used, last out
        else:
            changes = snapshotdelta.diff(old, new, snapshotdelta.SHARED_FIELDS)
            encoded = json.dumps(changes, separators=(",", ":"))[1:-1].encode()
            # keeping both lists alive keeps their ids from being reused while cached
            hit = (old.workloads, new.workloads, encoded)
            self._delta_cache[key] = hit
            while len(self._delta_cache) > DELTA_CACHE_SIZE:
                self._delta_cache.pop(next(iter(self._delta_cache)))
        return hit[2]

    async def _settle(self) -> None:
        """Coalesce model changes into published versions: once the model changes, wait
        `coalesce` seconds for the rest of the burst, and longer (up to `coalesce_max` in
        all) while the previous version is still in flight to more than a few agents
        (`STRAGGLERS`), then publish the
        model as it is now. Sessions wake together, so the burst is compiled once and what
        every node shares is encoded once; each node gets a message only if its own
        snapshot's version changed. Under churn this makes one version per push round: the
        window grows with the time a round takes, instead of versions queueing behind it."""
        while True:
            await self.model.wait_changed(self._current().generation)
            deadline = trio.current_time() + self.coalesce_max
            await trio.sleep(self.coalesce)
            with trio.move_on_at(deadline):
                while not self._few_in_flight():
                    if self._drained.is_set():
                        self._drained = trio.Event()
                    await self._drained.wait()
            self._publish()

    async def _wait_settled(self, pushed: int) -> None:
        """Until a version newer than the one a session last looked at is published."""
        while self._current().generation <= pushed:
            await self._settled.wait()

    def _few_in_flight(self) -> bool:
        """At most `STRAGGLERS` of the open streams wait to answer a snapshot or delta."""
        return len(self._in_flight) <= int(len(self._wires) * STRAGGLERS)

    def _flight_begins(self, session: AgentSession) -> None:
        self._in_flight.add(id(session))

    def _flight_ends(self, session: AgentSession) -> None:
        """The session answered (or closed): `_settle` stops waiting once few are left."""
        if id(session) in self._in_flight:
            self._in_flight.discard(id(session))
            if self._few_in_flight():
                self._drained.set()

    async def _read_agent(self, wire: MessageStream, session: AgentSession) -> None:
        handlers: dict[str, Callable[[MessageStream, AgentSession, dict], Awaitable[None]]] = {
            "ack": self._on_ack,
            "nack": self._on_nack,
            "csr": self._on_csr,
        }
        while True:
            message = await wire.receive()
            if message is None:
                return
            handler = handlers.get(message["type"])
            if handler is None:
                raise WireError(f"unexpected message type {message['type']!r}")
            await handler(wire, session, message)

    async def _on_ack(self, _wire: MessageStream, session: AgentSession, message: dict) -> None:
        session.acked_version = str(message.get("version", ""))
        if session.acked_version == session.sent_version:
            session.acked_generation = session.sent_generation
            session.held = session.in_flight
        session.last_nack = ""
        session.answered.set()
        self._flight_ends(session)

    async def _on_nack(self, _wire: MessageStream, session: AgentSession, message: dict) -> None:
        session.last_nack = str(message.get("error", ""))
        session.nacked_version = str(message.get("version", ""))
        if session.in_flight_delta and session.nacked_version == session.sent_version:
            # the agent could not rebuild it from what it holds: send it whole next
            session.held, session.sent_version, session.nacked_version = None, "", ""
        session.answered.set()
        self._flight_ends(session)
        log.warning(
            "agent %s refused %s: %s", session.node, message.get("version"), session.last_nack
        )

    async def _on_csr(self, wire: MessageStream, session: AgentSession, message: dict) -> None:
        request_id = message.get("id")
        if not isinstance(request_id, int) or isinstance(request_id, bool):
            raise WireError("csr message without an integer id")
        asked = message.get("identity")
        try:
            ca, identity, csr_pem = self._csr_request(message)
        except SigningRefused as exc:
            CSR_REFUSED.labels(reason=exc.reason).inc()
            return await self._refuse_csr(wire, session, request_id, asked, exc)
        try:
            chain = sign_for_node(
                ca,
                session.node,
                csr_pem,
                identity,
                scheduled_pods(self.model, session.node),
                self.cert_lifetime,
            )
        except SigningRefused as exc:  # counted by sign_for_node
            return await self._refuse_csr(wire, session, request_id, asked, exc)
        session.csr_signed += 1
        log.info("signed %s for node %s", identity, session.node)
        pems = [chain.leaf_pem, *chain.intermediates_pem]
        await wire.send(
            {"type": "certificate", "id": request_id, "chain": [p.decode("ascii") for p in pems]}
        )

    def _csr_request(self, message: dict) -> tuple[CertificateAuthority, Identity, bytes]:
        """What a csr message asks for; raises `SigningRefused` before any signing."""
        if self.ca is None:
            raise SigningRefused("no_ca", "this controller runs without a certificate authority")
        try:
            identity = Identity.parse(message.get("identity"))
        except InvalidIdentity as exc:
            raise SigningRefused("bad_identity", str(exc)) from None
        csr = message.get("csr")
        if not isinstance(csr, str) or not csr.isascii():
            raise SigningRefused("malformed_csr", "the csr field must be a PEM string")
        return self.ca, identity, csr.encode("ascii")

    async def _refuse_csr(
        self,
        wire: MessageStream,
        session: AgentSession,
        request_id: int,
        asked: object,
        exc: SigningRefused,
    ) -> None:
        session.csr_refused += 1
        session.last_csr_refusal = f"{asked}: {exc}"
        log.warning("refused certificate %s to node %s: %s", asked, session.node, exc)
        await wire.send({"type": "csr_refused", "id": request_id, "reason": str(exc)})
