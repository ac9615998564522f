"""The key a pinned datapath is reused by (agent/datapath/buildkey.py, loader.build_key): any
change to what the programs are compiled from gives another key, so a restarted agent
compiles again instead of reusing stale programs."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshagent.agent.datapath import buildkey, loader

SOURCES = {"maps.h": b"struct a { int x; };\n", "connect4.c": b"int f(void) { return 1; }\n"}
OPTIONS = ["-DMESH_PROXY_PORT=15001"]
LAYOUT = ["prog_mesh_connect4:connect4.c:10", "orig_dst"]
RELEASE = "6.18.0"


def key(**changes) -> str:
    args = {"sources": SOURCES, "options": OPTIONS, "release": RELEASE, "layout": LAYOUT}
    return buildkey.datapath_key(**{**args, **changes})


def test_the_same_build_has_the_same_key_whatever_the_order_of_the_sources():
    assert key() == key(sources=dict(reversed(SOURCES.items())))
    assert len(key()) == 64 and int(key(), 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        {"sources": {**SOURCES, "connect4.c": b"int f(void) { return 2; }\n"}},  # one byte
        {"sources": {**SOURCES, "maps.h": SOURCES["maps.h"] + b"\n"}},  # a header
        {"sources": {**SOURCES, "sockops.c": b""}},  # a new file
        {"sources": {"maps.h": SOURCES["maps.h"]}},  # a file gone
        {"sources": {"connect5.c" if n == "connect4.c" else n: v for n, v in SOURCES.items()}},
        {"options": ["-DMESH_PROXY_PORT=15002"]},
        {"release": "6.18.1"},
        {"layout": [*LAYOUT, "heartbeat"]},
    ],
)
def test_any_change_to_what_is_compiled_changes_the_key(change):
    assert key(**change) != key()


def settings(**changes) -> loader.DatapathSettings:
    base = {"pin_dir": Path("/sys/fs/bpf/x"), "cgroup_path": Path("/sys/fs/cgroup/x")}
    return loader.DatapathSettings(**{**base, "proxy_ip": "10.0.0.1", **changes})


def test_the_agents_key_covers_the_compiled_in_proxy_address_and_the_headers():
    env = {loader.HEADERS_ENV: ""}
    ours = loader.build_key(settings(), env)
    assert loader.build_key(settings(), env) == ours
    # Where the pins are is not what they were built from.
    assert loader.build_key(settings(pin_dir=Path("/elsewhere")), env) == ours
    assert loader.build_key(settings(proxy_ip="10.0.0.2"), env) != ours
    assert loader.build_key(settings(proxy_port=15002), env) != ours
    assert loader.build_key(settings(proxy_ip6="fd00::1"), env) != ours
    assert loader.build_key(settings(), {loader.BCC_SOURCE_ENV: "/opt/headers"}) != ours


def test_the_agents_key_covers_every_bpf_source(tmp_path, monkeypatch):
    """A copy of bpf/ with one byte changed in one file gives another key."""
    real = loader.resources.files("meshagent.bpf")
    copy = tmp_path / "bpf"
    copy.mkdir()
    for f in real.iterdir():
        if f.name.endswith(buildkey.SOURCE_SUFFIXES):
            (copy / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(loader.resources, "files", lambda _package: copy)
    env = {loader.HEADERS_ENV: ""}
    ours = loader.build_key(settings(), env)
    assert sorted(p.name for p in copy.iterdir()) == sorted(
        f.name for f in real.iterdir() if f.name.endswith((".c", ".h"))
    )
    for name in ("redirect.c", "maps.h"):
        original = (copy / name).read_bytes()
        (copy / name).write_bytes(original + b"/* changed */\n")
        assert loader.build_key(settings(), env) != ours, name
        (copy / name).write_bytes(original)
        assert loader.build_key(settings(), env) == ours


def test_pinned_key_reads_the_one_key_folder(tmp_path):
    assert loader.pinned_key(tmp_path / "absent") is None
    (tmp_path / "orig_dst").touch()
    assert loader.pinned_key(tmp_path) is None  # pins of an agent from before keys
    (tmp_path / "key-abc").mkdir()
    assert loader.pinned_key(tmp_path) == "abc"
    (tmp_path / "key-def").mkdir()
    assert loader.pinned_key(tmp_path) is None  # ambiguous: built again


def test_settings_reach_the_build_helper_unchanged():
    for s in (settings(), settings(proxy_ip6="fd00::1", proxy_port=15011)):
        assert loader.DatapathSettings.from_json(s.to_json()) == s
