"""The hand-over registry: how agent pods on one node tell an upgrade from a removal.

What flows through it: one `<pod uid>.lock` and one `<pod uid>.json` per agent pod in
`<state-dir>/agents/` (a hostPath every agent pod on the node shares). The running agent of
a pod holds an exclusive flock on its `.lock` for its whole life (the kernel drops it however
the process ends), so "live" needs no heartbeat; the `.json` says when the pod first
registered and whether its agent serves. Contract: daemonset/README.md, "Upgrade and removal".

Readers never touch another pod's files: a crashed container of a live pod comes back with
the same registration.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `meshagent uninstall` (a preStop hook) needs no trio
    import trio

log = logging.getLogger(__name__)

REGISTRY = "agents"
HANDOFF = "handoff"  # the proxy processes' hand-off sockets (agent/proxy/handoff.py)
POD_UID_ENV = "POD_UID"
POD_NAME_ENV = "POD_NAME"
# The contract asks for at least one look a second; a yield or resume lags by this much.
POLL_INTERVAL = 1.0


class RegistrationError(RuntimeError):
    """This pod's registration cannot be taken (another process of the pod holds it)."""


@dataclass(frozen=True, order=True)
class Registration:
    """One agent pod's `<uid>.json`. Ordered by (registered_ns, pod_uid): later is newer."""

    registered_ns: int
    pod_uid: str
    pod_name: str = ""
    serving: bool = False

    @property
    def name(self) -> str:
        return self.pod_name or self.pod_uid


class Phase(enum.Enum):
    """Where this agent stands towards its successors on the node."""

    OWNER = "owner"  # no newer live agent: listen, answer ready, write the maps
    SUCCESSOR_STARTING = "successor-starting"  # a newer live agent, not serving yet
    HANDED_OVER = "handed-over"  # a newer live agent serves: it owns the node


def registry_dir(state_dir: Path) -> Path:
    return state_dir / REGISTRY


def read_registration(path: Path) -> Registration | None:
    """The registration in ``path``; None if it is missing or unreadable (logged)."""
    try:
        data = json.loads(path.read_text())
        return Registration(
            registered_ns=int(data["registered_ns"]),
            pod_uid=str(data["pod_uid"]),
            pod_name=str(data.get("pod_name", "")),
            serving=bool(data.get("serving", False)),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable agent registration %s: %s", path, exc)
        return None


def is_live(lock_file: Path) -> bool:
    """True while some process holds the registration's lock (the kernel drops it at exit)."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def newer_live_agents(registry: Path, pod_uid: str) -> list[Registration]:
    """Live agents registered after ours, oldest first.

    Without a registration of our own (we never got that far) every live agent is newer.
    """
    own = read_registration(registry / f"{pod_uid}.json")
    own_key = (own.registered_ns, own.pod_uid) if own else (-1, "")
    found = []
    for path in sorted(registry.glob("*.json")) if registry.is_dir() else []:
        other = read_registration(path)
        if other is None or other.pod_uid == pod_uid:
            continue
        if (other.registered_ns, other.pod_uid) > own_key and is_live(
            registry / f"{other.pod_uid}.lock"
        ):
            found.append(other)
    return sorted(found)


def live_agents(registry: Path) -> list[Registration]:
    """Every live agent registered on the node, oldest first (the newest owns the node; older
    ones are handed over or draining what they hold)."""
    found = []
    for path in sorted(registry.glob("*.json")) if registry.is_dir() else []:
        other = read_registration(path)
        if other is not None and is_live(registry / f"{other.pod_uid}.lock"):
            found.append(other)
    return sorted(found)


def newer_live_agent(registry: Path, pod_uid: str) -> str | None:
    """The pod name of a live agent registered after ours (our successor), if any."""
    newer = newer_live_agents(registry, pod_uid)
    return newer[-1].name if newer else None


def handoff_folder(state_dir: Path, pod_uid: str | None) -> Path:
    """Where one agent pod's proxy processes take connections handed to them, a socket each
    (agent/proxy/handoff.py): ``<state-dir>/handoff/<pod uid>`` (``local`` without one)."""
    return state_dir / HANDOFF / (pod_uid or "local")


def own_handoff_folder(state_dir: Path, env: Mapping[str, str] = os.environ) -> Path:
    """This agent pod's (its workers inherit ``$POD_UID``)."""
    return handoff_folder(state_dir, env.get(POD_UID_ENV))


def handoff_socket(folder: Path, pid: int) -> Path:
    return folder / f"{pid}.sock"


def handoff_sockets(folder: Path) -> list[Path]:
    """The sockets in an agent pod's hand-off folder (a stale one refuses: the sender moves on
    to the next)."""
    return sorted(folder.glob("*.sock")) if folder.is_dir() else []


def clear_handoff(folder: Path) -> None:
    """Forget the sockets a previous container of this pod left (its processes are gone)."""
    for stale in handoff_sockets(folder):
        stale.unlink(missing_ok=True)


def successor_handoff_sockets(
    registration: AgentRegistration | None, state_dir: Path
) -> list[Path]:
    """The hand-off sockets of the newest live agent on the node if it serves (an upgrade's
    successor), else none."""
    if registration is None:
        return []
    newer = registration.newer()
    if not newer or not newer[-1].serving:
        return []
    return handoff_sockets(handoff_folder(state_dir, newer[-1].pod_uid))


def phase(newer: list[Registration]) -> Phase:
    """What the live newer agents mean for us (pure: the poller feeds it)."""
    if not newer:
        return Phase.OWNER
    if any(r.serving for r in newer):
        return Phase.HANDED_OVER
    return Phase.SUCCESSOR_STARTING


def _write_json(path: Path, registration: Registration) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(registration)))
    os.replace(tmp, path)


