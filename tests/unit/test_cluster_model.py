"""ClusterModel's journal: which objects changed since a generation, so the incremental
compiler looks at those only (issue 19: work per change, not per cluster)."""

from __future__ import annotations

from meshagent.controller import model as model_module
from meshagent.controller.model import ClusterModel


def _pod(name: str, label: str = "a") -> dict:
    return {"metadata": {"namespace": "ns", "name": name, "labels": {"v": label}}}


def test_changed_since_names_the_upserted_and_deleted_objects_of_a_kind() -> None:
    model = ClusterModel()
    model.replace("Pod", [_pod("p1"), _pod("p2"), _pod("p3")])
    start = model.generation
    model.upsert("Pod", _pod("p1", "b"))
    model.upsert("Pod", _pod("p2"))  # equal: not a change
    model.delete("Pod", _pod("p3"))
    model.upsert("Service", _pod("s1"))
    assert model.changed_since("Pod", start) == {("ns", "p1"), ("ns", "p3")}
    assert model.changed_since("Service", start) == {("ns", "s1")}
    assert model.changed_since("Pod", model.generation) == set()


def test_changed_since_cannot_say_across_a_replace_or_beyond_the_journal(monkeypatch) -> None:
    model = ClusterModel()
    model.replace("Pod", [_pod("p1")])
    assert model.changed_since("Pod", 0) is None  # the whole kind was replaced
    monkeypatch.setattr(model_module, "JOURNAL", 3)
    model = ClusterModel()
    model.upsert("Pod", _pod("p0"))
    start = model.generation
    for i in range(3):
        model.upsert("Pod", _pod(f"p{i + 1}"))
    assert model.changed_since("Pod", start) == {("ns", "p1"), ("ns", "p2"), ("ns", "p3")}
    assert model.changed_since("Pod", start - 1) is None  # p0's change is forgotten
