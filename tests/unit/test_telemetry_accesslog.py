"""Access log lines: one JSON object per connection or request, sampled, never blocking."""

import json
import os
import random
import select

import pytest
import trio
from meshagent.agent.telemetry import accesslog
from meshagent.agent.telemetry.accesslog import (
    FIELDS,
    AccessLog,
    AccessLogSettings,
    open_access_log,
)
from meshagent.agent.telemetry.labels import ConnectionLabels, Peer, ServiceRef
from meshagent.common.authz import Decision
from pydantic import ValidationError

LABELS = ConnectionLabels(
    "destination",
    Peer(
        workload="frontend",
        workload_namespace="shop",
        principal="spiffe://cluster.local/ns/shop/sa/frontend",
    ),
    Peer(
        workload="reviews-v1",
        workload_namespace="shop",
        principal="spiffe://cluster.local/ns/shop/sa/reviews",
    ),
    ServiceRef("reviews.shop.svc.cluster.local", "reviews", "shop"),
    "http",
    "mutual_tls",
)
DENY = Decision(False, "DENY", "shop/deny-legacy", 0, "matched")


@pytest.fixture
def sink(tmp_path):
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    yield fd, path
    os.close(fd)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tcp_and_http_lines_are_json_with_every_field(sink):
    fd, path = sink
    log = AccessLog(fd=fd)
    assert log.tcp_connection(
        LABELS,
        start=1_700_000_000.25,
        duration_ms=1523.4567,
        bytes_sent=4096,
        bytes_received=512,
        response_flags="DENY",
        decision=DENY,
        source_address="10.1.1.4:40312",
        destination_address="10.1.2.7:9080",
    )
    assert log.http_request(
        LABELS,
        start=1_700_000_001.0,
        duration_ms=3.2,
        method="GET",
        path="/reviews/1",
        response_code=200,
        bytes_sent=1200,
        bytes_received=80,
    )
    log.flush_sync()
    tcp, http = _lines(path)
    assert list(tcp) == list(FIELDS) and list(http) == list(FIELDS)
    assert tcp == {
        "start_time": "2023-11-14T22:13:20.250Z",
        "duration_ms": 1523.457,
        "kind": "tcp",
        "reporter": "destination",
        "source_address": "10.1.1.4:40312",
        "source_workload": "frontend",
        "source_namespace": "shop",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/frontend",
        "destination_address": "10.1.2.7:9080",
        "destination_workload": "reviews-v1",
        "destination_namespace": "shop",
        "destination_principal": "spiffe://cluster.local/ns/shop/sa/reviews",
        "destination_service": "reviews.shop.svc.cluster.local",
        "request_protocol": "http",
        "connection_security_policy": "mutual_tls",
        "method": None,
        "path": None,
        "response_code": None,
        "response_flags": "DENY",
        "bytes_sent": 4096,
        "bytes_received": 512,
        "policy_decision": "deny",
        "policy": "shop/deny-legacy",
        "error": None,
    }
    assert (http["kind"], http["method"], http["path"], http["response_code"]) == (
        "http",
        "GET",
        "/reviews/1",
        200,
    )
    assert (http["policy_decision"], http["response_flags"]) == (None, "-")


def test_sampling_half_keeps_about_half(sink):
    fd, path = sink
    n, p = 20_000, 0.5
    settings = AccessLogSettings(sample=p, max_buffer_bytes=64 * 1024 * 1024)
    log = AccessLog(settings, fd=fd, rng=random.Random(7).random)
    kept = sum(
        log.tcp_connection(LABELS, start=0.0, duration_ms=1, bytes_sent=0, bytes_received=0)
        for _ in range(n)
    )
    log.flush_sync()
    assert log.dropped == 0
    assert len(_lines(path)) == kept
    # binomial: mean n*p, standard deviation sqrt(n*p*(1-p)) ~ 71; five of them either side
    assert abs(kept - n * p) < 5 * (n * p * (1 - p)) ** 0.5


