"""The ctypes mirror in agent/datapath/maps.py matches bpf/meshagent.h, field by field.

Compiles a probe against the header with the host C compiler and compares the
sizes and offsets it prints with the mirror's.
"""

from __future__ import annotations

import ctypes
import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from meshagent.agent.datapath import maps

HEADER_DIR = Path(__file__).resolve().parents[2] / "bpf"


def _c_layout(tmp_path: Path) -> dict[str, int]:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "meshagent.h"',
        "int main(void) {",
    ]
    for cname, mirror in maps.MIRRORED_STRUCTS.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for field, _ in mirror._fields_:
            lines.append(f'printf("{cname}.{field} %zu\\n", offsetof(struct {cname}, {field}));')
    lines.append('printf("MESH_CTR_MAX %d\\n", MESH_CTR_MAX);')
    lines.append('printf("MESH_POD_FAIL_OPEN %d\\n", MESH_POD_FAIL_OPEN);')
    lines.append('printf("MESH_HEARTBEAT_TIMEOUT_NS %llu\\n", MESH_HEARTBEAT_TIMEOUT_NS);')
    for counter in maps.Counter:
        lines.append(f'printf("MESH_CTR_{counter.name} %d\\n", MESH_CTR_{counter.name});')
    lines.append("return 0; }")
    src = tmp_path / "probe.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "probe"
    subprocess.run(["cc", f"-I{HEADER_DIR}", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_mirror_matches_header(tmp_path):
    c = _c_layout(tmp_path)
    for cname, mirror in maps.MIRRORED_STRUCTS.items():
        assert c[cname] == ctypes.sizeof(mirror), cname
        for field, _ in mirror._fields_:
            assert c[f"{cname}.{field}"] == getattr(mirror, field).offset, f"{cname}.{field}"
    assert c["MESH_CTR_MAX"] == maps.COUNTER_MAX
    assert c["MESH_POD_FAIL_OPEN"] == maps.POD_FAIL_OPEN
    assert c["MESH_HEARTBEAT_TIMEOUT_NS"] == maps.DEFAULT_HEARTBEAT_TIMEOUT_NS
    for counter in maps.Counter:
        assert c[f"MESH_CTR_{counter.name}"] == counter.value


def test_ipv4_is_kept_mapped_in_network_order():
    addr = maps.to_addr("10.244.1.7")
    assert bytes(addr) == bytes([0] * 10 + [0xFF, 0xFF, 10, 244, 1, 7])
    assert maps.from_addr(addr) == "10.244.1.7"


def test_ipv6_round_trip_and_mapped_spelling():
    assert bytes(maps.to_addr("fd00:10:244:1::a"))[:4] == bytes([0xFD, 0x00, 0x00, 0x10])
    assert maps.from_addr(maps.to_addr("fd00:10:244:1::a")) == "fd00:10:244:1::a"
    # what an IPv6 socket that dialled an IPv4 address reports is the same key as IPv4
    assert bytes(maps.to_addr("::ffff:10.244.1.7")) == bytes(maps.to_addr("10.244.1.7"))
    assert maps.from_addr(maps.to_addr("::ffff:10.244.1.7")) == "10.244.1.7"
    assert maps.endpoint("10.0.0.1", 80).port == 80


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_addresses_are_packed_and_spelled_as_ipaddress_does(ip):
    """to_addr/from_addr take a shortcut for IPv4 (inet_pton/inet_ntop); every address still
    comes out as ipaddress packs and spells it (inet_ntop writes ``::1.2.3.4`` for some IPv6)."""
    mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip
    addr = maps.to_addr(str(ip))
    assert bytes(addr) == mapped.packed
    assert maps.from_addr(addr) == str(mapped.ipv4_mapped or mapped)


@pytest.mark.parametrize("bad", ["10.0.0", "10.0.0.256", "010.0.0.1", "", "fd00::g"])
def test_a_malformed_address_is_refused(bad):
    with pytest.raises(ValueError):
        maps.to_addr(bad)
