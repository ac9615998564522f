"""The corpus of real-world Istio manifests (tests/corpus/istio/, sources in SOURCES.md) under
`meshctl validate`'s own logic: every resource's verdict must stay what expectations.yaml
records (accepted, accepted with warnings on named fields, skipped for a named field, or
rejected naming the fields at fault), so a regression in what the mesh accepts, or in the
reasons it gives, fails here. Issue #21."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml
from meshagent.controller.checkfiles import Verdict, check_files

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "istio"
EXPECTATIONS = CORPUS / "expectations.yaml"
KINDS = (
    "AuthorizationPolicy",
    "PeerAuthentication",
    "RequestAuthentication",
    "VirtualService",
    "DestinationRule",
)


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*.yaml") if p != EXPECTATIONS)


def summary(v: Verdict) -> str:
    """One line per resource: `ok`, `ok, warns P1, P2`, `skipped P` or `rejected P1; P2`."""
    if v.outcome == "ok":
        paths = sorted({p for p, _ in v.warnings})
        return "ok" + (f", warns {', '.join(paths)}" if paths else "")
    return f"{v.outcome} " + "; ".join(p for p, _ in v.problems)


def verdicts() -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for path in corpus_files():
        report = check_files([path])
        assert not report.file_errors, report.file_errors
        rel = str(path.relative_to(CORPUS))
        entries = out.setdefault(rel, {})
        for v in report.verdicts:
            key = v.ref
            n = 2
            while key in entries:  # the same name twice in one file (a task's two steps)
                key, n = f"{v.ref} #{n}", n + 1
            entries[key] = summary(v)
    return out


def test_every_resource_keeps_its_recorded_verdict() -> None:
    expected = yaml.safe_load(EXPECTATIONS.read_text())
    assert verdicts() == expected


def test_every_reason_names_the_resource_field_and_cause() -> None:
    for path in corpus_files():
        for v in check_files([path]).verdicts:
            for field, message in v.problems:
                assert message and field is not None, v
                if v.outcome == "rejected" and "not supported" in message:
                    assert "not supported by meshagent yet" in message, (v.ref, message)
                if v.outcome == "skipped":
                    assert "not applied" in message, (v.ref, message)


def acceptance() -> dict[str, tuple[int, int, int, int]]:
    """Per kind: (accepted, skipped, rejected, total)."""
    counts: Counter[tuple[str, str]] = Counter()
    for path in corpus_files():
        for v in check_files([path]).verdicts:
            counts[(v.kind, v.outcome)] += 1
    return {
        kind: (
            counts[(kind, "ok")],
            counts[(kind, "skipped")],
            counts[(kind, "rejected")],
            sum(counts[(kind, o)] for o in ("ok", "skipped", "rejected")),
        )
        for kind in KINDS
    }


def test_the_corpus_is_big_enough_and_every_kind_is_in_it() -> None:
    rates = acceptance()
    assert sum(total for *_, total in rates.values()) >= 60
    assert all(total >= 5 for *_, total in rates.values()), rates


@pytest.mark.parametrize("kind", KINDS)
def test_acceptance_rate(kind: str, capsys) -> None:
    """Reported, not asserted beyond the recorded verdicts: `pytest -s -k acceptance`."""
    ok, skipped, rejected, total = acceptance()[kind]
    with capsys.disabled():
        print(
            f"\n{kind}: {ok}/{total} accepted ({100 * ok / total:.0f} %), "
            f"{skipped} skipped, {rejected} rejected"
        )
