"""A small synchronous Kubernetes API client for the lab (http.client, no extra process).

The lab's control plane listens in the lab's underlay network namespace, which the host
cannot reach; with ``netns`` set, every connection is opened from inside that namespace
(a socket made while the thread is in a namespace stays there), so `meshlab` commands and
the lab kubelet, which run in the host's namespace, talk to it directly. kubectl on the
host goes through the lab kubelet's loopback forwarder instead (lab/kubelet.py).

Server-side apply (``apply``) finds each kind's resource through API discovery, so any
kind the server serves (built-in or a CRD) can be applied; a kind it does not serve
raises `UnknownKind`.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from meshagent.common.netns import entered

FIELD_MANAGER = "meshlab"


class ApiError(RuntimeError):
    """The server answered with an error status; ``status`` and its ``message``."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.reason = reason


class UnknownKind(LookupError):
    """The server serves no such kind (no built-in, no CRD)."""


@dataclass(frozen=True)
class Resource:
    plural: str
    namespaced: bool
    base: str  # /api/v1 or /apis/GROUP/VERSION

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        out = self.base
        if self.namespaced and namespace:
            out += f"/namespaces/{namespace}"
        out += f"/{self.plural}"
        if name:
            out += f"/{name}"
        return out


def _api_base(api_version: str) -> str:
    return f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"


class _Connection(http.client.HTTPSConnection):
    def __init__(
        self, host: str, port: int, *, context: ssl.SSLContext, netns: str | None, timeout
    ):
        super().__init__(host, port, context=context, timeout=timeout)
        self._netns = netns
        self._tls = context

    def connect(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        if self._netns:
            with entered(self._netns):
                sock = socket.socket(family, socket.SOCK_STREAM)
        else:
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect((self.host, self.port))
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


class KubeApi:
    """Requests to one API server as one user (client certificate or bearer token)."""

    def __init__(
        self,
        server: str,
        ca_file: Path,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        token: str | None = None,
        netns: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(server)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 443
        self.netns = netns
        self.timeout = timeout
        self.token = token
        self.context = ssl.create_default_context(cafile=str(ca_file))
        if cert is not None:
            self.context.load_cert_chain(str(cert), str(key))
        self._resources: dict[tuple[str, str], Resource] = {}

    @classmethod
    def from_kubeconfig(
        cls, path: Path, *, netns: str | None = None, server: str | None = None
    ) -> KubeApi:
        config = yaml.safe_load(Path(path).read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        return cls(
            server or cluster["server"],
            Path(cluster["certificate-authority"]),
            cert=Path(user["client-certificate"]) if "client-certificate" in user else None,
            key=Path(user["client-key"]) if "client-key" in user else None,
            token=user.get("token"),
            netns=netns,
        )

    # -- requests
    def _connection(self, timeout: float | None) -> _Connection:
        return _Connection(
            self.host,
            self.port,
            context=self.context,
            netns=self.netns,
            timeout=timeout if timeout is not None else self.timeout,
        )

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        content_type: str = "application/json",
        query: dict | None = None,
        timeout: float | None = None,
    ) -> dict:
        """One request; the decoded JSON answer, or ApiError."""
        if query:
            path += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        conn = self._connection(timeout)
        try:
            conn.request(method, path, data, self._headers(content_type if data else None))
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {"message": raw.decode(errors="replace")[:500]}
        if response.status >= 400:
            raise ApiError(
                response.status,
                answer.get("message", response.reason),
                answer.get("reason", ""),
            )
        return answer

    def get(self, path: str, **query) -> dict:
        return self.request("GET", path, query=query or None)

    def get_or_none(self, path: str) -> dict | None:
        try:
            return self.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, patch: dict) -> dict:
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    def delete(self, path: str, *, grace: int | None = None, uid: str | None = None) -> dict | None:
        """DELETE; None if it was not there. ``uid``: only that incarnation of the object."""
        options: dict = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace is not None:
            options["gracePeriodSeconds"] = grace
        if uid is not None:
            options["preconditions"] = {"uid": uid}
        try:
            return self.request("DELETE", path, options)
        except ApiError as exc:
            if exc.status in (404, 409):  # gone, or another incarnation (precondition)
                return None
            raise

    def watch(
        self, path: str, resource_version: str, *, timeout: int = 300, **query
    ) -> Iterator[dict]:
        """Watch events after ``resource_version`` (bookmarks included); ends when the server
        closes the watch. A 410 (too old) arrives as an ERROR event, as the server sends it."""
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout),
            **query,
        }
        conn = self._connection(timeout + 30)
        try:
            conn.request(
                "GET", f"{path}?{urllib.parse.urlencode(params)}", None, self._headers(None)
            )
            response = conn.getresponse()
            if response.status >= 400:
                raw = response.read()
                raise ApiError(response.status, raw.decode(errors="replace")[:300])
            while line := response.readline():
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()

    # -- discovery and server-side apply
    def resource(self, api_version: str, kind: str) -> Resource:
        key = (api_version, kind)
        if key not in self._resources:
            base = _api_base(api_version)
            try:
                listing = self.get(base)
            except ApiError as exc:
                if exc.status == 404:
                    raise UnknownKind(f"{kind} ({api_version}): not served here") from None
                raise
            for item in listing.get("resources") or []:
                if "/" in item["name"]:
                    continue  # subresources
                found = Resource(item["name"], item["namespaced"], base)
                self._resources[(api_version, item["kind"])] = found
            if key not in self._resources:
                raise UnknownKind(f"{kind} ({api_version}): not served here")
        return self._resources[key]

    def object_path(self, obj: dict) -> str:
        meta = obj.get("metadata") or {}
        resource = self.resource(obj.get("apiVersion", "v1"), obj["kind"])
        namespace = (meta.get("namespace") or "default") if resource.namespaced else None
        return resource.path(namespace, meta["name"])

    def apply(self, obj: dict) -> dict:
        """Server-side apply of ``obj`` as the field manager `meshlab` (forcing conflicts, as
        `kubectl apply --server-side --force-conflicts`); the object as stored."""
        return self.request(
            "PATCH",
            self.object_path(obj),
            obj,
            content_type="application/apply-patch+yaml",
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
        )
