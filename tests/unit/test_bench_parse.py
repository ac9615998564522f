"""benchmarks/parse.py: the figures taken from iperf3's and wrk's output, and clear errors when the
output is something else."""

from __future__ import annotations

import json

import pytest

from benchmarks.parse import ToolOutputError, iperf3_gbps, wrk_result

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
