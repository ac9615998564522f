"""The controller's Kubernetes source: list and watch each kind into the cluster model.

Per kind, one task lists every object (paged with `limit`/`continue`), hands the
whole set to `sink.replace`, then watches from the list's resourceVersion and
turns ADDED/MODIFIED/DELETED events into `sink.upsert`/`sink.delete`. It tracks
the resourceVersion of every event and BOOKMARK, so a dropped connection resumes
where it stopped (after an exponential backoff); a 410 Gone (an HTTP status or an
ERROR event: the history was compacted) makes it list and replace again, which
also removes objects deleted while it was away. Objects reach the sink exactly
as the API server sent them (plus the apiVersion/kind that typed lists leave
out), so the file source and this one share one parsing and validation path.

Client library: lightkube. Its AsyncClient runs on httpx2, whose trio backend
lets every list and watch be an ordinary trio task: cancellation and shutdown
work like anywhere else in the controller. The official `kubernetes` client is
synchronous: each watch would hold a worker thread that trio cannot cancel until
a read timeout fires; `kubernetes-asyncio` needs asyncio. Two lightkube gaps are
covered here: its typed models reject BOOKMARK objects (EndpointSlice's required
`addressType` is absent) and drop fields they do not know, so we declare
dict-backed generic resources; and `watch()` has no `allowWatchBookmarks`
parameter, so the client's transport adds it to watch requests. lightkube's own
watch retry is left off (it sleeps with asyncio); this module retries. Kubeconfigs
with an `exec` credential plugin do not work under trio (lightkube runs the plugin
with asyncio): use a token, token file or client certificate.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import asdict, dataclass
from typing import NoReturn

import httpx2
import msgspec
import trio
from lightkube import ALL_NS, ApiError, AsyncClient, KubeConfig, SingleConfig
from lightkube.config.client_adapter import verify_cluster
from lightkube.core.resource import ApiInfo, ResourceDef
from lightkube.generic_resource import GenericGlobalResource, GenericNamespacedResource
from meshagent.controller.sources.sink import ClusterSink
from prometheus_client import Counter

log = logging.getLogger(__name__)

WATCH_RESTARTS = Counter(
    "meshagent_controller_watch_restarts_total",
    "Restarts of one kind's list+watch loop, by reason: gone (410, relisted), "
    "disconnected, idle (no event for too long), error (any other failure).",
    ["kind", "reason"],
)

# client-go's page size; servers cap `limit` themselves.
LIST_CHUNK_SIZE = 500
# Server-side watch timeout: the server ends the watch cleanly and lightkube
# reconnects from the last resourceVersion, so half-open connections get noticed.
WATCH_TIMEOUT = 290
# A watch with no event (bookmarks included) for this long beyond its server
# timeout is considered dead and restarted.
WATCH_IDLE_GRACE = 60.0
# How often to look again for Istio CRDs that were not installed.
MISSING_CRD_RETRY = 30.0


@dataclass(frozen=True)
class KindSpec:
    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool = True
    optional: bool = False  # a CRD the cluster may not have: 404 is not an error

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KIND_SPECS = {
    spec.kind: spec
    for spec in (
        KindSpec("Node", "", "v1", "nodes", namespaced=False),
        KindSpec("Namespace", "", "v1", "namespaces", namespaced=False),
        KindSpec("Pod", "", "v1", "pods"),
        KindSpec("Service", "", "v1", "services"),
        KindSpec("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices"),
        KindSpec(
            "AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies", optional=True
        ),
        KindSpec(
            "PeerAuthentication", "security.istio.io", "v1", "peerauthentications", optional=True
        ),
        KindSpec(
            "RequestAuthentication",
            "security.istio.io",
            "v1",
            "requestauthentications",
            optional=True,
        ),
        KindSpec("VirtualService", "networking.istio.io", "v1", "virtualservices", optional=True),
        KindSpec("DestinationRule", "networking.istio.io", "v1", "destinationrules", optional=True),
        KindSpec("ServiceEntry", "networking.istio.io", "v1", "serviceentries", optional=True),
        KindSpec("Telemetry", "telemetry.istio.io", "v1", "telemetries", optional=True),
    )
}
ALL_KINDS: tuple[str, ...] = tuple(KIND_SPECS)


def _generic_resource(spec: KindSpec) -> type:
    """A lightkube resource whose objects stay plain dicts (not registered globally)."""
    base = GenericNamespacedResource if spec.namespaced else GenericGlobalResource
    info = ApiInfo(
        resource=ResourceDef(spec.group, spec.version, spec.kind),
        plural=spec.plural,
        verbs=["list", "global_list", "watch", "global_watch"],
    )
    return type(spec.kind, (base,), {"_api_info": info})


_RESOURCES = {kind: _generic_resource(spec) for kind, spec in KIND_SPECS.items()}


@dataclass
class KindState:
    """What `meshctl status` shows for one kind."""

    kind: str
    resource_version: str | None = None
    connected: bool = False  # listed and watching (False while backing off)
    synced: bool = False  # listed at least once: the model holds this kind
    installed: bool = True  # False while the API group answers 404 (no CRD)
    relists: int = 0  # lists after the first one (410 Gone, or errors while listing)
    last_error: str | None = None


class KubernetesSourceState:
    """Per-kind progress of the source, readable at any time."""

    def __init__(self, kinds: Sequence[str]) -> None:
        self.kinds = {kind: KindState(kind) for kind in kinds}

    @property
    def complete(self) -> bool:
        """Every kind listed, or known absent: the model is a full view of the cluster."""
        return all(state.synced or not state.installed for state in self.kinds.values())

    def as_dict(self) -> dict[str, dict]:
        return {kind: asdict(state) for kind, state in self.kinds.items()}


class _BookmarkTransport(httpx2.AsyncBaseTransport):
    """Adds allowWatchBookmarks=true to watch requests (lightkube's watch() has no option)."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.params.get("watch") == "true":
            request.url = request.url.copy_set_param("allowWatchBookmarks", "true")
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@asynccontextmanager
async def open_kube_client(
    config: KubeConfig | SingleConfig | None = None,
) -> AsyncIterator[AsyncClient]:
    """A lightkube AsyncClient for `config` (default: in-cluster, then $KUBECONFIG).

    Raises lightkube's ConfigError when no configuration is found.
    """
    if config is None:
        config = KubeConfig.from_env()
    single = config.get() if isinstance(config, KubeConfig) else config
    if single.user is None:
        raise ValueError(f"kubeconfig context {single.context_name!r} names no user")
    # A transport of our own replaces the one lightkube would build, so it gets
    # lightkube's certificate checks (cluster CA, client certificate) explicitly.
    verify = verify_cluster(single.cluster, single.user, single.abs_file)
    transport = _BookmarkTransport(httpx2.AsyncHTTPTransport(verify=verify))
    client = AsyncClient(single, transport=transport)
    try:
        yield client
    finally:
        with trio.move_on_after(5, shield=True):
            await client.close()


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after `failures` consecutive failures (1, 2, ...), before jitter."""
    return min(maximum, initial * 2 ** max(0, failures - 1))


class _Gone(Exception):
    """The requested resourceVersion is compacted away: list again."""


class _Absent(Exception):
    """The kind's API group is not served (404): its CRD is not installed."""


class _Idle(Exception):
    """No watch event for longer than the server's own watch timeout allows."""


def _status_code(exc: httpx2.HTTPStatusError) -> int:
    # An ERROR event becomes an ApiError carrying only a Status (no HTTP response).
    if isinstance(exc, ApiError) and exc.status is not None and exc.status.code:
        return exc.status.code
    return exc.response.status_code


class _KindWatcher:
    """One kind's list+watch loop; the only writer of that kind into the sink."""

    def __init__(
        self,
        spec: KindSpec,
        client: AsyncClient,
        sink: ClusterSink,
        state: KindState,
        *,
        backoff: tuple[float, float],
        chunk_size: int,
        watch_timeout: int,
        crd_retry: float,
        ready: trio.Event,
    ) -> None:
        self.spec = spec
        self.client = client
        self.sink = sink
        self.state = state
        self.backoff = backoff
        self.chunk_size = chunk_size
        self.watch_timeout = watch_timeout
        self.crd_retry = crd_retry
        self.ready = ready
        self.resource = _RESOURCES[spec.kind]
        self.namespace = ALL_NS if spec.namespaced else None
        self.failures = 0  # consecutive; reset by a good list or any watch event

    async def run(self) -> None:
        must_list = True
        while True:
            try:
                if must_list:
                    await self._list()
                    must_list = False
                await self._watch()
            except _Absent:
                await self._absent()
                must_list = True
                continue
            except _Gone as exc:
                reason, must_list = "gone", True
                log.info("%s: %s; listing again", self.spec.kind, exc)
            except _Idle as exc:
                reason = "idle"
                log.warning("%s: %s; reconnecting", self.spec.kind, exc)
            except (httpx2.TransportError, httpx2.HTTPStatusError, msgspec.MsgspecError) as exc:
                reason = "disconnected" if isinstance(exc, httpx2.TransportError) else "error"
                log.warning("%s: watch failed (%s): %s", self.spec.kind, reason, _describe(exc))
                self.state.last_error = _describe(exc)
            self.state.connected = False
            WATCH_RESTARTS.labels(kind=self.spec.kind, reason=reason).inc()
            self.failures += 1
            delay = backoff_delay(self.failures, *self.backoff)
            await trio.sleep(delay * random.uniform(0.5, 1.0))

    async def _list(self) -> None:
        listing = self.client.list(
            self.resource, namespace=self.namespace, chunk_size=self.chunk_size
        )
        try:
            objects = [self._plain(obj) async for obj in listing]
        except httpx2.HTTPStatusError as exc:
            self._raise_for(exc)
        if self.state.synced:
            self.state.relists += 1
        self.sink.replace(self.spec.kind, objects)
        self.state.resource_version = listing.resourceVersion
        self.state.synced = True
        self.state.last_error = None
        self.failures = 0
        if not self.state.installed:
            log.info("%s: API group %s is served now", self.spec.kind, self.spec.group)
            self.state.installed = True
        self.ready.set()

    async def _watch(self) -> None:
        """Apply events until the watch fails; never returns normally."""
        events = self.client.watch(
            self.resource,
            namespace=self.namespace,
            resource_version=self.state.resource_version,
            server_timeout=self.watch_timeout,
        )
        idle_limit = self.watch_timeout + WATCH_IDLE_GRACE
        self.state.connected = True
        async with aclosing(events):
            iterator = aiter(events)
            while True:
                with trio.move_on_after(idle_limit) as idle:
                    try:
                        event_type, obj = await anext(iterator)
                    except httpx2.HTTPStatusError as exc:
                        self._raise_for(exc)
                    except StopAsyncIteration:
                        raise httpx2.RemoteProtocolError("watch stream ended") from None
                if idle.cancelled_caught:
                    raise _Idle(f"no watch event for {idle_limit:.0f}s")
                self._apply(event_type, obj)

    def _apply(self, event_type: str, obj: dict) -> None:
        if event_type in ("ADDED", "MODIFIED"):
            self.sink.upsert(self.spec.kind, self._plain(obj))
        elif event_type == "DELETED":
            self.sink.delete(self.spec.kind, self._plain(obj))
        elif event_type != "BOOKMARK":
            log.warning("%s: ignoring watch event of type %r", self.spec.kind, event_type)
        self.state.resource_version = obj["metadata"]["resourceVersion"]
        self.state.last_error = None
        self.failures = 0

    def _plain(self, obj: dict) -> dict:
        plain = dict(obj)
        plain.setdefault("apiVersion", self.spec.api_version)
        plain.setdefault("kind", self.spec.kind)
        return plain

    def _raise_for(self, exc: httpx2.HTTPStatusError) -> NoReturn:
        code = _status_code(exc)
        if code == 410:
            raise _Gone(f"resourceVersion expired ({_describe(exc)})") from exc
        if code == 404 and self.spec.optional:
            raise _Absent() from exc
        raise exc

    async def _absent(self) -> None:
        """The CRD is not installed: an empty kind; look again every `crd_retry` seconds."""
        if self.state.installed:
            log.warning(
                "%s: API group %s/%s is not served (CRD not installed?); retrying every %.0fs",
                self.spec.kind,
                self.spec.group,
                self.spec.version,
                self.crd_retry,
            )
        self.state.installed = False
        self.state.connected = False
        self.state.resource_version = None
        self.sink.replace(self.spec.kind, [])
        self.ready.set()
        await trio.sleep(self.crd_retry)


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"HTTP {_status_code(exc)}: {exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def serve_kubernetes_source(
    sink: ClusterSink,
    *,
    kinds: Sequence[str] = ALL_KINDS,
    client_config: KubeConfig | SingleConfig | None = None,
    relist_backoff: tuple[float, float] = (0.5, 30.0),
    list_chunk_size: int = LIST_CHUNK_SIZE,
    watch_timeout: int = WATCH_TIMEOUT,
    crd_retry: float = MISSING_CRD_RETRY,
    state: KubernetesSourceState | None = None,
    task_status: trio.TaskStatus[KubernetesSourceState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep `sink` in step with the cluster's objects of `kinds`; runs until cancelled.

    Says started (with the state object) once every kind has been listed, or, for an
    Istio kind, found not installed: from then on the sink holds a complete view.
    `relist_backoff` is (first, longest) delay in seconds between retries. Pass
    `state` to read progress before started; raises ValueError for an unknown kind.
    """
    unknown = [kind for kind in kinds if kind not in KIND_SPECS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; known: {', '.join(ALL_KINDS)}")
    first, longest = relist_backoff
    if not 0 < first <= longest:
        raise ValueError(f"relist_backoff needs 0 < first <= longest seconds, got {relist_backoff}")
    if state is None:
        state = KubernetesSourceState(kinds)
    async with open_kube_client(client_config) as client, trio.open_nursery() as nursery:
        ready = []
        for kind in kinds:
            event = trio.Event()
            ready.append(event)
            watcher = _KindWatcher(
                KIND_SPECS[kind],
                client,
                sink,
                state.kinds[kind],
                backoff=relist_backoff,
                chunk_size=list_chunk_size,
                watch_timeout=watch_timeout,
                crd_retry=crd_retry,
                ready=event,
            )
            nursery.start_soon(watcher.run, name=f"kube-watch-{kind}")
        for event in ready:
            await event.wait()
        log.info("kubernetes source: initial list complete for %s", ", ".join(kinds))
        task_status.started(state)
