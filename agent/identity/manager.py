"""The one owner of a node's workload certificates: wanted identities in, fresh certificates out.

Pod discovery says which identities the node's meshed pods run as (`set_wanted`); `serve`
keeps one task per wanted identity that makes a key, has the controller sign a CSR through the
injected `Signer`, and renews at half the certificate's validity, retrying with capped
exponential backoff when signing fails. The proxy asks for the current certificate with `get`
or `wait_for` at each handshake, so a renewal affects new handshakes only; connections already
up keep the certificate they were made with.

Scheduling uses trio's clock (so tests drive it with `trio.testing.MockClock`): a certificate
received at trio time ``t`` with validity ``notAfter - notBefore = v`` is renewed at ``t + v/2``
and counted expired at ``t`` plus its remaining wall-clock life. Private keys exist only in
memory, inside `WorkloadCert.key_pem`, which is left out of every repr and log line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from meshagent.agent.identity.keys import build_csr, key_pem, new_key
from meshagent.common.spiffe import CertificateChain, Identity, identity_from_certificate

if TYPE_CHECKING:
    pass

__all__ = [
    "IdentityManager",
    "IdentityUnavailable",
    "Signer",
    "WorkloadCert",
]

log = logging.getLogger(__name__)


class Signer(Protocol):
    """Has the controller sign a CSR for ``identity``; raises on any failure."""

    async def sign(self, csr_pem: bytes, identity: Identity) -> CertificateChain: ...


@dataclass(frozen=True)
class WorkloadCert:
    """One identity's current certificate and key, as the TLS layer needs them."""

    identity: Identity
    cert_chain_pem: bytes  # the leaf, then intermediates (not the root)
    key_pem: bytes = field(repr=False)  # unencrypted PKCS#8; memory only, never logged
    not_before: datetime
    not_after: datetime


class CertStoreLike(Protocol):
    """Where certificates outlive the process (see certstore.py)."""

    def load(self, identity: Identity) -> WorkloadCert | None: ...

    def save(self, cert: WorkloadCert) -> None: ...


class IdentityUnavailable(Exception):
    """No valid certificate for an identity arrived in time."""


@dataclass(eq=False)
class _Slot:
    """The state of one wanted identity; written only by its own refresh task."""

    identity: Identity
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cert: WorkloadCert | None = None
    expires_at: float = -math.inf  # trio time
    renew_at: float = -math.inf  # trio time
    issued: int = 0
    last_error: str | None = None

    def valid(self) -> WorkloadCert | None:
        if self.cert is not None and trio.current_time() < self.expires_at:
            return self.cert
        return None


