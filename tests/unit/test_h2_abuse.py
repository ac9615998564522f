"""HTTP/2 abuse of the pod-facing engine (issue #15 item 4), in process: the engine with the
frame guard it shares with the HBONE server (`common/h2guard.py`).

A raw client writes frames (hyperframe) on an in-memory stream to `proxy_http2`: rapid reset,
CONTINUATION, oversized header block, PING and SETTINGS floods each end that connection with
GOAWAY ENHANCE_YOUR_CALM and the reason in its debug data, counted in
`meshagent_http2_abuse_total{listener="pod"}` (`"hbone"` for HTTP inside a 15008 tunnel) and
logged (rate-limited, with the reason), while another client of the same engine keeps being
served. A 101st concurrent stream is refused by h2 itself (GOAWAY PROTOCOL_ERROR). A header
block not complete within the request header timeout (a HEADERS whose CONTINUATION never ends)
gets the same GOAWAY.
"""

from __future__ import annotations

import dataclasses
import logging

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
from meshagent.agent.proxy.http import h2proxy
from meshagent.agent.proxy.http.h2proxy import proxy_http2
from meshagent.agent.proxy.http.memstream import memory_stream_pair
from meshagent.agent.proxy.http.types import HttpSettings
from meshagent.common.h2guard import (
    MAX_CONTINUATIONS,
    PING_BURST,
    PREFACE,
    RESET_BURST,
    SETTINGS_BURST,
)
from prometheus_client import REGISTRY

from tests.unit.test_h2_proxy import HOST, _Lab, _routes

ENHANCE_YOUR_CALM = 0xB
PROTOCOL_ERROR = 0x1


def metric(kind: str, listener: str = "pod") -> float:
    labels = {"listener": listener, "kind": kind}
    return REGISTRY.get_sample_value("meshagent_http2_abuse_total", labels) or 0.0


def _block(path: str = "/") -> bytes:
    return hpack.Encoder().encode(
        [(":method", "GET"), (":scheme", "http"), (":path", path), (":authority", HOST)]
    )


def _rapid_reset(count: int):
    block = _block()
    for i in range(count):
        sid = 1 + 2 * i
        yield HeadersFrame(sid, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
        yield RstStreamFrame(sid, error_code=0x8).serialize()


def _continuations(count: int, size: int = 1):
    yield HeadersFrame(1, data=_block()).serialize()  # no END_HEADERS
    for _ in range(count):
        yield ContinuationFrame(1, data=b"\x00" * size).serialize()


def _pings(count: int):
    for i in range(count):
        yield PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize()


def _settings(count: int):
    for _ in range(count):
        yield SettingsFrame(0, settings={0x3: 100}).serialize()


def _open_streams(count: int):
    block = _block()
    for i in range(count):  # requests without END_STREAM: they stay open
        yield HeadersFrame(1 + 2 * i, data=block, flags=["END_HEADERS"]).serialize()


def _goaway(reply: bytes) -> GoAwayFrame | None:
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


async def _flood(ctx, frames, batch: int) -> tuple[bytes, int]:
    """Serve one connection of `ctx` with the engine; send the preface, then `frames` in
    batches while reading, until the engine closes. What it sent, and how many bytes of the
    flood it took before it stopped reading."""
    client, proxy_end = memory_stream_pair()
    received = bytearray()
    sent = 0
    closed = trio.Event()

    async def read() -> None:
        try:
            while chunk := await client.receive_some(65536):
                received.extend(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        closed.set()

    async def serve() -> None:
        await proxy_http2(proxy_end, ctx)
        await proxy_end.aclose()  # what the listener does with a connection served

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(read)
            try:
                await client.send_all(PREFACE + SettingsFrame(0).serialize())
                pending: list[bytes] = []
                for data in frames:
                    pending.append(data)
                    if len(pending) >= batch:
                        chunk = b"".join(pending)
                        pending.clear()
                        await client.send_all(chunk)
                        sent += len(chunk)
                        await trio.sleep(0)
                    if closed.is_set():
                        break
                if pending and not closed.is_set():
                    await client.send_all(b"".join(pending))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await closed.wait()
            nursery.cancel_scope.cancel()
    return bytes(received), sent


@pytest.mark.parametrize(
    ("kind", "frames", "batch"),
    [
        ("rapid_reset", lambda: _rapid_reset(20_000), 50),
        ("continuation", lambda: _continuations(10_000), 10),
        ("header_block", lambda: _continuations(100, size=16_384), 1),
        ("ping", lambda: _pings(5_000), 100),
        ("settings", lambda: _settings(5_000), 100),
    ],
)
async def test_a_flood_ends_its_connection_with_goaway_and_others_keep_working(
    kind, frames, batch, caplog
):
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("10.1.0.1"))
        headers, body, _ = await lab.call("/before", b"x")
        assert headers[b":status"] == b"200"
        before = metric(kind)
        with caplog.at_level(logging.WARNING, logger=h2proxy.__name__):
            reply, sent = await _flood(lab.ctx, frames(), batch)
        goaway = _goaway(reply)
        assert goaway is not None, reply[:200]
        assert goaway.error_code == ENHANCE_YOUR_CALM
        assert goaway.additional_data  # the reason
        assert metric(kind) == before + 1
        lines = [r.getMessage() for r in caplog.records if "ENHANCE_YOUR_CALM" in r.getMessage()]
        assert lines and goaway.additional_data.decode() in lines[-1]
        assert sent < 4 * 1024 * 1024  # stopped early: the flood was not taken in whole
        headers, body, _ = await lab.call("/after", b"y")  # the other connection: served
        assert headers[b":status"] == b"200" and body == b"y"
        nursery.cancel_scope.cancel()


async def test_abuse_inside_a_tunnel_is_counted_under_hbone_not_pod():
    """The engine serves 15001 and HTTP inside 15008 tunnels: each counts under its own label."""
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("10.1.0.1"))
        before = metric("ping"), metric("ping", "hbone")
        reply, _ = await _flood(dataclasses.replace(lab.ctx, listener="hbone"), _pings(5_000), 100)
        goaway = _goaway(reply)
        assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
        assert (metric("ping"), metric("ping", "hbone")) == (before[0], before[1] + 1)
        nursery.cancel_scope.cancel()


