"""HTTP/2 abuse of the HBONE server (issue #17 item 5, port 15008), in process.

First the sans-IO `FloodGuard` by transcript (frames in, a verdict out, a fake clock); then a
real mutual-TLS server on 127.0.0.1 flooded by a client that holds a mesh certificate and
writes raw frames: rapid reset (CVE-2023-44487), CONTINUATION, PING and SETTINGS floods each
end that connection with GOAWAY ENHANCE_YOUR_CALM, counted by kind, while a normal client on
another connection keeps working and no per-stream state is left behind.
"""

from __future__ import annotations

import gc
import ssl

import hpack
import pytest
import trio
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)
from meshagent.agent.hbone import InboundTunnel, open_tunnel_pool
from meshagent.agent.hbone.connection import TunnelStream
from meshagent.agent.telemetry.ratelog import RateLimitedLog, reason
from meshagent.common.h2guard import (
    MAX_CONTINUATIONS,
    MAX_HEADER_BLOCK,
    PING_BURST,
    PREFACE,
    RESET_BURST,
    SETTINGS_BURST,
    FloodGuard,
)

from tests.certs import TestCA
from tests.unit import test_hbone_tunnel as hbone
from tests.unit.test_hbone_tunnel import FRONTEND, POD, REVIEWS, metric

ENHANCE_YOUR_CALM = 0xB


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _headers_block() -> bytes:
    return hpack.Encoder().encode(
        [(":method", "CONNECT"), (":authority", f"{POD}:80"), ("forwarded", "for=10.0.0.1")]
    )


def frame(f: Frame) -> bytes:
    return f.serialize()


# --- the guard, by transcript ---------------------------------------------------------


def test_a_header_block_over_the_cap_is_refused_at_the_frame_header_before_its_body():
    guard = FloodGuard(FakeClock())
    assert guard.feed(PREFACE + frame(SettingsFrame(0))) is None
    assert guard.feed(frame(HeadersFrame(1, data=b"x" * 1000))) is None  # no END_HEADERS
    big = frame(ContinuationFrame(1, data=b"y" * (1024 * 1024)))
    abuse = guard.feed(big[:9])  # only the 9-byte header of a 1 MiB CONTINUATION
    assert abuse is not None and abuse.kind == "header_block"
    assert str(MAX_HEADER_BLOCK) in abuse.reason


def test_many_small_continuations_are_refused_and_a_finished_block_resets_the_count():
    guard = FloodGuard(FakeClock(), preface=False)
    ok = frame(HeadersFrame(1, data=b"h")) + frame(
        ContinuationFrame(1, data=b"c", flags=["END_HEADERS"])
    )
    for _ in range(3 * MAX_CONTINUATIONS):  # many whole blocks: fine
        assert guard.feed(ok) is None
    assert guard.feed(frame(HeadersFrame(3, data=b"h"))) is None
    verdicts = [
        guard.feed(frame(ContinuationFrame(3, data=b""))) for _ in range(MAX_CONTINUATIONS + 1)
    ]
    assert verdicts[:-1] == [None] * MAX_CONTINUATIONS
    assert verdicts[-1] is not None and verdicts[-1].kind == "continuation"


def test_a_header_block_is_open_from_its_headers_frame_until_its_end_headers_frame_is_whole():
    clock = FakeClock()
    guard = FloodGuard(clock, preface=False)
    assert guard.header_block_since is None
    clock.now = 5.0
    guard.feed(frame(HeadersFrame(1, data=b"h")))  # no END_HEADERS
    clock.now = 6.0
    guard.feed(frame(ContinuationFrame(1, data=b"c")))
    assert guard.header_block_since == 5.0  # from its first frame, whatever followed
    last = frame(ContinuationFrame(1, data=b"end", flags=["END_HEADERS"]))
    guard.feed(last[:-1])
    assert guard.header_block_since == 5.0  # the last frame's body is not whole yet
    guard.feed(last[-1:])
    assert guard.header_block_since is None
    guard.feed(frame(HeadersFrame(3, data=b"h", flags=["END_HEADERS"])))
    assert guard.header_block_since is None


def test_frames_split_anywhere_are_followed():
    guard = FloodGuard(FakeClock())
    data = (
        PREFACE
        + frame(HeadersFrame(1, data=b"h" * 100))
        + frame(ContinuationFrame(1, data=b"c" * (MAX_HEADER_BLOCK), flags=["END_HEADERS"]))
    )
    verdicts = [guard.feed(data[i : i + 7]) for i in range(0, len(data), 7)]
    assert [v.kind for v in verdicts if v] == ["header_block"]


