"""`meshlab`: a multi-node mesh on one Linux machine, for the demo, tests and benchmarks."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from meshagent.common.manifests import ManifestError, load_files
from meshagent.lab import lab, podexec, upgrade
from meshagent.lab.topology import PlanError


def _fail(message: str) -> None:
    click.echo(f"meshlab: {message}", err=True)
    sys.exit(1)


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="meshagent", prog_name="meshlab")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages (any subcommand).")
def main(verbose: bool) -> None:
    """meshlab: nodes and pods made of network namespaces and cgroups, running the real mesh."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.option(
    "-f",
    "--filename",
    "--file",
    "files",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Kubernetes-style manifests: Namespace, Pod, Service (and Istio resources).",
)
@click.option("--nodes", default=2, show_default=True, help="How many nodes.")
def up(files: tuple[Path, ...], nodes: int) -> None:
    """Build the lab on a real control plane and start the controller, one agent per node,
    and the pods.

    Starts etcd, kube-apiserver and kube-controller-manager in the lab's underlay namespace,
    the lab kubelet, the controller and the agents, then creates the manifests' objects
    through the API. Returns once agents serve the current snapshot, pods are Ready (in the
    API too) and every meshed pod holds its certificate; the lab runs on in the background
    until `meshlab down`. `meshlab kubeconfig` is for kubectl.

    \b
    Examples:
      meshlab up -f lab/examples/demo.yaml
      meshlab up -f app.yaml -f policies.yaml --nodes 3
    """
    try:
        objects = load_files(files)
        plan = lab.up(objects, nodes)
    except (ManifestError, PlanError, lab.ApplyError) as exc:
        lab.down()
        _fail(str(exc))
    except lab.LabError as exc:
        _fail(str(exc))
    services = sum(1 for o in objects if o.get("kind") == "Service")
    click.echo(f"lab up: {len(plan.nodes)} nodes, {len(plan.pods)} pods, {services} services")
    for pod in sorted(plan.pods.values(), key=lambda p: p.key):
        click.echo(f"  {pod.key:<32} {pod.node:<8} {pod.ip}")


@main.command()
def down() -> None:
    """Remove everything the lab made: processes, namespaces, veths, cgroups, pins, files.

    Safe to run twice, and after the lab or any of its processes crashed.

    \b
    Examples:
      meshlab down
    """
    removed = lab.down()
    click.echo(
        "lab down" + (f": removed {len(removed)} objects" if removed else ": nothing to remove")
    )
    left = lab.leftovers()
    if left:
        _fail("could not remove: " + ", ".join(left))


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--node", help="Run on this node (its network namespace) instead of in a pod.")
@click.argument("target", required=False)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def exec(node: str | None, target: str | None, argv: tuple[str, ...]) -> None:
    """Run a command in a pod (NAMESPACE/POD) or on a node (--node NODE).

    The command's exit status and output pass through.

    \b
    Examples:
      meshlab exec shop/frontend -- curl -s http://reviews.shop:9080/
      meshlab exec --node node-1 -- meshagent status
    """
    args = list(argv)
    if args and args[0] == "--":
        args.pop(0)
    if node is None and target is None:
        _fail("give NAMESPACE/POD or --node NODE")
    if node is not None and target is not None:
        args.insert(0, target)  # `--node N -- cmd`: click saw the command's first word as target
    if not args:
        _fail("give the command to run after --")
    try:
        podexec.exec_command(node, None if node else target, args)  # becomes the command
    except (lab.LabError, PlanError) as exc:
        _fail(str(exc))


@main.command()
@click.option(
    "-f",
    "--filename",
    "--file",
    "files",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Kubernetes-style manifests to create or change. Repeatable.",
)
def apply(files: tuple[Path, ...]) -> None:
    """Create or change objects in the running lab: new pods start, labels change, ...

    Server-side apply through the lab's kube-apiserver (field manager `meshlab`), Namespaces
    first; a pod without a node goes to the least loaded node its nodeSelector, required node
    affinity and tolerations allow. Waits until new pods run, are Ready (in the API too) and
    hold their certificates. Kinds the API does not serve are named and ignored; objects the
    API refuses, and pods no node fits, are named and the command fails.

    \b
    Examples:
      meshlab apply -f more-pods.yaml
      meshlab apply -f namespace-labelled.yaml
    """
    try:
        started, _applied, ignored = lab.apply(load_files(files))
    except (ManifestError, PlanError, lab.LabError) as exc:
        _fail(str(exc))
    click.echo("applied" + (f"; started {', '.join(started)}" if started else ""))
    for what in ignored:
        click.echo(f"ignored {what}: the API server serves no such kind", err=True)


@main.command()
@click.option(
    "-f",
    "--filename",
    "--file",
    "files",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Kubernetes-style manifests of the objects to remove. Repeatable.",
)
def delete(files: tuple[Path, ...]) -> None:
    """Remove objects from the running lab; deleted pods are stopped and their network removed.

    Deletes through the API and waits until deleted pods are gone: their processes get
    SIGTERM, SIGKILL after the pod's terminationGracePeriodSeconds.

    \b
    Examples:
      meshlab delete -f reviews-v3.yaml
    """
    try:
        stopped = lab.delete(load_files(files))
    except (ManifestError, PlanError, lab.LabError) as exc:
        _fail(str(exc))
    click.echo("deleted" + (f"; stopped {', '.join(stopped)}" if stopped else ""))


