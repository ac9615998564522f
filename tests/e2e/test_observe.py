"""Issue #20: `meshagent observe`, the node's flows as they happen.

On the demo lab with `reviews-from-frontend` (only frontend's identity may call reviews), the
intruder (node-2, beside reviews) is refused; `meshagent observe --denied --json` on node-2
prints that request, naming the policy, within a second of it; every line is JSON.
"""

from __future__ import annotations

import json
import select
import subprocess
import threading
import time

from tests.e2e.conftest import BIN, EXAMPLES, meshlab
from tests.waiting import wait_until

URL = "http://reviews.shop:9080/"
READY_TIMEOUT = 30.0


def _until_watching(watch: subprocess.Popen) -> None:
    """Until `meshagent observe` says on stderr that it watches every proxy process (each
    tap registered it: any flow from then on is printed); the first stderr line."""
    ready, _, _ = select.select([watch.stderr], [], [], READY_TIMEOUT)
    assert ready, f"observe said nothing in {READY_TIMEOUT:.0f}s"
    line = watch.stderr.readline()
    assert line.startswith("watching flows from "), line + watch.stderr.read()


def test_observe_prints_the_denied_request_with_its_policy_within_a_second(demo_lab):
    meshlab("apply", "-f", str(EXAMPLES / "demo-policy.yaml"))
    wait_until(
        lambda: demo_lab.curl("shop/intruder", URL)[0],
        lambda code: code == "403",
        what="the intruder is refused",
        timeout=15,
    )
    watch = subprocess.Popen(
        [
            str(BIN / "meshlab"), "exec", "--node", "node-2", "--",
            "meshagent", "observe", "--denied", "--json", "--count", "1", "--timeout", "30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in watch.stdout:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _until_watching(watch)
        code, body = demo_lab.curl("shop/intruder", URL)
        answered = time.monotonic()
        assert code == "403" and "RBAC: access denied" in body
        watch.wait(timeout=30)
        reader.join(timeout=5)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, watch.stderr.read()
    assert len(lines) == 1, lines
    arrived, line = lines[0]
    assert arrived - answered < 1.0, f"printed {arrived - answered:.2f}s after the request"
    flow = json.loads(line)
    assert flow["source_workload"] == "intruder" and flow["source_namespace"] == "shop"
    assert flow["destination_service"] == "reviews.shop.svc.cluster.local"
    assert flow["response_code"] == 403 and flow["policy_decision"] == "deny"
    assert "shop/reviews-from-frontend" in (flow["policy"] or flow["policy_reason"]), flow


def test_observe_text_lines_and_filters(demo_lab):
    watch = subprocess.Popen(
        [
            str(BIN / "meshlab"), "exec", "--node", "node-2", "--",
            "meshagent", "observe", "-n", "shop", "--pod", "shop/intruder",
            "--count", "1", "--timeout", "30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        _until_watching(watch)
        demo_lab.curl("shop/frontend", URL)  # not the intruder's: filtered out
        demo_lab.curl("shop/intruder", URL)
        out, err = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, err
    (line,) = out.splitlines()
    assert "shop/intruder -> reviews.shop.svc.cluster.local" in line and " 403 " in line, line
