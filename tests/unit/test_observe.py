"""`meshagent observe`: the access log's tap (nothing while unwatched; every entry, with the
decision's reason, while watched, even with the log off) and the flow filters and lines."""

import json
import time

import trio
from meshagent.agent.observe import GREETING_TIMEOUT, FlowFilter, follow, render
from meshagent.agent.telemetry import AccessLog, AccessLogSettings
from meshagent.agent.telemetry.flows import FlowTap, _Watcher, flow_socket, serve_flow_tap
from meshagent.common.authz import Decision

from tests.unit.test_telemetry_accesslog import LABELS

NO_MATCH = Decision(False, "DENY", None, None, "denied: no ALLOW policy matched (checked shop/a)")


def _request(log: AccessLog, decision: Decision | None = None) -> bool:
    return log.http_request(
        LABELS,
        start=1_700_000_000.25,
        duration_ms=1.5,
        method="GET",
        path="/",
        response_code=403,
        bytes_sent=19,
        bytes_received=0,
        response_flags="RBAC",
        decision=decision,
    )


def test_the_tap_sees_every_entry_only_while_watched():
    tap = FlowTap()
    log = AccessLog(AccessLogSettings(output="off"), tap=tap)
    assert not _request(log, NO_MATCH) and not tap.watched
    watcher = _Watcher()
    tap._watchers.append(watcher)
    assert not _request(log, NO_MATCH)  # the log itself stays off
    flow = json.loads(watcher.receive.receive_nowait())
    assert flow["policy_decision"] == "deny" and flow["policy"] is None
    assert flow["policy_reason"] == NO_MATCH.reason
    assert flow["response_code"] == 403 and flow["source_workload"] == "frontend"


def test_a_slow_watcher_loses_lines_not_the_proxy_time():
    tap = FlowTap()
    watcher = _Watcher()
    tap._watchers.append(watcher)
    for _ in range(watcher.send.statistics().max_buffer_size + 5):
        tap.publish(b'{"a":1}\n', None)
    assert watcher.dropped == 5


def test_filters_and_the_line():
    flow = {
        "start_time": "2023-11-14T22:13:20.250Z",
        "kind": "http",
        "reporter": "destination",
        "source_namespace": "shop",
        "source_workload": "intruder",
        "destination_namespace": "shop",
        "destination_workload": "reviews",
        "destination_service": "reviews.shop.svc.cluster.local",
        "request_protocol": "http",
        "method": "GET",
        "path": "/",
        "response_code": 403,
        "response_flags": "RBAC",
        "policy_decision": "deny",
        "policy": "shop/deny-intruder",
        "duration_ms": 1.5,
        "bytes_sent": 19,
        "bytes_received": 0,
    }
    assert FlowFilter(namespace="shop", pod="shop/intruder", denied=True)(flow)
    assert FlowFilter(pod="reviews")(flow)
    assert not FlowFilter(namespace="other")(flow)
    assert not FlowFilter(pod="other/reviews")(flow)
    assert not FlowFilter(denied=True)({**flow, "policy_decision": "allow", "response_flags": "-"})
    line = render(flow)
    assert line.startswith("22:13:20.250 shop/intruder -> reviews.shop.svc.cluster.local")
    assert "http GET / 403 DENIED by shop/deny-intruder" in line


async def test_follow_reads_the_socket_of_each_process(tmp_path):
    taps = [FlowTap(), FlowTap()]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_flow_tap, taps[0], flow_socket(tmp_path))
        await nursery.start(serve_flow_tap, taps[1], flow_socket(tmp_path, 0))

        def watch() -> list[dict]:
            return list(follow(tmp_path, FlowFilter(denied=True), count=1, duration=10))

        async def feed() -> None:
            while not all(tap.watched for tap in taps):
                await trio.sleep(0.01)
            taps[0].publish(b'{"policy_decision":"allow"}\n', None)
            taps[1].publish(b'{"policy_decision":"deny"}\n', "denied by x")

        nursery.start_soon(feed)
        flows = await trio.to_thread.run_sync(watch)
        nursery.cancel_scope.cancel()
    assert flows == [{"policy_decision": "deny", "policy_reason": "denied by x"}]
    assert not list(tmp_path.glob("flows/*.sock"))  # removed when the taps stop


async def test_every_flow_after_ready_is_seen(tmp_path):
    """`on_ready` comes once each tap has registered the watcher (its hello), so a flow
    published right after it is never lost: what `meshagent observe` says on stderr."""
    taps = [FlowTap(), FlowTap()]
    ready = trio.Event()
    token = trio.lowlevel.current_trio_token()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_flow_tap, taps[0], flow_socket(tmp_path))
        await nursery.start(serve_flow_tap, taps[1], flow_socket(tmp_path, 0))
        seen: list[int] = []
        waited: list[float] = []

        def watch() -> list[dict]:
            started = time.monotonic()

            def on_ready(count: int) -> None:
                seen.append(count)
                waited.append(time.monotonic() - started)
                trio.from_thread.run_sync(ready.set, trio_token=token)

            flows = follow(tmp_path, FlowFilter(), count=2, duration=10, on_ready=on_ready)
            return list(flows)

        async def feed() -> None:
            await ready.wait()
            for i, tap in enumerate(taps):  # no waiting for `watched`: ready means watched
                tap.publish(b'{"n":%d}\n' % i, None)

        nursery.start_soon(feed)
        flows = await trio.to_thread.run_sync(watch)
        nursery.cancel_scope.cancel()
    assert seen == [2]
    assert waited[0] < GREETING_TIMEOUT / 2  # the hellos said it, not the timeout
    assert sorted(f["n"] for f in flows) == [0, 1]
