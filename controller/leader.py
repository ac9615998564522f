"""Leader election between controller replicas, and the once-only work only the leader does.

Every replica serves agents; work that must happen once (creating the CA Secret) waits for
leadership. The leader holds a coordination.k8s.io/v1 Lease (`meshctl` in the controller's
namespace) the way client-go's leaderelection does: every ``retry_period`` each replica
reads the Lease; the holder writes a new renewTime, the others take it over once it has not
changed for ``lease_duration`` by their own clock (so clock skew between replicas does not
matter). Every write carries the resourceVersion it read, so two replicas racing for an
expired Lease cannot both win: the API server answers the loser 409 Conflict. A leader that
cannot renew for ``renew_deadline`` stops acting as leader before its Lease can expire. A
replica that stops cleanly (cancelled, or `resign` on SIGTERM) hands the Lease back at once,
so a follower takes over at its next read instead of after ``lease_duration``.

Lease times are MicroTime, which the API server parses only with six fractional digits
("2006-01-02T15:04:05.000000Z07:00"); the JSON encoder writes a datetime whose microsecond
is 0 without any (`...:00Z`, refused), so every time we write has a non-zero microsecond.
"""

from __future__ import annotations

import base64
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx2
import trio
from lightkube import ApiError, AsyncClient
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Secret

__all__ = ["LeaderElector", "ensure_secret"]

log = logging.getLogger(__name__)

LEASE_NAME = "meshctl"
LEASE_DURATION = 15.0
RENEW_DEADLINE = 10.0
RETRY_PERIOD = 2.0
# client-go waits retry_period * (1 + up to this) between attempts to acquire.
JITTER = 0.2
RELEASE_TIMEOUT = 5.0


def _micro(moment: datetime) -> datetime:
    """``moment`` as a MicroTime the API server accepts (see module docstring): a zero
    microsecond becomes 1, which no Lease decision can notice."""
    return moment if moment.microsecond else moment.replace(microsecond=1)


def _now() -> datetime:
    return _micro(datetime.now(UTC))


def _writable(spec: LeaseSpec) -> LeaseSpec:
    """``spec`` with its MicroTimes encodable (times read back from the server may have been
    written with .000000 by another client)."""
    if spec.acquireTime is not None:
        spec.acquireTime = _micro(spec.acquireTime)
    if spec.renewTime is not None:
        spec.renewTime = _micro(spec.renewTime)
    return spec


def _code(exc: ApiError) -> int:
    return exc.status.code if exc.status is not None and exc.status.code else 0