@main.command()
def kubeconfig() -> None:
    """Print the path of a kubeconfig for the lab's kube-apiserver (as its admin).

    \b
    Examples:
      kubectl --kubeconfig "$(meshlab kubeconfig)" get pods -A -o wide
    """
    try:
        lab.load_state()
    except lab.LabError as exc:
        _fail(str(exc))
    click.echo(str(lab.HOST_KUBECONFIG))


@main.group()
def controller() -> None:
    """Stop or start the lab's controller (to see agents serve on without it)."""


REPLICA = click.option(
    "--replica",
    default=1,
    show_default=True,
    type=click.IntRange(1, lab.MAX_CONTROLLER_REPLICAS),
    help="Which replica (a lab up with MESHLAB_CONTROLLER_REPLICAS=N has N).",
)


@controller.command("stop")
@REPLICA
def controller_stop(replica: int) -> None:
    """Kill a controller replica; its agents move to another one, or, with none left, keep
    serving their last snapshot.

    \b
    Examples:
      meshlab controller stop
      meshlab controller stop --replica 2
    """
    lab.load_plan()
    try:
        lab.stop_controller(replica - 1)
    except lab.LabError as exc:
        _fail(str(exc))
    click.echo(f"controller replica {replica} stopped")


@controller.command("start")
@REPLICA
def controller_start(replica: int) -> None:
    """Start a controller replica again; agents reconnect and converge.

    \b
    Examples:
      meshlab controller start
    """
    lab.load_plan()
    try:
        lab.start_controller(replica - 1)
    except lab.LabError as exc:
        _fail(str(exc))
    click.echo(f"controller replica {replica} started")


@main.group()
def agent() -> None:
    """Stop, start or upgrade a node's agent (to see the datapath outlive it)."""


@agent.command("stop")
@click.argument("node")
def agent_stop(node: str) -> None:
    """Kill a node's agent with SIGKILL, as a crash would; its programs stay attached.

    \b
    Examples:
      meshlab agent stop node-1
    """
    plan = lab.load_plan()
    plan.node(node)
    lab.stop_agent(node)
    click.echo(f"agent on {node} killed")


@agent.command("start")
@click.argument("node")
def agent_start(node: str) -> None:
    """Start a node's agent again and wait until it is ready.

    \b
    Examples:
      meshlab agent start node-1
    """
    plan = lab.load_plan()
    lab.start_agent(plan.node(node))
    try:
        lab.wait_ready(plan)
    except lab.LabError as exc:
        _fail(str(exc))
    click.echo(f"agent on {node} ready")


@agent.command("upgrade")
@click.argument("node")
@click.option(
    "--min-ready",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds the new agent serves before the old one is stopped (minReadySeconds).",
)
def agent_upgrade(node: str, min_ready: float) -> None:
    """Upgrade a node's agent as the DaemonSet does (surge, then retire the old one).

    Returns once the old agent got SIGTERM, as a rollout moves on: it drains the connections
    it holds (up to an hour) and exits after the last; SIGKILL at its grace period's end.

    \b
    Examples:
      meshlab agent upgrade node-1
    """
    plan = lab.load_plan()
    plan.node(node)
    try:
        pod, retired = upgrade.upgrade(plan, node, min_ready)
    except lab.LabError as exc:
        _fail(str(exc))
    click.echo(f"{pod['name']} serves on {node} (pid {pod['pid']})")
    _show_retired(retired)


@agent.command("surge")
@click.argument("node")
def agent_surge(node: str) -> None:
    """Start a new agent pod next to the node's agent; wait until it serves.

    \b
    Examples:
      meshlab agent surge node-1 && meshlab agent retire node-1
    """
    _surge(lab.load_plan(), node)


@agent.command("retire")
@click.argument("node")
@click.option(
    "--wait/--no-wait",
    default=False,
    show_default=True,
    help="Wait until the old agents have exited (or were killed at the grace period's end).",
)
def agent_retire(node: str, wait: bool) -> None:
    """Stop every agent pod on the node but the newest: preStop hook, SIGTERM, SIGKILL after
    the grace period (terminationGracePeriodSeconds, 3660 s), as the kubelet does.

    \b
    Examples:
      meshlab agent retire node-1
      meshlab agent retire --wait node-1
    """
    _retire(lab.load_plan(), node, wait=wait)


def _surge(plan, node: str) -> None:
    plan.node(node)
    try:
        pod = upgrade.surge(plan, node)
    except lab.LabError as exc:
        _fail(str(exc))
    click.echo(f"{pod['name']} serves on {node} (pid {pod['pid']})")


def _retire(plan, node: str, *, wait: bool) -> None:
    plan.node(node)
    _show_retired(upgrade.retire(plan, node, wait=wait))


def _show_retired(retired) -> None:
    for old in retired:
        click.echo(f"{old.name}: preStop: {old.pre_stop}")
        if old.exit_after_s is None:
            click.echo(
                f"{old.name}: SIGTERM sent (pid {old.pid}); it drains what it holds and exits "
                f"after the last connection, SIGKILL in {upgrade.GRACE_PERIOD:.0f}s at most"
            )
            continue
        how = "killed after the grace period" if old.killed else "exited"
        click.echo(f"{old.name}: {how} {old.exit_after_s:.2f}s after SIGTERM")


@main.command()
def demo() -> None:
    """Bring up a 2-node lab with a sample app, show what the mesh does, tear it down.

    \b
    Examples:
      meshlab demo
    """
    from meshagent.lab.demo import run_demo

    if lab.net.lab_namespaces():
        _fail("a lab is already up: run `meshlab down` first")
    sys.exit(run_demo())