def test_pings_and_settings_are_bounded_per_second_and_acks_are_free():
    clock = FakeClock()
    guard = FloodGuard(clock, preface=False)
    for _ in range(10 * PING_BURST):
        assert guard.feed(frame(PingFrame(0, opaque_data=b"12345678", flags=["ACK"]))) is None
    ping = frame(PingFrame(0, opaque_data=b"12345678"))
    assert all(guard.feed(ping) is None for _ in range(PING_BURST))
    assert guard.feed(ping).kind == "ping"
    clock.now += 1.0  # a few more tokens a second later
    guard = FloodGuard(clock, preface=False)  # a guard that found abuse is not fed again
    settings = frame(SettingsFrame(0, settings={0x3: 100}))
    assert all(guard.feed(settings) is None for _ in range(SETTINGS_BURST))
    assert guard.feed(frame(SettingsFrame(0, flags=["ACK"]))) is None
    assert guard.feed(settings).kind == "settings"


def test_only_premature_resets_count():
    clock = FakeClock()
    guard = FloodGuard(clock)
    assert all(guard.stream_reset(age=5.0) is None for _ in range(10 * RESET_BURST))
    assert all(guard.stream_reset(age=0.0) is None for _ in range(RESET_BURST))
    assert guard.stream_reset(age=0.0).kind == "rapid_reset"
    assert FloodGuard.pending_requests(10) is None
    assert FloodGuard.pending_requests(10_000).kind == "pending_requests"


def test_log_lines_are_rate_limited_and_never_without_a_reason(caplog):
    import logging

    clock = FakeClock()
    logger = logging.getLogger("test.ratelog")
    limited = RateLimitedLog(logger, burst=3, per_second=1.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.ratelog"):
        results = [limited.warning("503", "refused %d: %s", 503, "x") for _ in range(100)]
        assert results.count(True) == 3
        clock.now += 1.0
        assert limited.warning("503", "refused %d: %s", 503, "x")
    assert len(caplog.records) == 4
    assert "97 similar lines left out" in caplog.records[-1].getMessage()
    assert reason(trio.TooSlowError()) == "timeout"
    assert reason(OSError()) == "OSError"
    assert reason("") == "no reason given"
    assert reason(OSError(111, "Connection refused")) == "[Errno 111] Connection refused"


# --- a real server, flooded -------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def leaves(ca):
    return {identity: ca.issue(identity.uri) for identity in (FRONTEND, REVIEWS)}


def _goaway(reply: bytes) -> GoAwayFrame | None:
    """The GOAWAY among the server's frames (after its SETTINGS), if it sent one."""
    view = memoryview(reply)
    while len(view) >= 9:
        f, length = Frame.parse_frame_header(view[:9])
        if len(view) < 9 + length:
            break
        f.parse_body(view[9 : 9 + length])
        if isinstance(f, GoAwayFrame):
            return f
        view = view[9 + length :]
    return None


async def _flood(node: tuple[str, int], ctx: ssl.SSLContext, frames, batch: int = 50) -> bytes:
    """Send the preface and then ``frames`` (an iterable of bytes) in batches, reading what
    the server sends meanwhile, until it closes; what it sent."""
    tls = await hbone._tls_to(node, ctx)
    received = bytearray()
    closed = trio.Event()

    async def read() -> None:
        try:
            while chunk := await tls.receive_some(65536):
                received.extend(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        closed.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            try:
                await tls.send_all(PREFACE + frame(SettingsFrame(0)))
                pending: list[bytes] = []
                for data in frames:
                    pending.append(data)
                    if len(pending) >= batch:
                        await tls.send_all(b"".join(pending))
                        pending.clear()
                    if closed.is_set():
                        break
                if pending and not closed.is_set():
                    await tls.send_all(b"".join(pending))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await closed.wait()
            nursery.cancel_scope.cancel()
    await trio.aclose_forcefully(tls)
    return bytes(received)


def _rapid_reset(count: int):
    block = _headers_block()
    for i in range(count):
        stream_id = 1 + 2 * i
        yield frame(HeadersFrame(stream_id, data=block, flags=["END_HEADERS"])) + frame(
            RstStreamFrame(stream_id, error_code=0x8)
        )


def _continuation_flood(frames: int, size: int = 1024 * 1024):
    yield frame(HeadersFrame(1, data=_headers_block()))  # no END_HEADERS
    body = b"\x00" * size
    for _ in range(frames):
        yield frame(ContinuationFrame(1, data=body))


def _pings(count: int):
    for i in range(count):
        yield frame(PingFrame(0, opaque_data=i.to_bytes(8, "big")))


def _settings(count: int):
    for _ in range(count):
        yield frame(SettingsFrame(0, settings={0x3: 100}))


def _tunnel_streams() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, TunnelStream))


