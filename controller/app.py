"""The controller process: a source feeding the model, validation, the CA, the agent stream
on 15012 and status/metrics on 15014.

Everything runs in one nursery; `Controller.serve` says started once the agent port listens
and the source has delivered its first full view (validated, so `/status` lists rejected
resources from the start). Two ways to run:

- files (the lab): manifests from a folder, the CA in a 0600 file, node bootstrap tokens;
- Kubernetes: list+watch through the API server, leader election on the `meshctl` Lease, the
  CA in a Secret the leader creates once, agents authenticated by TokenReview; the leader
  publishes the trust bundle (no key) in the ConfigMap `meshagent-root` for the agent
  DaemonSet to mount as its `--controller-ca-file`.

15014 serves `/metrics` to anyone and `/status` and `/debug/config` only to loopback or
authenticated callers (controller/debugauth.py). With `--webhook`, every replica also serves
the admission webhook over HTTPS; the leader keeps its configuration's caBundle
(controller/webhook.py).

`Controller.run` (what `meshctl serve` runs) serves until SIGTERM or SIGINT, then shuts down
within the grace period: it hands the Lease back, tells every agent goodbye with the reason,
and returns (exit 0). At the default log level the HTTP client's per-request lines are off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import httpx2
import prometheus_client
import trio
from cryptography.hazmat.primitives import serialization
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap
from meshagent.common.httpserve import Response, json_response, serve_http
from meshagent.common.spiffe import DEFAULT_TRUST_DOMAIN
from meshagent.controller.ca import CertificateAuthority
from meshagent.controller.compiler import compile_snapshot
from meshagent.controller.debugauth import DebugGuard, NamespaceTokenReviewAuthenticator
from meshagent.controller.gcfreeze import HeapKeeper
from meshagent.controller.jwks import JwksFetcher
from meshagent.controller.leader import RETRY_PERIOD, LeaderElector, ensure_secret
from meshagent.controller.model import ClusterModel
from meshagent.controller.push import (
    DEFAULT_CERT_LIFETIME,
    NodeAuthenticator,
    PushServer,
    StreamCertificate,
    TokenFileAuthenticator,
    TokenReviewAuthenticator,
    controller_identity,
)
from meshagent.controller.resolver import NameResolver
from meshagent.controller.serviceentry import model_entry_hosts
from meshagent.controller.sources.files import FileSource
from meshagent.controller.sources.kubernetes import (
    ALL_KINDS,
    KubernetesSourceState,
    open_kube_client,
    serve_kubernetes_source,
)
from meshagent.controller.validation import Validator, reason, resource_name
from meshagent.controller.webhook import (
    WEBHOOK_CONFIGURATION,
    keep_ca_bundle,
    serve_webhook,
    webhook_names,
)

log = logging.getLogger(__name__)

CA_SECRET_KEY = "ca.pem"
ROOT_CONFIGMAP = "meshagent-root"
ROOT_CONFIGMAP_KEY = "root.pem"
# Once published, the leader looks again this often (someone may delete or edit it).
ROOT_RECHECK = 60.0
# SIGTERM to exit: well inside a pod's default 30 s terminationGracePeriodSeconds.
SHUTDOWN_GRACE = 10.0
CONTROLLER_NAMESPACE = "meshagent-system"
DEFAULT_AGENT_SERVICE_ACCOUNT = "meshagent-system/meshagent"
_WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class ControllerSettings:
    listen_host: str = "0.0.0.0"
    listen_port: int = 15012
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 15014
    manifest_dir: Path | None = None
    kubernetes: bool = False
    kubeconfig: Path | None = None
    namespace: str = CONTROLLER_NAMESPACE  # of the Lease and the CA Secret (POD_NAMESPACE)
    pod_name: str = ""  # this replica's leader-election identity (POD_NAME)
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    ca_file: Path | None = None
    ca_secret: str | None = None
    trust_bundle_out: Path | None = None
    server_names: tuple[str, ...] = ()
    node_tokens: Path | None = None
    agent_service_account: str = DEFAULT_AGENT_SERVICE_ACCOUNT
    cert_lifetime: timedelta = DEFAULT_CERT_LIFETIME
    plaintext: bool = False
    webhook_host: str = "0.0.0.0"
    webhook_port: int | None = None  # the admission webhook (HTTPS); None: not served
    webhook_configuration: str = WEBHOOK_CONFIGURATION  # whose caBundle to keep

    def problems(self) -> list[str]:
        """What makes these settings unusable, as messages naming the options."""
        out = []
        if self.kubernetes and self.manifest_dir is not None:
            out.append("--files and --kubernetes are two different sources: choose one")
        if (self.ca_file is None) == (self.ca_secret is None):
            out.append("give the CA as exactly one of --ca-file PATH or --ca-secret NAME")
        if self.ca_secret is not None and not self.kubernetes:
            out.append("--ca-secret needs --kubernetes (the Secret lives in the cluster)")
        if not self.kubernetes and self.node_tokens is None:
            out.append(
                "agents must authenticate: give --node-tokens PATH (bootstrap tokens) or run"
                " with --kubernetes (TokenReview)"
            )
        if self.kubernetes and not self.pod_name:
            out.append("--kubernetes needs this replica's name for leader election (POD_NAME)")
        if self.cert_lifetime <= timedelta(0):
            out.append(f"--cert-lifetime must be positive, got {self.cert_lifetime}")
        return out

    def stream_names(self) -> tuple[str, ...]:
        """Names the stream certificate carries: the given ones, else the listen address and,
        in a cluster, the controller Service's DNS names."""
        if self.server_names:
            return self.server_names
        names = [] if self.listen_host in _WILDCARDS else [self.listen_host]
        if self.kubernetes:
            names += [
                f"meshctl.{self.namespace}.svc",
                f"meshctl.{self.namespace}.svc.cluster.local",
            ]
        return tuple(names)


