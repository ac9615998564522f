"""Shared, pausable listeners (common/listeners.py) on real loopback sockets.

Two agents on a node during a surge upgrade bind the same ports; the one that hands over
stops accepting but keeps what it accepted.
"""

from __future__ import annotations

from functools import partial

import trio
import trio.testing
from meshagent.common.listeners import PausableListener, enable_request_migration

TIMEOUT = 5


async def _echo_server(listener: PausableListener, seen: list[str], name: str, nursery) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        seen.append(name)
        async for data in stream:
            await stream.send_all(name.encode() + b":" + data)

    nursery.start_soon(trio.serve_listeners, handle, [listener])


async def _ask(port: int, text: bytes = b"hi") -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(text)
        return await stream.receive_some(100)


async def test_two_listeners_share_a_port_and_a_paused_one_keeps_its_connections() -> None:
    with trio.fail_after(TIMEOUT):
        old = PausableListener("127.0.0.1", 0)
        port = old.address[1]
        seen: list[str] = []
        async with trio.open_nursery() as nursery:
            await _echo_server(old, seen, "old", nursery)
            # a long-lived connection that only the old one can have accepted
            kept = await trio.open_tcp_stream("127.0.0.1", port)
            await kept.send_all(b"first")
            assert await kept.receive_some(100) == b"old:first"
            new = PausableListener("127.0.0.1", port)  # would fail without SO_REUSEPORT
            await _echo_server(new, seen, "new", nursery)

            old.pause()
            assert not old.accepting
            answers = {(await _ask(port)).split(b":")[0] for _ in range(20)}
            assert answers == {b"new"}
            # the connection accepted before the pause goes on
            await kept.send_all(b"again")
            assert await kept.receive_some(100) == b"old:again"
            await kept.aclose()

            new.pause()
            old.resume()
            assert {(await _ask(port)).split(b":")[0] for _ in range(5)} == {b"old"}
            nursery.cancel_scope.cancel()


async def test_a_paused_listener_refuses_nothing_it_does_not_own_and_closes_cleanly() -> None:
    with trio.fail_after(TIMEOUT):
        listener = PausableListener("127.0.0.1", 0)
        port = listener.address[1]
        listener.pause()
        try:
            await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            pass  # nobody listens: refused
        else:
            raise AssertionError("a paused listener still accepted")
        errors: list[BaseException] = []

        async def accept() -> None:
            try:
                await listener.accept()
            except trio.ClosedResourceError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            await trio.testing.wait_all_tasks_blocked()  # accept() is waiting for a resume
            await listener.aclose()
        assert len(errors) == 1


def test_request_migration_is_switched_on_and_a_missing_knob_is_reported(tmp_path) -> None:
    knob = tmp_path / "tcp_migrate_req"
    knob.write_text("0\n")
    assert enable_request_migration(knob) is True
    assert knob.read_text().strip() == "1"
    assert enable_request_migration(tmp_path / "missing" / "knob") is False


async def test_serve_owned_hands_each_connection_to_its_handler_and_survives_a_full_fd_table(
    monkeypatch,
) -> None:
    import errno

    from meshagent.common import listeners as module

    listener = PausableListener("127.0.0.1", 0)
    port = listener.address[1]
    served: list[bytes] = []
    real_accept = listener.accept
    failures = [OSError(errno.EMFILE, "Too many open files")]

    async def accept() -> trio.SocketStream:
        if failures:  # the first accept finds the process out of descriptors
            raise failures.pop()
        return await real_accept()

    monkeypatch.setattr(listener, "accept", accept)
    monkeypatch.setattr(module, "_CAPACITY_PAUSE", 0.01)

    async def handle(stream: trio.SocketStream) -> None:
        served.append(await stream.receive_some(10))
        await stream.send_all(b"ok")
        stream.socket.close()  # the handler owns its stream

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(module.serve_owned, handle, [listener])
            assert await _ask(port, b"one") == b"ok"
            assert await _ask(port, b"two") == b"ok"
            nursery.cancel_scope.cancel()
    assert served == [b"one", b"two"]
    assert not failures
    assert not listener.accepting  # closed with the server


async def test_a_connection_is_in_flight_from_its_accept_until_its_handler_starts() -> None:
    """A worker drained in the moment between an accept and its handler's first step saw
    nothing open and exited, resetting the connection (gRPC calls failed): `serve_owned`
    counts each connection in `InFlight` until its handler counts it."""
    from meshagent.common.listeners import InFlight, serve_owned

    listener = PausableListener("127.0.0.1", 0)
    port = listener.address[1]
    in_flight = InFlight()
    real_accept = listener.accept
    seen_at_next_accept: list[int] = []
    seen_by_handler: list[int] = []

    async def accept() -> trio.SocketStream:
        seen_at_next_accept.append(in_flight.count)
        return await real_accept()

    listener.accept = accept  # type: ignore[method-assign]

    async def handle(stream: trio.SocketStream) -> None:
        seen_by_handler.append(in_flight.count)
        stream.socket.close()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_owned, handle, [listener], in_flight=in_flight))
            client = await trio.open_tcp_stream("127.0.0.1", port)
            while not seen_by_handler:
                await trio.sleep(0.01)
            await client.aclose()
            nursery.cancel_scope.cancel()
    # before any accept: nothing; at the accept after the first one the handler had not
    # started and the connection was counted; the handler found itself no longer counted
    assert seen_at_next_accept == [0, 1]
    assert seen_by_handler == [0]
    assert in_flight.count == 0

    held = InFlight()
    with held.hold():
        assert held.count == 1
    assert held.count == 0
