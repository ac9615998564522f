"""Thin ctypes wrappers around the bpf(2) commands userspace needs.

bcc compiles and loads the programs once; everything after that (pinning,
attaching to a cgroup, reading maps, listing what is attached) goes through
these calls on plain file descriptors. That keeps `meshagent status` and the
proxy's per-connection lookups free of bcc and working when only the pins are
left (agent down).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

_SYS_BPF = 321  # x86_64
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long

# enum bpf_cmd (include/uapi/linux/bpf.h)
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21

# enum bpf_attach_type
ATTACH_CGROUP_INET_INGRESS = 0
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_SK_SKB_STREAM_VERDICT = 5  # target: a sockmap/sockhash, not a cgroup
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_INET4_GETPEERNAME = 29
ATTACH_CGROUP_INET6_GETPEERNAME = 30

BPF_F_ALLOW_MULTI = 2
BPF_F_REPLACE = 4  # with ALLOW_MULTI: swap one attached program for another in place (5.6+)
BPF_ANY = 0

PROG_TYPE_NAMES = {8: "cgroup_skb", 13: "sock_ops", 14: "sk_skb", 18: "cgroup_sock_addr"}
ATTACH_TYPE_NAMES = {
    ATTACH_CGROUP_INET_INGRESS: "cgroup_inet_ingress",
    ATTACH_CGROUP_SOCK_OPS: "cgroup_sock_ops",
    ATTACH_CGROUP_INET4_CONNECT: "cgroup_inet4_connect",
    ATTACH_CGROUP_INET6_CONNECT: "cgroup_inet6_connect",
    ATTACH_CGROUP_INET4_GETPEERNAME: "cgroup_inet4_getpeername",
    ATTACH_CGROUP_INET6_GETPEERNAME: "cgroup_inet6_getpeername",
}


class BpfError(OSError):
    """A bpf(2) command failed; carries errno and which command."""


class _Attr(ctypes.Union):
    _fields_ = [("raw", ctypes.c_uint8 * 128)]


class _MapElem(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjPath(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _Attach(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("replace_bpf_fd", ctypes.c_uint32),
    ]


class _Query(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info, up to and including `name`."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _GetById(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


class _InfoByFd(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info, up to and including `name`."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    union = _Attr()
    ctypes.memmove(ctypes.byref(union), ctypes.byref(attr), ctypes.sizeof(attr))
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(union), ctypes.sizeof(union))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({what}): {os.strerror(err)}")
    ctypes.memmove(ctypes.byref(attr), ctypes.byref(union), ctypes.sizeof(attr))
    return ret


def _addr(obj: ctypes._CData) -> int:
    return ctypes.addressof(obj)


def obj_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(path.encode())
    _bpf(BPF_OBJ_PIN, _ObjPath(pathname=_addr(name), bpf_fd=fd), f"pin {path}")


def obj_get(path: str) -> int:
    """Open a pinned program or map; the caller owns the returned fd."""
    name = ctypes.create_string_buffer(path.encode())
    return _bpf(BPF_OBJ_GET, _ObjPath(pathname=_addr(name)), f"open {path}")


def prog_attach(prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
    attr = _Attach(
        target_fd=cgroup_fd,
        attach_bpf_fd=prog_fd,
        attach_type=attach_type,
        attach_flags=BPF_F_ALLOW_MULTI,
    )
    _bpf(BPF_PROG_ATTACH, attr, "attach")


def map_prog_attach(prog_fd: int, map_fd: int, attach_type: int) -> None:
    """Attach a program to a sockmap/sockhash (no flags: the map holds one per type)."""
    _bpf(
        BPF_PROG_ATTACH,
        _Attach(target_fd=map_fd, attach_bpf_fd=prog_fd, attach_type=attach_type),
        "attach to map",
    )


def prog_replace(prog_fd: int, cgroup_fd: int, attach_type: int, old_fd: int) -> None:
    """Put ``prog_fd`` where ``old_fd`` is attached, in one step: at no instant is neither
    (or both) of them attached (BPF_F_REPLACE)."""
    attr = _Attach(
        target_fd=cgroup_fd,
        attach_bpf_fd=prog_fd,
        attach_type=attach_type,
        attach_flags=BPF_F_ALLOW_MULTI | BPF_F_REPLACE,
        replace_bpf_fd=old_fd,
    )
    _bpf(BPF_PROG_ATTACH, attr, "replace")


def prog_detach(prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
    attr = _Attach(target_fd=cgroup_fd, attach_bpf_fd=prog_fd, attach_type=attach_type)
    _bpf(BPF_PROG_DETACH, attr, "detach")


def prog_query(cgroup_fd: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """Ids of the programs attached directly to a cgroup for one attach type."""
    ids = (ctypes.c_uint32 * max_progs)()
    attr = _Query(
        target_fd=cgroup_fd, attach_type=attach_type, prog_ids=_addr(ids), prog_cnt=max_progs
    )
    _bpf(BPF_PROG_QUERY, attr, "query")
    return list(ids[: attr.prog_cnt])


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _GetById(id=prog_id), f"prog {prog_id}")


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: str
    name: str


def prog_info(prog_fd: int) -> ProgInfo:
    info = _ProgInfo()
    attr = _InfoByFd(bpf_fd=prog_fd, info_len=ctypes.sizeof(info), info=_addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "prog info")
    kind = PROG_TYPE_NAMES.get(info.type, str(info.type))
    return ProgInfo(id=info.id, type=kind, name=info.name.decode(errors="replace"))


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int

    def same_layout(self, other: MapInfo) -> bool:
        """Whether entries of one can be written into the other as they are."""
        return (self.type, self.key_size, self.value_size) == (
            other.type,
            other.key_size,
            other.value_size,
        )


def map_info(map_fd: int) -> MapInfo:
    info = _MapInfo()
    attr = _InfoByFd(bpf_fd=map_fd, info_len=ctypes.sizeof(info), info=_addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "map info")
    return MapInfo(info.id, info.type, info.key_size, info.value_size, info.max_entries)


def map_lookup(fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    attr = _MapElem(map_fd=fd, key=_addr(key), value=_addr(value))
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr, "lookup")
    except BpfError as exc:
        if exc.errno == 2:  # ENOENT
            return False
        raise
    return True


def map_lookup_and_delete(fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    attr = _MapElem(map_fd=fd, key=_addr(key), value=_addr(value))
    try:
        _bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, attr, "lookup_and_delete")
    except BpfError as exc:
        if exc.errno == 2:
            return False
        raise
    return True


def map_update(fd: int, key: ctypes._CData, value: ctypes._CData) -> None:
    attr = _MapElem(map_fd=fd, key=_addr(key), value=_addr(value), flags=BPF_ANY)
    _bpf(BPF_MAP_UPDATE_ELEM, attr, "update")


def map_delete(fd: int, key: ctypes._CData) -> bool:
    attr = _MapElem(map_fd=fd, key=_addr(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr, "delete")
    except BpfError as exc:
        if exc.errno == 2:
            return False
        raise
    return True


def map_next_key(fd: int, key: ctypes._CData | None, next_key: ctypes._CData) -> bool:
    attr = _MapElem(map_fd=fd, key=_addr(key) if key is not None else 0, value=_addr(next_key))
    try:
        _bpf(BPF_MAP_GET_NEXT_KEY, attr, "next_key")
    except BpfError as exc:
        if exc.errno == 2:
            return False
        raise
    return True