def quiet_client_logs() -> None:
    """Below DEBUG, keep only warnings of the HTTP client, which logs every request at INFO
    (each replica reads and writes the Lease every 2 s)."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("httpx2", "httpcore2"):
            logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def _private_dir() -> Iterator[Path]:
    """A temporary 0700 folder, in memory where the system offers it (/dev/shm)."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="meshctl-ca-", dir=base) as folder:
        yield Path(folder)


def new_root_pem(trust_domain: str) -> bytes:
    """A new self-signed root CA (certificate and key) as the PEM a CA file holds."""
    with _private_dir() as folder:
        CertificateAuthority.load_or_create(folder / "ca.pem", trust_domain)
        return (folder / "ca.pem").read_bytes()


def ca_from_pem(pem: bytes, trust_domain: str) -> CertificateAuthority:
    """Load a root CA from CA-file PEM held in memory (a Secret's content)."""
    with _private_dir() as folder:
        path = folder / "ca.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return CertificateAuthority.load_or_create(path, trust_domain)


def write_public_file(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text`` (mode 0644: the trust bundle is public)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)


class Controller:
    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.model = ClusterModel()
        self.validator = Validator()
        self.files: FileSource | None = None
        self.kube_state: KubernetesSourceState | None = None
        self.elector: LeaderElector | None = None
        self.push: PushServer | None = None
        self.ca: CertificateAuthority | None = None
        self.stream_sockets: list[trio.SocketListener] = []  # where agents connect
        self.webhook_sockets: list[trio.SocketListener] = []  # the admission webhook

    def status(self) -> dict:
        sessions = self.push.sessions.values() if self.push else ()
        return {
            "generation": self.model.generation,
            "source": self.source_status(),
            "leader": self.elector.status() if self.elector else None,
            "stream": self.push.status() if self.push else None,
            "agents": [s.as_dict() for s in sorted(sessions, key=lambda s: s.node)],
            "rejected": self.rejected(),
            "skipped": [
                {"resource": resource_name(e), "path": e.path, "reason": e.message}
                for e in self.validator.skipped
            ],
            "unenforceable": self.unenforceable(),
            "ca": self.ca_status(),
        }

    def unenforceable(self) -> list[dict]:
        """Refused DENY policies enforced as deny-all (controller/failclosed.py), with the
        pods of their namespace they now deny (mesh-wide ones are not enumerated)."""
        pods = list(self.model.objects("Pod"))
        out = []
        for u in self.validator.unenforceable:
            selected = [
                f"{u.namespace}/{(p.get('metadata') or {}).get('name')}"
                for p in pods
                if (p.get("metadata") or {}).get("namespace", "default") == u.namespace
                and u.selects((p.get("metadata") or {}).get("labels") or {})
            ]
            out.append(u.as_dict(selected))
        return out

    def ca_status(self) -> dict | None:
        """The signing CA as operators check it: who it is, until when, and what it signed."""
        if self.ca is None:
            return None
        cert = self.ca.certificate
        sessions = self.push.sessions.values() if self.push else ()
        return {
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "root": cert.subject == cert.issuer,
            "not_after": cert.not_valid_after_utc.isoformat(),
            "signed": sum(getattr(s, "csr_signed", 0) for s in sessions),
            "refused": sum(getattr(s, "csr_refused", 0) for s in sessions),
        }

    def source_status(self) -> dict:
        if self.kube_state is not None:
            return {
                "type": "kubernetes",
                "complete": self.kube_state.complete,
                "kinds": self.kube_state.as_dict(),
            }
        if self.files is not None:
            return {
                "type": "files",
                "folder": str(self.files.folder),
                "unreadable_files": len(self.files.errors),
            }
        return {"type": "none"}

    def rejected(self) -> list[dict[str, str]]:
        """Manifest files that do not parse (no field path: the whole file is kept out), then
        Istio resources refused by validation, with the field at fault."""
        files = sorted((self.files.errors if self.files else {}).items())
        return [{"resource": file, "path": "", "reason": why} for file, why in files] + [
            {"resource": resource_name(e), "path": e.path, "reason": reason(e)}
            for e in self.validator.rejected
        ]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        problems = s.problems()
        if problems:
            raise ValueError("; ".join(problems))
        async with contextlib.AsyncExitStack() as stack, trio.open_nursery() as nursery:
            client: AsyncClient | None = None
            if s.kubernetes:
                kube_config = KubeConfig.from_file(s.kubeconfig) if s.kubeconfig else None
                client = await stack.enter_async_context(open_kube_client(kube_config))
                self.elector = LeaderElector(client, s.namespace, s.pod_name)
                await nursery.start(self.elector.serve)
                self.kube_state = KubernetesSourceState(ALL_KINDS)
                source = partial(
                    serve_kubernetes_source,
                    self.model,
                    client_config=kube_config,
                    state=self.kube_state,
                )
                await nursery.start(source)
            elif s.manifest_dir is not None:
                self.files = FileSource(s.manifest_dir, self.model)
                await nursery.start(self.files.serve)
            await nursery.start(self.validator.serve, self.model)
            await nursery.start(JwksFetcher(self.model).serve)
            await nursery.start(NameResolver(self.model).serve)

            self.ca, issuer_pem = await self._load_ca(client)
            if s.trust_bundle_out is not None:
                write_public_file(s.trust_bundle_out, self.ca.trust_bundle_pem)
            if client is not None:
                nursery.start_soon(
                    publish_root, client, self.elector, ROOT_CONFIGMAP, self.ca.trust_bundle_pem
                )
            tls = None
            if s.plaintext:
                log.warning("agent stream without TLS (--plaintext): for development only")
            else:
                identity = controller_identity(s.trust_domain, s.namespace)
                certificate = StreamCertificate(issuer_pem, identity, s.stream_names())
                nursery.start_soon(certificate.serve_renewal)
                tls = certificate.context
            authenticator: NodeAuthenticator
            if client is not None:
                authenticator = TokenReviewAuthenticator(client, s.agent_service_account)
            else:
                assert s.node_tokens is not None  # problems() said so
                authenticator = TokenFileAuthenticator(s.node_tokens)
            self.push = PushServer(
                self.model,
                authenticator=authenticator,
                ca=self.ca,
                tls=tls,
                cert_lifetime=s.cert_lifetime,
                heap=HeapKeeper(),
            )
            self.stream_sockets = await nursery.start(self.push.serve, s.listen_host, s.listen_port)
            if s.webhook_port is not None:
                await self._serve_webhook(nursery, client, issuer_pem)

            async def status(_query: str) -> Response:
                return json_response(json.dumps(self.status(), indent=2))

            async def metrics(_query: str) -> Response:
                return Response(
                    200, prometheus_client.generate_latest(), prometheus_client.CONTENT_TYPE_LATEST
                )

            async def config(_query: str) -> Response:
                # the node-independent snapshot: what `meshctl authz check` evaluates against
                full = compile_snapshot(self.model, "")
                return json_response(full.model_dump_json())

            routes = {"/status": status, "/metrics": metrics, "/debug/config": config}
            debug_auth = (
                NamespaceTokenReviewAuthenticator(client, s.namespace)
                if client is not None
                else TokenFileAuthenticator(s.node_tokens)
                if s.node_tokens is not None
                else None
            )
            guard = DebugGuard(debug_auth)
            await nursery.start(
                partial(serve_http, guard=guard), (s.metrics_host, s.metrics_port), routes
            )
            log.info("controller serving agents on %s:%d", s.listen_host, s.listen_port)
            task_status.started()

    async def _serve_webhook(
        self, nursery: trio.Nursery, client: AsyncClient | None, issuer_pem: bytes
    ) -> None:
        """The admission webhook on its own certificate from the CA (the Service's names and
        --server-name); in a cluster, its configuration's caBundle kept to the CA's roots."""
        s = self.settings
        assert s.webhook_port is not None and self.ca is not None
        names = webhook_names(s.namespace, s.stream_names())
        certificate = StreamCertificate(
            issuer_pem, controller_identity(s.trust_domain, s.namespace), names
        )
        nursery.start_soon(certificate.serve_renewal)
        self.webhook_sockets = await nursery.start(
            partial(serve_webhook, entry_hosts=partial(model_entry_hosts, self.model)),
            s.webhook_host,
            s.webhook_port,
            certificate.context,
        )
        if client is not None:
            bundle = self.ca.trust_bundle_pem
            issuer = self.ca.certificate.public_bytes(serialization.Encoding.PEM).decode()
            if issuer not in bundle:  # an intermediate CA signs the webhook's certificate
                bundle += issuer
            nursery.start_soon(
                partial(keep_ca_bundle, leader=self.elector),
                client,
                bundle,
                s.webhook_configuration,
            )

    async def run(self, *, grace: float = SHUTDOWN_GRACE) -> None:
        """`serve` until SIGTERM or SIGINT, then `shutdown` (at most ``grace`` seconds; a
        second signal cuts it short) and return. Errors of `serve` propagate."""
        quiet_client_logs()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.serve)
                async for signum in signals:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    break
                with trio.move_on_after(grace) as deadline:
                    async with trio.open_nursery() as cleanup:

                        async def second_signal() -> None:
                            async for again in signals:
                                log.warning("%s again: stopping now", signal.Signals(again).name)
                                cleanup.cancel_scope.cancel()

                        cleanup.start_soon(second_signal)
                        await self.shutdown(f"controller {self.settings.pod_name} is shutting down")
                        cleanup.cancel_scope.cancel()
                if deadline.cancelled_caught:
                    log.warning("clean shutdown took over %.0fs: stopping now", grace)
                nursery.cancel_scope.cancel()
        log.info("controller stopped")

    async def shutdown(self, reason: str) -> None:
        """Hand the Lease back and tell the agents goodbye, together; `serve` goes on until
        cancelled (agents connecting meanwhile only get the goodbye)."""
        async with trio.open_nursery() as nursery:
            if self.elector is not None:
                nursery.start_soon(self.elector.resign)
            if self.push is not None:
                nursery.start_soon(self.push.close_streams, reason)

    async def _load_ca(self, client: AsyncClient | None) -> tuple[CertificateAuthority, bytes]:
        """The CA and its PEM (certificate and key, for the stream certificate)."""
        s = self.settings
        if s.ca_file is not None:
            ca = CertificateAuthority.load_or_create(s.ca_file, s.trust_domain)
            return ca, s.ca_file.read_bytes()
        assert client is not None and self.elector is not None and s.ca_secret is not None
        pem = await ensure_secret(
            client,
            self.elector,
            s.ca_secret,
            CA_SECRET_KEY,
            partial(new_root_pem, s.trust_domain),
        )
        return ca_from_pem(pem, s.trust_domain), pem


