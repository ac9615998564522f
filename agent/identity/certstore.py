"""Keeps workload certificates and their keys on the node's disk (0600), so a restarted
agent serves mutual TLS at once, also while the controller is away.

Keys still never leave the node: they are written only to the agent's own state
folder, readable by root alone, and replaced on every renewal.
"""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from meshagent.agent.identity.manager import WorkloadCert
from meshagent.common.spiffe import Identity

log = logging.getLogger(__name__)

_KEY_MARK = b"-----BEGIN PRIVATE KEY-----"


class CertStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, identity: Identity) -> Path:
        return self.folder / (hashlib.sha256(identity.uri.encode()).hexdigest()[:32] + ".pem")

    def save(self, cert: WorkloadCert) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(cert.identity)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert.cert_chain_pem + cert.key_pem)
        os.replace(tmp, path)

    def load(self, identity: Identity) -> WorkloadCert | None:
        """The saved certificate for `identity` if it is there and not expired."""
        try:
            data = self._path(identity).read_bytes()
        except OSError:
            return None
        chain, mark, key = data.partition(_KEY_MARK)
        if not mark:
            return None
        try:
            leaf = x509.load_pem_x509_certificate(chain)
        except ValueError:
            log.warning("saved certificate for %s is unreadable; ignoring it", identity)
            return None
        if leaf.not_valid_after_utc <= datetime.now(UTC):
            return None
        return WorkloadCert(
            identity=identity,
            cert_chain_pem=chain,
            key_pem=mark + key,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )
