"""`ControllerSigner` on its own: requests out through whatever stream is attached, answers
matched by id, and what happens when the stream comes and goes."""

from __future__ import annotations

import pytest
import trio
from meshagent.agent.identity.controller_signer import (
    ControllerSigner,
    ControllerUnavailable,
    SigningRefusedByController,
)
from meshagent.common.spiffe import CertificateChain, Identity

A = Identity("cluster.local", "shop", "a")
B = Identity("cluster.local", "shop", "b")
LEAF = "-----BEGIN CERTIFICATE-----\nleaf\n-----END CERTIFICATE-----\n"
MIDDLE = "-----BEGIN CERTIFICATE-----\nmiddle\n-----END CERTIFICATE-----\n"


class FakeStream:
    """Records what the signer sends, as the controller would receive it."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.got = trio.Event()

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        self.got.set()
        self.got = trio.Event()

    async def wait_for(self, count: int) -> list[dict]:
        while len(self.sent) < count:
            await self.got.wait()
        return self.sent


async def test_answers_are_matched_by_id_whatever_their_order() -> None:
    signer, stream = ControllerSigner(), FakeStream()
    signer.attach(stream.send)
    results: dict[Identity, object] = {}

    async def ask(identity: Identity) -> None:
        try:
            results[identity] = await signer.sign(b"csr for " + identity.uri.encode(), identity)
        except SigningRefusedByController as exc:
            results[identity] = exc

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, A)
            nursery.start_soon(ask, B)
            first, second = await stream.wait_for(2)
            by_identity = {m["identity"]: m for m in (first, second)}
            assert by_identity[A.uri]["csr"] == f"csr for {A.uri}"
            signer.deliver(
                {"type": "csr_refused", "id": by_identity[B.uri]["id"], "reason": "not_on_node"}
            )
            signer.deliver(
                {"type": "certificate", "id": by_identity[A.uri]["id"], "chain": [LEAF, MIDDLE]}
            )
    assert results[A] == CertificateChain(LEAF.encode(), (MIDDLE.encode(),))
    assert isinstance(results[B], SigningRefusedByController)
    assert str(results[B]) == "not_on_node"


async def test_a_request_waits_for_a_stream_within_the_callers_timeout() -> None:
    signer = ControllerSigner()
    with pytest.raises(trio.TooSlowError), trio.fail_after(0.1):
        await signer.sign(b"csr", A)


async def test_a_lost_stream_fails_requests_in_flight_and_the_next_stream_serves_new_ones() -> None:
    signer, old, new = ControllerSigner(), FakeStream(), FakeStream()
    signer.attach(old.send)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            failed: list[Exception] = []

            async def ask() -> None:
                try:
                    await signer.sign(b"csr", A)
                except ControllerUnavailable as exc:
                    failed.append(exc)

            nursery.start_soon(ask)
            await old.wait_for(1)
            signer.detach("connection reset")
        assert "connection reset" in str(failed[0])
        assert not signer.attached

        async with trio.open_nursery() as nursery:
            chains: list[CertificateChain] = []

            async def ask_again() -> None:
                chains.append(await signer.sign(b"csr", A))

            nursery.start_soon(ask_again)
            await trio.sleep(0.01)
            signer.attach(new.send)  # the request was held until now
            (message,) = await new.wait_for(1)
            signer.deliver({"type": "certificate", "id": message["id"], "chain": [LEAF]})
        assert chains == [CertificateChain(LEAF.encode())]


async def test_a_late_answer_is_dropped_and_a_malformed_one_is_an_error() -> None:
    signer, stream = ControllerSigner(), FakeStream()
    signer.attach(stream.send)
    signer.deliver({"type": "certificate", "id": 999, "chain": [LEAF]})  # nobody waits: dropped
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            errors: list[Exception] = []

            async def ask() -> None:
                try:
                    await signer.sign(b"csr", A)
                except ValueError as exc:
                    errors.append(exc)

            nursery.start_soon(ask)
            (message,) = await stream.wait_for(1)
            with pytest.raises(ValueError, match="no PEM chain"):
                signer.deliver({"type": "certificate", "id": message["id"], "chain": []})
    assert "no PEM chain" in str(errors[0])