@pytest.mark.parametrize("settings", [AccessLogSettings(output="off"), AccessLogSettings(sample=0)])
def test_off_writes_nothing(sink, settings):
    fd, path = sink
    log = AccessLog(settings, fd=fd)
    assert not log.enabled
    assert not log.http_request(
        LABELS,
        start=0.0,
        duration_ms=1,
        method="GET",
        path="/",
        response_code=200,
        bytes_sent=0,
        bytes_received=0,
    )
    log.flush_sync()
    assert path.read_text() == ""


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValidationError, match="sample"):
        AccessLogSettings(sample=1.5)
    with pytest.raises(ValidationError, match="output"):
        AccessLogSettings(output="file")


def test_a_full_buffer_drops_and_counts_instead_of_waiting(sink):
    fd, path = sink
    log = AccessLog(AccessLogSettings(max_buffer_bytes=select.PIPE_BUF), fd=fd)
    kept = sum(
        log.tcp_connection(LABELS, start=0.0, duration_ms=1, bytes_sent=0, bytes_received=0)
        for _ in range(50)
    )
    assert 0 < kept < 50
    assert log.dropped == 50 - kept
    log.flush_sync()
    assert len(_lines(path)) == kept


def _recorded_writes(monkeypatch) -> list[bytes]:
    writes: list[bytes] = []
    real_write = os.write

    def recording_write(target, data):
        writes.append(bytes(data))
        return real_write(target, data)

    monkeypatch.setattr(accesslog.os, "write", recording_write)
    return writes


def _log_lines(log: AccessLog, count: int) -> None:
    for i in range(count):
        log.http_request(
            LABELS,
            start=0.0,
            duration_ms=i,
            method="GET",
            path="/" + "x" * (i % 50),
            response_code=200,
            bytes_sent=i,
            bytes_received=0,
        )


def test_writes_to_a_pipe_are_whole_lines_of_at_most_pipe_buf(monkeypatch):
    read_end, write_end = os.pipe()
    try:
        writes = _recorded_writes(monkeypatch)
        log = AccessLog(fd=write_end)
        _log_lines(log, 40)  # less than the pipe holds: no reader needed
        log.flush_sync()
        assert len(writes) > 1
        assert all(w.endswith(b"\n") and len(w) <= select.PIPE_BUF for w in writes)
        assert os.read(read_end, 1 << 20).count(b"\n") == 40
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_batch_goes_to_a_regular_file_in_one_write(sink, monkeypatch):
    fd, path = sink
    writes = _recorded_writes(monkeypatch)
    log = AccessLog(fd=fd)
    for i in range(200):
        log.http_request(
            LABELS,
            start=0.0,
            duration_ms=i,
            method="GET",
            path="/" + "x" * (i % 50),
            response_code=200,
            bytes_sent=i,
            bytes_received=0,
        )
    log.flush_sync()
    assert len(writes) == 1 and writes[0].endswith(b"\n")
    assert len(_lines(path)) == 200


async def test_the_flusher_writes_in_the_background(sink):
    fd, path = sink
    async with open_access_log(AccessLogSettings(flush_interval=0.05), fd=fd) as log:
        log.tcp_connection(LABELS, start=0.0, duration_ms=1, bytes_sent=1, bytes_received=1)
        with trio.fail_after(5):
            while not path.read_text():
                await trio.sleep(0.01)
    assert len(_lines(path)) == 1


async def test_what_is_buffered_is_written_on_exit(sink):
    fd, path = sink
    async with open_access_log(AccessLogSettings(flush_interval=3600), fd=fd) as log:
        log.tcp_connection(LABELS, start=0.0, duration_ms=2, bytes_sent=2, bytes_received=2)
        await trio.sleep(0.05)
        assert path.read_text() == ""
    assert [line["duration_ms"] for line in _lines(path)] == [2]


def _read_lines(fd, count):
    data = b""
    while data.count(b"\n") < count:
        data += os.read(fd, 65536)
    return data


