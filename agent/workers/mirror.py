"""A worker's copy of the agent's workload certificates (the agent alone signs and renews)."""

from __future__ import annotations

from datetime import UTC, datetime

import trio
from meshagent.agent.identity.manager import IdentityUnavailable, WorkloadCert
from meshagent.common.spiffe import Identity


class IdentityMirror:
    """`IdentitySource` for a worker: the set the agent sent last, expired ones left out."""

    def __init__(self) -> None:
        self._certs: dict[Identity, WorkloadCert] = {}
        self._changed = trio.Event()

    def replace(self, certs: list[WorkloadCert]) -> None:
        self._certs = {c.identity: c for c in certs}
        self._changed.set()
        self._changed = trio.Event()

    def get(self, identity: Identity) -> WorkloadCert | None:
        cert = self._certs.get(identity)
        if cert is None or cert.not_after <= datetime.now(UTC):
            return None
        return cert

    async def wait_for(self, identity: Identity, timeout: float) -> WorkloadCert:
        cert = self.get(identity)
        if cert is not None:  # as nearly always: no deadline to arm
            return cert
        with trio.move_on_after(timeout):
            while (cert := self.get(identity)) is None:
                await self._changed.wait()
            return cert
        raise IdentityUnavailable(
            f"no certificate for {identity} after {timeout:g}s (the agent has sent none)"
        )
