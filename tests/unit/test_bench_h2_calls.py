"""benchmarks/h2_calls.py: gRPC-shaped calls through 0, 1 and 2 engines all succeed and are
counted (a failed call raises)."""

from __future__ import annotations

import pytest

from benchmarks.h2_calls import measure


@pytest.mark.parametrize("engines", [0, 1, 2])
async def test_calls_through_the_engines_succeed_and_are_counted(engines):
    figures = await measure(engines, calls=25, in_flight=5)
    assert figures.calls == 25
    assert figures.cpu_us_per_call > 0 and figures.calls_per_s > 0
