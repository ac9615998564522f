"""Loads, pins, attaches and removes the datapath's eBPF programs.

bcc compiles bpf/*.c at first start (one compile unit, so the maps of
bpf/maps.h exist once). Programs and maps are pinned under the agent's bpffs
folder and attached to the configured cgroup-v2 path with BPF_F_ALLOW_MULTI.
Attachments made with BPF_PROG_ATTACH outlive the agent process, so a restarted
agent finds its programs still attached and traffic still steered; it then
opens the pinned maps instead of compiling again (a restart serves in well under
a second), but only when what is pinned was built from the same sources, options
and kernel: a ``key-<sha256>`` folder beside the pins (bpffs holds folders, not
files) names what they were built from (`buildkey`), and any other key, or none,
means compile again and replace the pins, make before break (`swap`: the new
programs take the old ones' places one step per hook, their maps already filled, so
the node's connects are never left unsteered). Compiling runs in a short-lived helper
process (`build`), so the long-lived agent never holds bcc and LLVM (~130 MiB).
`uninstall` is the one place that detaches everything and unpins.

Kernel headers: bcc finds the running kernel's headers at
/lib/modules/<release>/build or in /sys/kernel/kheaders.tar.xz. Where the node has
neither, the image's own headers ($MESHAGENT_KERNEL_HEADERS, a nearby release) are
handed to bcc through BCC_KERNEL_SOURCE: the programs use only stable uapi types.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from meshagent.agent.config import AgentConfig
from meshagent.agent.datapath import bpfsys, buildkey, swap
from meshagent.agent.datapath.maps import ALL_MAPS, JOIN_MAPS, MAP_SOCK_JOIN, DatapathMaps

log = logging.getLogger(__name__)

HEADERS_ENV = "MESHAGENT_KERNEL_HEADERS"
BCC_SOURCE_ENV = "BCC_KERNEL_SOURCE"
KEY_PREFIX = "key-"
BUILD_TIMEOUT_S = 300.0  # bcc takes ~1 s; unpacking kernel headers the first time, longer


@dataclass(frozen=True)
class Hook:
    """One program: its C function, where it attaches, and its pin name."""

    function: str
    source: str
    attach_type: int

    @property
    def pin_name(self) -> str:
        return f"prog_{self.function}"


LIBRARY_SOURCES = ("counters.c", "redirect.c")
HOOKS = (
    Hook("mesh_connect4", "connect4.c", bpfsys.ATTACH_CGROUP_INET4_CONNECT),
    Hook("mesh_connect6", "connect6.c", bpfsys.ATTACH_CGROUP_INET6_CONNECT),
    Hook("mesh_peername4", "getpeername.c", bpfsys.ATTACH_CGROUP_INET4_GETPEERNAME),
    Hook("mesh_peername6", "getpeername.c", bpfsys.ATTACH_CGROUP_INET6_GETPEERNAME),
    Hook("mesh_sockops", "sockops.c", bpfsys.ATTACH_CGROUP_SOCK_OPS),
    Hook("mesh_ingress", "ingress.c", bpfsys.ATTACH_CGROUP_INET_INGRESS),
)
# The sk_skb stream verdict of same-node connections joined in the kernel (bpf/join.c): it
# attaches to the `sock_join` map, not to the cgroup, and goes when that map goes.
JOIN_HOOK = Hook("mesh_join_verdict", "join.c", bpfsys.ATTACH_SK_SKB_STREAM_VERDICT)
# sock_addr hooks: bcc must load each with the attach type it will be attached at.
_SOCK_ADDR_ATTACH = {
    bpfsys.ATTACH_CGROUP_INET4_CONNECT: "CGROUP_INET4_CONNECT",
    bpfsys.ATTACH_CGROUP_INET6_CONNECT: "CGROUP_INET6_CONNECT",
    bpfsys.ATTACH_CGROUP_INET4_GETPEERNAME: "CGROUP_INET4_GETPEERNAME",
    bpfsys.ATTACH_CGROUP_INET6_GETPEERNAME: "CGROUP_INET6_GETPEERNAME",
}


@dataclass(frozen=True)
class DatapathSettings:
    pin_dir: Path
    cgroup_path: Path
    proxy_ip: str
    proxy_port: int = 15001
    proxy_ip6: str | None = None  # without one, native IPv6 connects of meshed pods are refused

    def to_json(self) -> str:
        """For the build helper (stdin)."""
        return json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        )

    @classmethod
    def from_json(cls, text: str) -> DatapathSettings:
        raw = json.loads(text)
        return cls(
            **{**raw, "pin_dir": Path(raw["pin_dir"]), "cgroup_path": Path(raw["cgroup_path"])}
        )


class DatapathError(RuntimeError):
    """The datapath could not be built."""


def datapath_settings(config: AgentConfig) -> DatapathSettings:
    """The datapath an agent config describes (one place, for run, status and uninstall)."""
    return DatapathSettings(
        pin_dir=config.pin_dir,
        cgroup_path=config.cgroup_path,
        proxy_ip=config.proxy_ip,
        proxy_port=config.outbound_port,
        proxy_ip6=config.proxy_ip6,
    )


@dataclass(frozen=True)
class AttachedProgram:
    id: int
    type: str
    name: str
    attach_type: str
    cgroup: str
    pinned: bool


def _ip_host_order(ip: str) -> int:
    return int(ipaddress.IPv4Address(ip))


def _ip6_words(ip: str | None) -> tuple[int, int, int, int]:
    """An IPv6 address as four 32-bit groups (host-order values), zeros for None."""
    value = int(ipaddress.IPv6Address(ip)) if ip else 0
    return tuple((value >> shift) & 0xFFFFFFFF for shift in (96, 64, 32, 0))  # type: ignore[return-value]


def fallback_kernel_headers(
    release: str, env: Mapping[str, str], root: Path = Path("/")
) -> str | None:
    """The headers folder bcc must be pointed at, or None when bcc finds its own.

    None if the node has headers for ``release`` (a generated include folder under
    /lib/modules/<release>/build) or the kernel carries them (kheaders), or if the
    operator already chose BCC_KERNEL_SOURCE; else $MESHAGENT_KERNEL_HEADERS if set.
    """
    if env.get(BCC_SOURCE_ENV):
        return None
    build = root / "lib/modules" / release / "build/include/generated"
    if build.is_dir() or (root / "sys/kernel/kheaders.tar.xz").exists():
        return None
    return env.get(HEADERS_ENV) or None


def _use_fallback_headers() -> None:
    release = os.uname().release
    headers = fallback_kernel_headers(release, os.environ)
    if headers is None:
        return
    try:
        theirs = (Path(headers) / "RELEASE").read_text().strip()
    except OSError:
        theirs = "unknown release"
    log.warning(
        "datapath: no kernel headers for %s on this node; compiling against %s (%s)",
        release,
        headers,
        theirs,
    )
    os.environ[BCC_SOURCE_ENV] = headers


def _defines(settings: DatapathSettings) -> list[str]:
    """The compile options that depend on the node (and so belong to the build key)."""
    return [
        f"-DMESH_PROXY_IP4={_ip_host_order(settings.proxy_ip):#x}",
        f"-DMESH_PROXY_PORT={settings.proxy_port}",
        *(f"-DMESH_PROXY_IP6_{i}={w:#x}" for i, w in enumerate(_ip6_words(settings.proxy_ip6))),
        "-Wno-macro-redefined",
    ]


def build_key(settings: DatapathSettings, env: Mapping[str, str] = os.environ) -> str:
    """What the datapath for ``settings`` would be built from, as a key (module doc)."""
    release = os.uname().release
    headers = env.get(BCC_SOURCE_ENV) or fallback_kernel_headers(release, env) or ""
    bpf_dir = resources.files("meshagent.bpf")
    sources = {
        f.name: f.read_bytes()
        for f in bpf_dir.iterdir()
        if f.name.endswith(buildkey.SOURCE_SUFFIXES)
    }
    hooks = (*HOOKS, JOIN_HOOK)
    layout = [f"{h.pin_name}:{h.source}:{h.attach_type}" for h in hooks] + list(ALL_MAPS)
    return buildkey.datapath_key(
        sources, [*_defines(settings), f"headers={headers}"], release, layout
    )


def _compile_and_load(settings: DatapathSettings) -> dict[str, int]:
    """Compile every hook with bcc; returns pin name -> fd of programs and maps."""
    from bcc import BPF  # imported here (in the build helper): the agent never needs bcc

    _use_fallback_headers()

    bpf_dir = resources.files("meshagent.bpf")
    # bcc only turns functions of the main text into programs (and rewrites map
    # accesses only there), so the .c files are joined into one text rather than
    # #included; maps.h is included once at the top.
    sources = dict.fromkeys((*LIBRARY_SOURCES, *(h.source for h in (*HOOKS, JOIN_HOOK))))
    unit = '#include "maps.h"\n' + "".join(
        f'#line 1 "{name}"\n' + bpf_dir.joinpath(name).read_text() for name in sources
    )
    bpf = BPF(text=unit, cflags=[f"-I{bpf_dir}", *_defines(settings)])
    fds: dict[str, int] = {}
    for hook in HOOKS:
        if hook.attach_type in _SOCK_ADDR_ATTACH:
            from bcc import BPFAttachType

            fn = bpf.load_func(
                hook.function,
                BPF.CGROUP_SOCK_ADDR,
                attach_type=getattr(BPFAttachType, _SOCK_ADDR_ATTACH[hook.attach_type]),
            )
        elif hook.attach_type == bpfsys.ATTACH_CGROUP_SOCK_OPS:
            fn = bpf.load_func(hook.function, BPF.SOCK_OPS)
        else:
            fn = bpf.load_func(hook.function, BPF.CGROUP_SKB)
        fds[hook.pin_name] = os.dup(fn.fd)
    fds[JOIN_HOOK.pin_name] = os.dup(bpf.load_func(JOIN_HOOK.function, BPF.SK_SKB).fd)
    from bcc.libbcc import lib

    for name in ALL_MAPS:  # by fd: bcc 0.26's Table knows no sockhash
        fd = lib.bpf_table_fd(bpf.module, name.encode())
        if fd < 0:
            raise DatapathError(f"datapath: the compiled unit has no map {name}")
        fds[name] = os.dup(fd)
    bpf.cleanup()
    return fds


@contextlib.contextmanager
def _cgroup_fd(path: Path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _pinned_prog_id(pin_dir: Path, hook: Hook) -> int | None:
    try:
        fd = bpfsys.obj_get(str(pin_dir / hook.pin_name))
    except OSError:
        return None
    try:
        return bpfsys.prog_info(fd).id
    finally:
        os.close(fd)


def is_installed(settings: DatapathSettings) -> bool:
    """True when every hook's pinned program is attached to the cgroup and every map of
    this version is pinned (a datapath from an older version, which lacks a map, is
    replaced whole: its programs would not read the new map)."""
    if not settings.cgroup_path.is_dir() or swap.staging_dir(settings.pin_dir).exists():
        return False  # a swap cut short (`swap`): build again, which finishes the clean-up
    if not all((settings.pin_dir / name).exists() for name in (*ALL_MAPS, JOIN_HOOK.pin_name)):
        return False
    with _cgroup_fd(settings.cgroup_path) as cg:
        for hook in HOOKS:
            prog_id = _pinned_prog_id(settings.pin_dir, hook)
            if prog_id is None or prog_id not in bpfsys.prog_query(cg, hook.attach_type):
                return False
    return True


def pinned_key(pin_dir: Path) -> str | None:
    """The key of what is pinned at ``pin_dir`` (None: no pins, or pins without a key)."""
    try:
        names = [e.name for e in os.scandir(pin_dir) if e.name.startswith(KEY_PREFIX)]
    except OSError:
        return None
    return names[0].removeprefix(KEY_PREFIX) if len(names) == 1 else None


def install(settings: DatapathSettings) -> bool:
    """Make sure the programs are loaded, pinned and attached; returns True if it
    had to build them (False when a previous agent's, built from the same key, were
    still in place)."""
    key = build_key(settings)
    found = pinned_key(settings.pin_dir)
    if found == key and is_installed(settings):
        log.info(
            "datapath: reused pinned datapath at %s (key %s), still attached at %s",
            settings.pin_dir,
            key[:12],
            settings.cgroup_path,
        )
        return False
    if found is not None and found != key:
        log.info(
            "datapath: the pins at %s were built from other sources, options or kernel "
            "(key %s, this agent's %s); building again",
            settings.pin_dir,
            found[:12],
            key[:12],
        )
    _build_in_helper(settings)
    if pinned_key(settings.pin_dir) != key or not is_installed(settings):
        raise DatapathError(f"datapath: the build helper left no datapath of key {key[:12]}")
    return True


def _build_in_helper(settings: DatapathSettings) -> None:
    """`build(settings)` in a child process (module doc); its log lines go to our stderr."""
    argv = [sys.executable, "-m", "meshagent.agent.datapath.build"]
    try:
        proc = subprocess.run(argv, input=settings.to_json(), text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise DatapathError(f"datapath: the build helper took over {exc.timeout:.0f} s") from None
    if proc.returncode != 0:
        raise DatapathError(
            f"datapath: the build helper failed (exit {proc.returncode}); its error is logged above"
        )


def _our_program_ids(pin_dir: Path, hook: Hook) -> set[int]:
    """Ids of the hook's programs pinned live or staged (a swap cut short: `swap`)."""
    ids = {_pinned_prog_id(pin_dir, hook), _pinned_prog_id(swap.staging_dir(pin_dir), hook)}
    return {prog_id for prog_id in ids if prog_id is not None}


