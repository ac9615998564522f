"""benchmarks/parse.py: the figures taken from iperf3's and wrk's output, and clear errors when the
output is something else."""

from __future__ import annotations

import json

import pytest

from benchmarks.parse import (
    GRPC_MARKER,
    ToolOutputError,
    grpc_result,
    h2load_result,
    iperf3_gbps,
    wrk_result,
)

IPERF3_REPORT = {
    "start": {"test_start": {"protocol": "TCP", "num_streams": 1}},
    "intervals": [],
    "end": {
        "sum_sent": {"bytes": 3400000000, "bits_per_second": 13.6e9, "retransmits": 1},
        "sum_received": {"bytes": 3390000000, "bits_per_second": 13.56e9},
    },
}

WRK_OUTPUT = """Running 2s test @ http://10.170.2.10:8080/small
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   656.03us    0.90ms   8.15ms   86.10%
  74274 requests in 2.10s, 10.62MB read
Requests/sec:  35346.52
WRK_JSON {"requests":74274,"duration_us":2101310,"bytes":11141100,"p50_us":256,"p90_us":1921,\
"p99_us":4185,"p999_us":6390,"max_us":8149,"errors":{"connect":0,"read":2,"write":0,"status":1,\
"timeout":0}}
"""


def test_iperf3_received_throughput_in_gbps():
    assert iperf3_gbps(json.dumps(IPERF3_REPORT)) == pytest.approx(13.56)


def test_iperf3_error_report_is_named():
    out = json.dumps({"start": {}, "end": {}, "error": "the server is busy running a test"})
    with pytest.raises(ToolOutputError, match="server is busy"):
        iperf3_gbps(out)


@pytest.mark.parametrize("text", ["iperf3: error - unable to connect", "[]", '{"end": {}}'])
def test_iperf3_not_a_report(text):
    with pytest.raises(ToolOutputError, match="iperf3"):
        iperf3_gbps(text)


def test_wrk_line_gives_rate_latencies_and_errors():
    r = wrk_result(WRK_OUTPUT)
    assert r.requests == 74274
    assert r.req_per_s == pytest.approx(74274 / 2.10131)
    assert (r.p50_ms, r.p90_ms, r.p99_ms, r.p999_ms, r.max_ms) == (0.256, 1.921, 4.185, 6.39, 8.149)
    assert r.errors["read"] == 2 and r.error_count == 3


def test_wrk_without_the_report_line():
    with pytest.raises(ToolOutputError, match="no WRK_JSON line"):
        wrk_result("unable to connect to 10.0.0.1:80 Connection refused\n")


def test_wrk_with_a_broken_report_line():
    with pytest.raises(ToolOutputError, match="bad WRK_JSON"):
        wrk_result('WRK_JSON {"requests": 1}\n')


# h2load 1.52 -c 10 -m 10 -D 1 against nginx h2c (progress lines left out)
H2LOAD = """Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 1.00s, 10000.00 req/s, 674.47KB/s
requests: 10064 total, 10090 started, 10064 done, 10000 succeeded, 64 failed, 64 errored, 0 timeout
status codes: 10000 2xx, 0 3xx, 0 4xx, 3 5xx
traffic: 674.47KB (690660) total, 468.75KB (480000) headers (space savings 51.02%), 29.30KB data
                     min         max         mean         sd        +/- sd
time for request:       35us      7.07ms      1.52ms       863us    80.35%
time for connect:       58us       194us       123us        49us    60.00%
"""


def test_h2load_summary_gives_rate_mean_latency_and_failures():
    r = h2load_result(H2LOAD)
    assert (r.req_per_s, r.succeeded, r.failed, r.non_2xx, r.mean_ms) == (10000, 10000, 64, 3, 1.52)
    # the requests cut when -D ends (at most connections x streams) are not errors; 5xx are
    assert r.error_count(in_flight=100) == 3
    assert r.error_count(in_flight=50) == 3 + 14
    assert h2load_result(H2LOAD.replace("1.52ms", "900us")).mean_ms == pytest.approx(0.9)


def test_h2load_without_a_summary():
    with pytest.raises(ToolOutputError, match="h2load: no summary"):
        h2load_result("connect to 10.1.2.3 port 8082 failed: Connection refused")


def test_grpc_load_line_gives_calls_per_second_latencies_and_errors():
    line = json.dumps(
        {"calls": 5000, "window_s": 2.0, "errors": {"UNAVAILABLE": 2}, "p50_ms": 1.5, "p99_ms": 9}
    )
    r = grpc_result(f"noise\n{GRPC_MARKER}{line}\n")
    assert (r.calls_per_s, r.p50_ms, r.p99_ms, r.errors) == (2500, 1.5, 9, {"UNAVAILABLE": 2})
    with pytest.raises(ToolOutputError, match="no call completed"):
        grpc_result(GRPC_MARKER + json.dumps({**json.loads(line), "calls": 0}))
    with pytest.raises(ToolOutputError, match="no GRPC_JSON line"):
        grpc_result("Traceback ...")
