"""Issue #15 item 4: HTTP/2 abuse of the pod-facing proxy, from a pod, through the mesh.

A pod on node-1 floods an `http2-*` Service port (nginx h2c on node-2 behind it) with the `h2`
library (`apps/h2_flood.py`): a rapid reset (CVE-2023-44487) and a CONTINUATION flood. Node-1's
proxy, whose HTTP/2 engine serves the pod's connection with the frame guard it shares with
15008, ends each connection with GOAWAY ENHANCE_YOUR_CALM and the reason, counts it in
`meshagent_http2_abuse_total{listener="pod"}`; a normal h2c request from another pod right
after is served, and each proxy worker's RSS is back within 10 % of before once the flood ended.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import APPS, meshlab, render_manifest
from tests.e2e.nginx import write_conf
from tests.e2e.test_grpc_l7 import NGINX_HTTP
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifests" / "h2-abuse.yaml"
VENV_PYTHON = sys.executable  # the project's venv: h2, hpack, hyperframe
TARGET = ("web.h2a", "8082")
ENHANCE_YOUR_CALM = 0xB


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("h2-abuse")
    write_conf(folder, "web", NGINX_HTTP.format(dir=folder, name="web"))
    lab = lab_factory(render_manifest(MANIFEST, folder, NGINX=folder), nodes=2)
    url = f"http://{TARGET[0]}:{TARGET[1]}/"
    h2c = "--http2-prior-knowledge"
    lab.wait_answer("h2a/client", url, h2c, what="web answers h2c through the mesh")
    return lab


def _h2c(lab, pod: str) -> str:
    code, _ = lab.curl(pod, f"http://{TARGET[0]}:{TARGET[1]}/", "--http2-prior-knowledge")
    return code


def _abuse(kind: str) -> float:
    page = meshlab("exec", "--node", "node-1", "--", "curl", "-s", "127.0.0.1:15020/metrics").stdout
    return sum(
        s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name == "meshagent_http2_abuse_total"
        and s.labels.get("listener") == "pod"
        and s.labels.get("kind") == kind
    )


def _rss(pid: int) -> int:
    """Resident set of a process, in KiB (/proc/PID/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _worker_rss(lab) -> dict[int, int]:
    workers = lab.status("node-1")["agent"]["workers"]
    assert workers and all(w["pid"] for w in workers), workers
    return {w["pid"]: _rss(w["pid"]) for w in workers}


@pytest.mark.parametrize(
    ("flood", "count", "kind", "reason"),
    [
        ("rapid-reset", 20_000, "rapid_reset", "streams reset within"),
        ("continuation", 10_000, "continuation", "CONTINUATION frames"),
    ],
)
def test_a_flood_gets_goaway_and_the_proxy_serves_on_with_bounded_memory(
    lab, flood, count, kind, reason
):
    for _ in range(20):  # warm: the worker has served h2c before it is measured
        assert _h2c(lab, "h2a/client") == "200"
    before = _worker_rss(lab)
    counted = _abuse(kind)
    proc = meshlab(
        "exec", "h2a/attacker", "--", VENV_PYTHON, str(APPS / "h2_flood.py"),
        flood, *TARGET, str(count),
        timeout=60,
    )  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    goaway = result["goaway"]
    assert goaway is not None, result
    assert goaway["error_code"] == ENHANCE_YOUR_CALM, result
    assert reason in goaway["debug"], result
    assert result["seconds"] < 20, result  # ended by the server, not by the flood's deadline
    wait_until(lambda: _abuse(kind), lambda n: n == counted + 1, what=f"{kind} counted")
    assert _h2c(lab, "h2a/client") == "200"  # another pod, right after
    after = wait_until(
        lambda: _worker_rss(lab),
        lambda now: (
            now.keys() == before.keys() and all(now[pid] <= before[pid] * 1.10 for pid in before)
        ),
        what=f"node-1's proxy workers' RSS within 10 % of {before} after the {flood} flood",
        timeout=30,
        interval=0.5,
    )
    assert after.keys() == before.keys()  # no worker was restarted by the flood