def build(settings: DatapathSettings) -> None:
    """Compile, fill and attach a new datapath in place of what is there, make before break
    (`swap`), then mark the pins with their key (last: a build cut short leaves another key
    or none, so the next start builds again)."""
    key = build_key(settings)
    pin_dir = settings.pin_dir
    pin_dir.mkdir(parents=True, exist_ok=True)
    ours = {hook.pin_name: _our_program_ids(pin_dir, hook) for hook in HOOKS}
    staging = swap.staging_dir(pin_dir)
    shutil.rmtree(staging, ignore_errors=True)  # a swap cut short: its programs are in `ours`
    fds = _compile_and_load(settings)
    try:
        staging.mkdir()
        for name, fd in fds.items():
            bpfsys.obj_pin(fd, str(staging / name))
        copied = {
            name: swap.copy_map(pin_dir / name, fds[name])
            for name in ALL_MAPS
            if name not in JOIN_MAPS  # live sockets: the new map starts empty (join.py)
        }
        bpfsys.map_prog_attach(fds[JOIN_HOOK.pin_name], fds[MAP_SOCK_JOIN], JOIN_HOOK.attach_type)
        with _cgroup_fd(settings.cgroup_path) as cg:
            for hook in HOOKS:
                swap.attach_in_place(cg, hook.attach_type, fds[hook.pin_name], ours[hook.pin_name])
    finally:
        for fd in fds.values():
            os.close(fd)
    swap.promote(pin_dir, list(fds), f"{KEY_PREFIX}{key}")
    replaced = sum(1 for ids in ours.values() if ids)
    log.info(
        "datapath: compiled and attached %d programs at %s (key %s), %d of them in place of "
        "the previous ones; carried over from the previous maps: %s",
        len(HOOKS),
        settings.cgroup_path,
        key[:12],
        replaced,
        ", ".join(f"{name} {n}" for name, n in copied.items() if n is not None) or "nothing",
    )


