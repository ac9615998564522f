"""The latency chart: grouped bars (one colour per path) drawn on an RGB canvas and written as a
PNG with zlib, so the harness needs no plotting library. Pure: panels of values in, PNG bytes out.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (30, 30, 30)
GREY: Color = (215, 215, 215)

# A 5x7 bitmap font, lower case (text is lower-cased), one string of 7 rows of 5 pixels each.
_FONT_ROWS = {
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "a": "..... ..... .###. ....# .#### #...# .####",
    "b": "#.... #.... #.##. ##..# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.",
    "d": "....# ....# .##.# #..## #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.",
    "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... .#### #...# #...# .#### ....# .###.",
    "h": "#.... #.... #.##. ##..# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",
    "j": "...#. ..... ..##. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #...# #...#",
    "n": "..... ..... #.##. ##..# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.",
    "p": "..... ..... ####. #...# ####. #.... #....",
    "q": "..... ..... .##.# #..## .#### ....# ....#",
    "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .###. #.... .###. ....# ####.",
    "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#",
    "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.",
    "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# .#### ....# .###.",
    "z": "..... ..... ##### ...#. ..#.. .#... #####",
    " ": "..... ..... ..... ..... ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "_": "..... ..... ..... ..... ..... ..... #####",
}
_UNKNOWN = "##### #...# #...# #...# #...# #...# #####"
GLYPH_W, GLYPH_H = 5, 7


def _glyph(ch: str) -> list[str]:
    return _FONT_ROWS.get(ch.lower(), _UNKNOWN).split()


class Canvas:
    """An RGB image in memory with just what a bar chart needs: rectangles and text."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fill [x0, x1) x [y0, y1), clipped to the canvas."""
        x0, x1 = max(0, min(x0, x1)), min(self.width, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height, max(y0, y1))
        if x0 >= x1:
            return
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            start = 3 * (y * self.width + x0)
            self.pixels[start : start + len(row)] = row

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 1) -> None:
        for i, ch in enumerate(text):
            for gy, row in enumerate(_glyph(ch)):
                for gx, bit in enumerate(row):
                    if bit == "#":
                        px = x + (i * (GLYPH_W + 1) + gx) * scale
                        self.rect(px, y + gy * scale, px + scale, y + (gy + 1) * scale, color)

    @staticmethod
    def text_width(text: str, scale: int = 1) -> int:
        return max(0, len(text) * (GLYPH_W + 1) - 1) * scale

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        stride = 3 * self.width
        raw = b"".join(
            b"\x00" + bytes(self.pixels[y * stride : (y + 1) * stride]) for y in range(self.height)
        )  # filter type 0 (none) before every row
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


@dataclass(frozen=True)
class Panel:
    """One chart: a title and groups of bars (e.g. "p50" -> {path: milliseconds or None})."""

    title: str
    groups: Sequence[tuple[str, dict[str, float | None]]]
    log_scale: bool = False  # latencies span decades: p50 and p99.9 both stay readable


WIDTH = 1000
LEGEND_H = 40
PANEL_H = 250
MARGIN_L, MARGIN_R = 60, 20


def _nice_top(value: float) -> float:
    """A round axis maximum at or above `value` (1, 2 or 5 times a power of ten)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** int(f"{value:e}".split("e")[1])
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _label(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def bar_chart(panels: Sequence[Panel], series: Sequence[str], colors: Sequence[Color]) -> bytes:
    """Panels stacked vertically under one legend; each panel has its own linear axis."""
    canvas = Canvas(WIDTH, LEGEND_H + PANEL_H * len(panels))
    x = MARGIN_L
    for name, color in zip(series, colors, strict=True):
        canvas.rect(x, 14, x + 14, 28, color)
        canvas.text(x + 20, 14, name, scale=2)
        x += 20 + Canvas.text_width(name, 2) + 30
    for index, panel in enumerate(panels):
        _draw_panel(canvas, LEGEND_H + index * PANEL_H, panel, series, colors)
    return canvas.png()


class _Axis:
    """Maps values to heights in pixels, linear from 0 or logarithmic between whole decades."""

    def __init__(self, values: list[float], log: bool, pixels: int) -> None:
        self.log, self.pixels = log, pixels
        positive = [v for v in values if v > 0]
        if log and positive:
            # room below the smallest bar (a third of a decade at least): never on the floor
            self.low = math.floor(math.log10(min(positive) / 2))
            self.high = max(self.low + 1, math.ceil(math.log10(max(positive))))
            self.ticks = [10.0**e for e in range(self.low, self.high + 1)]
        else:
            self.log = False
            top = _nice_top(max(values, default=0.0))
            self.ticks = [top * i / 4 for i in range(5)]

    def height(self, value: float) -> int:
        if self.log:
            if value <= 0:
                return 0
            share = (math.log10(value) - self.low) / (self.high - self.low)
        else:
            share = value / self.ticks[-1]
        return round(self.pixels * min(1.0, max(0.0, share)))


def _draw_panel(
    canvas: Canvas, top: int, panel: Panel, series: Sequence[str], colors: Sequence[Color]
) -> None:
    canvas.text(MARGIN_L, top + 8, panel.title, scale=2)
    plot_top, plot_bottom = top + 40, top + PANEL_H - 30
    values = [v for _, by in panel.groups for v in by.values() if v is not None]
    axis = _Axis(values, panel.log_scale, plot_bottom - plot_top)
    for i, tick in enumerate(axis.ticks):  # grid lines and their labels
        y = plot_bottom - axis.height(tick)
        canvas.rect(MARGIN_L, y, WIDTH - MARGIN_R, y + 1, GREY if i else BLACK)
        label = _label(tick)
        canvas.text(MARGIN_L - 6 - Canvas.text_width(label), y - 3, label)
    group_w = (WIDTH - MARGIN_L - MARGIN_R) / max(1, len(panel.groups))
    bar_w = int(group_w * 0.8 / max(1, len(series)))
    for g, (name, by_series) in enumerate(panel.groups):
        gx = MARGIN_L + int(g * group_w + group_w * 0.1)
        for s, (key, color) in enumerate(zip(series, colors, strict=True)):
            bx = gx + s * bar_w
            value = by_series.get(key)
            if value is None:
                canvas.text(bx + 2, plot_bottom - 10, "n/a")
                continue
            height = axis.height(value)
            canvas.rect(bx + 2, plot_bottom - height, bx + bar_w - 2, plot_bottom, color)
            label = _label(value)
            lx = bx + (bar_w - Canvas.text_width(label)) // 2
            canvas.text(lx, plot_bottom - height - 10, label)
        cx = gx + (bar_w * len(series) - Canvas.text_width(name, 2)) // 2
        canvas.text(cx, plot_bottom + 8, name, scale=2)
