"""The harness's chart: one panel per scenario, grouped bars (one colour per path), drawn with
matplotlib so a person sees every scenario of a run at a glance. Pure: panels of values in, a
figure (for tests) or PNG bytes out.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure  # not pyplot: no display or global state, Agg renders it
from matplotlib.patches import Patch

COLUMNS = 3
PANEL_SIZE = (5.2, 3.0)  # inches per panel


@dataclass(frozen=True)
class Panel:
    """One scenario: a title, a unit and groups of bars (e.g. "p50" -> {path: value or None})."""

    title: str
    unit: str
    groups: Sequence[tuple[str, dict[str, float | None]]]
    log_scale: bool = False  # latencies span decades: p50 and p99.9 both stay readable


def figure(panels: Sequence[Panel], series: Sequence[str], colors: Sequence[str]) -> Figure:
    """The panels in a grid, with one legend for the paths above them. A missing value (None:
    the path was not measured in that scenario) draws no bar."""
    rows = max(1, math.ceil(len(panels) / COLUMNS))
    fig = Figure(
        figsize=(PANEL_SIZE[0] * COLUMNS, PANEL_SIZE[1] * rows + 0.6), layout="constrained"
    )
    axes = list(fig.subplots(rows, COLUMNS, squeeze=False).flat)
    for ax, panel in zip(axes, panels, strict=False):
        # only the series measured in this scenario take a slot (the L7 level paths run the
        # HTTP/1.1 scenarios alone), so the others' bars stay wide enough to read
        shown = [
            (name, color)
            for name, color in zip(series, colors, strict=True)
            if any(values.get(name) is not None for _, values in panel.groups)
        ]
        _draw(ax, panel, [n for n, _ in shown], [c for _, c in shown])
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles = [Patch(color=c, label=s) for s, c in zip(series, colors, strict=True)]
    fig.legend(handles=handles, loc="outside upper center", ncols=len(series), frameon=False)
    return fig


def _draw(ax, panel: Panel, series: Sequence[str], colors: Sequence[str]) -> None:
    width = 0.8 / max(1, len(series))
    crowded = len(series) > 5  # value labels upright would overlap their neighbours'
    for i, (name, color) in enumerate(zip(series, colors, strict=True)):
        xs, heights = [], []
        for g, (_, values) in enumerate(panel.groups):
            value = values.get(name)
            if value is not None and (value > 0 or not panel.log_scale):
                xs.append(g + (i - (len(series) - 1) / 2) * width)
                heights.append(value)
        bars = ax.bar(xs, heights, width * 0.95, color=color, label=name)
        ax.bar_label(
            bars,
            labels=[_label(h) for h in heights],
            fontsize=6 if crowded else 7,
            padding=1,
            rotation=90 if crowded else 0,
        )
    ax.set_xticks(range(len(panel.groups)), [label for label, _ in panel.groups])
    ax.set_title(panel.title, fontsize=10)
    ax.set_ylabel(panel.unit + (" (log scale)" if panel.log_scale else ""), fontsize=8)
    if panel.log_scale:
        ax.set_yscale("log")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _label(value: float) -> str:
    return f"{value:,.3g}" if value < 1000 else f"{value:,.0f}"


def png(fig: Figure) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    return out.getvalue()


def bar_chart(panels: Sequence[Panel], series: Sequence[str], colors: Sequence[str]) -> bytes:
    return png(figure(panels, series, colors))
