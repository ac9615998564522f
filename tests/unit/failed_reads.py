"""Counting the socket reads that found nothing (EAGAIN, raised as BlockingIOError): what the
wait-first reads (agent/sockio.py) are there to avoid. Tests of the relay, sockio and the
HBONE TLS stream count them around real loopback sockets."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest


@dataclass
class FailedReads:
    count: int = 0


def count_failed_reads(monkeypatch: pytest.MonkeyPatch) -> FailedReads:
    """From now until the test ends, `os.read` and `os.readv` count the calls that raise
    BlockingIOError (and raise it as before)."""
    failed = FailedReads()
    for name in ("read", "readv"):
        real = getattr(os, name)

        def counting(*args, real=real):
            try:
                return real(*args)
            except BlockingIOError:
                failed.count += 1
                raise

        monkeypatch.setattr(os, name, counting)
    return failed
