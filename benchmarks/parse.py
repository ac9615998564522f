"""Reading the load tools' output: iperf3's JSON report and the line wrk_report.lua prints. Pure:
text in, figures out; output that is not what the tool should print raises ToolOutputError
naming the tool and what is missing."""

from __future__ import annotations

import json
from dataclasses import dataclass

WRK_MARKER = "WRK_JSON "


class ToolOutputError(ValueError):
    """A load tool printed something else than its report (it failed, or is another version)."""


def _excerpt(text: str) -> str:
    text = text.strip()
    return text if len(text) <= 300 else text[:300] + " ..."


def iperf3_gbps(output: str) -> float:
    """Throughput received by the server (what crossed the path), in Gbit/s, from `iperf3 -J`."""
    try:
        report = json.loads(output)
    except json.JSONDecodeError:
        raise ToolOutputError(f"iperf3: not a JSON report: {_excerpt(output)}") from None
    if not isinstance(report, dict):
        raise ToolOutputError(f"iperf3: not a JSON report: {_excerpt(output)}")
    if report.get("error"):
        raise ToolOutputError(f"iperf3: {report['error']}")
    try:
        bps = report["end"]["sum_received"]["bits_per_second"]
    except (KeyError, TypeError):
        raise ToolOutputError("iperf3: report has no end.sum_received.bits_per_second") from None
    return float(bps) / 1e9


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: completed requests per second, latency percentiles (ms) and errors."""

    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: dict[str, int]

    @property
    def req_per_s(self) -> float:
        return self.requests / self.duration_s

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def wrk_result(output: str) -> WrkResult:
    """The figures from the WRK_JSON line of a `wrk -s wrk_report.lua` run."""
    lines = [line for line in output.splitlines() if line.startswith(WRK_MARKER)]
    if not lines:
        raise ToolOutputError(f"wrk: no {WRK_MARKER.strip()} line in: {_excerpt(output)}")
    try:
        data = json.loads(lines[-1][len(WRK_MARKER) :])
        duration = data["duration_us"] / 1e6
        if duration <= 0:
            raise ToolOutputError("wrk: zero duration")
        return WrkResult(
            requests=int(data["requests"]),
            duration_s=duration,
            p50_ms=data["p50_us"] / 1000,
            p90_ms=data["p90_us"] / 1000,
            p99_ms=data["p99_us"] / 1000,
            p999_ms=data["p999_us"] / 1000,
            max_ms=data["max_us"] / 1000,
            errors={k: int(v) for k, v in data["errors"].items()},
        )
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ToolOutputError(f"wrk: bad {WRK_MARKER.strip()} line ({exc}): {lines[-1]}") from None
