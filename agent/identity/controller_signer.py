"""Workload CSRs out over the controller stream, signed chains (or refusals) back.

`ControllerSigner` is the `IdentityManager`'s `Signer` in a running agent. It owns no
connection: the config client attaches the live stream's send function when it connects,
hands it every `certificate`/`csr_refused` message, and detaches when the stream ends. A
request waits for a stream if there is none (the manager's timeout bounds the wait), is
matched to its answer by id, and fails with `ControllerUnavailable` if the stream drops
before the answer comes, so the manager retries on the next one.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from meshagent.common.spiffe import CertificateChain, Identity

__all__ = ["ControllerSigner", "ControllerUnavailable", "SigningRefusedByController"]

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]


class ControllerUnavailable(Exception):
    """The stream to the controller went away before the answer came."""


class SigningRefusedByController(Exception):
    """The controller refused the CSR; the message is its reason."""


@dataclass(eq=False)
class _Pending:
    identity: Identity
    done: trio.Event = field(default_factory=trio.Event)
    chain: CertificateChain | None = None
    error: Exception | None = None

    def finish(self, *, chain: CertificateChain | None = None, error: Exception | None = None):
        if not self.done.is_set():
            self.chain, self.error = chain, error
            self.done.set()


class ControllerSigner:
    """Signs CSRs through whichever controller stream is up (see module docstring)."""

    def __init__(self) -> None:
        self._send: Send | None = None
        self._attached = trio.Event()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)

    # -- the Signer protocol -----------------------------------------------------------------

    async def sign(self, csr_pem: bytes, identity: Identity) -> CertificateChain:
        """Send ``csr_pem`` for ``identity`` and wait for the controller's answer.

        Raises `SigningRefusedByController` or `ControllerUnavailable`; the caller bounds
        the whole wait (including waiting for a stream) with its own timeout.
        """
        while self._send is None:
            await self._attached.wait()
        send = self._send
        request_id = next(self._ids)
        pending = _Pending(identity)
        self._pending[request_id] = pending
        try:
            message = {
                "type": "csr",
                "id": request_id,
                "identity": identity.uri,
                "csr": csr_pem.decode("ascii"),
            }
            try:
                await send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ControllerUnavailable(f"controller stream failed: {exc}") from None
            await pending.done.wait()
        finally:
            del self._pending[request_id]
        if pending.error is not None:
            raise pending.error
        assert pending.chain is not None
        return pending.chain

    # -- driven by the config client ---------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._send is not None

    def attach(self, send: Send) -> None:
        """A stream is up: send requests with ``send`` from now on."""
        self._send = send
        self._attached.set()

    def detach(self, reason: str) -> None:
        """The stream is gone: fail what waits on it, hold new requests until the next one."""
        self._send = None
        self._attached = trio.Event()
        for pending in self._pending.values():
            pending.finish(error=ControllerUnavailable(f"controller stream lost: {reason}"))

    def deliver(self, message: dict[str, Any]) -> None:
        """Hand over a `certificate` or `csr_refused` message; unknown ids (an answer that
        came after its request gave up) are dropped. Raises ValueError for a malformed one."""
        request_id = message.get("id")
        pending = self._pending.get(request_id) if isinstance(request_id, int) else None
        if pending is None:
            log.info("dropping controller answer for unknown CSR id %r", request_id)
            return
        if message["type"] == "csr_refused":
            reason = str(message.get("reason") or "no reason given")
            pending.finish(error=SigningRefusedByController(reason))
            return
        chain = message.get("chain")
        if (
            not isinstance(chain, list)
            or not chain
            or not all(isinstance(pem, str) and pem.isascii() for pem in chain)
        ):
            error = ValueError(f"certificate answer for CSR {request_id} has no PEM chain")
            pending.finish(error=error)
            raise error
        pems = [pem.encode("ascii") for pem in chain]
        pending.finish(chain=CertificateChain(leaf_pem=pems[0], intermediates_pem=tuple(pems[1:])))
