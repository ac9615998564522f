"""The push-latency benchmark runs end to end in its smoke mode (no timing is asserted:
numbers depend on the machine; the benchmark itself reports them)."""

from __future__ import annotations

import json

from benchmarks.push_latency import main


def test_smoke_run_measures_every_round_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "push_latency.json"
    assert main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["agents"], result["rounds"], len(result["samples_ms"])) == (5, 3, 3)
    assert 0 < result["min_ms"] <= result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert "p50" in capsys.readouterr().out
