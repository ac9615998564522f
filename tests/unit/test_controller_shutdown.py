"""The controller's clean shutdown: SIGTERM/SIGINT end `Controller.run`, the Lease is handed
back at once, agents are told goodbye with the reason; Lease times keep six fractional
digits; the HTTP client's per-request lines stay off at the default log level."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import ssl
from datetime import UTC, datetime

import pytest
import trio
from lightkube import KubeConfig
from meshagent.common.configwire import MessageStream
from meshagent.controller import leader as leader_module
from meshagent.controller.app import Controller, ControllerSettings, quiet_client_logs
from meshagent.controller.leader import LeaderElector
from meshagent.controller.sources.kubernetes import open_kube_client

from tests.fakes.kube_apiserver import open_fake_apiserver
from tests.unit.test_push_stream import running_controller

TIMEOUT = 10
NAMESPACE = "meshagent-system"
FAST = {"lease_duration": 1, "renew_deadline": 0.6, "retry_period": 0.1}
MICRO_TIME = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$"


class _OnTheSecond(datetime):
    """A clock that reads whole seconds, as it does once in a million calls."""

    @classmethod
    def now(cls, tz=None):  # type: ignore[override]
        return datetime(2026, 1, 2, 3, 4, 5, tzinfo=tz or UTC)


async def test_lease_times_always_have_six_fractional_digits(monkeypatch) -> None:
    monkeypatch.setattr(leader_module, "datetime", _OnTheSecond)
    async with open_fake_apiserver() as api:
        # another client wrote the Lease with whole-second times
        api.create(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": "meshctl", "namespace": NAMESPACE},
                "spec": {
                    "holderIdentity": "",
                    "acquireTime": "2026-01-01T00:00:00.000000Z",
                    "renewTime": "2026-01-01T00:00:00.000000Z",
                },
            }
        )
        with trio.fail_after(TIMEOUT):
            async with (
                open_kube_client(KubeConfig.from_dict(api.kubeconfig())) as client,
                trio.open_nursery() as nursery,
            ):
                a = LeaderElector(client, NAMESPACE, "meshctl-a", **FAST)
                await nursery.start(a.serve)
                assert a.is_leader
                await trio.sleep(0.3)  # a few renewals
                nursery.cancel_scope.cancel()
        (lease,) = api.objects("Lease")
    spec = lease["spec"]
    assert spec["renewTime"] == "2026-01-02T03:04:05.000001Z"
    assert spec["acquireTime"] == "2026-01-02T03:04:05.000001Z"

    for key in ("renewTime", "acquireTime"):
        assert re.match(MICRO_TIME, spec[key]), spec[key]


async def test_resign_hands_the_lease_over_and_serve_returns() -> None:
    async with open_fake_apiserver() as api:
        with trio.fail_after(TIMEOUT):
            async with (
                open_kube_client(KubeConfig.from_dict(api.kubeconfig())) as client,
                trio.open_nursery() as nursery,
            ):
                a = LeaderElector(client, NAMESPACE, "meshctl-a", **FAST)
                b = LeaderElector(client, NAMESPACE, "meshctl-b", **FAST)
                returned = trio.Event()

                async def serve_a(task_status: trio.TaskStatus[None]) -> None:
                    await a.serve(task_status=task_status)
                    returned.set()

                await nursery.start(serve_a)
                await nursery.start(b.serve)
                assert a.is_leader
                await a.resign()
                assert not a.is_leader
                assert api.objects("Lease")[0]["spec"]["holderIdentity"] in ("", "meshctl-b")
                resigned = trio.current_time()
                with trio.fail_after(1):
                    await returned.wait()
                while not b.is_leader:
                    await trio.sleep(0.01)
                assert trio.current_time() - resigned < 0.5  # no waiting out the lease
                await trio.sleep(0.3)
                assert not a.is_leader  # resigned for good: no campaigning again
                nursery.cancel_scope.cancel()


async def test_resign_before_serving_is_a_no_op() -> None:
    elector = LeaderElector(None, NAMESPACE, "x", **FAST)  # type: ignore[arg-type]
    with trio.fail_after(1):
        await elector.resign()


async def _hello(port: int, token: str, root: str) -> MessageStream:

    context = ssl.create_default_context(cafile=root)
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    wire = MessageStream(stream)
    await wire.send({"type": "hello", "node": "node-1", "token": token, "version": ""})
    return wire


async def test_agents_are_told_goodbye_with_the_reason(tmp_path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_controller(tmp_path) as controller:
            root = str(controller.root)
            wire = await _hello(controller.port, controller.tokens["node-1"], root)
            first = await wire.receive()
            assert first is not None and first["type"] == "snapshot"
            told = await controller.server.close_streams("controller x is shutting down")
            assert told == 1
            assert await wire.receive() == {
                "type": "goodbye",
                "reason": "controller x is shutting down",
            }
            # an agent connecting now gets only the goodbye
            late = await _hello(controller.port, controller.tokens["node-2"], root)
            assert (await late.receive() or {}).get("type") == "goodbye"
            with contextlib.suppress(trio.BrokenResourceError):  # RST: our hello unread
                assert await late.receive() is None
            await wire.stream.aclose()
            await late.stream.aclose()


def _settings(tmp_path) -> ControllerSettings:
    (tmp_path / "cluster").mkdir()
    tokens = tmp_path / "node-tokens.json"
    tokens.write_text(json.dumps({}))
    return ControllerSettings(
        listen_host="127.0.0.1",
        listen_port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        manifest_dir=tmp_path / "cluster",
        ca_file=tmp_path / "ca.pem",
        node_tokens=tokens,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_ends_run_cleanly(tmp_path, signum, caplog) -> None:
    controller = Controller(_settings(tmp_path))
    caplog.set_level(logging.INFO)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(controller.run)
            while controller.push is None or not controller.stream_sockets:
                await trio.sleep(0.01)
            os.kill(os.getpid(), signum)
        # run() returned: no exception, nothing left running
    assert f"{signal.Signals(signum).name}: shutting down" in caplog.text
    assert "controller stopped" in caplog.text


def test_http_client_request_lines_are_off_at_the_default_level() -> None:
    root = logging.getLogger()
    saved = root.level, logging.getLogger("httpx2").level
    try:
        root.setLevel(logging.INFO)
        quiet_client_logs()
        assert not logging.getLogger("httpx2").isEnabledFor(logging.INFO)
        assert logging.getLogger("httpx2").isEnabledFor(logging.WARNING)
        logging.getLogger("httpx2").setLevel(logging.NOTSET)
        root.setLevel(logging.DEBUG)  # -v: every request, as before
        quiet_client_logs()
        assert logging.getLogger("httpx2").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(saved[0])
        logging.getLogger("httpx2").setLevel(saved[1])
