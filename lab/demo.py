"""`meshlab demo`: the lab with the sample app, walking through what the mesh does.

Each step runs the real thing (curl in a pod, `meshagent status` on a node)
and prints the command and its output, so the demo doubles as a tour.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources

import click
from meshagent.common.manifests import load_documents
from meshagent.lab import lab

BIN = lab.BIN_DIR


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    click.secho("$ " + " ".join(argv), fg="cyan")
    proc = subprocess.run([str(BIN / "meshlab"), *argv], capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).rstrip()
    if out:
        click.echo(out)
    return proc


def _counters(node: str) -> dict:
    proc = subprocess.run(
        [str(BIN / "meshlab"), "exec", "--node", node, "--", "meshagent", "status", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout)["datapath"]["counters"]


def _step(title: str) -> None:
    click.echo()
    click.secho(f"== {title}", bold=True)


def run_demo() -> int:
    manifest = resources.files("meshagent.lab").joinpath("examples/demo.yaml").read_text()
    failures = 0
    _step("Bringing up a 2-node lab: controller, one agent per node, the shop app")
    try:
        plan = lab.up(load_documents(manifest, "demo.yaml"), nodes=2)
        for pod in sorted(plan.pods.values(), key=lambda p: p.key):
            click.echo(f"  {pod.key:<20} on {pod.node}  {pod.ip}")
        reviews = plan.pods["shop/reviews-v1"]

        _step(
            "Interception: shop is labelled meshagent.io/mesh=enabled, so frontend's "
            "connections go through node-1's proxy"
        )
        before = _counters("node-1")
        curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\\n", "--max-time", "5"]
        for url in ("http://reviews.shop:9080/", "http://reviews.shop.svc.cluster.local:9080/"):
            proc = _run(["exec", "shop/frontend", "--", *curl, url])
            failures += proc.stdout.strip() != "200"
        after = _counters("node-1")
        click.echo(f"  node-1 redirect counter: {before['redirected']} -> {after['redirected']}")
        failures += after["redirected"] - before["redirected"] != 2

        _step(
            "Not meshed: a pod in an unlabelled namespace, and one labelled "
            "meshagent.io/mesh=disabled, connect directly"
        )
        before = _counters("node-1")
        for pod in ("legacy/client", "shop/batch"):
            proc = _run(["exec", pod, "--", *curl, f"http://{reviews.ip}:9080/"])
            failures += proc.stdout.strip() != "200"
        after = _counters("node-1")
        click.echo(f"  node-1 redirect counter: {before['redirected']} -> {after['redirected']}")
        failures += after["redirected"] != before["redirected"]

        _step("meshagent status on node-1, as an operator would run it on the node")
        failures += _run(["exec", "--node", "node-1", "--", "meshagent", "status"]).returncode != 0
    finally:
        _step("Tearing the lab down")
        removed = lab.down()
        click.echo(f"  removed {len(removed)} objects; left behind: {lab.leftovers() or 'nothing'}")
    click.echo()
    click.secho(
        "demo OK" if not failures else f"demo: {failures} checks failed",
        fg="green" if not failures else "red",
        bold=True,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_demo())