class IdentityManager:
    """Keeps a certificate for every wanted identity of this node (see module docstring)."""

    def __init__(
        self,
        signer: Signer,
        *,
        request_timeout: float = 30.0,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        max_concurrent_requests: int = 8,
        store: CertStoreLike | None = None,
    ) -> None:
        self._signer = signer
        self._store = store
        self._request_timeout = request_timeout
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        # A node starting up with many pods should not open a CSR storm on the controller.
        self._limiter = trio.CapacityLimiter(max_concurrent_requests)
        self._wanted: frozenset[Identity] = frozenset()
        self._slots: dict[Identity, _Slot] = {}
        self._wanted_changed = trio.Event()
        self._cert_changed = trio.Event()
        self._serving = False
        self._listeners: list[Callable[[], None]] = []

    # -- inputs ------------------------------------------------------------------------------

    def set_wanted(self, identities: Iterable[Identity]) -> None:
        """Replace the set of identities to hold; `serve` fetches new ones, drops the rest."""
        self._wanted = frozenset(identities)
        self._wanted_changed.set()
        self._notify()

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever `current` may have changed (a certificate issued or
        renewed, the wanted set changed): proxy worker processes mirror the certificates."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in self._listeners:
            callback()

    @property
    def wanted(self) -> frozenset[Identity]:
        return self._wanted

    # -- outputs -----------------------------------------------------------------------------

    def get(self, identity: Identity) -> WorkloadCert | None:
        """The current unexpired certificate for ``identity``; None if there is none yet or
        the identity is no longer wanted (from the moment `set_wanted` drops it)."""
        slot = self._slots.get(identity)
        return slot.valid() if slot is not None and identity in self._wanted else None

    async def wait_for(self, identity: Identity, timeout: float) -> WorkloadCert:
        """The current certificate, waiting up to ``timeout`` seconds for one to arrive.

        Raises `IdentityUnavailable` (with the last signing error, if any) on timeout.
        """
        with trio.move_on_after(timeout):
            while (cert := self.get(identity)) is None:
                await self._cert_changed.wait()
            return cert
        slot = self._slots.get(identity)
        if identity not in self._wanted:
            why = "it is not a wanted identity of this node"
        elif slot is not None and slot.last_error:
            why = f"last signing error: {slot.last_error}"
        else:
            why = "no certificate has been signed yet"
        raise IdentityUnavailable(f"no certificate for {identity} after {timeout:g}s: {why}")

    def current(self) -> list[WorkloadCert]:
        """Every wanted identity's current unexpired certificate."""
        return [c for i in self._wanted if (c := self.get(i)) is not None]

    def expiries(self) -> dict[str, datetime]:
        """Identity URI -> the current certificate's not-after; safe from any thread (no trio
        clock), for the metrics scrape."""
        return {
            identity.uri: slot.cert.not_after
            for identity, slot in list(self._slots.items())
            if slot.cert is not None and identity in self._wanted
        }

    def status(self) -> list[dict[str, Any]]:
        """One row per wanted identity, for ``meshagent status``."""
        rows = []
        for identity in sorted(self._wanted):
            slot = self._slots.get(identity)
            cert = slot.cert if slot else None
            if cert is None:
                state = "pending"
            elif slot is not None and slot.valid() is None:
                state = "expired"
            else:
                state = "ready"
            rows.append(
                {
                    "identity": identity.uri,
                    "state": state,
                    "not_after": cert.not_after.isoformat() if cert else None,
                    "renewals": max(slot.issued - 1, 0) if slot else 0,
                    "last_error": slot.last_error if slot else None,
                }
            )
        return rows

    # -- the worker --------------------------------------------------------------------------

    async def serve(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Keep every wanted identity's certificate fresh, until cancelled."""
        if self._serving:
            raise RuntimeError("IdentityManager.serve is already running")
        self._serving = True
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    self._wanted_changed = trio.Event()
                    self._reconcile(nursery)
                    await self._wanted_changed.wait()
        finally:
            for slot in self._slots.values():
                slot.scope.cancel()
            self._slots.clear()
            self._serving = False

    def _reconcile(self, nursery: trio.Nursery) -> None:
        for identity in [i for i in self._slots if i not in self._wanted]:
            log.info("dropping certificate for %s", identity)
            self._slots.pop(identity).scope.cancel()
        for identity in self._wanted - self._slots.keys():
            slot = _Slot(identity)
            self._slots[identity] = slot
            nursery.start_soon(self._keep_fresh, slot, name=f"identity {identity}")

    async def _keep_fresh(self, slot: _Slot) -> None:
        with slot.scope:
            saved = self._store.load(slot.identity) if self._store is not None else None
            if saved is not None:  # serve at once; renew when due (now, if past half-life)
                self._install(slot, saved)
                await trio.sleep_until(slot.renew_at)
            failures = 0
            while True:
                try:
                    cert = await self._fetch(slot.identity)
                except Exception as exc:  # any signer failure: keep the old cert, try again
                    failures += 1
                    delay = min(self._retry_max, self._retry_initial * 2 ** min(failures - 1, 30))
                    slot.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning(
                        "signing %s failed (attempt %d, next in %gs): %s",
                        slot.identity,
                        failures,
                        delay,
                        slot.last_error,
                    )
                    await trio.sleep(delay)
                    continue
                failures = 0
                self._install(slot, cert)
                if self._store is not None:
                    self._store.save(cert)
                await trio.sleep_until(slot.renew_at)

    async def _fetch(self, identity: Identity) -> WorkloadCert:
        key = new_key()
        csr = build_csr(key, identity)
        async with self._limiter:
            with trio.fail_after(self._request_timeout):
                chain = await self._signer.sign(csr, identity)
        return _workload_cert(identity, key, chain)

    def _install(self, slot: _Slot, cert: WorkloadCert) -> None:
        now = trio.current_time()
        validity = (cert.not_after - cert.not_before).total_seconds()
        remaining = (cert.not_after - datetime.now(UTC)).total_seconds()
        remaining = min(max(remaining, 0.0), validity)
        slot.cert = cert
        slot.issued += 1
        slot.last_error = None
        slot.expires_at = now + remaining
        # Renew at half the validity; if this node's clock says the certificate is already past
        # its half-life (skew, or a late delivery), at half of what is left instead.
        slot.renew_at = now + (validity / 2 if remaining > validity / 2 else remaining / 2)
        log.info(
            "certificate for %s %s, valid until %s",
            slot.identity,
            "renewed" if slot.issued > 1 else "issued",
            cert.not_after.isoformat(),
        )
        self._cert_changed.set()
        self._cert_changed = trio.Event()
        self._notify()


def _workload_cert(
    identity: Identity, key: ec.EllipticCurvePrivateKey, chain: CertificateChain
) -> WorkloadCert:
    """Check what the signer returned really is ``identity`` for ``key``."""
    leaf = chain.leaf()
    named = identity_from_certificate(leaf)
    if named != identity:
        raise ValueError(f"signer returned a certificate for {named}, not {identity}")
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ValueError(f"signer returned a certificate for {identity} with another key")
    if leaf.not_valid_after_utc <= leaf.not_valid_before_utc:
        raise ValueError(f"signer returned a certificate for {identity} with no validity")
    return WorkloadCert(
        identity=identity,
        cert_chain_pem=chain.pem,
        key_pem=key_pem(key),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )
