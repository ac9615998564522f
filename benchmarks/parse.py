"""Reading the load tools' output: iperf3's JSON report and the line wrk_report.lua prints. Pure:
text in, figures out; output that is not what the tool should print raises ToolOutputError
naming the tool and what is missing."""

from __future__ import annotations

import json
import re
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


@dataclass(frozen=True)
class H2loadResult:
    """One h2load run: requests per second over its measured window (succeeded ones), mean
    latency (ms), the answers that were not 2xx, and the requests that did not complete."""

    req_per_s: float
    succeeded: int
    failed: int
    errored: int
    timeout: int
    non_2xx: int
    mean_ms: float

    def error_count(self, in_flight: int) -> int:
        """Answers other than 2xx, and failed requests beyond `in_flight`: with -D, h2load
        counts the requests still in flight when the duration ends as failed (at most
        connections x streams), which says nothing about the path."""
        return self.non_2xx + max(0, self.failed - in_flight)


_H2LOAD_FINISHED = re.compile(r"^finished in [\d.]+m?s, ([\d.]+) req/s", re.MULTILINE)
_H2LOAD_REQUESTS = re.compile(
    r"^requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout",
    re.MULTILINE,
)
_H2LOAD_CODES = re.compile(r"^status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)
_H2LOAD_TIME = re.compile(r"^time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\b", re.MULTILINE)
_TO_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def h2load_result(output: str) -> H2loadResult:
    """The figures from h2load's summary (its `finished in`, `requests:` and `time for
    request:` lines)."""
    finished = _H2LOAD_FINISHED.search(output)
    requests = _H2LOAD_REQUESTS.search(output)
    codes = _H2LOAD_CODES.search(output)
    latency = _H2LOAD_TIME.search(output)
    if not (finished and requests and codes and latency):
        raise ToolOutputError(f"h2load: no summary in: {_excerpt(output)}")
    succeeded, failed, errored, timeout = (int(g) for g in requests.groups())
    return H2loadResult(
        req_per_s=float(finished.group(1)),
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeout,
        non_2xx=sum(int(g) for g in codes.groups()),
        mean_ms=float(latency.group(1)) * _TO_MS[latency.group(2)],
    )


GRPC_MARKER = "GRPC_JSON "  # benchmarks/grpc_load.py's report line


@dataclass(frozen=True)
class GrpcResult:
    """One grpc_load run: completed calls per second, latency percentiles (ms), errors."""

    calls_per_s: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]


def grpc_result(output: str) -> GrpcResult:
    """The figures from the GRPC_JSON line of a `benchmarks.grpc_load` run."""
    lines = [line for line in output.splitlines() if line.startswith(GRPC_MARKER)]
    if not lines:
        raise ToolOutputError(f"grpc_load: no {GRPC_MARKER.strip()} line in: {_excerpt(output)}")
    try:
        data = json.loads(lines[-1][len(GRPC_MARKER) :])
        if data["window_s"] <= 0 or data["calls"] == 0:
            raise ToolOutputError(f"grpc_load: no call completed ({data['errors']})")
        return GrpcResult(
            calls_per_s=data["calls"] / data["window_s"],
            p50_ms=float(data["p50_ms"]),
            p99_ms=float(data["p99_ms"]),
            errors={k: int(v) for k, v in data["errors"].items()},
        )
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ToolOutputError(f"grpc_load: bad line ({exc}): {lines[-1]}") from None