async def test_a_blocked_reader_does_not_block_the_event_loop():
    read_end, write_end = os.pipe()  # nobody reads yet: the writer blocks once the pipe is full
    try:
        log = AccessLog(fd=write_end)
        lines = 2000  # about 1.4 MB, far more than a pipe holds
        for _ in range(lines):
            log.tcp_connection(LABELS, start=0.0, duration_ms=1, bytes_sent=0, bytes_received=0)
        flushed = trio.Event()

        async def flush():
            await log.flush()
            flushed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush)
            await trio.sleep(0.2)  # the loop runs on while the writer thread is stuck
            assert not flushed.is_set()
            assert log.tcp_connection(
                LABELS, start=0.0, duration_ms=1, bytes_sent=0, bytes_received=0
            )
            data = await trio.to_thread.run_sync(_read_lines, read_end, lines)
        assert flushed.is_set()
        log.flush_sync()
        data += _read_lines(read_end, 1)
        assert [json.loads(line)["kind"] for line in data.splitlines()] == ["tcp"] * (lines + 1)
    finally:
        os.close(read_end)
        os.close(write_end)


def _reference_line(labels, kind, start, duration_ms, values: dict) -> str:
    """The line as json.dumps writes the entry (how the log was written before it was made
    faster): the fast path must give exactly these bytes."""
    from datetime import UTC, datetime

    stamp = datetime.fromtimestamp(start, tz=UTC).isoformat(timespec="milliseconds")
    src, dst = labels.source, labels.destination
    entry = {
        "start_time": stamp.replace("+00:00", "Z"),
        "duration_ms": round(duration_ms, 3),
        "kind": kind,
        "reporter": labels.reporter,
        "source_address": values["source_address"],
        "source_workload": src.workload,
        "source_namespace": src.workload_namespace,
        "source_principal": src.principal,
        "destination_address": values["destination_address"],
        "destination_workload": dst.workload,
        "destination_namespace": dst.workload_namespace,
        "destination_principal": dst.principal,
        "destination_service": labels.service.hostname,
        "request_protocol": labels.request_protocol,
        "connection_security_policy": labels.connection_security_policy,
        "method": values["method"],
        "path": values["path"],
        "response_code": values["response_code"],
        "response_flags": values["response_flags"],
        "bytes_sent": values["bytes_sent"],
        "bytes_received": values["bytes_received"],
        "policy_decision": values["policy_decision"],
        "policy": values["policy"],
        "error": values["error"],
    }
    return json.dumps(entry, separators=(",", ":"), ensure_ascii=False) + "\n"


def test_lines_are_byte_for_byte_what_json_dumps_writes():
    rng = random.Random(7)
    odd = ['a"b', "\\x", "tab\there", "nl\n", "ünï©ødé", "\u2028", "\x01", ""]
    log = AccessLog(settings=AccessLogSettings(max_buffer_bytes=1 << 30), fd=-1)
    labels = ConnectionLabels(
        "source",
        Peer(workload=odd[0], workload_namespace=odd[4], principal=odd[1]),
        Peer(workload=odd[2]),
        ServiceRef(odd[3], "n", "s"),
        "http",
        "none",
    )
    for i in range(400):
        start = rng.choice([0.0, 1_700_000_000.0, 1_700_000_000.9995, 1_699_999_999.9999996])
        start += rng.random() * (10 if i % 2 else 0)
        duration = rng.choice([0, 0.0004, 1.23456, 1523.4567, rng.random() * 1e4])
        values = {
            "source_address": rng.choice([None, "10.0.0.1:5", odd[rng.randrange(len(odd))]]),
            "destination_address": rng.choice([None, "10.0.0.2:80"]),
            "method": rng.choice(["GET", odd[rng.randrange(len(odd))]]),
            "path": rng.choice(["/", "/a?b=c&d", odd[rng.randrange(len(odd))]]),
            "response_code": rng.choice([0, 200, 503]),
            "response_flags": rng.choice(["-", "UF,URX"]),
            "bytes_sent": rng.randrange(10**9),
            "bytes_received": rng.randrange(10),
            "error": rng.choice([None, odd[rng.randrange(len(odd))]]),
        }
        decision = rng.choice([None, DENY, Decision(True, "ALLOW", None, None, "ok")])
        log.http_request(
            labels,
            start=start,
            duration_ms=duration,
            decision=decision,
            **values,
        )
        values["policy_decision"] = None if decision is None else decision.action.lower()
        values["policy"] = None if decision is None else decision.policy
        expected = _reference_line(labels, "http", start, duration, values)
        assert log._take()[0].decode() == expected
