"""benchmarks/png.py: the chart is a valid PNG (checked by decoding it here) with the bars where
the values put them."""

from __future__ import annotations

import struct
import zlib

import pytest

from benchmarks.png import Canvas, Panel, bar_chart

RED, BLUE = (200, 0, 0), (0, 0, 200)


def _decode(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB rows of an 8-bit RGB PNG with filter 0 rows; checks every CRC."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        chunks[kind] = chunks.get(kind, b"") + data
        pos += 12 + length
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color) == (8, 2)
    assert b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    rows = [raw[y * stride : (y + 1) * stride] for y in range(height)]
    assert all(r[0] == 0 for r in rows)
    return width, height, [r[1:] for r in rows]


def _pixel(rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    return tuple(rows[y][3 * x : 3 * x + 3])


def test_canvas_writes_a_decodable_png_with_its_pixels():
    c = Canvas(7, 5)
    c.rect(2, 1, 4, 3, RED)
    width, height, rows = _decode(c.png())
    assert (width, height) == (7, 5)
    assert _pixel(rows, 2, 1) == RED and _pixel(rows, 3, 2) == RED
    assert _pixel(rows, 4, 1) == (255, 255, 255) and _pixel(rows, 2, 3) == (255, 255, 255)


def test_text_draws_in_its_color_within_its_width():
    c = Canvas(40, 10)
    c.text(1, 1, "p99", color=BLUE)
    _, _, rows = _decode(c.png())
    blue = [(x, y) for y in range(10) for x in range(40) if _pixel(rows, x, y) == BLUE]
    assert blue
    assert max(x for x, _ in blue) < 1 + Canvas.text_width("p99")


def _bar_height(rows: list[bytes], color: tuple[int, int, int]) -> int:
    return sum(1 for row in rows if any(_pixel([row], x, 0) == color for x in range(len(row) // 3)))


def test_bars_are_as_tall_as_their_values():
    panel = Panel("latency", [("p50", {"a": 1.0, "b": 2.0})])
    _, _, rows = _decode(bar_chart([panel], ["a", "b"], [RED, BLUE]))
    red, blue = _bar_height(rows, RED), _bar_height(rows, BLUE)
    assert 1.8 < blue / red < 2.2  # legend swatches add the same few rows to both


def test_log_scale_gives_each_decade_the_same_height():
    panel = Panel("latency", [("p50", {"a": 0.1, "b": 10.0})], log_scale=True)
    _, _, rows = _decode(bar_chart([panel], ["a", "b"], [RED, BLUE]))
    red, blue = _bar_height(rows, RED), _bar_height(rows, BLUE)
    legend = 14
    assert red - legend > 20  # linear, 0.1 of 10 would be 1% of the height: about 2 pixels
    assert blue - legend == pytest.approx(3 * (red - legend), abs=3)  # axis 0.01 .. 10


def test_missing_values_leave_no_bar():
    panel = Panel("latency", [("p50", {"a": 1.0, "b": None})])
    _, _, rows = _decode(bar_chart([panel], ["a", "b"], [RED, BLUE]))
    assert _bar_height(rows, BLUE) == 14  # its legend swatch only
    assert _bar_height(rows, RED) > 14
