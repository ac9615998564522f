"""`meshlab demo`: the lab with the sample app, walking through what the mesh does.

Each step runs the real thing (curl in a pod, `meshagent status` on a node,
`meshlab apply` of Istio resources) and prints the command and its output, so
the demo doubles as a tour. Each step also checks what it shows; the demo
exits non-zero if any check fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib import resources

import click
from meshagent.agent.status import describe_denial
from meshagent.common.manifests import load_documents
from meshagent.lab import lab

BIN = lab.BIN_DIR
CURL = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\\n", "--max-time", "3"]


def _example(name: str) -> str:
    return str(resources.files("meshagent.lab").joinpath(f"examples/{name}"))


def _run(argv: list[str], show: bool = True) -> subprocess.CompletedProcess:
    if show:
        click.secho("$ meshlab " + " ".join(argv), fg="cyan")
    proc = subprocess.run([str(BIN / "meshlab"), *argv], capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).rstrip()
    if out and show:
        click.echo(out)
    return proc


def _curl(pod: str, url: str) -> str:
    return _run(["exec", pod, "--", *CURL, url]).stdout.strip()


def _get(pod: str, url: str, extra: list[str] | None = None) -> str:
    """The body of one curl GET in `pod` (printed by _run, as every command is)."""
    argv = ["exec", pod, "--", "curl", "-s", "--max-time", "3", *(extra or []), url]
    return _run(argv, show=False).stdout


def _status(node: str) -> dict:
    proc = _run(["exec", "--node", node, "--", "meshagent", "status", "--json"], show=False)
    return json.loads(proc.stdout)


def _step(title: str) -> None:
    click.echo()
    click.secho(f"== {title}", bold=True)


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def expect(self, ok: bool, what: str) -> None:
        click.secho(f"  {'ok' if ok else 'FAILED'}: {what}", fg="green" if ok else "red")
        if not ok:
            self.failed.append(what)


def _until(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def run_demo() -> int:
    manifest = resources.files("meshagent.lab").joinpath("examples/demo.yaml").read_text()
    checks = Checks()
    _step("Bringing up a 2-node lab: controller, one agent per node, the shop app")
    try:
        plan = lab.up(load_documents(manifest, "demo.yaml"), nodes=2)
        for pod in sorted(plan.pods.values(), key=lambda p: p.key):
            click.echo(f"  {pod.key:<20} on {pod.node}  {pod.ip}")
        reviews_ip = plan.pods["shop/reviews-v1"].ip

        _step(
            "Interception: namespace shop is labelled meshagent.io/mesh=enabled, so "
            "frontend's connections go through node-1's proxy"
        )
        before = _status("node-1")["datapath"]["counters"]["redirected"]
        for url in ("http://reviews.shop:9080/", "http://reviews.shop.svc.cluster.local:9080/"):
            checks.expect(_curl("shop/frontend", url) == "200", f"frontend -> {url}: 200")
        after = _status("node-1")["datapath"]["counters"]["redirected"]
        checks.expect(after - before == 2, f"node-1 eBPF redirect counter {before} -> {after}")
        v6_before = _status("node-1")["datapath"]["counters"]["redirected_ipv6"]
        url = f"http://[::ffff:{reviews_ip}]:9080/"  # an IPv6 socket, as gRPC clients dial
        checks.expect(_curl("shop/frontend", url) == "200", f"frontend -> {url}: 200")
        v6_after = _status("node-1")["datapath"]["counters"]["redirected_ipv6"]
        checks.expect(
            v6_after - v6_before == 1,
            f"IPv6 sockets are steered too: redirected_ipv6 {v6_before} -> {v6_after}",
        )

        _step(
            "Not meshed: a pod in an unlabelled namespace, and one labelled "
            "meshagent.io/mesh=disabled, connect directly"
        )
        before = _status("node-1")["datapath"]["counters"]["redirected"]
        for pod in ("legacy/client", "shop/batch"):
            code = _curl(pod, f"http://{reviews_ip}:9080/")
            checks.expect(code == "200", f"{pod} -> reviews pod IP directly: 200")
        after = _status("node-1")["datapath"]["counters"]["redirected"]
        checks.expect(after == before, f"node-1 redirect counter unchanged ({after})")

        _step(
            "mTLS: node-1's proxy tunnels to node-2's over HBONE (mutual TLS on 15008); "
            "node-2 knows who is calling"
        )
        # proxy workers report their figures every second: wait for the report with the tunnel
        frontend_id = "spiffe://cluster.local/ns/shop/sa/frontend"
        _until(lambda: frontend_id in _status("node-2")["agent"]["inbound"]["peers"])
        node2 = _status("node-2")["agent"]
        peers = node2["inbound"]["peers"]
        for identity, count in peers.items():
            click.echo(f"  node-2 accepted {count} tunnel(s) from {identity}")
        checks.expect(
            frontend_id in peers,
            "node-2 saw frontend's SPIFFE identity from its certificate",
        )
        for cert in node2["certificates"]:
            click.echo(
                f"  node-2 holds {cert['identity']} ({cert['state']}, until {cert['not_after']})"
            )

        _step(
            "Routing: reviews-v2 joins; a VirtualService sends user jason to v2, everyone "
            "else to v1 (per request, by the source node's proxy)"
        )
        _run(["apply", "-f", _example("demo-routing.yaml")])
        jason = ["-H", "end-user: jason"]
        checks.expect(
            _until(
                lambda: "reviews v2" in _get("shop/frontend", "http://reviews.shop:9080/", jason)
            ),
            "frontend as jason is routed to reviews-v2",
        )
        click.echo(f"  jason gets: {_get('shop/frontend', 'http://reviews.shop:9080/', jason)!r}")
        others = [_get("shop/frontend", "http://reviews.shop:9080/") for _ in range(5)]
        checks.expect(
            all("Directory listing" in body for body in others),
            "frontend as anyone else stays on reviews-v1 (5 of 5)",
        )

        _step("PeerAuthentication STRICT for shop: plaintext to its pods is dropped in the kernel")
        _run(["apply", "-f", _example("demo-strict.yaml")])
        checks.expect(
            _until(lambda: _curl("legacy/client", f"http://{reviews_ip}:9080/") != "200"),
            "legacy/client (plaintext) is refused",
        )
        checks.expect(
            _curl("shop/frontend", "http://reviews.shop:9080/") == "200",
            "frontend (through the mesh) still gets 200",
        )

        _step(
            "AuthorizationPolicy: only frontend's identity may call reviews "
            "(enforced by reviews' node, same-node and cross-node alike)"
        )
        _run(["apply", "-f", _example("demo-policy.yaml")])
        checks.expect(
            _until(lambda: _curl("shop/intruder", "http://reviews.shop:9080/") != "200"),
            "intruder (same node as reviews, another identity) is refused",
        )
        checks.expect(
            _curl("shop/frontend", "http://reviews.shop:9080/") == "200",
            "frontend (other node) gets 200",
        )
        _until(lambda: _status("node-2")["agent"]["authz"]["recent_denials"])
        denials = _status("node-2")["agent"]["authz"]["recent_denials"]
        if denials:
            click.echo(f"  node-2 logged the denial: {describe_denial(denials[-1])}")

        _step("meshagent status on node-2, as an operator would run it on the node")
        checks.expect(
            _run(["exec", "--node", "node-2", "--", "meshagent", "status"]).returncode == 0,
            "meshagent status ran",
        )
    finally:
        _step("Tearing the lab down")
        removed = lab.down()
        click.echo(f"  removed {len(removed)} objects; left behind: {lab.leftovers() or 'nothing'}")
    click.echo()
    if checks.failed:
        click.secho(f"demo: {len(checks.failed)} checks failed", fg="red", bold=True)
        return 1
    click.secho("demo OK", fg="green", bold=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