class LeaderElector:
    """Campaigns for one Lease and says whether this replica leads (see module docstring)."""

    def __init__(
        self,
        client: AsyncClient,
        namespace: str,
        identity: str,
        *,
        name: str = LEASE_NAME,
        lease_duration: float = LEASE_DURATION,
        renew_deadline: float = RENEW_DEADLINE,
        retry_period: float = RETRY_PERIOD,
    ) -> None:
        if not identity:
            raise ValueError("leader election needs a non-empty identity (POD_NAME)")
        if not 0 < retry_period * (1 + JITTER) < renew_deadline < lease_duration:
            raise ValueError(
                "leader election needs lease_duration > renew_deadline > retry_period * 1.2,"
                f" got {lease_duration}, {renew_deadline}, {retry_period}"
            )
        if lease_duration != int(lease_duration):
            raise ValueError(f"lease_duration is whole seconds in a Lease, got {lease_duration}")
        self._client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.holder = ""
        self.last_error = ""
        self._leading = False
        self._renewed_at = -float("inf")  # trio time of our last successful write
        self._observed: tuple[str, float] = ("", -float("inf"))  # (resourceVersion, trio time)
        self._changed = trio.Event()
        self._campaign: trio.CancelScope | None = None  # while serve() runs
        self._stopped = trio.Event()  # serve() has returned (and released)

    @property
    def is_leader(self) -> bool:
        return self._leading

    def status(self) -> dict[str, Any]:
        return {
            "lease": f"{self.namespace}/{self.name}",
            "identity": self.identity,
            "leader": self._leading,
            "holder": self.holder,
            "last_error": self.last_error,
        }

    async def wait_changed(self) -> None:
        """Return at the next change of leadership or of the observed holder."""
        await self._changed.wait()

    async def serve(
        self,
        *,
        release_on_exit: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Campaign until cancelled; says started after the first attempt (won or not).

        On cancellation a leader hands the Lease back (``release_on_exit``) so another
        replica need not wait for it to expire. After `resign` it returns normally.
        """
        started = False
        self._campaign = trio.CancelScope()
        try:
            with self._campaign:
                while True:
                    await self._attempt()
                    if not started:
                        task_status.started()
                        started = True
                    delay = self.retry_period
                    if not self._leading:
                        delay *= 1 + random.uniform(0, JITTER)
                    await trio.sleep(delay)
        finally:
            if self._leading and release_on_exit:
                with trio.move_on_after(RELEASE_TIMEOUT, shield=True):
                    await self._release()
            self._set(leading=False, holder=self.holder)
            self._stopped.set()
        if not started:
            task_status.started()

    async def resign(self) -> None:
        """Stop campaigning and, if leading, hand the Lease back; returns once `serve` has
        (within RELEASE_TIMEOUT). For a clean shutdown: the in-flight read or write, if any,
        is cancelled first, so it cannot take the Lease again after the release."""
        if self._campaign is None:
            return  # serve() never ran
        self._campaign.cancel()
        await self._stopped.wait()

    async def _attempt(self) -> None:
        try:
            won = await self._acquire_or_renew()
            self.last_error = ""
        except (httpx2.HTTPError, ValueError) as exc:
            won = False
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("lease %s/%s: %s", self.namespace, self.name, self.last_error)
        now = trio.current_time()
        if won:
            self._renewed_at = now
            if not self._leading:
                log.info("became the leader (lease %s/%s)", self.namespace, self.name)
            self._set(leading=True, holder=self.identity)
        elif self._leading and now - self._renewed_at >= self.renew_deadline:
            log.warning("lost the lead: lease not renewed for %.0fs", now - self._renewed_at)
            self._set(leading=False, holder=self.holder)

    async def _acquire_or_renew(self) -> bool:
        """One read and at most one write of the Lease; True if we hold it afterwards."""
        try:
            lease = await self._client.get(Lease, self.name, namespace=self.namespace)
        except ApiError as exc:
            if _code(exc) != 404:
                raise
            return await self._create()
        spec = lease.spec or LeaseSpec()
        version = lease.metadata.resourceVersion if lease.metadata else ""
        if version != self._observed[0]:
            self._observed = (version or "", trio.current_time())
        holder = spec.holderIdentity or ""
        duration = spec.leaseDurationSeconds or self.lease_duration
        if holder not in ("", self.identity) and trio.current_time() < self._observed[1] + duration:
            self._set(leading=False, holder=holder)  # another replica holds it and renews
            return False
        now = _now()
        if holder != self.identity:
            spec.acquireTime = now
            spec.leaseTransitions = (spec.leaseTransitions or 0) + (1 if holder else 0)
        spec.holderIdentity = self.identity
        spec.renewTime = now
        spec.leaseDurationSeconds = int(self.lease_duration)
        lease.spec = _writable(spec)
        try:
            written = await self._client.replace(lease)
        except ApiError as exc:
            if _code(exc) == 409:  # another replica wrote first: we lost this round
                return False
            raise
        self._observed = (written.metadata.resourceVersion or "", trio.current_time())
        return True

    async def _create(self) -> bool:
        now = _now()
        lease = Lease(
            metadata=ObjectMeta(name=self.name, namespace=self.namespace),
            spec=LeaseSpec(
                holderIdentity=self.identity,
                leaseDurationSeconds=int(self.lease_duration),
                acquireTime=now,
                renewTime=now,
                leaseTransitions=0,
            ),
        )
        try:
            written = await self._client.create(lease)
        except ApiError as exc:
            if _code(exc) == 409:
                return False
            raise
        self._observed = (written.metadata.resourceVersion or "", trio.current_time())
        return True

    async def _release(self) -> None:
        try:
            lease = await self._client.get(Lease, self.name, namespace=self.namespace)
            if lease.spec is None or lease.spec.holderIdentity != self.identity:
                return
            lease.spec.holderIdentity = ""
            lease.spec.renewTime = _now()
            lease.spec = _writable(lease.spec)
            await self._client.replace(lease)
            log.info("released the lead (lease %s/%s)", self.namespace, self.name)
        except (httpx2.HTTPError, ValueError) as exc:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, exc)

    def _set(self, *, leading: bool, holder: str) -> None:
        if (leading, holder) != (self._leading, self.holder):
            self._leading, self.holder = leading, holder
            self._changed.set()
            self._changed = trio.Event()


async def ensure_secret(
    client: AsyncClient,
    elector: LeaderElector,
    name: str,
    key: str,
    make: Callable[[], bytes],
    *,
    poll: float = RETRY_PERIOD,
) -> bytes:
    """The value under ``key`` of Secret ``name`` in the elector's namespace, created once.

    Only the leader creates it (with ``make()``); other replicas wait until it exists. Should
    two replicas both believe they lead, the API server lets only one create win (409 for the
    other, which then reads the winner's). Raises ValueError if the Secret exists without
    ``key``.
    """
    namespace = elector.namespace
    waiting_logged = False
    while True:
        try:
            secret = await client.get(Secret, name, namespace=namespace)
        except ApiError as exc:
            if _code(exc) != 404:
                raise
        else:
            encoded = (secret.data or {}).get(key)
            if not encoded:
                raise ValueError(f"Secret {namespace}/{name} has no {key!r} entry")
            return base64.b64decode(encoded)
        if elector.is_leader:
            value = make()
            secret = Secret(
                metadata=ObjectMeta(
                    name=name,
                    namespace=namespace,
                    labels={"app.kubernetes.io/managed-by": "meshctl"},
                ),
                type="Opaque",
                data={key: base64.b64encode(value).decode("ascii")},
            )
            try:
                await client.create(secret)
            except ApiError as exc:
                if _code(exc) != 409:
                    raise
                continue  # created meanwhile by another replica: read theirs
            log.info("created Secret %s/%s", namespace, name)
            return value
        if not waiting_logged:
            log.info("waiting for the leader to create Secret %s/%s", namespace, name)
            waiting_logged = True
        with trio.move_on_after(poll):
            await elector.wait_changed()
