"""The Python mirror of bpf/meshagent.h and bpf/maps.h, and typed access to the maps.

Every struct the programs share with userspace is declared once in C and once
here; tests/unit/test_map_layout.py compiles the header and compares sizes and
offsets. Map names here are the names in maps.h, which are also the names of
their pins.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from meshagent.agent.datapath import bpfsys


class MeshAddr(ctypes.Structure):
    """struct mesh_addr: 16 bytes in network order; IPv4 in its mapped form ::ffff:a.b.c.d."""

    _fields_ = [("ip6", ctypes.c_uint8 * 16)]


class MeshPod(ctypes.Structure):
    """struct mesh_pod: the pod's primary IP (the key of its peer_auth entries)."""

    _fields_ = [("addr", MeshAddr), ("flags", ctypes.c_uint32)]


class MeshHeartbeat(ctypes.Structure):
    """struct mesh_heartbeat: the owning agent's last beat and the age at which it counts as
    down, both in CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns's clock)."""

    _fields_ = [("beat_ns", ctypes.c_uint64), ("timeout_ns", ctypes.c_uint64)]


class MeshEndpoint(ctypes.Structure):
    """struct mesh_endpoint: address as MeshAddr, port in host order."""

    _fields_ = [("addr", MeshAddr), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class MeshJoin(ctypes.Structure):
    """struct mesh_join: the partner socket's cookie, and the bytes sent on to it in the kernel."""

    _fields_ = [("partner", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class Counter(IntEnum):
    """enum mesh_counter"""

    REDIRECTED = 0
    EXCLUDED = 1
    ESTABLISHED = 2
    INFLIGHT_MISS = 3
    STRICT_DROPPED = 4
    REDIRECTED_IPV6 = 5
    REFUSED = 6
    PEER_RESTORED = 7
    FAIL_OPEN = 8
    FAIL_CLOSED = 9
    JOIN_REDIRECTED = 10
    JOIN_UNPAIRED = 11


POD_FAIL_OPEN = 1  # enum mesh_pod_flag
DEFAULT_HEARTBEAT_TIMEOUT_NS = 1_000_000_000  # MESH_HEARTBEAT_TIMEOUT_NS


class MtlsMode(IntEnum):
    """enum mesh_mtls_mode"""

    PERMISSIVE = 0
    STRICT = 1


COUNTER_MAX = 12

# Map names, as declared in bpf/maps.h and pinned by the loader.
MAP_MESH_NETNS = "mesh_netns"
MAP_INFLIGHT = "inflight"
MAP_ORIG_DST = "orig_dst"
MAP_EXCLUDED_PORTS = "excluded_ports"
MAP_COUNTERS = "counters"
MAP_PEER_AUTH = "peer_auth"
MAP_TRUSTED_SOURCES = "trusted_sources"
MAP_HEARTBEAT = "heartbeat"
MAP_SOCK_JOIN = "sock_join"
MAP_JOIN_PEER = "join_peer"
# Maps of live sockets (agent/datapath/join.py): a new build starts them empty, never copies.
JOIN_MAPS = (MAP_SOCK_JOIN, MAP_JOIN_PEER)
ALL_MAPS = (
    MAP_MESH_NETNS,
    MAP_INFLIGHT,
    MAP_ORIG_DST,
    MAP_EXCLUDED_PORTS,
    MAP_COUNTERS,
    MAP_PEER_AUTH,
    MAP_TRUSTED_SOURCES,
    MAP_HEARTBEAT,
    *JOIN_MAPS,
)

# Layout facts the test compares against the C header (name -> (size, {field: offset})).
MIRRORED_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "mesh_addr": MeshAddr,
    "mesh_pod": MeshPod,
    "mesh_endpoint": MeshEndpoint,
    "mesh_heartbeat": MeshHeartbeat,
    "mesh_join": MeshJoin,
}


_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def to_addr(ip: str) -> MeshAddr:
    """An IPv4 or IPv6 address as the datapath keeps it (IPv4 as ::ffff:a.b.c.d). An IPv4
    address (each accepted connection's client) is packed by inet_pton: ipaddress's parse
    was ~20 Python calls."""
    if ":" not in ip:
        try:
            return MeshAddr.from_buffer_copy(_V4_MAPPED + socket.inet_pton(socket.AF_INET, ip))
        except OSError:
            pass  # ipaddress says what is wrong with it
    parsed = ipaddress.ip_address(ip)
    if parsed.version == 4:
        parsed = ipaddress.IPv6Address(_V4_MAPPED + parsed.packed)
    return MeshAddr.from_buffer_copy(parsed.packed)


def from_addr(addr: MeshAddr) -> str:
    """The address as the proxy and the snapshot write it (an IPv4-mapped one as IPv4;
    IPv6 as ipaddress writes it, which inet_ntop does not always: ``::1.2.3.4``)."""
    packed = bytes(addr.ip6)
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return str(ipaddress.IPv6Address(packed))


def endpoint(ip: str, port: int) -> MeshEndpoint:
    return MeshEndpoint(addr=to_addr(ip), port=port)


def monotonic_ns() -> int:
    """Now on the clock the programs compare the heartbeat with (bpf_ktime_get_ns)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def fail_mode_flags(mode: str) -> int:
    """mesh_pod.flags for a fail mode; anything but `open` is `closed` (the safe one)."""
    return POD_FAIL_OPEN if mode == "open" else 0


def fail_mode_of(flags: int) -> str:
    return "open" if flags & POD_FAIL_OPEN else "closed"


def possible_cpus() -> int:
    """Number of slots in a per-CPU map value (the kernel's possible CPUs)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


class PinnedMap:
    """One BPF map opened from its pin; owns the fd."""

    def __init__(self, path: Path, key_type: type, value_type: type) -> None:
        self.path = path
        self.fd = bpfsys.obj_get(str(path))
        self.id = bpfsys.map_info(self.fd).id
        self.key_type = key_type
        self.value_type = value_type
        self._replaced: list[int] = []  # fds of maps the pin named before (`follow_pin`)

    def follow_pin(self) -> bool:
        """Use the map the pin names now if a datapath swap (datapath/swap.py) put another
        one there; True if it did. The previous fd stays open until `close`: another thread
        may be in a call on it (the heartbeat beats in its own), and a swap is rare."""
        try:
            fd = bpfsys.obj_get(str(self.path))
        except OSError:
            return False  # unpinned (uninstall): keep the map we have
        map_id = bpfsys.map_info(fd).id
        if map_id == self.id:
            os.close(fd)
            return False
        self._replaced.append(self.fd)
        self.fd, self.id = fd, map_id
        return True

    def close(self) -> None:
        for fd in self._replaced:
            os.close(fd)
        self._replaced.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lookup(self, key: ctypes._CData) -> ctypes._CData | None:
        value = self.value_type()
        return value if bpfsys.map_lookup(self.fd, key, value) else None

    def pop(self, key: ctypes._CData) -> ctypes._CData | None:
        value = self.value_type()
        return value if bpfsys.map_lookup_and_delete(self.fd, key, value) else None

    def update(self, key: ctypes._CData, value: ctypes._CData) -> None:
        bpfsys.map_update(self.fd, key, value)

    def delete(self, key: ctypes._CData) -> bool:
        return bpfsys.map_delete(self.fd, key)

    def iter_keys(self) -> Iterator[ctypes._CData]:
        key = None
        while True:
            nxt = self.key_type()
            if not bpfsys.map_next_key(self.fd, key, nxt):
                return
            yield nxt
            key = nxt

    def items(self) -> Iterator[tuple[ctypes._CData, ctypes._CData]]:
        for key in list(self.iter_keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value


@dataclass
class DatapathMaps:
    """All the datapath's maps, opened from the pins under one bpffs folder."""

    mesh_netns: PinnedMap
    orig_dst: PinnedMap
    excluded_ports: PinnedMap
    counters: PinnedMap
    peer_auth: PinnedMap
    trusted_sources: PinnedMap
    heartbeat: PinnedMap

    @classmethod
    def open(cls, pin_dir: Path) -> DatapathMaps:
        ncpu = possible_cpus()
        return cls(
            mesh_netns=PinnedMap(pin_dir / MAP_MESH_NETNS, ctypes.c_uint64, MeshPod),
            orig_dst=PinnedMap(pin_dir / MAP_ORIG_DST, MeshEndpoint, MeshEndpoint),
            excluded_ports=PinnedMap(pin_dir / MAP_EXCLUDED_PORTS, ctypes.c_uint16, ctypes.c_uint8),
            counters=PinnedMap(pin_dir / MAP_COUNTERS, ctypes.c_uint32, ctypes.c_uint64 * ncpu),
            peer_auth=PinnedMap(pin_dir / MAP_PEER_AUTH, MeshEndpoint, ctypes.c_uint8),
            trusted_sources=PinnedMap(pin_dir / MAP_TRUSTED_SOURCES, MeshAddr, ctypes.c_uint8),
            heartbeat=PinnedMap(pin_dir / MAP_HEARTBEAT, ctypes.c_uint32, MeshHeartbeat),
        )

    def _all(self) -> tuple[PinnedMap, ...]:
        return (
            self.mesh_netns,
            self.orig_dst,
            self.excluded_ports,
            self.counters,
            self.peer_auth,
            self.trusted_sources,
            self.heartbeat,
        )

    def close(self) -> None:
        for m in self._all():
            m.close()

    def follow_pins(self) -> bool:
        """Move to the maps the pins name now, where a newer agent swapped in a new build
        (datapath/swap.py) while this one serves: its beats and pod updates must reach the
        maps the attached programs read. True if any moved."""
        return any([m.follow_pin() for m in self._all()])

    # -- typed operations used by the agent -------------------------------------------

    def read_counters(self) -> dict[str, int]:
        out = {}
        for counter in Counter:
            value = self.counters.lookup(ctypes.c_uint32(counter))
            out[counter.name.lower()] = sum(value) if value is not None else 0
        return out

    def meshed_netns(self) -> dict[int, str]:
        """netns cookie -> pod IP of every meshed namespace."""
        return {cookie: ip for cookie, (ip, _mode) in self.meshed_pods().items()}

    def meshed_pods(self) -> dict[int, tuple[str, str]]:
        """netns cookie -> (pod IP, fail mode) of every meshed namespace."""
        return {
            key.value: (from_addr(val.addr), fail_mode_of(val.flags))
            for key, val in self.mesh_netns.items()
        }

    def set_meshed(self, cookie: int, ip: str, fail_mode: str = "closed") -> None:
        """Mark a namespace meshed; `ip` is the pod's primary IP (its peer_auth key),
        `fail_mode` what its connects do while the agent is down."""
        self.mesh_netns.update(
            ctypes.c_uint64(cookie), MeshPod(addr=to_addr(ip), flags=fail_mode_flags(fail_mode))
        )

    def beat(self, timeout_s: float, now_ns: int | None = None) -> None:
        """Refresh the heartbeat: the agent serves; it counts as down `timeout_s` from now.
        Each beat first follows the pins (`follow_pins`), so a swap is picked up within a
        beat interval, well inside the timeout."""
        self.follow_pins()
        self.heartbeat.update(
            ctypes.c_uint32(0),
            MeshHeartbeat(
                beat_ns=monotonic_ns() if now_ns is None else now_ns,
                timeout_ns=max(1, int(timeout_s * 1e9)),
            ),
        )

    def heartbeat_age(self) -> tuple[float | None, float]:
        """(seconds since the last beat or None if never, the timeout in seconds)."""
        value = self.heartbeat.lookup(ctypes.c_uint32(0))
        if value is None or not value.beat_ns:
            timeout = value.timeout_ns if value is not None and value.timeout_ns else 0
            return None, (timeout or DEFAULT_HEARTBEAT_TIMEOUT_NS) / 1e9
        timeout = value.timeout_ns or DEFAULT_HEARTBEAT_TIMEOUT_NS
        return (monotonic_ns() - value.beat_ns) / 1e9, timeout / 1e9

    def unset_meshed(self, cookie: int) -> None:
        self.mesh_netns.delete(ctypes.c_uint64(cookie))

    def set_excluded_ports(self, ports: set[int]) -> None:
        current = {k.value for k in self.excluded_ports.iter_keys()}
        for port in ports - current:
            self.excluded_ports.update(ctypes.c_uint16(port), ctypes.c_uint8(1))
        for port in current - ports:
            self.excluded_ports.delete(ctypes.c_uint16(port))

    def peer_auth_entries(self) -> dict[tuple[str, int], MtlsMode]:
        """(pod ip, port) -> mode; port 0 is the pod-wide mode."""
        return {(from_addr(k.addr), k.port): MtlsMode(v.value) for k, v in self.peer_auth.items()}

    def set_peer_auth(self, wanted: dict[tuple[str, int], MtlsMode]) -> None:
        """Make the peer_auth map exactly `wanted` (adds, changes, removes)."""
        current = self.peer_auth_entries()
        for (ip, port), mode in wanted.items():
            if current.get((ip, port)) != mode:
                self.peer_auth.update(endpoint(ip, port), ctypes.c_uint8(mode))
        for ip, port in current.keys() - wanted.keys():
            self.peer_auth.delete(endpoint(ip, port))

    def set_trusted_sources(self, ips: set[str]) -> None:
        ips = {from_addr(to_addr(ip)) for ip in ips}  # one spelling per address
        current = {from_addr(k) for k in self.trusted_sources.iter_keys()}
        for ip in ips - current:
            self.trusted_sources.update(to_addr(ip), ctypes.c_uint8(1))
        for ip in current - ips:
            self.trusted_sources.delete(to_addr(ip))

    def pop_orig_dst(self, client_ip: str, client_port: int) -> tuple[str, int] | None:
        """Consume the original destination of an accepted, redirected connection."""
        value = self.orig_dst.pop(endpoint(client_ip, client_port))
        if value is None and self.orig_dst.follow_pin():  # redirected by a swapped-in build
            value = self.orig_dst.pop(endpoint(client_ip, client_port))
        if value is None:
            return None
        return from_addr(value.addr), value.port
