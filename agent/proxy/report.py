"""Reporting a finished HTTP request (Istio's metrics and the access log line, one call) and the
access log line of a finished TCP connection.

Both directions (the source's outbound engine and the destination's inbound one) report
the same way; only the labels (reporter, peers) and the addresses differ.
"""

from __future__ import annotations

import dataclasses
import functools

import trio
from meshagent.agent.proxy.http import RequestRecord
from meshagent.agent.proxy.inputs import ProxyInputs
from meshagent.agent.telemetry import ConnectionLabels
from meshagent.common.authz import Decision


def report_http(
    inputs: ProxyInputs,
    labels: ConnectionLabels,
    record: RequestRecord,
    *,
    source_address: str,
    destination_address: str | None,
    decision: Decision | None = None,
) -> None:
    duration_ms = record.duration * 1000
    flags = record.flag_string
    if record.grpc and labels.request_protocol != "grpc":
        labels = _grpc_labels(labels)
    if decision is None and isinstance(record.decision, Decision):
        decision = record.decision
    inputs.metrics.http_request(
        labels,
        record.status,
        flags,
        duration_ms,
        record.bytes_received,
        record.bytes_sent,
        grpc_status=record.grpc_status if record.grpc else None,
        messages=_messages(record),
    )
    if inputs.access_log is not None:
        inputs.access_log.http_request(
            labels,
            start=record.start,
            duration_ms=duration_ms,
            method=record.method,
            path=record.target,
            response_code=record.status,
            response_flags=flags,
            bytes_sent=record.bytes_sent,
            bytes_received=record.bytes_received,
            decision=decision,
            source_address=source_address,
            destination_address=destination_address,
        )


def _messages(record: RequestRecord) -> tuple[int, int] | None:
    """A gRPC call's messages each way (None for any other request: no series)."""
    request, response = record.request_messages, record.response_messages
    if not record.grpc or request is None or response is None:
        return None
    return request.count, response.count


@functools.lru_cache(maxsize=1024)
def _grpc_labels(labels: ConnectionLabels) -> ConnectionLabels:
    """The connection's labels for a gRPC call (request_protocol grpc), built once each."""
    return dataclasses.replace(labels, request_protocol="grpc")


def log_tcp(
    inputs: ProxyInputs,
    labels: ConnectionLabels,
    *,
    start: float,
    started: float,
    bytes_sent: int,
    bytes_received: int,
    flags: str,
    source_address: str,
    destination_address: str | None,
    decision: Decision | None = None,
    error: str | None = None,
) -> None:
    """The access log line of a TCP connection (``started``: trio time it began)."""
    if inputs.access_log is not None:
        inputs.access_log.tcp_connection(
            labels,
            start=start,
            duration_ms=(trio.current_time() - started) * 1000,
            bytes_sent=bytes_sent,
            bytes_received=bytes_received,
            response_flags=flags,
            decision=decision,
            source_address=source_address,
            destination_address=destination_address,
            error=error,
        )
