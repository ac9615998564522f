"""An in-process fake Kubernetes API server that clients reach over real HTTP.

Test code changes the cluster with `create`/`update`/`delete` (plain object
dicts, as in manifests). The store stamps each change with the next value of one
cluster-wide resourceVersion counter (etcd's revision), keeps it in the history
and pushes it to every open watch of that kind, which streams it as one line of
chunked JSON. Clients list, watch and read discovery documents over HTTP/1.1
(h11 over trio), by default over TLS with a throwaway CA, with bearer-token auth.

What it copies from kube-apiserver, because the controller's source depends on it:
- list answers `<Kind>List` with `metadata.resourceVersion`; `limit` pages carry a
  `continue` token that serves the rest of the same snapshot, until `compact()`
  expires it (HTTP 410);
- items of built-in groups' lists omit apiVersion/kind (typed lists do); CRD
  items carry them;
- a watch from resourceVersion r replays the history after r; r older than the
  last compaction gets 410 Gone, as an ERROR event in a 200 stream (the real
  server's way) or, with `gone_as_http`, as an HTTP 410;
- BOOKMARK events go only to watches that sent `allowWatchBookmarks=true`;
- an API group that is not installed (no CRDs) answers 404 with a Status body;
- writes (what the controller's leader election, CA Secret and root ConfigMap need): POST creates
  (409 AlreadyExists if present), PUT replaces, answering 409 Conflict when the body's
  metadata.resourceVersion is not the stored one (optimistic concurrency), and every
  write is stamped and streamed to watches like a test-made change;
- TokenReview (POST only, never stored) answers from the tokens a test registers with
  `add_token`, with audience checks as the real authenticator does them.

Test hooks: `compact()`, `drop_watches()`, `bookmark()`, `install_group()`,
`add_token()`, and the records `served`, `list_requests`, `watch_requests`,
`token_reviews`.
"""

from __future__ import annotations

import base64
import copy
import datetime
import itertools
import json
import math
import ssl
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ISTIO_GROUPS = ("security.istio.io", "networking.istio.io")
READ_SIZE = 65536


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool = True
    crd: bool = False
    review: bool = False  # a create-only request object that is answered, never stored

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


@dataclass(frozen=True)
class ServiceAccountToken:
    """What the fake's TokenReview knows about one registered token."""

    username: str
    audiences: tuple[str, ...]
    extra: dict[str, list[str]]


RESOURCE_TYPES = (
    ResourceType("", "v1", "Node", "nodes", namespaced=False),
    ResourceType("", "v1", "Namespace", "namespaces", namespaced=False),
    ResourceType("", "v1", "Pod", "pods"),
    ResourceType("", "v1", "Service", "services"),
    ResourceType("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    ResourceType(
        "security.istio.io", "v1", "AuthorizationPolicy", "authorizationpolicies", crd=True
    ),
    ResourceType("security.istio.io", "v1", "PeerAuthentication", "peerauthentications", crd=True),
    ResourceType(
        "security.istio.io", "v1", "RequestAuthentication", "requestauthentications", crd=True
    ),
    ResourceType("networking.istio.io", "v1", "VirtualService", "virtualservices", crd=True),
    ResourceType("networking.istio.io", "v1", "DestinationRule", "destinationrules", crd=True),
    ResourceType("networking.istio.io", "v1", "ServiceEntry", "serviceentries", crd=True),
    ResourceType("telemetry.istio.io", "v1", "Telemetry", "telemetries", crd=True),
    ResourceType("", "v1", "Secret", "secrets"),
    ResourceType("", "v1", "ConfigMap", "configmaps"),
    ResourceType("coordination.k8s.io", "v1", "Lease", "leases"),
    ResourceType(
        "authentication.k8s.io", "v1", "TokenReview", "tokenreviews", namespaced=False, review=True
    ),
)
_BY_API_KIND = {(rt.api_version, rt.kind): rt for rt in RESOURCE_TYPES}
_BY_PATH = {(rt.group, rt.version, rt.plural): rt for rt in RESOURCE_TYPES}


