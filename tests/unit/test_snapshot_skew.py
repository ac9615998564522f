"""Version skew between controller and agents (a rolling upgrade of either): the agent checks a
snapshot's version against the document it received, so a controller one schema version behind
(a field missing that the agent defaults) or ahead (a field the agent does not know) is served,
deltas on top of such a document apply, and the saved copy is taken again after a restart."""

from __future__ import annotations

import copy
import json

import pytest
from meshagent.agent.state import SNAPSHOT_FILE, SnapshotRejected, SnapshotStore
from meshagent.common.snapshot import Snapshot, Workload, wire_version

NODE = "node-1"


def document(edit) -> dict:
    """A snapshot as a controller of another version would send it: the current model's JSON
    with `edit` applied, versioned as that controller computes it (over what it sends)."""
    pod = Workload(
        uid="u1", namespace="shop", name="web", node=NODE, ips=["10.0.1.10"], meshed=True
    )
    doc = Snapshot(node=NODE, workloads=[pod]).model_dump(mode="json")
    edit(doc)
    doc["version"] = wire_version(doc)
    return doc


def older(doc: dict) -> None:  # a controller that predates a defaulted field
    for w in doc["workloads"]:
        del w["fail_mode"]


def newer(doc: dict) -> None:  # a controller that knows a field this agent does not
    doc["workloads"][0]["future_field"] = {"x": 1}
    doc["future_section"] = []


@pytest.mark.parametrize("edit", [older, newer], ids=["older-controller", "newer-controller"])
def test_a_snapshot_from_another_version_is_served_and_kept_across_a_restart(tmp_path, edit):
    doc = document(edit)
    store = SnapshotStore(NODE, tmp_path)
    store.apply(doc)
    assert store.version == doc["version"]
    assert store.tables is not None and "10.0.1.10" in store.tables.workload_by_ip

    restarted = SnapshotStore(NODE, tmp_path)
    assert restarted.load_saved()
    assert restarted.version == doc["version"]


def test_a_delta_applies_to_the_document_as_received(tmp_path):
    doc = document(older)
    store = SnapshotStore(NODE, tmp_path)
    store.apply(doc)
    added = copy.deepcopy(doc["workloads"][0]) | {"uid": "u2", "name": "api", "ips": ["10.0.1.11"]}
    after = copy.deepcopy(doc)
    after["workloads"].insert(0, added)  # the compiler's order: by namespace, then name
    after["version"] = wire_version(after)
    store.apply_delta(doc["version"], after["version"], {"workloads": {"upsert": [added]}})
    assert store.version == after["version"]
    assert "10.0.1.11" in store.tables.workload_by_ip
    saved = json.loads((tmp_path / SNAPSHOT_FILE).read_text())
    assert saved["version"] == after["version"]


def test_content_that_does_not_match_its_version_is_refused(tmp_path):
    doc = document(older)
    doc["workloads"][0]["ips"] = ["10.0.1.99"]  # changed after it was versioned
    store = SnapshotStore(NODE, tmp_path)
    with pytest.raises(SnapshotRejected, match="does not match its content"):
        store.apply(doc)
    assert store.tables is None and not (tmp_path / SNAPSHOT_FILE).exists()


def test_the_model_and_the_wire_form_agree_on_the_version():
    snap = Snapshot(node=NODE, workloads=[], trust_bundle=None).with_version()
    assert wire_version(json.loads(snap.model_dump_json())) == snap.version


def test_proxy_workers_are_fed_the_document_the_agent_checked(tmp_path):
    """Workers check the snapshot again: they get the document as received, which passes,
    where the agent's own model (with the field it defaults) would not."""
    doc = document(older)
    agent = SnapshotStore(NODE, tmp_path / "agent")
    agent.apply(doc)
    worker = SnapshotStore(NODE, tmp_path / "worker")
    worker.apply(json.loads(agent.document_json()), save=False)
    assert worker.version == doc["version"]
    with pytest.raises(SnapshotRejected):  # what feeding the model's dump did
        worker.apply(json.loads(agent.tables.snapshot.model_dump_json()), save=False)
