"""`meshctl`: run the controller and ask it about the mesh."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import trio
from meshagent.common.httpserve import http_get
from meshagent.common.istio import SUPPORTED_KINDS, ResourceError, parse_resource
from meshagent.common.manifests import ManifestError, load_files
from meshagent.controller.app import Controller, ControllerSettings
from meshagent.controller.sources.files import PATTERNS
from meshagent.controller.validation import DEFAULT_NAMESPACE


def _hostport(value: str, default_port: int) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host or "0.0.0.0"), int(port or default_port)


@click.group()
def main() -> None:
    """meshctl: the meshagent control plane and operator commands."""


@main.command()
@click.option(
    "--files",
    "manifest_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Watch this folder of manifests as the cluster (the lab's source).",
)
@click.option("--listen", default="0.0.0.0:15012", show_default=True, help="Agent stream address.")
@click.option(
    "--metrics", default="0.0.0.0:15014", show_default=True, help="Metrics and status address."
)
@click.option("-v", "--verbose", is_flag=True)
def serve(manifest_dir: Path | None, listen: str, metrics: str, verbose: bool) -> None:
    """Run the controller.

    \b
    Examples:
      meshctl serve --files /run/meshlab/cluster --listen 172.30.0.1:15012
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    lh, lp = _hostport(listen, 15012)
    mh, mp = _hostport(metrics, 15014)
    settings = ControllerSettings(lh, lp, mh, mp, manifest_dir)
    trio.run(Controller(settings).serve)


@main.command()
@click.option(
    "--controller",
    default="127.0.0.1:15014",
    show_default=True,
    envvar="MESHCTL_CONTROLLER",
    help="The controller's metrics/status address ($MESHCTL_CONTROLLER; the lab sets it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(controller: str, as_json: bool) -> None:
    """Show connected agents, their acked versions, and rejected resources.

    \b
    Examples:
      meshctl status
      meshctl status --controller 172.30.0.1:15014 --json
    """
    host, port = _hostport(controller, 15014)
    try:
        _code, body = trio.run(http_get, host, port, "/status")
    except OSError as exc:
        click.echo(f"controller at {host}:{port} is not reachable: {exc}", err=True)
        sys.exit(1)
    data = json.loads(body)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"model generation: {data['generation']}")
    click.echo("AGENTS")
    for a in data["agents"]:
        state = "connected" if a["connected"] else "disconnected"
        click.echo(
            f"  {a['node']:<12} {state:<13} acked={a['acked_version'] or '-':<17} "
            f"for {a['connected_for_s']}s  {('NACK: ' + a['last_nack']) if a['last_nack'] else ''}"
        )
    click.echo("REJECTED RESOURCES")
    if not data["rejected"]:
        click.echo("  (none)")
    for r in data["rejected"]:
        where = f"{r['path']}: " if r.get("path") else ""
        click.echo(f"  {r['resource']}\n      {where}{r['reason']}")


def _manifest_files(paths: tuple[Path, ...]) -> list[Path]:
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted({f for pattern in PATTERNS for f in path.glob(pattern)}))
        else:
            out.append(path)
    return out


@main.command()
@click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path, exists=True),
    help="A manifest file, or a folder of them (*.yaml, *.yml, *.json). Repeatable.",
)
def validate(paths: tuple[Path, ...]) -> None:
    """Check Istio resources offline, as the controller would.

    Parses every AuthorizationPolicy, PeerAuthentication, VirtualService and
    DestinationRule with the controller's own code and prints `ok` or the
    field at fault. Other kinds (Pod, Service, Namespace, ...) are skipped.
    Exits 1 if anything is rejected, 0 otherwise.

    \b
    Examples:
      meshctl validate -f reviews-route.yaml
      meshctl validate -f policies/ -f reviews-route.yaml
    """
    ok = rejected = skipped = 0
    for path in _manifest_files(paths):
        try:
            objects = load_files([path])
        except (ManifestError, OSError, UnicodeDecodeError) as exc:
            click.echo(f"rejected {exc}")
            rejected += 1
            continue
        for obj in objects:
            if obj.get("kind") not in SUPPORTED_KINDS:
                skipped += 1
                continue
            try:
                resource = parse_resource(obj, DEFAULT_NAMESPACE)
            except ResourceError as exc:
                click.echo(f"rejected {exc}")
                rejected += 1
                continue
            click.echo(f"ok {resource.kind} {resource.namespace}/{resource.name}")
            ok += 1
    click.echo(f"{ok} ok, {rejected} rejected, {skipped} of other kinds skipped")
    sys.exit(1 if rejected else 0)
