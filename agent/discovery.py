"""Finds the network namespaces of pods on this node, by pod IP, the way a node sees them.

Walks /proc/*/ns/net (needs the host PID namespace), reads each namespace's
local addresses (IPv4 from /proc/<pid>/net/fib_trie, global IPv6 from
/proc/<pid>/net/if_inet6), and for the namespaces that
hold a wanted pod IP, enters them from a worker thread just long enough to ask
a socket for the namespace cookie (SO_NETNS_COOKIE), which is what the connect4
program sees. Results are cached by namespace inode; cookies are never reused.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from meshagent.common.netns import netns_cookie

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodNetns:
    inode: int
    pid: int
    cookie: int
    ips: frozenset[str]


def _local_ipv4(pid: int) -> frozenset[str]:
    """The /32 LOCAL addresses of the namespace pid lives in (fib_trie's 'host LOCAL')."""
    ips, last = set(), None
    try:
        with open(f"/proc/{pid}/net/fib_trie") as f:
            for line in f:
                stripped = line.strip()
                if stripped.startswith("|--"):
                    last = stripped[3:].strip()
                elif stripped == "/32 host LOCAL" and last:
                    ips.add(last)
    except OSError:
        return frozenset()
    return frozenset(ip for ip in ips if not ip.startswith("127."))


IF_INET6_SCOPE_GLOBAL = "00"  # the scope column of /proc/net/if_inet6 (link-local is 20)


def _global_ipv6(pid: int) -> frozenset[str]:
    """The namespace's global-scope IPv6 addresses (pod IPs; not ::1, not fe80::)."""
    ips = set()
    try:
        with open(f"/proc/{pid}/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 4 and fields[3] == IF_INET6_SCOPE_GLOBAL:
                    ips.add(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    except (OSError, ValueError):
        return frozenset()
    return frozenset(ips)


def _local_ips(pid: int) -> frozenset[str]:
    return _local_ipv4(pid) | _global_ipv6(pid)


def pod_netns_cookie(pid: int) -> int:
    """The cookie of pid's network namespace. Blocking: call from a worker thread."""
    return netns_cookie(f"/proc/{pid}/ns/net")


# How long a namespace that holds no wanted IP is not looked at again (unless new IPs are
# wanted): its addresses are read from two /proc files, and a node has many such namespaces
# (pods not in the mesh, the host's own) while the scan runs every `discovery_interval`.
OTHERS_RECHECK_S = 5.0


class NetnsScanner:
    """Maps wanted pod IPs to namespace cookies; keeps a cache across scans: of the namespaces
    found (by inode), and of the others' addresses, read again when new IPs are wanted or
    OTHERS_RECHECK_S later (an address may come to a namespace after it was looked at)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._cache: dict[int, PodNetns] = {}
        self._others: set[int] = set()  # inodes of namespaces that hold no wanted IP
        self._others_since = -math.inf
        self._wanted: frozenset[str] = frozenset()
        self._clock = clock
        self._own_inode = os.stat("/proc/self/ns/net").st_ino

    def scan(self, wanted_ips: set[str]) -> dict[str, PodNetns]:
        """Blocking (run in a thread). Returns pod IP -> namespace for the wanted IPs found."""
        seen: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                inode = os.stat(f"/proc/{entry.name}/ns/net").st_ino
            except OSError:
                continue
            if inode != self._own_inode:
                seen.setdefault(inode, int(entry.name))
        for inode in list(self._cache):
            if inode not in seen:
                del self._cache[inode]  # namespace gone
        self._others &= seen.keys()
        now = self._clock()
        if not wanted_ips <= self._wanted or now >= self._others_since + OTHERS_RECHECK_S:
            self._others.clear()  # new pods wanted, or time to look again
            self._others_since = now
        self._wanted = frozenset(wanted_ips)
        found: dict[str, PodNetns] = {}
        for inode, pid in seen.items():
            ns = self._cache.get(inode)
            if ns is None:
                if inode in self._others:
                    continue
                ips = _local_ips(pid)
                if not ips & wanted_ips:
                    self._others.add(inode)
                    continue
                try:
                    ns = PodNetns(inode=inode, pid=pid, cookie=pod_netns_cookie(pid), ips=ips)
                except OSError as exc:
                    log.debug("netns of pid %d: %s", pid, exc)
                    continue
                self._cache[inode] = ns
            for ip in ns.ips & wanted_ips:
                found[ip] = ns
        return found