async def test_a_header_block_not_complete_within_the_header_timeout_gets_goaway():
    """A slowloris head: HEADERS without END_HEADERS, then CONTINUATIONs too slow to end it."""

    def trickle():
        yield from _continuations(0)
        for _ in range(100):  # bounded: the engine ends it after 3 or so
            yield ContinuationFrame(1, data=b"\x00").serialize()

    async def slow(frames):  # one frame every 0.1 s
        for data in frames:
            await trio.sleep(0.1)
            yield data

    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("10.1.0.1"))
        ctx = dataclasses.replace(lab.ctx, settings=HttpSettings(request_header_timeout=0.3))
        before = metric("header_timeout")
        client, proxy_end = memory_stream_pair()
        nursery.start_soon(proxy_http2, proxy_end, ctx)
        await client.send_all(PREFACE + SettingsFrame(0).serialize())
        received = bytearray()
        with trio.fail_after(5):
            async for data in slow(trickle()):
                received.extend(await _available(client))
                if _goaway(bytes(received)) is not None:
                    break
                await client.send_all(data)
        goaway = _goaway(bytes(received))
        assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
        assert b"request header block not complete within 0.3 s" in goaway.additional_data
        assert metric("header_timeout") == before + 1
        headers, body, _ = await lab.call("/after", b"y")  # the other connection: served
        assert headers[b":status"] == b"200" and body == b"y"
        nursery.cancel_scope.cancel()


async def _available(stream) -> bytes:
    """What `stream` has to read now (waiting at most a moment)."""
    got = bytearray()
    with trio.move_on_after(0.01):
        while chunk := await stream.receive_some(65536):
            got.extend(chunk)
    return bytes(got)


async def test_below_the_bounds_nothing_happens():
    """What a busy but legitimate client does: some early resets, some PINGs and SETTINGS,
    a header block in a few CONTINUATIONs; the connection stays open."""
    frames = [
        *_rapid_reset(RESET_BURST // 2),
        *_pings(PING_BURST // 2),
        *_settings(SETTINGS_BURST // 2),
    ]
    block = _block("/" + "p" * 3000)
    sid = 1 + 2 * (RESET_BURST // 2)
    frames.append(HeadersFrame(sid, data=block[:1000]).serialize())
    frames.append(ContinuationFrame(sid, data=block[1000:2000]).serialize())
    frames.append(ContinuationFrame(sid, data=block[2000:], flags=["END_HEADERS"]).serialize())
    async with trio.open_nursery() as nursery:
        lab = _Lab(nursery, _routes("10.1.0.1"))
        client, proxy_end = memory_stream_pair()
        nursery.start_soon(proxy_http2, proxy_end, lab.ctx)
        await client.send_all(PREFACE + SettingsFrame(0).serialize() + b"".join(frames))
        received = bytearray()
        with trio.move_on_after(0.5):
            while chunk := await client.receive_some(65536):
                received.extend(chunk)
        assert _goaway(bytes(received)) is None
        assert MAX_CONTINUATIONS >= 2
        nursery.cancel_scope.cancel()


async def test_a_101st_concurrent_stream_is_refused_by_h2():
    async with trio.open_nursery() as nursery:

        async def slow_filter(info):
            await trio.sleep(10)

        lab = _Lab(nursery, _routes("10.1.0.1"), request_filter=slow_filter)
        reply, _ = await _flood(lab.ctx, _open_streams(101), 101)
        goaway = _goaway(reply)
        assert goaway is not None and goaway.error_code == PROTOCOL_ERROR
        nursery.cancel_scope.cancel()
