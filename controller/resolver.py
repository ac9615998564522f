"""The controller resolves the names of ServiceEntries with `resolution: DNS`, so agents never do.

As Envoy's STRICT_DNS and LOGICAL_DNS clusters do for Istio, each name (an endpoint's address,
or a host when the entry lists no endpoints) is resolved and re-resolved every REFRESH seconds
(Istio's meshConfig.dnsRefreshRate, 60 s by default); here once, by the controller, with its
resolver (the cluster's DNS when it runs as a pod), and the addresses go into the snapshot as
the entry's endpoints (controller/serviceentry.py), so a change of addresses reaches the agents
like any other change.

What flows through: accepted ServiceEntries out of the cluster model in; for each name a
RESOLVED_KIND object back into the model (`{"metadata": {"name": name}, "addresses": [...]}`,
in the resolver's order). A name that does not resolve is retried every RETRY seconds with one
WARNING per new problem; until it first resolves the entry has no endpoint for it (requests
routed there get 503 "no healthy upstream"); after that a failed refresh keeps the last
addresses, as Envoy keeps its last hosts.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Awaitable, Callable

import trio
from meshagent.common.istio.serviceentry import node_local
from meshagent.controller.model import ClusterModel
from meshagent.controller.serviceentry import model_entries

log = logging.getLogger(__name__)

RESOLVED_KIND = "meshagent.io/ResolvedName"  # internal: never read from a source
REFRESH = 60.0
RETRY = 5.0
TIMEOUT = 5.0

Resolve = Callable[[str], Awaitable[list[str]]]


async def resolve_name(name: str) -> list[str]:
    """The addresses of `name` (IPv4 and IPv6, the resolver's order, each once). Raises
    OSError (socket.gaierror) when it does not resolve, TooSlowError after TIMEOUT."""
    with trio.fail_after(TIMEOUT):
        infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _usable(addresses: list[str]) -> list[str]:
    """The addresses an endpoint may have: not the node's own (`node_local`: a name that
    resolves to 127.0.0.1 would have the node proxy dial its own node). Raises OSError when
    none is left."""
    kept = [a for a in addresses if not node_local(a.split("%")[0])]
    if not kept:
        raise OSError(
            f"resolves only to the node's own addresses {addresses}" if addresses else "no address"
        )
    return kept


def names_to_resolve(model: ClusterModel) -> set[str]:
    return {name for entry in model_entries(model) for name in entry.spec.names_to_resolve()}


def resolved_names(model: ClusterModel) -> dict[str, tuple[str, ...]]:
    """The addresses each resolved name has, for the snapshot (controller/serviceentry.py)."""
    return {
        obj["metadata"]["name"]: tuple(obj["addresses"])
        for obj in model.objects(RESOLVED_KIND)
        if isinstance(obj.get("addresses"), list)
    }


class NameResolver:
    """Keeps RESOLVED_KIND objects in the model in step with the names the entries need."""

    def __init__(
        self,
        model: ClusterModel,
        *,
        resolve: Resolve = resolve_name,
        refresh: float = REFRESH,
        retry: float = RETRY,
    ) -> None:
        self.model = model
        self.resolve = resolve
        self.refresh = refresh
        self.retry = retry
        self.due: dict[str, float] = {}  # name -> when to resolve it next (trio clock)
        self.problems: dict[str, str] = {}  # name -> the last failure, logged once

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED):
        task_status.started()
        while True:
            await self.run_once()
            wait = min(self.due.values(), default=math.inf) - trio.current_time()
            seen = self.model.generation
            with trio.move_on_after(max(wait, 0)):
                await self.model.wait_changed(seen)

    async def run_once(self) -> None:
        """Resolve what is due, forget what is no longer needed."""
        wanted = names_to_resolve(self.model)
        for obj in list(self.model.objects(RESOLVED_KIND)):
            if obj["metadata"]["name"] not in wanted:
                self.model.delete(RESOLVED_KIND, obj)
        for name in set(self.due) - wanted:
            del self.due[name]
            self.problems.pop(name, None)
        now = trio.current_time()
        for name in sorted(wanted):
            if self.due.get(name, now) > now:
                continue
            try:
                addresses = _usable(await self.resolve(name))
            except (OSError, trio.TooSlowError) as exc:
                self.due[name] = trio.current_time() + self.retry
                problem = str(exc) or type(exc).__name__
                if self.problems.get(name) != problem:
                    self.problems[name] = problem
                    kept = self.model.get(RESOLVED_KIND, "", name) is not None
                    log.warning(
                        "cannot resolve %s: %s; %s",
                        name,
                        problem,
                        "keeping the addresses resolved before"
                        if kept
                        else "its ServiceEntry has no endpoint for it until it resolves",
                    )
                continue
            self.due[name] = trio.current_time() + self.refresh
            if self.problems.pop(name, None) is not None:
                log.info("resolved %s: %s", name, ", ".join(addresses))
            current = self.model.get(RESOLVED_KIND, "", name)
            if current is None or current.get("addresses") != addresses:
                self.model.upsert(
                    RESOLVED_KIND, {"metadata": {"name": name}, "addresses": addresses}
                )