@dataclass(frozen=True)
class ListRequest:
    kind: str
    namespace: str | None
    limit: int | None
    continue_token: str | None


@dataclass(frozen=True)
class WatchRequest:
    kind: str
    namespace: str | None
    resource_version: str | None
    allow_bookmarks: bool
    timeout_seconds: int | None


class _HttpError(Exception):
    """Answered as a Kubernetes `Status` object with this code."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = _status(code, reason, message)


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass(eq=False)
class _Watcher:
    rtype: ResourceType
    namespace: str | None
    allow_bookmarks: bool
    send: trio.MemorySendChannel[dict]
    receive: trio.MemoryReceiveChannel[dict]
    dropped: bool = False
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def wants(self, rtype: ResourceType, obj: dict) -> bool:
        if rtype is not self.rtype:
            return False
        return self.namespace is None or obj["metadata"].get("namespace") == self.namespace


def _dumps(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


class FakeApiServer:
    """The object store, its history and open watches; the HTTP side lives in `_serve`."""

    def __init__(self, *, token: str, missing_groups: Iterable[str] = ()) -> None:
        self.token = token
        self.url = ""
        self.ca_pem: bytes | None = None
        # Answer a too-old watch with HTTP 410 instead of an ERROR event.
        self.gone_as_http = False
        self.served: Counter[tuple[str, str]] = Counter()  # (verb, kind or path) -> requests
        self.list_requests: list[ListRequest] = []
        self.watch_requests: list[WatchRequest] = []
        self.token_reviews: list[dict] = []  # the spec of every TokenReview received
        self._tokens: dict[str, ServiceAccountToken] = {}
        self._missing_groups = set(missing_groups)
        self._rv = 0
        self._compacted = 0
        self._objects: dict[ResourceType, dict[tuple[str, str], dict]] = {
            rt: {} for rt in RESOURCE_TYPES
        }
        self._history: list[tuple[int, ResourceType, dict]] = []  # (rv, type, event)
        self._watchers: set[_Watcher] = set()
        self._pages: dict[str, tuple[int, list[dict]]] = {}
        self._page_ids = itertools.count(1)

    # ---- test API ----------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    def objects(self, kind: str) -> list[dict]:
        """Current objects of one kind, as a watch would show them."""
        rtype = next(rt for rt in RESOURCE_TYPES if rt.kind == kind)
        return [copy.deepcopy(obj) for _, obj in sorted(self._objects[rtype].items())]

    def create(self, obj: dict) -> dict:
        rtype, key = self._identify(obj)
        if key in self._objects[rtype]:
            raise ValueError(f"{rtype.kind} {'/'.join(key).strip('/')} already exists")
        stored = copy.deepcopy(obj)
        meta = stored["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        return self._commit("ADDED", rtype, key, stored)

    def update(self, obj: dict) -> dict:
        rtype, key = self._identify(obj)
        old = self._objects[rtype].get(key)
        if old is None:
            raise ValueError(f"{rtype.kind} {'/'.join(key).strip('/')} does not exist")
        stored = copy.deepcopy(obj)
        for kept in ("uid", "creationTimestamp"):
            stored["metadata"][kept] = old["metadata"][kept]
        return self._commit("MODIFIED", rtype, key, stored)

    def delete(self, obj: dict) -> dict:
        rtype, key = self._identify(obj)
        old = self._objects[rtype].get(key)
        if old is None:
            raise ValueError(f"{rtype.kind} {'/'.join(key).strip('/')} does not exist")
        return self._commit("DELETED", rtype, key, copy.deepcopy(old))

    def compact(self) -> None:
        """Forget the history (as etcd compaction does): older versions now get 410."""
        self._compacted = self._rv
        self._history.clear()
        self._pages.clear()

    def drop_watches(self) -> int:
        """Cut every open watch connection mid-stream; returns how many were cut."""
        dropped = len(self._watchers)
        for watcher in self._watchers:
            watcher.dropped = True
            watcher.scope.cancel()
        self._watchers.clear()
        return dropped

    def bookmark(self) -> None:
        """Send the current resourceVersion to every watch that allows bookmarks."""
        for watcher in self._watchers:
            if watcher.allow_bookmarks:
                rtype = watcher.rtype
                marker = {
                    "kind": rtype.kind,
                    "apiVersion": rtype.api_version,
                    "metadata": {"resourceVersion": str(self._rv), "creationTimestamp": None},
                }
                watcher.send.send_nowait({"type": "BOOKMARK", "object": marker})

    def add_token(
        self,
        token: str,
        *,
        service_account: str,
        audiences: Iterable[str] = (),
        node: str | None = None,
    ) -> None:
        """Make TokenReview accept ``token`` as a projected token of ``service_account``
        (``namespace/name``) for ``audiences``, bound to a pod on ``node`` if given."""
        namespace, _, name = service_account.partition("/")
        extra = {"authentication.kubernetes.io/node-name": [node]} if node else {}
        self._tokens[token] = ServiceAccountToken(
            f"system:serviceaccount:{namespace}:{name}", tuple(audiences), extra
        )

    def install_group(self, group: str) -> None:
        """Start serving an API group that was missing (its CRDs got installed)."""
        self._missing_groups.discard(group)

    def kubeconfig(self) -> dict:
        """A kubeconfig (as parsed YAML) for this server and its bearer token."""
        cluster: dict = {"server": self.url}
        if self.ca_pem is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }

    # ---- the store ---------------------------------------------------------------

    def _identify(self, obj: dict) -> tuple[ResourceType, tuple[str, str]]:
        try:
            rtype = _BY_API_KIND[(obj["apiVersion"], obj["kind"])]
            name = obj["metadata"]["name"]
        except KeyError as exc:
            raise ValueError(f"object needs apiVersion, kind and metadata.name: {exc}") from None
        namespace = obj["metadata"].get("namespace", "")
        if rtype.namespaced != bool(namespace):
            need = "needs" if rtype.namespaced else "takes no"
            raise ValueError(f"{rtype.kind} {name} {need} metadata.namespace")
        return rtype, (namespace, name)

    def _commit(self, kind: str, rtype: ResourceType, key: tuple[str, str], obj: dict) -> dict:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        if kind == "DELETED":
            del self._objects[rtype][key]
        else:
            self._objects[rtype][key] = obj
        event = {"type": kind, "object": obj}
        self._history.append((self._rv, rtype, event))
        for watcher in self._watchers:
            if watcher.wants(rtype, obj):
                watcher.send.send_nowait(copy.deepcopy(event))
        return copy.deepcopy(obj)

    def _listed(self, rtype: ResourceType, obj: dict) -> dict:
        item = copy.deepcopy(obj)
        if not rtype.crd:
            del item["apiVersion"], item["kind"]
        return item

    def _in_namespace(self, rtype: ResourceType, namespace: str | None) -> list[dict]:
        return [
            obj
            for (ns, _), obj in sorted(self._objects[rtype].items())
            if namespace is None or ns == namespace
        ]

    # ---- HTTP --------------------------------------------------------------------

    async def _serve(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                received = await _read_request(conn, stream)
                if received is None or not await self._respond(conn, stream, *received):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def _respond(
        self, conn: h11.Connection, stream: trio.abc.Stream, request, body: bytes
    ) -> bool:
        """Answer one request; False when the connection must be cut."""
        target = urlsplit(request.target.decode("ascii"))
        query = {key: values[-1] for key, values in parse_qs(target.query).items()}
        try:
            self._authorize(request)
            if request.method in (b"POST", b"PUT"):
                code, answer = self._write(request.method, target.path, body)
                await _send_json(conn, stream, code, answer)
                return True
            if request.method != b"GET":
                raise _HttpError(405, "MethodNotAllowed", "the fake serves GET, POST and PUT")
            route = self._route(target.path)
            if isinstance(route, dict):
                self.served[("discovery", target.path)] += 1
                await _send_json(conn, stream, 200, route)
                return True
            rtype, namespace, name = route
            if rtype.review:
                raise _HttpError(405, "MethodNotAllowed", f"{rtype.plural} accept only create")
            if name is not None:
                self.served[("get", rtype.kind)] += 1
                await _send_json(conn, stream, 200, self._get(rtype, namespace, name))
                return True
            if query.get("watch") in ("1", "true"):
                return await self._watch(conn, stream, rtype, namespace, query)
            self.served[("list", rtype.kind)] += 1
            await _send_json(conn, stream, 200, self._list(rtype, namespace, query))
            return True
        except _HttpError as err:
            await _send_json(conn, stream, err.code, err.status)
            return True

    def _write(self, method: bytes, path: str, body: bytes) -> tuple[int, dict]:
        """POST (create, or a TokenReview) and PUT (replace); returns (status, object)."""
        route = self._route(path)
        if isinstance(route, dict):
            raise _HttpError(405, "MethodNotAllowed", f"{path} is read-only")
        rtype, namespace, name = route
        try:
            obj = json.loads(body)
        except ValueError:
            raise _HttpError(400, "BadRequest", "request body is not JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata", {}), dict):
            raise _HttpError(400, "BadRequest", "request body is not an object")
        obj.setdefault("apiVersion", rtype.api_version)
        obj.setdefault("kind", rtype.kind)
        meta = obj.setdefault("metadata", {})
        if (obj["apiVersion"], obj["kind"]) != (rtype.api_version, rtype.kind):
            raise _HttpError(400, "BadRequest", f"body is not a {rtype.kind}")
        if rtype.review:
            if method != b"POST" or name is not None:
                raise _HttpError(405, "MethodNotAllowed", f"{rtype.plural} accept only create")
            self.served[("create", rtype.kind)] += 1
            return 201, self._review(obj)
        if namespace is not None and meta.setdefault("namespace", namespace) != namespace:
            raise _HttpError(400, "BadRequest", "metadata.namespace does not match the URL")
        if method == b"POST":
            if name is not None:
                raise _HttpError(405, "MethodNotAllowed", "POST goes to the collection")
            self.served[("create", rtype.kind)] += 1
            try:
                return 201, self.create(obj)
            except ValueError as exc:
                raise _HttpError(409, "AlreadyExists", str(exc)) from None
        if name is None or meta.get("name") != name:
            raise _HttpError(400, "BadRequest", "PUT needs the object's own URL and name")
        self.served[("update", rtype.kind)] += 1
        current = self._objects[rtype].get((namespace or "", name))
        if current is None:
            raise _HttpError(404, "NotFound", f'{rtype.plural} "{name}" not found')
        asked = meta.get("resourceVersion")
        if asked and asked != current["metadata"]["resourceVersion"]:
            raise _HttpError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rtype.plural} "{name}": the object has been'
                " modified; please apply your changes to the latest version and try again",
            )
        return 200, self.update(obj)

    def _review(self, review: dict) -> dict:
        spec = review.get("spec") or {}
        self.token_reviews.append(copy.deepcopy(spec))
        known = self._tokens.get(spec.get("token", ""))
        wanted = spec.get("audiences") or []
        status: dict = {"authenticated": False}
        if known is None:
            status["error"] = "invalid bearer token"
        elif wanted and not set(wanted) & set(known.audiences):
            status["error"] = "token audiences are invalid for the target audiences"
        else:
            status = {
                "authenticated": True,
                "audiences": [a for a in wanted if a in known.audiences],
                "user": {
                    "username": known.username,
                    "uid": str(uuid.uuid5(uuid.NAMESPACE_OID, known.username)),
                    "groups": ["system:serviceaccounts", "system:authenticated"],
                    "extra": copy.deepcopy(known.extra),
                },
            }
        return {**review, "status": status}

    def _authorize(self, request) -> None:
        headers = dict(request.headers)
        if headers.get(b"authorization") != f"Bearer {self.token}".encode():
            raise _HttpError(401, "Unauthorized", "Unauthorized")

    def _route(self, path: str) -> dict | tuple[ResourceType, str | None, str | None]:
        """A discovery document, or (resource type, namespace, object name)."""
        parts = [p for p in path.split("/") if p]
        if parts == ["version"]:
            return {"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake"}
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"]}
        if parts == ["apis"]:
            return self._group_list()
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _not_found()
        if group in self._missing_groups or not any(
            (rt.group, rt.version) == (group, version) for rt in RESOURCE_TYPES
        ):
            raise _not_found()
        if not rest:
            return _resource_list(group, version)
        namespace = name = None
        if rest[0] == "namespaces" and len(rest) in (3, 4):
            namespace, rest = rest[1], rest[2:]
        plural, name = rest[0], (rest[1] if len(rest) == 2 else None)
        rtype = _BY_PATH.get((group, version, plural))
        if rtype is None or len(rest) > 2 or (namespace is not None and not rtype.namespaced):
            raise _not_found()
        return rtype, namespace, name

    def _group_list(self) -> dict:
        groups = sorted({rt.group for rt in RESOURCE_TYPES if rt.group} - self._missing_groups)
        docs = []
        for group in groups:
            versions = sorted({rt.version for rt in RESOURCE_TYPES if rt.group == group})
            entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
            docs.append({"name": group, "versions": entries, "preferredVersion": entries[0]})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": docs}

    def _get(self, rtype: ResourceType, namespace: str | None, name: str) -> dict:
        obj = self._objects[rtype].get((namespace or "", name))
        if obj is None:
            raise _HttpError(404, "NotFound", f'{rtype.plural} "{name}" not found')
        return copy.deepcopy(obj)

    def _list(self, rtype: ResourceType, namespace: str | None, query: dict) -> dict:
        limit = _int_param(query, "limit")
        token = query.get("continue")
        self.list_requests.append(ListRequest(rtype.kind, namespace, limit, token))
        if token:
            try:
                rv, remaining = self._pages.pop(token)
            except KeyError:
                raise _HttpError(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter.",
                ) from None
        else:
            rv = self._rv
            remaining = [self._listed(rtype, obj) for obj in self._in_namespace(rtype, namespace)]
        page, rest = (remaining[:limit], remaining[limit:]) if limit else (remaining, [])
        metadata: dict = {"resourceVersion": str(rv)}
        if rest:
            next_token = f"{rtype.plural}-{next(self._page_ids)}"
            self._pages[next_token] = (rv, rest)
            metadata["continue"] = next_token
            metadata["remainingItemCount"] = len(rest)
        return {
            "kind": f"{rtype.kind}List",
            "apiVersion": rtype.api_version,
            "metadata": metadata,
            "items": page,
        }

    async def _watch(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        rtype: ResourceType,
        namespace: str | None,
        query: dict,
    ) -> bool:
        since = query.get("resourceVersion")
        allow_bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        timeout = _int_param(query, "timeoutSeconds")
        self.served[("watch", rtype.kind)] += 1
        self.watch_requests.append(
            WatchRequest(rtype.kind, namespace, since, allow_bookmarks, timeout)
        )
        gone = False
        if since in (None, "", "0"):
            # No version: the current state as ADDED events, then changes.
            backlog = [
                {"type": "ADDED", "object": copy.deepcopy(obj)}
                for obj in self._in_namespace(rtype, namespace)
            ]
        else:
            start = _int_param(query, "resourceVersion") or 0
            if start < self._compacted:
                message = f"too old resource version: {start} ({self._compacted})"
                if self.gone_as_http:
                    raise _HttpError(410, "Gone", message)
                backlog = [{"type": "ERROR", "object": _status(410, "Expired", message)}]
                gone = True
            else:
                backlog = [
                    copy.deepcopy(event)
                    for rv, rt, event in self._history
                    if rv > start and rt is rtype and (namespace is None or _ns(event) == namespace)
                ]
        send, receive = trio.open_memory_channel[dict](math.inf)
        watcher = _Watcher(rtype, namespace, allow_bookmarks, send, receive)
        if not gone:
            self._watchers.add(watcher)  # before any await: no change can slip between
        try:
            with watcher.scope, trio.move_on_after(math.inf if timeout is None else timeout):
                await _send(conn, stream, _headers(200, chunked=True))
                for event in backlog:
                    await _send(conn, stream, h11.Data(data=_dumps(event) + b"\n"))
                if not gone:
                    async for event in receive:
                        await _send(conn, stream, h11.Data(data=_dumps(event) + b"\n"))
        finally:
            self._watchers.discard(watcher)
            send.close()
        if watcher.dropped:
            return False
        await _send(conn, stream, h11.EndOfMessage())
        return True


def _ns(event: dict) -> str:
    return event["object"]["metadata"].get("namespace", "")


def _int_param(query: dict, name: str) -> int | None:
    if name not in query:
        return None
    try:
        return int(query[name])
    except ValueError:
        raise _HttpError(400, "BadRequest", f"{name}={query[name]!r} is not an integer") from None


def _not_found() -> _HttpError:
    return _HttpError(404, "NotFound", "the server could not find the requested resource")


def _resource_list(group: str, version: str) -> dict:
    resources = [
        {
            "name": rt.plural,
            "singularName": rt.kind.lower(),
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": ["create"] if rt.review else ["create", "get", "list", "update", "watch"],
        }
        for rt in RESOURCE_TYPES
        if (rt.group, rt.version) == (group, version)
    ]
    group_version = f"{group}/{version}" if group else version
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


def _headers(status: int, *, chunked: bool = False, length: int = 0) -> h11.Response:
    headers = [("Content-Type", "application/json")]
    if not chunked:
        headers.append(("Content-Length", str(length)))
    return h11.Response(status_code=status, headers=headers)


async def _send(conn: h11.Connection, stream: trio.abc.Stream, event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _send_json(conn: h11.Connection, stream: trio.abc.Stream, status: int, doc) -> None:
    body = _dumps(doc)
    await _send(conn, stream, _headers(status, length=len(body)))
    await _send(conn, stream, h11.Data(data=body))
    await _send(conn, stream, h11.EndOfMessage())


async def _read_request(
    conn: h11.Connection, stream: trio.abc.Stream
) -> tuple[h11.Request, bytes] | None:
    """The next whole request on this connection and its body, None at EOF."""
    request = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(READ_SIZE))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return (request, bytes(body)) if request is not None else None
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _server_tls(folder: Path) -> tuple[ssl.SSLContext, bytes]:
    """A throwaway CA and a 127.0.0.1 server certificate; returns (context, CA PEM)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kube-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = folder / "server.crt", folder / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context, ca_cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@asynccontextmanager
async def open_fake_apiserver(
    *, tls: bool = True, token: str = "fake-token", missing_groups: Iterable[str] = ()
) -> AsyncIterator[FakeApiServer]:
    """Serve a fresh, empty fake API server on 127.0.0.1 (ephemeral port) while open.

    `missing_groups` lists API groups answered with 404, as on a cluster without
    those CRDs (`ISTIO_GROUPS` for no Istio at all).
    """
    server = FakeApiServer(token=token, missing_groups=missing_groups)
    with tempfile.TemporaryDirectory(prefix="fake-kube-") as folder:
        listeners: list = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        if tls:
            context, server.ca_pem = _server_tls(Path(folder))
            listeners = [trio.SSLListener(lst, context, https_compatible=True) for lst in listeners]
        server.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, server._serve, listeners)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()
