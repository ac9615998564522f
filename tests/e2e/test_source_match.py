"""Issue #21 item 3: VirtualService `match[].sourceLabels` and `sourceNamespace` in the lab.
Two servers behind one Service (subsets v1 "one", v2 "two", the stdlib's http.server telling
its name at /who); clients on another node that differ only in labels or namespace. The http
rule sends canary-labelled clients of namespace sl to v2 per request; the tcp rule sends
canary-labelled clients of any namespace to v2 per connection (a port named tcp-*: L4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import render_manifest
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

MANIFEST = Path(__file__).resolve().parent / "manifests" / "source-match.yaml"
HTTP = "http://backend.sl:8080/who"
TCP = "http://backend.sl:9000/who"
TRIES = 6  # both subsets have one pod: a wrong rule would show on the first request


@pytest.fixture(scope="module")
def lab(lab_factory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("source-match")
    for name in ("one", "two"):
        (folder / name).mkdir()
        (folder / name / "who").write_text(name)
    lab = lab_factory(render_manifest(MANIFEST, folder, WHO=folder), nodes=2)
    for pod in ("sl/canary", "sl/stable", "sl-other/outsider"):
        wait_until(
            lambda pod=pod: lab.curl(pod, HTTP),
            lambda answer: answer[0] == "200",
            what=f"{pod} reaches backend through the mesh",
            timeout=30,
        )
    return lab


def _servers(lab, pod: str, url: str) -> set[str]:
    answers = [lab.curl(pod, url) for _ in range(TRIES)]
    assert all(code == "200" for code, _ in answers), answers
    return {body.strip() for _, body in answers}


@pytest.mark.parametrize(
    ("pod", "server"),
    [("sl/canary", "two"), ("sl/stable", "one"), ("sl-other/outsider", "one")],
)
def test_http_rule_by_client_labels_and_namespace(lab, pod, server):
    assert _servers(lab, pod, HTTP) == {server}


@pytest.mark.parametrize(
    ("pod", "server"),
    [("sl/canary", "two"), ("sl/stable", "one"), ("sl-other/outsider", "two")],
)
def test_tcp_rule_by_client_labels(lab, pod, server):
    assert _servers(lab, pod, TCP) == {server}
