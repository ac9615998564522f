"""Issue #2: the README demo runs start to finish and shows what it says it shows."""

from __future__ import annotations

import subprocess

from tests.e2e.conftest import BIN, _require_root, meshlab


def test_demo_runs_start_to_finish():
    _require_root()
    meshlab("down", check=False)
    proc = subprocess.run(
        [str(BIN / "meshlab"), "demo"], capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "demo OK" in out
    assert "ok: node-1 eBPF redirect counter 0 -> 2" in out
    assert "ok: node-2 saw frontend's SPIFFE identity" in out
    assert "ok: frontend as jason is routed to reviews-v2" in out
    assert "ok: frontend as anyone else stays on reviews-v1 (5 of 5)" in out
    assert "ok: legacy/client (plaintext) is refused" in out
    assert "ok: intruder (same node as reviews, another identity) is refused" in out
    assert "FAILED" not in out
    assert "mesh_connect4" in out and "shop/reviews-v1" in out
    assert "left behind: nothing" in out