@pytest.mark.parametrize(
    ("kind", "frames", "batch"),
    [
        ("rapid_reset", lambda: _rapid_reset(20_000), 50),
        ("header_block", lambda: _continuation_flood(60), 1),
        ("ping", lambda: _pings(5_000), 100),
        ("settings", lambda: _settings(5_000), 100),
    ],
    ids=["rapid-reset", "continuation", "ping", "settings"],
)
async def test_a_flood_ends_its_connection_with_goaway_and_others_keep_working(
    ca, leaves, kind, frames, batch
):
    handled: list[InboundTunnel] = []

    async def handler(tunnel: InboundTunnel) -> None:
        handled.append(tunnel)
        await hbone.echo_after_eof(tunnel)

    before = metric("meshagent_http2_abuse_total", listener="hbone", kind=kind)
    streams_before = _tunnel_streams()
    async with (
        hbone.hbone_node(ca, leaves, handler) as node,
        open_tunnel_pool(hbone.contexts_for(ca, leaves)) as pool,
    ):
        survivor = await hbone.open_to(pool, node)  # another connection, open throughout
        reply = await _flood(node, hbone.contexts_for(ca, leaves)(FRONTEND), frames(), batch)
        goaway = _goaway(reply)
        assert goaway is not None, "no GOAWAY"
        assert goaway.error_code == ENHANCE_YOUR_CALM
        assert goaway.additional_data  # the reason, for the peer's logs
        assert metric("meshagent_http2_abuse_total", listener="hbone", kind=kind) == before + 1
        if kind == "rapid_reset":
            # streams reset before their handler ran never reach it (no pod is dialled)
            assert len(handled) <= 1  # the survivor's
            assert goaway.last_stream_id < 2 * (RESET_BURST + 50)

        await survivor.send_all(b"survived")
        await survivor.send_eof()
        assert (await hbone.read_all(survivor)).endswith(b"survived")
        fresh = await hbone.open_to(pool, node)
        await fresh.send_all(b"new")
        await fresh.send_eof()
        assert (await hbone.read_all(fresh)).endswith(b"new")
        await survivor.aclose()
        await fresh.aclose()
    del survivor, fresh
    handled.clear()
    gc.collect()
    assert _tunnel_streams() <= streams_before  # nothing kept per flooded stream


async def test_more_than_100_concurrent_streams_end_the_connection_with_goaway(ca, leaves):
    """h2 enforces the SETTINGS_MAX_CONCURRENT_STREAMS (100, as ztunnel) we announce: the
    101st open stream is a connection error, answered GOAWAY (PROTOCOL_ERROR)."""
    held = trio.Event()

    async def hold(tunnel: InboundTunnel) -> None:
        await tunnel.accept()
        await held.wait()

    block = _headers_block()
    opens = (frame(HeadersFrame(1 + 2 * i, data=block, flags=["END_HEADERS"])) for i in range(150))
    async with hbone.hbone_node(ca, leaves, hold) as node:
        reply = await _flood(node, hbone.contexts_for(ca, leaves)(FRONTEND), opens, batch=150)
        held.set()
    goaway = _goaway(reply)
    assert goaway is not None and goaway.error_code == 0x1
    assert goaway.last_stream_id <= 1 + 2 * 100


async def test_a_connection_with_no_tunnel_is_closed_after_the_idle_timeout(ca, leaves):
    """A peer that opens a connection and never asks for a tunnel (or stops asking) gets
    GOAWAY NO_ERROR after the idle timeout; one with a tunnel open is left alone."""

    async def hold(tunnel: InboundTunnel) -> None:
        stream = await tunnel.accept()
        await stream.send_all(await stream.receive_some())  # one echo, whenever it comes

    contexts = hbone.contexts_for(ca, leaves)
    async with hbone.hbone_node(ca, leaves, hold, idle_timeout=0.4) as node:
        with trio.fail_after(10):
            idle = await _flood(node, contexts(REVIEWS), [])  # preface and SETTINGS only
        goaway = _goaway(idle)
        assert goaway is not None and goaway.error_code == 0, goaway  # NO_ERROR
        async with open_tunnel_pool(contexts) as pool:
            busy = await hbone.open_to(pool, node)
            await trio.sleep(1.0)  # well past the idle timeout, with a tunnel open
            await busy.send_all(b"still here")  # the connection still carries it
            assert await busy.receive_some() == b"still here"
            await busy.aclose()
