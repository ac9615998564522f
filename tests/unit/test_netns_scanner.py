"""NetnsScanner's caching (agent/discovery.py) over this machine's real /proc: which
namespaces' addresses it reads again on a later scan."""

from __future__ import annotations

import os

from meshagent.agent import discovery
from meshagent.agent.discovery import OTHERS_RECHECK_S, NetnsScanner

NOWHERE = "203.0.113.77"  # TEST-NET-3: held by no namespace here


def _counting(monkeypatch) -> list[int]:
    reads: list[int] = []
    real = discovery._local_ips

    def local_ips(pid: int) -> frozenset[str]:
        reads.append(pid)
        return real(pid)

    monkeypatch.setattr(discovery, "_local_ips", local_ips)
    return reads


def test_a_namespace_without_a_wanted_ip_is_read_again_only_for_new_ips_or_after_a_while(
    monkeypatch,
):
    reads = _counting(monkeypatch)
    now = [1000.0]
    scanner = NetnsScanner(clock=lambda: now[0])
    scanner._own_inode = -1  # this process's namespace counts as any other here
    assert scanner.scan({NOWHERE}) == {}
    first = len(reads)
    assert first >= 1  # at least this process's namespace was read
    assert scanner.scan({NOWHERE}) == {}
    assert len(reads) == first  # nothing read again
    scanner.scan({NOWHERE, "203.0.113.78"})  # a new pod IP wanted: read everything again
    assert len(reads) >= 2 * first
    again = len(reads)
    now[0] += OTHERS_RECHECK_S
    scanner.scan({NOWHERE, "203.0.113.78"})  # and after OTHERS_RECHECK_S
    assert len(reads) > again


def test_a_wanted_ip_in_a_namespace_looked_at_before_is_found(monkeypatch):
    """This process's own namespace, first with no wanted IP of its, then asked for one."""
    _counting(monkeypatch)
    scanner = NetnsScanner()
    scanner._own_inode = -1
    mine = discovery._local_ips(os.getpid())
    assert mine, "this machine's namespace has no address other than loopback"
    scanner.scan({NOWHERE})
    ip = sorted(mine)[0]
    found = scanner.scan({ip})
    assert ip in found and found[ip].inode == os.stat("/proc/self/ns/net").st_ino
