"""The mesh root handed to agents in a cluster: the controller leader publishes its trust
bundle in the ConfigMap `meshagent-root` that the agent DaemonSet mounts as
`--controller-ca-file`. Against the fake API server over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import yaml
from lightkube import KubeConfig
from meshagent.agent.configclient import controller_tls_context
from meshagent.controller.app import (
    ROOT_CONFIGMAP,
    Controller,
    ControllerSettings,
    publish_root,
)
from meshagent.controller.leader import LeaderElector
from meshagent.controller.sources.kubernetes import open_kube_client

from tests.fakes.kube_apiserver import FakeApiServer, open_fake_apiserver

TIMEOUT = 10
NAMESPACE = "meshagent-system"
FAST = {"lease_duration": 1, "renew_deadline": 0.6, "retry_period": 0.1}
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with open_fake_apiserver() as server:
        yield server


async def until(predicate: Callable[[], object]) -> None:
    while not predicate():
        await trio.sleep(0.01)


def root_maps(api: FakeApiServer) -> list[dict]:
    return [c for c in api.objects("ConfigMap") if c["metadata"]["name"] == ROOT_CONFIGMAP]


async def test_only_the_leader_publishes_and_it_restores_an_edited_root(api) -> None:
    config = KubeConfig.from_dict(api.kubeconfig())
    with trio.fail_after(TIMEOUT):
        async with open_kube_client(config) as client, trio.open_nursery() as nursery:
            leader = LeaderElector(client, NAMESPACE, "meshctl-a", **FAST)
            follower = LeaderElector(client, NAMESPACE, "meshctl-b", **FAST)
            await nursery.start(leader.serve)
            await nursery.start(follower.serve)
            assert leader.is_leader and not follower.is_leader
            nursery.start_soon(
                lambda: publish_root(client, follower, ROOT_CONFIGMAP, "not mine", retry=0.05)
            )
            nursery.start_soon(
                lambda: publish_root(client, leader, ROOT_CONFIGMAP, PEM, retry=0.05, recheck=0.1)
            )
            await until(lambda: root_maps(api))
            (published,) = root_maps(api)
            assert published["metadata"]["namespace"] == NAMESPACE
            assert published["data"] == {"root.pem": PEM}

            edited = {**published, "data": {"root.pem": "tampered"}}
            api.update(edited)
            await until(lambda: root_maps(api)[0]["data"] == {"root.pem": PEM})
            await trio.sleep(0.3)  # the follower never wrote its own
            assert [c["data"] for c in root_maps(api)] == [{"root.pem": PEM}]
            nursery.cancel_scope.cancel()


async def test_the_controller_publishes_the_root_its_stream_certificate_chains_to(
    api, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(api.kubeconfig()))
    settings = ControllerSettings(
        listen_host="127.0.0.1",
        listen_port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        kubernetes=True,
        kubeconfig=kubeconfig,
        pod_name="meshctl-0",
        ca_secret="meshagent-ca",
    )
    controller = Controller(settings)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(controller.serve)
            await until(lambda: root_maps(api))
            nursery.cancel_scope.cancel()
    (published,) = root_maps(api)
    root = published["data"]["root.pem"]
    assert root == controller.ca.trust_bundle_pem
    assert "PRIVATE KEY" not in root
    (tmp_path / "root.pem").write_text(root)
    controller_tls_context(tmp_path / "root.pem")  # what the agent makes of the mounted file
