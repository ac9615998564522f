"""Who may have what signed: node credentials in, a node-scoped signing decision out.

A node's agent asks for certificates for the workloads running on it. The controller signs an
identity only if a pod with that namespace and service account is scheduled on the asking
node, so a compromised node cannot mint other nodes' identities (DESIGN.md section 4). In the
lab, nodes prove who they are with per-node bootstrap tokens (`NodeTokenAuthenticator`); in a
cluster, with their service-account token (TokenReview, elsewhere).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from meshagent.common.spiffe import CertificateChain, Identity
from meshagent.controller.ca import CertificateAuthority, SigningRefused
from prometheus_client import Counter

__all__ = [
    "CSR_REFUSED",
    "CSR_SIGNED",
    "AuthenticationFailed",
    "NodeTokenAuthenticator",
    "PodInfo",
    "authorize_csr",
    "sign_for_node",
]

CSR_REFUSED = Counter(
    "meshagent_controller_csr_refused_total",
    "Certificate signing requests refused, by reason.",
    ["reason"],
)
CSR_SIGNED = Counter(
    "meshagent_controller_csr_signed_total",
    "Workload certificates signed.",
)

_TOKEN_BYTES = 32
_FILE_MODE = 0o600


class PodInfo(Protocol):
    """What node-scoped signing needs to know about a pod (snapshot workloads fit)."""

    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def node(self) -> str: ...
    @property
    def service_account(self) -> str: ...


def authorize_csr(node: str, identity: Identity, pods: Iterable[PodInfo]) -> None:
    """Allow ``node`` to have ``identity`` signed only if one of its pods runs as it.

    ``pods`` are the pods the controller knows to be scheduled and not finished; the caller
    filters out Succeeded and Failed pods. Raises `SigningRefused` (reason ``not_on_node``).
    """
    for pod in pods:
        if (
            pod.node == node
            and pod.namespace == identity.namespace
            and pod.service_account == identity.service_account
        ):
            return
    raise SigningRefused(
        "not_on_node",
        f"node {node!r} runs no pod with service account {identity.service_account!r}"
        f" in namespace {identity.namespace!r}",
    )


def sign_for_node(
    ca: CertificateAuthority,
    node: str,
    csr_pem: bytes,
    identity: Identity,
    pods: Iterable[PodInfo],
    lifetime: timedelta,
) -> CertificateChain:
    """The whole signing decision for an authenticated node: authorize, sign, count.

    Raises `SigningRefused`; every refusal and signature is counted in the module's metrics.
    """
    try:
        authorize_csr(node, identity, pods)
        chain = ca.sign_workload_csr(csr_pem, identity, lifetime)
    except SigningRefused as exc:
        CSR_REFUSED.labels(reason=exc.reason).inc()
        raise
    CSR_SIGNED.inc()
    return chain


class AuthenticationFailed(Exception):
    """A presented node credential is not valid."""


class NodeTokenAuthenticator:
    """Per-node bootstrap tokens for the lab, persisted to one JSON file (mode 0600).

    Only SHA-256 digests of the tokens are stored, so the file does not hand out credentials;
    the token itself is returned once, by `issue`, for the node's agent to keep.
    """

    def __init__(self, path: Path) -> None:
        """Load tokens from ``path`` (an absent file means no node has a token yet)."""
        self._path = Path(path)
        self._digests: dict[str, bytes] = {}
        if self._path.exists():
            self._digests = self._load()

    def issue(self, node: str) -> str:
        """Make a new token for ``node``, replacing (and so revoking) any earlier one."""
        if not node or not isinstance(node, str):
            raise ValueError(f"node name must be a non-empty string, got {node!r}")
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        self._digests[node] = _digest(token)
        self._save()
        return token

    def revoke(self, node: str) -> None:
        """Forget ``node``'s token; unknown nodes are ignored."""
        if self._digests.pop(node, None) is not None:
            self._save()

    def authenticate(self, token: str) -> str:
        """The node ``token`` belongs to; raises `AuthenticationFailed`.

        Compares in constant time against every stored digest, so timing tells nothing about
        how close a guess came or which node it matched.
        """
        presented = _digest(token) if isinstance(token, str) else b""
        matched: str | None = None
        for node, digest in self._digests.items():
            if hmac.compare_digest(presented, digest):
                matched = node
        if matched is None:
            raise AuthenticationFailed("unknown or revoked node bootstrap token")
        return matched

    def nodes(self) -> list[str]:
        return sorted(self._digests)

    def _load(self) -> dict[str, bytes]:
        try:
            raw = json.loads(self._path.read_text())
            nodes = raw["nodes"]
            return {str(node): bytes.fromhex(digest) for node, digest in nodes.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"node token file {self._path} is unreadable (want"
                f' {{"nodes": {{"<node>": "<sha256 hex>"}}}}): {exc}'
            ) from None

    def _save(self) -> None:
        data = json.dumps(
            {"nodes": {node: digest.hex() for node, digest in sorted(self._digests.items())}},
            indent=2,
        ).encode()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self._path.parent, prefix=f".{self._path.name}.")
        try:
            with os.fdopen(fd, "wb") as tmp:
                os.fchmod(tmp.fileno(), _FILE_MODE)
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, self._path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
