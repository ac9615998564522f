"""Access log: one JSON line per TCP connection and per HTTP request.

What flows through: when a connection closes or a request completes, the proxy hands in its
`ConnectionLabels` and what happened (start, duration, bytes, response code and flags, the
authorization decision); a sampled fraction becomes one JSON line in an in-memory buffer; a
flusher task writes the buffer to a file descriptor (stdout by default) from a worker thread,
so a slow reader (a full pipe, a stalled log collector) never blocks the event loop. When the
buffer is full, new lines are dropped and counted rather than waiting (`AccessLog.dropped`).

Every line has the same keys (JSON null when a field does not apply), so log pipelines can rely
on them: `FIELDS`. ``bytes_sent`` is what the proxy sent to the client (the response direction)
and ``bytes_received`` what it received from it, as in the metrics. Lines go out in chunks of
whole lines of at most PIPE_BUF bytes, so several worker processes sharing stdout do not
interleave inside a line.

Settings (`AccessLogSettings`, for the agent's config): ``output`` ``stdout`` (default) or
``off``; ``sample`` the fraction of entries written (1.0 = all); ``flush_interval`` seconds;
``max_buffer_bytes``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import select
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from json.encoder import encode_basestring  # C-accelerated; what json.dumps uses here
from typing import TYPE_CHECKING, Literal

import trio
from meshagent.agent.telemetry.labels import NO_RESPONSE_FLAGS, ConnectionLabels
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from meshagent.agent.telemetry.flows import FlowTap
    from meshagent.common.authz import Decision

log = logging.getLogger(__name__)

__all__ = ["FIELDS", "AccessLog", "AccessLogSettings", "open_access_log"]

FIELDS: tuple[str, ...] = (
    "start_time",
    "duration_ms",
    "kind",
    "reporter",
    "source_address",
    "source_workload",
    "source_namespace",
    "source_principal",
    "destination_address",
    "destination_workload",
    "destination_namespace",
    "destination_principal",
    "destination_service",
    "request_protocol",
    "connection_security_policy",
    "method",
    "path",
    "response_code",
    "response_flags",
    "bytes_sent",
    "bytes_received",
    "policy_decision",
    "policy",
    "error",
)

_WAKE_FLUSHER_AT = 64 * 1024  # pending bytes that wake the flusher before its interval
_FINAL_FLUSH_TIMEOUT = 5.0
_CHUNK = select.PIPE_BUF  # writes up to this size to a pipe are atomic


class AccessLogSettings(BaseModel):
    """Where access log lines go and how many (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: Literal["stdout", "off"] = "stdout"
    sample: float = Field(1.0, ge=0.0, le=1.0)
    flush_interval: float = Field(1.0, gt=0.0)
    max_buffer_bytes: int = Field(4 * 1024 * 1024, ge=_CHUNK)


_second: list = [None, ""]  # the last whole second formatted, and its text


def _rfc3339(unix_time: float) -> str:
    """`unix_time` as RFC 3339 UTC with milliseconds (``2023-11-14T22:13:20.250Z``), as
    datetime's isoformat(timespec="milliseconds") writes it: microseconds rounded half to
    even as datetime.fromtimestamp rounds them, then truncated. The date and time of day are
    formatted once per second."""
    frac, whole = math.modf(unix_time)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        whole += 1.0
        micros -= 1_000_000
    elif micros < 0:
        whole -= 1.0
        micros += 1_000_000
    second = int(whole)
    if _second[0] != second:
        text = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second[0], _second[1] = second, text
    return f"{_second[1]}.{micros // 1000:03d}Z"


def _json(value: str | float | None) -> str:
    """One JSON value as json.dumps(..., ensure_ascii=False) writes it."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return encode_basestring(value)
    return repr(value)  # int, or a float (json.dumps writes float.__repr__)


# One line's JSON, keys in FIELDS order; %s are JSON values (the connection's labels come
# pre-encoded, see AccessLog._labels_json).
_LINE = (
    '{"start_time":"%s","duration_ms":%s,"kind":"%s",%s,"source_address":%s,%s,'
    '"destination_address":%s,%s,"method":%s,"path":%s,"response_code":%s,"response_flags":%s,'
    '"bytes_sent":%d,"bytes_received":%d,"policy_decision":%s,"policy":%s,"error":%s}\n'
)
_LABELS_CACHE_LIMIT = 4096


def _decision_fields(decision: Decision | None) -> tuple[str | None, str | None]:
    if decision is None:
        return None, None
    return ("allow" if decision.allowed else "deny"), decision.policy


class AccessLog:
    """Formats, samples and buffers access log lines; `serve` (or `open_access_log`) writes
    them. `fd` is the file descriptor written to (1: stdout); `rng` decides sampling."""

    def __init__(
        self,
        settings: AccessLogSettings | None = None,
        *,
        fd: int = 1,
        rng: Callable[[], float] = random.random,
        tap: FlowTap | None = None,
    ) -> None:
        self.settings = settings or AccessLogSettings()
        self.tap = tap  # `meshagent observe`'s tap: sees every entry while watched (flows.py)
        self._fd = fd
        self._random = rng
        self._enabled = self.settings.output != "off" and self.settings.sample > 0.0
        self._labels: dict[ConnectionLabels, tuple[str, str, str]] = {}
        self._regular: bool | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._wakeup = trio.Event()
        self._write_lock = trio.Lock()
        self.dropped = 0  # lines lost to a full buffer or a failed write

    @property
    def enabled(self) -> bool:
        return self._enabled

    def _sampled(self) -> bool:
        if not self._enabled:
            return False
        return self.settings.sample >= 1.0 or self._random() < self.settings.sample

    def tcp_connection(
        self,
        labels: ConnectionLabels,
        *,
        start: float,
        duration_ms: float,
        bytes_sent: int,
        bytes_received: int,
        response_flags: str = NO_RESPONSE_FLAGS,
        decision: Decision | None = None,
        source_address: str | None = None,
        destination_address: str | None = None,
        error: str | None = None,
    ) -> bool:
        """Log a closed TCP connection (`start`: UNIX time it was accepted). Returns whether
        the line was kept (sampled in and buffered)."""
        keep = self._sampled()
        tap = self.tap if self.tap is not None and self.tap.watched else None
        if not keep and tap is None:
            return False
        return self._add(
            labels,
            "tcp",
            keep=keep,
            tap=tap,
            start=start,
            duration_ms=duration_ms,
            bytes_sent=bytes_sent,
            bytes_received=bytes_received,
            response_flags=response_flags,
            decision=decision,
            source_address=source_address,
            destination_address=destination_address,
            error=error,
            method=None,
            path=None,
            response_code=None,
        )

    def http_request(
        self,
        labels: ConnectionLabels,
        *,
        start: float,
        duration_ms: float,
        method: str,
        path: str,
        response_code: int,
        bytes_sent: int,
        bytes_received: int,
        response_flags: str = NO_RESPONSE_FLAGS,
        decision: Decision | None = None,
        source_address: str | None = None,
        destination_address: str | None = None,
        error: str | None = None,
    ) -> bool:
        """Log a completed HTTP request (`start`: UNIX time its headers arrived). Returns
        whether the line was kept."""
        keep = self._sampled()
        tap = self.tap if self.tap is not None and self.tap.watched else None
        if not keep and tap is None:
            return False
        return self._add(
            labels,
            "http",
            keep=keep,
            tap=tap,
            start=start,
            duration_ms=duration_ms,
            bytes_sent=bytes_sent,
            bytes_received=bytes_received,
            response_flags=response_flags,
            decision=decision,
            source_address=source_address,
            destination_address=destination_address,
            error=error,
            method=method,
            path=path,
            response_code=response_code,
        )

    def _add(
        self,
        labels: ConnectionLabels,
        kind: str,
        *,
        keep: bool,
        tap: FlowTap | None,
        start: float,
        duration_ms: float,
        decision: Decision | None,
        source_address: str | None,
        destination_address: str | None,
        method: str | None,
        path: str | None,
        response_code: int | None,
        response_flags: str,
        bytes_sent: int,
        bytes_received: int,
        error: str | None,
    ) -> bool:
        action, policy = _decision_fields(decision)
        reporter, source, destination = self._labels_json(labels)
        line = (
            _LINE
            % (
                _rfc3339(start),
                repr(round(duration_ms, 3)),
                kind,
                reporter,
                _json(source_address),
                source,
                _json(destination_address),
                destination,
                _json(method),
                _json(path),
                _json(response_code),
                _json(response_flags),
                bytes_sent,
                bytes_received,
                _json(action),
                _json(policy),
                _json(error),
            )
        ).encode()
        if tap is not None:
            tap.publish(line, decision.reason if decision is not None else None)
        if not keep:
            return False
        if self._pending_bytes + len(line) > self.settings.max_buffer_bytes:
            self.dropped += 1
            return False
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= _WAKE_FLUSHER_AT:
            self._wakeup.set()
        return True

    def _labels_json(self, labels: ConnectionLabels) -> tuple[str, str, str]:
        """The connection's fields as JSON members, encoded once per ConnectionLabels."""
        parts = self._labels.get(labels)
        if parts is None:
            if len(self._labels) >= _LABELS_CACHE_LIMIT:
                self._labels.clear()
            src, dst = labels.source, labels.destination
            parts = self._labels[labels] = (
                f'"reporter":{_json(labels.reporter)}',
                f'"source_workload":{_json(src.workload)},'
                f'"source_namespace":{_json(src.workload_namespace)},'
                f'"source_principal":{_json(src.principal)}',
                f'"destination_workload":{_json(dst.workload)},'
                f'"destination_namespace":{_json(dst.workload_namespace)},'
                f'"destination_principal":{_json(dst.principal)},'
                f'"destination_service":{_json(labels.service.hostname)},'
                f'"request_protocol":{_json(labels.request_protocol)},'
                f'"connection_security_policy":{_json(labels.connection_security_policy)}',
            )
        return parts

    def _take(self) -> list[bytes]:
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        return batch

    def _to_regular_file(self) -> bool:
        """Whether the fd is a regular file (decided once): lines then go out in one write
        per batch; PIPE_BUF chunks keep lines whole on a pipe shared by several processes, but
        cost the writer thread a GIL hand-off with the event loop per 4 KiB."""
        if self._regular is None:
            try:
                self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
            except OSError:
                self._regular = False
        return self._regular

    def _write(self, batch: list[bytes]) -> None:
        """Blocking: write whole lines, grouped into chunks of at most PIPE_BUF bytes (one
        piece to a regular file)."""
        chunk: list[bytes] = []
        size = 0
        pieces: list[bytes] = []
        if self._to_regular_file():
            batch = [b"".join(batch)] if batch else []
        for line in batch:
            if chunk and size + len(line) > _CHUNK:  # (a regular file's batch is one "line")
                pieces.append(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            pieces.append(b"".join(chunk))
        for index, piece in enumerate(pieces):
            view = memoryview(piece)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                lost = sum(p.count(b"\n") for p in pieces[index:])
                self.dropped += lost
                log.warning("access log write failed, %d lines lost: %s", lost, exc)
                return

    def flush_sync(self) -> None:
        """Write everything buffered now, blocking the caller (tests, shutdown outside trio)."""
        self._write(self._take())

    async def flush(self, *, abandon_on_cancel: bool = False) -> None:
        """Write everything buffered, in a worker thread."""
        async with self._write_lock:
            batch = self._take()
            if batch:
                await trio.to_thread.run_sync(
                    self._write, batch, abandon_on_cancel=abandon_on_cancel
                )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush every `flush_interval` seconds, or sooner when much is pending; never returns."""
        task_status.started()
        while True:
            with trio.move_on_after(self.settings.flush_interval):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            await self.flush()


@asynccontextmanager
async def open_access_log(
    settings: AccessLogSettings | None = None, *, fd: int = 1, tap: FlowTap | None = None
) -> AsyncIterator[AccessLog]:
    """An `AccessLog` with its flusher running (and `tap` fed: `flows.py`); on exit, what is
    still buffered is written (for at most a few seconds, even when the exit is a
    cancellation)."""
    access_log = AccessLog(settings, fd=fd, tap=tap)
    try:
        async with trio.open_nursery() as nursery:
            if access_log.enabled:
                await nursery.start(access_log.serve)
            yield access_log
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_FINAL_FLUSH_TIMEOUT):
            await access_log.flush(abandon_on_cancel=True)
