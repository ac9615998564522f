"""benchmarks/restart.py's pure parts: the summary of a set of restarts and its table."""

from __future__ import annotations

import re

from meshagent.lab.paths import INSTANCE_PATTERN

from benchmarks import restart
from benchmarks.restart import markdown, summary


def _samples(*figures: float, rebuilt: int = 0) -> list[dict]:
    return [{"ready_after_s": f, "reused": True} for f in figures] + [
        {"ready_after_s": 2.5, "reused": False} for _ in range(rebuilt)
    ]


def test_the_summary_counts_only_restarts_on_the_pins_and_takes_a_real_median():
    s = summary(_samples(0.9, 0.5, 1.4, 0.7, rebuilt=1))
    # p50 is the lower median (a figure that was measured); the rebuild is left out of both
    assert s == {"reused": 4, "rebuilt": 1, "p50_s": 0.7, "max_s": 1.4, "within_target": 3}
    assert summary(_samples(rebuilt=2)) == {"reused": 0, "rebuilt": 2}


def test_the_table_has_a_row_per_machine_state_with_every_figure():
    quiet, busy = _samples(0.61, 0.72), _samples(0.95, 1.21)
    results = {
        "command": "python -m benchmarks.restart --runs 2",
        "started_at": "2026-12-06T18:00:00+00:00",
        "runs": 2,
        "machine": {
            "commit": "abc",
            "dirty": False,
            "cores": 2,
            "cpu_model": "cpu",
            "loadavg_start": "1.0",
            "loadavg_end": "2.0",
            "other_labs": [],
        },
        "measured": {
            "quiet": {"samples": quiet, **summary(quiet)},
            "busy": {"samples": busy, **summary(busy)},
            "served_after": "200",
        },
    }
    text = markdown(results)
    assert "| quiet | 2 of 2 | 0.61 s | 0.72 s | 2 of 2 | 0.61, 0.72 |" in text
    assert (
        "| beside a one-core busy loop | 2 of 2 | 0.95 s | 1.21 s | 1 of 2 | 0.95, 1.21 |" in text
    )
    assert "got `200`" in text and "other labs running: none" in text


def test_the_benchmarks_lab_instance_is_a_valid_instance_name():
    assert re.fullmatch(INSTANCE_PATTERN, restart.DEFAULT_INSTANCE)
