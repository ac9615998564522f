"""Summaries of repeated measurements: samples in, median and spread out, and the ratios between
paths measured in the same run. Pure."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """A figure measured `n` times: its median, and its spread as min, max and (max-min)/median."""

    median: float
    low: float
    high: float
    n: int

    @property
    def spread_pct(self) -> float | None:
        if self.median == 0:
            return None
        return 100 * (self.high - self.low) / abs(self.median)

    def as_dict(self) -> dict:
        spread = self.spread_pct
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "n": self.n,
            "spread_pct": None if spread is None else round(spread, 1),
        }


def summarize(samples: Sequence[float]) -> Summary:
    if not samples:
        raise ValueError("no samples to summarize")
    return Summary(statistics.median(samples), min(samples), max(samples), len(samples))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is zero
    (a ratio to nothing is not a figure)."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def added(samples: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Pairwise differences, round by round: what a path adds over the baseline measured in the
    same round (so slow drifts of the machine cancel out)."""
    if len(samples) != len(baseline):
        raise ValueError(f"{len(samples)} samples against {len(baseline)} baseline samples")
    return [s - b for s, b in zip(samples, baseline, strict=True)]
