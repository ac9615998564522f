"""benchmarks/chart.py: each scenario's panel carries the bars its values say (none for a path
not measured), latency panels are logarithmic, and the PNG decodes to the figure's size."""

from __future__ import annotations

import io
import json
import types
from pathlib import Path

from matplotlib.image import imread

from benchmarks.chart import Panel, figure, png

SERIES = ["direct", "mesh"]
COLORS = ["#5f5f5f", "#4285f4"]


def _bars(ax) -> dict[str, list[float]]:
    """Bar heights per series of one panel, in group order."""
    return {c.get_label(): [bar.get_height() for bar in c] for c in ax.containers}


def test_bars_follow_the_values_and_a_missing_value_draws_none():
    panels = [
        Panel(
            "bulk",
            "Gbit/s",
            [("1 stream", {"direct": 17.4, "mesh": 2.6}), ("4", {"direct": 18.0, "mesh": None})],
        ),
        Panel("latency", "ms", [("p50", {"direct": 0.09, "mesh": 5.2})], log_scale=True),
    ]
    fig = figure(panels, SERIES, COLORS)
    bulk, latency = (ax for ax in fig.axes if ax.get_visible())
    assert bulk.get_title() == "bulk" and _bars(bulk) == {"direct": [17.4, 18.0], "mesh": [2.6]}
    assert bulk.get_yscale() == "linear" and latency.get_yscale() == "log"
    assert _bars(latency) == {"direct": [0.09], "mesh": [5.2]}
    assert [t.get_text() for t in bulk.get_xticklabels()] == ["1 stream", "4"]
    assert sum(ax.get_visible() for ax in fig.axes) == 2  # the grid's spare cell is hidden


def test_png_decodes_to_the_figures_size():
    fig = figure([Panel("one", "req/s", [("c1", {"direct": 1.0, "mesh": 2.0})])], SERIES, COLORS)
    image = imread(io.BytesIO(png(fig)), format="png")
    width, height = (round(v * 90) for v in fig.get_size_inches())
    assert image.shape[:2] == (height, width)


def test_the_harness_chart_has_a_panel_per_scenario():
    """The committed results drawn as the harness draws them: each scenario's panel shows its
    medians per path, and the picture renders."""
    from benchmarks import run

    results = json.loads((Path(run.__file__).parent / "results" / "latest.json").read_text())
    settings = types.SimpleNamespace(**results["settings"])
    panels = run.chart_panels(results["metrics"], settings)
    assert len(panels) == 9 and len({p.title for p in panels}) == 9
    medians = {m["id"]: m["paths"]["mesh-cross-node"]["median"] for m in results["metrics"]}
    shown = {label: values["mesh-cross-node"] for p in panels for label, values in p.groups}
    assert shown["16 keep-alive"] == medians["http_c16_rps"]
    assert shown["1 stream"] == medians["tcp_1_gbps"]
    assert all(p.log_scale for p in panels if p.unit.startswith("latency"))
    image = imread(io.BytesIO(run.chart(results["metrics"], settings)), format="png")
    assert image.shape[0] > 500 and image.shape[1] > 1000


def test_a_series_not_measured_in_a_scenario_takes_no_slot_in_its_panel():
    """The L7 level paths run the HTTP/1.1 scenarios only: elsewhere they leave no gap."""
    panels = [
        Panel("bulk", "Gbit/s", [("1 stream", {"direct": 17.4, "mesh": None})]),
        Panel("c16", "req/s", [("c16", {"direct": 9.0, "mesh": 3.0})]),
    ]
    bulk, c16 = (ax for ax in figure(panels, SERIES, COLORS).axes if ax.get_visible())
    assert _bars(bulk) == {"direct": [17.4]}
    (direct,) = bulk.containers
    assert direct[0].get_x() + direct[0].get_width() / 2 == 0  # centred on its group
    assert _bars(c16) == {"direct": [9.0], "mesh": [3.0]}