def uninstall(settings: DatapathSettings) -> None:
    """Detach our programs (live and staged) from the cgroup and remove every pin.
    Idempotent."""
    if settings.cgroup_path.is_dir():
        with _cgroup_fd(settings.cgroup_path) as cg:
            for hook in HOOKS:
                for folder in (settings.pin_dir, swap.staging_dir(settings.pin_dir)):
                    try:
                        fd = bpfsys.obj_get(str(folder / hook.pin_name))
                    except OSError:
                        continue
                    try:
                        bpfsys.prog_detach(fd, cg, hook.attach_type)
                    except OSError as exc:
                        log.debug("detach %s: %s", hook.function, exc)
                    finally:
                        os.close(fd)
    if settings.pin_dir.exists():
        shutil.rmtree(settings.pin_dir, ignore_errors=True)


def open_maps(settings: DatapathSettings) -> DatapathMaps:
    return DatapathMaps.open(settings.pin_dir)


def attached_programs(settings: DatapathSettings) -> list[AttachedProgram]:
    """What is attached at the cgroup for our attach types (ours or not), for status."""
    if not settings.cgroup_path.is_dir():
        return []
    pinned = {h.pin_name: _pinned_prog_id(settings.pin_dir, h) for h in HOOKS}
    out = []
    with _cgroup_fd(settings.cgroup_path) as cg:
        for attach_type in sorted({h.attach_type for h in HOOKS}):
            for prog_id in bpfsys.prog_query(cg, attach_type):
                fd = bpfsys.prog_fd_by_id(prog_id)
                try:
                    info = bpfsys.prog_info(fd)
                finally:
                    os.close(fd)
                out.append(
                    AttachedProgram(
                        id=info.id,
                        type=info.type,
                        name=info.name,
                        attach_type=bpfsys.ATTACH_TYPE_NAMES[attach_type],
                        cgroup=str(settings.cgroup_path),
                        pinned=prog_id in pinned.values(),
                    )
                )
    return out