class AgentRegistration:
    """This agent's own entry: the held lock and the `.json` it alone writes."""

    def __init__(self, registry: Path, registration: Registration, lock_fd: int) -> None:
        self.registry = registry
        self.registration = registration
        self._lock_fd = lock_fd

    @property
    def pod_uid(self) -> str:
        return self.registration.pod_uid

    def set_serving(self, serving: bool) -> None:
        if serving != self.registration.serving:
            self.registration = Registration(
                self.registration.registered_ns,
                self.registration.pod_uid,
                self.registration.pod_name,
                serving,
            )
            _write_json(self.registry / f"{self.pod_uid}.json", self.registration)

    def newer(self) -> list[Registration]:
        return newer_live_agents(self.registry, self.pod_uid)


@contextlib.contextmanager
def open_registration(
    state_dir: Path, pod_uid: str, pod_name: str = ""
) -> Iterator[AgentRegistration]:
    """Register this agent pod and hold its lock until exit.

    A restarted container of the same pod keeps its first ``registered_ns`` (so it stays
    "older" than a successor that registered meanwhile) and starts as not serving.
    Raises RegistrationError if another live process already holds this pod's lock.
    """
    registry = registry_dir(state_dir)
    registry.mkdir(parents=True, exist_ok=True)
    lock_file = registry / f"{pod_uid}.lock"
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise RegistrationError(
                f"another process of agent pod {pod_uid} holds {lock_file}: one agent per pod"
            ) from None
        path = registry / f"{pod_uid}.json"
        earlier = read_registration(path)
        registered_ns = earlier.registered_ns if earlier else time.time_ns()
        registration = Registration(registered_ns, pod_uid, pod_name, serving=False)
        _write_json(path, registration)
        log.info("registered agent pod %s in %s", pod_name or pod_uid, registry)
        yield AgentRegistration(registry, registration, fd)
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def open_registration_from_env(
    state_dir: Path, env: Mapping[str, str] = os.environ
) -> Iterator[AgentRegistration | None]:
    """`open_registration` for this pod (``$POD_UID``, ``$POD_NAME``); None when ``$POD_UID``
    is unset (the lab, or by hand: no other agent pod to hand over to)."""
    pod_uid = env.get(POD_UID_ENV)
    if not pod_uid:
        yield None
        return
    with open_registration(state_dir, pod_uid, env.get(POD_NAME_ENV, "")) as registration:
        yield registration


