"""The controller refuses bad Istio resources one by one and says which field, where users look:
the gauge, the log, `/status`, `meshctl status` and `meshctl validate`."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import trio
import yaml
from click.testing import CliRunner
from meshagent.controller import cli
from meshagent.controller.app import Controller, ControllerSettings
from meshagent.controller.model import ClusterModel
from meshagent.controller.sources.files import FileSource
from meshagent.controller.validation import Validator, validate_model
from prometheus_client import REGISTRY

GOOD_VS = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "good", "namespace": "shop"},
    "spec": {
        "hosts": ["reviews"],
        "http": [
            {
                "route": [
                    {"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                    {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20},
                ]
            }
        ],
    },
}
WEIGHT_PATH = "spec.http[0].route[0].weight"


def bad_vs() -> dict:
    vs = copy.deepcopy(GOOD_VS)
    vs["metadata"]["name"] = "bad"
    vs["spec"]["http"][0]["route"][0]["weight"] = "eighty"
    return vs


POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "shop"}}


def gauge(kind: str) -> float | None:
    return REGISTRY.get_sample_value("meshagent_controller_rejected_resources", {"kind": kind})


def test_bad_virtual_service_is_rejected_alone_with_its_field_path():
    model = ClusterModel()
    model.replace("VirtualService", [GOOD_VS, bad_vs()])

    accepted, rejected = validate_model(model)

    assert [(r.kind, r.ref) for r in accepted] == [("VirtualService", "shop/good")]
    [error] = rejected
    assert (error.kind, error.namespace, error.name, error.path) == (
        "VirtualService",
        "shop",
        "bad",
        WEIGHT_PATH,
    )
    assert str(error).startswith(f"VirtualService shop/bad: {WEIGHT_PATH}: ")


def test_validator_gauge_and_log_follow_rejections_until_fixed(caplog):
    model = ClusterModel()
    validator = Validator()
    model.replace("VirtualService", [GOOD_VS, bad_vs()])

    with caplog.at_level(logging.INFO, logger="meshagent.controller.validation"):
        validator.run(model)
        validator.run(model)  # unchanged: no second log line

        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [r.getMessage() for r in errors] == [f"rejected {validator.rejected[0]}"]
        assert f"rejected VirtualService shop/bad: {WEIGHT_PATH}: " in errors[0].getMessage()
        assert gauge("VirtualService") == 1
        assert gauge("DestinationRule") == 0
        assert [r.ref for r in validator.accepted] == ["shop/good"]

        fixed = copy.deepcopy(GOOD_VS)
        fixed["metadata"]["name"] = "bad"
        model.upsert("VirtualService", fixed)
        validator.run(model)

    assert validator.rejected == []
    assert gauge("VirtualService") == 0
    assert sorted(r.ref for r in validator.accepted) == ["shop/bad", "shop/good"]
    assert validator.generation == model.generation


async def test_validator_serve_revalidates_when_the_model_changes():
    model = ClusterModel()
    validator = Validator()
    async with trio.open_nursery() as nursery:
        await nursery.start(validator.serve, model)
        assert validator.rejected == []

        model.upsert("VirtualService", bad_vs())
        with trio.fail_after(5):
            while validator.generation != model.generation:
                await trio.sleep(0.01)
        assert [e.path for e in validator.rejected] == [WEIGHT_PATH]
        nursery.cancel_scope.cancel()


def write_manifests(folder: Path, *docs: dict) -> Path:
    path = folder / "resources.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def test_controller_status_lists_rejected_resource_and_bad_file(tmp_path):
    write_manifests(tmp_path, POD, GOOD_VS, bad_vs())
    (tmp_path / "broken.yaml").write_text("kind: [unclosed\n")
    controller = Controller(ControllerSettings(manifest_dir=tmp_path))
    controller.files = FileSource(tmp_path, controller.model)
    controller.files.load()
    controller.validator.run(controller.model)

    rejected = controller.status()["rejected"]

    broken, vs = rejected
    assert broken["resource"] == str(tmp_path / "broken.yaml")
    assert broken["path"] == ""
    assert "not valid YAML" in broken["reason"]
    assert vs["resource"] == "VirtualService shop/bad"
    assert vs["path"] == WEIGHT_PATH
    assert vs["reason"] and WEIGHT_PATH not in vs["reason"]
    json.dumps(controller.status())  # served as JSON on /status


def test_meshctl_status_prints_path_and_reason(monkeypatch):
    status = {
        "generation": 3,
        "agents": [],
        "rejected": [
            {"resource": "VirtualService shop/bad", "path": WEIGHT_PATH, "reason": "not a number"}
        ],
    }

    async def fake_get(host, port, path):
        return 200, json.dumps(status).encode()

    monkeypatch.setattr(cli, "http_get", fake_get)
    result = CliRunner().invoke(cli.main, ["status"])

    assert result.exit_code == 0
    assert "VirtualService shop/bad" in result.output
    assert f"{WEIGHT_PATH}: not a number" in result.output


def test_meshctl_validate_rejects_bad_file_with_field_path(tmp_path):
    path = write_manifests(tmp_path, POD, GOOD_VS, bad_vs())

    result = CliRunner().invoke(cli.main, ["validate", "-f", str(path)])

    assert result.exit_code == 1
    assert "ok VirtualService shop/good" in result.output
    assert f"rejected VirtualService shop/bad: {WEIGHT_PATH}: " in result.output
    summary = "1 ok, 1 rejected, 0 skipped (not for the mesh), 1 of other kinds skipped"
    assert summary in result.output


def test_meshctl_validate_accepts_good_files_and_skips_other_kinds(tmp_path):
    good = write_manifests(tmp_path, POD, GOOD_VS)
    other = tmp_path / "ns.yaml"
    other.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")

    result = CliRunner().invoke(cli.main, ["validate", "-f", str(good), "-f", str(other)])

    assert result.exit_code == 0, result.output
    assert "ok VirtualService shop/good" in result.output
    summary = "1 ok, 0 rejected, 0 skipped (not for the mesh), 2 of other kinds skipped"
    assert summary in result.output


def test_meshctl_validate_reports_a_file_that_is_not_yaml(tmp_path):
    (tmp_path / "broken.yaml").write_text("kind: [unclosed\n")
    write_manifests(tmp_path, GOOD_VS)

    result = CliRunner().invoke(cli.main, ["validate", "-f", str(tmp_path)])

    assert result.exit_code == 1
    assert "broken.yaml: not valid YAML" in result.output
    assert "ok VirtualService shop/good" in result.output


def test_a_change_to_a_pod_only_its_node_needs_versions_only_that_node():
    """Issue #3: unchanged input gives the same version; a change gives a new version only to
    the nodes it affects."""
    from meshagent.controller.compiler import compile_shared

    model = ClusterModel()
    ns = {
        "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"meshagent.io/mesh": "enabled"}},
    }
    other = {"kind": "Namespace", "metadata": {"name": "batch"}}

    def pod(name, ns_, node, labels):
        return {
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns_, "labels": labels},
            "spec": {"nodeName": node},
            "status": {"phase": "Running", "podIP": f"10.0.{node[-1]}.{len(name)}"},
        }

    model.replace("Namespace", [ns, other])
    model.replace(
        "Pod", [pod("web", "shop", "node-1", {}), pod("job", "batch", "node-1", {"v": "1"})]
    )

    def versions():
        shared = compile_shared(model)
        return {n: shared.for_node(n).version for n in ("node-1", "node-2")}

    first = versions()
    assert versions() == first  # same input, same versions
    # an unmeshed pod on node-1 that no Service selects: only node-1 sees it
    model.upsert("Pod", pod("job", "batch", "node-1", {"v": "2"}))
    second = versions()
    assert second["node-1"] != first["node-1"] and second["node-2"] == first["node-2"]
    # a meshed pod changes every node's view
    model.upsert("Pod", pod("web", "shop", "node-1", {"app": "web"}))
    third = versions()
    assert third["node-1"] != second["node-1"] and third["node-2"] != second["node-2"]
    # and the agent accepts what the controller versioned
    snap = compile_shared(model).for_node("node-1")
    assert snap.version == snap.content_version()
    assert [w.name for w in snap.local_workloads] == ["job"]