async def publish_root(
    client: AsyncClient,
    elector: LeaderElector,
    name: str,
    pem: str,
    *,
    retry: float = RETRY_PERIOD,
    recheck: float = ROOT_RECHECK,
) -> None:
    """Keep ConfigMap ``name`` (key ``root.pem``) in the elector's namespace equal to ``pem``
    while this replica leads; never returns.

    Agents mount it to check the controller's stream certificate, so it holds only the
    public trust bundle. Followers write nothing; a write that loses a race (409) is retried.
    """
    namespace = elector.namespace
    while True:
        wait = retry
        if elector.is_leader:
            try:
                await _put_root(client, namespace, name, pem)
                wait = recheck
            except (ApiError, httpx2.HTTPError) as exc:
                log.warning("publishing ConfigMap %s/%s: %s", namespace, name, exc)
        with trio.move_on_after(wait):
            await elector.wait_changed()


async def _put_root(client: AsyncClient, namespace: str, name: str, pem: str) -> None:
    data = {ROOT_CONFIGMAP_KEY: pem}
    try:
        current = await client.get(ConfigMap, name, namespace=namespace)
    except ApiError as exc:
        if exc.status is None or exc.status.code != 404:
            raise
        labels = {"app.kubernetes.io/managed-by": "meshctl"}
        meta = ObjectMeta(name=name, namespace=namespace, labels=labels)
        await client.create(ConfigMap(metadata=meta, data=data))
        log.info("published the mesh root in ConfigMap %s/%s", namespace, name)
        return
    if current.data != data:
        current.data = data
        await client.replace(current)  # carries the resourceVersion read: 409 if raced
        log.info("updated the mesh root in ConfigMap %s/%s", namespace, name)