Service = Callable[..., Awaitable[None]]


class Recheck:
    """Asks the hand-over poller for a look now rather than at its next tick: an agent told
    to stop (SIGTERM) acts on, and logs, the phase it stops in (a successor may have started
    serving within the last poll interval)."""

    def __init__(self) -> None:
        import trio

        self._asked = trio.Event()
        self._looked = trio.Event()
        self.polling = False  # no registration (no $POD_UID): nothing to look at

    async def now(self, timeout: float) -> None:
        """Returns once a look that started after this call ended (or at ``timeout``)."""
        import trio

        if not self.polling:
            return
        looked = self._looked
        self._asked.set()
        with trio.move_on_after(timeout):
            await looked.wait()

    def begin_look(self) -> trio.Event | None:
        """The poller starts a look: the event to set when it ends, if one was asked for."""
        import trio

        if not self._asked.is_set():
            return None
        looked = self._looked
        self._asked, self._looked = trio.Event(), trio.Event()
        return looked

    async def wait(self, interval: float) -> None:
        """Until the next tick or a request, whichever comes first."""
        import trio

        with trio.move_on_after(interval):
            await self._asked.wait()


async def serve_handover(
    registration: AgentRegistration | None,
    is_ready: Callable[[], bool],
    readiness: Service,
    *,
    on_phase: Callable[[Phase], None] = lambda _phase: None,
    interval: float = POLL_INTERVAL,
    recheck: Recheck | None = None,
    task_status: trio.TaskStatus[None] | None = None,
) -> None:
    """Run the readiness listener while this agent owns the node; mark it serving once ready.

    ``readiness`` is a `serve_*` service (started with ``task_status``). It is closed while a
    newer live agent exists (the kubelet's probes on the shared port must reach only the
    newer one) and started again if that agent dies. ``on_phase`` hears every change of
    `Phase`, for the caller to stop and resume what else the newer agent takes over.
    Says started once the readiness listener listens. Without a registration (no
    ``$POD_UID``) it only serves ``readiness``. ``recheck`` asks for a look between ticks.
    """
    import trio

    recheck = recheck or Recheck()
    current = Phase.OWNER
    async with trio.open_nursery() as nursery:
        scope = await _start_in_scope(nursery, readiness)
        (task_status or trio.TASK_STATUS_IGNORED).started()
        if registration is None:
            return
        recheck.polling = True
        while True:
            looked = recheck.begin_look()
            try:
                found = await trio.to_thread.run_sync(registration.newer)
            except OSError as exc:
                log.warning("reading the agent registry %s: %s", registration.registry, exc)
                found = []
            now = phase(found)
            if now is not current:
                who = found[-1].name if found else ""
                log.info("hand-over: %s -> %s %s", current.value, now.value, who)
                if now is Phase.OWNER:
                    scope = await _start_in_scope(nursery, readiness)
                elif current is Phase.OWNER and scope is not None:
                    scope.cancel()
                    scope = None
                current = now
                on_phase(now)
            try:
                registration.set_serving(now is Phase.OWNER and is_ready())
            except OSError as exc:
                log.warning("writing the agent registration: %s", exc)
            if looked is not None:
                looked.set()
            await recheck.wait(interval)


async def _start_in_scope(nursery: trio.Nursery, service: Service) -> trio.CancelScope:
    """Start ``service`` in the nursery inside a cancel scope of its own; return the scope."""
    import trio

    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await service(task_status=task_status)

    await nursery.start(run)
    return scope
