"""`meshagent`: the node agent (run), its status, and removal of its datapath."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import click
from meshagent.agent.config import load_config
from meshagent.agent.handover import POD_UID_ENV, newer_live_agent, registry_dir

_config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Agent settings (JSON). Default: $MESHAGENT_CONFIG or /etc/meshagent/agent.json.",
)


@click.group()
def main() -> None:
    """meshagent: the per-node mesh agent and proxy."""


@main.command()
@_config_option
@click.option("--node-name", help="This node's name (default: from the config, else hostname).")
@click.option("--controller", help="Controller address host:port.")
@click.option("--cgroup-path", type=click.Path(path_type=Path), help="cgroup-v2 path to attach at.")
@click.option("--bpffs", "pin_dir", type=click.Path(path_type=Path), help="Folder for the pins.")
@click.option(
    "--state-dir", type=click.Path(path_type=Path), help="Where the last snapshot is kept."
)
@click.option(
    "--token-file", type=click.Path(path_type=Path), help="Node credential for the controller."
)
@click.option(
    "--controller-ca-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The mesh root (PEM) the controller's certificate must chain to.",
)
@click.option("--proxy-ip", help="Address the node proxy listens on (redirect target).")
@click.option("-v", "--verbose", is_flag=True)
def run(config_file: Path | None, verbose: bool, **overrides: object) -> None:
    """Run the agent: load the datapath, follow the controller, proxy meshed traffic.

    \b
    Examples:
      meshagent run --config /etc/meshagent/agent.json
      meshagent run --node-name node-1 --controller meshctl.meshagent-system.svc:15012 \\
          --cgroup-path /sys/fs/cgroup --bpffs /sys/fs/bpf/meshagent
    """
    import trio
    from meshagent.agent.run import Agent

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    config = load_config(config_file, **overrides)
    trio.run(Agent(config).serve)


@main.command()
@_config_option
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for scripts (one line each with --watch)."
)
@click.option(
    "--watch",
    "interval",
    type=click.FloatRange(min=0.1),
    help="Refresh every INTERVAL seconds until Ctrl-C.",
)
@click.option("--count", type=click.IntRange(min=1), help="With --watch: stop after COUNT reports.")
def status(
    config_file: Path | None, as_json: bool, interval: float | None, count: int | None
) -> None:
    """Show the agent, controller link, attached programs, meshed pods (identity, certificate,
    mTLS mode), connections, tunnels, ejected endpoints and recent denials.

    Works when the agent is down too: it then reads the pinned maps, the saved snapshot and the
    saved certificates, and says which parts only the running agent knows.

    \b
    Examples:
      meshagent status
      meshagent status --json | jq '.pods[] | {ip, identity, mtls_mode}'
      meshagent status --watch 2
      meshagent status --watch 5 --count 3 --json
    """
    from meshagent.agent.status import gather, render, watch

    if count is not None and interval is None:
        raise click.UsageError("--count needs --watch")
    config = load_config(config_file)

    def show(report: dict) -> None:
        if as_json:
            click.echo(json.dumps(report, indent=None if interval else 2))
        elif interval is None:
            click.echo(render(report))
        else:
            click.clear()
            click.echo(f"meshagent status every {interval:g}s (Ctrl-C stops)\n\n{render(report)}")

    if interval is None:
        show(gather(config))
        return
    try:
        watch(lambda: gather(config), show, interval=interval, count=count)
    except KeyboardInterrupt:
        click.echo()  # end the line the terminal's ^C is on


def _clear_folder(folder: Path) -> list[str]:
    """Remove what is inside ``folder`` (not the folder: on a node it is a hostPath mount)."""
    removed = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(str(entry))
    return removed


@main.command()
@_config_option
@click.option(
    "--unless-handed-over",
    is_flag=True,
    help=f"Leave the datapath in place if a newer agent pod runs on this node (needs "
    f"${POD_UID_ENV}; the DaemonSet's preStop hook).",
)
def uninstall(config_file: Path | None, unless_handed_over: bool) -> None:
    """Detach the datapath's programs, remove their pins and the agent's saved state: pods'
    traffic flows directly again. Safe to run again and by several agents.

    With --unless-handed-over (an agent pod stopping), nothing is removed when a newer live
    agent is registered on the node: it is an upgrade, and that agent owns the datapath.

    \b
    Examples:
      meshagent uninstall
      POD_UID=0b5e... meshagent uninstall --unless-handed-over
    """
    # Not through meshagent.agent.run: importing the whole proxy would cost a preStop hook
    # (and an operator removing the mesh) most of a second.
    from meshagent.agent.datapath import loader

    config = load_config(config_file)
    if unless_handed_over:
        pod_uid = os.environ.get(POD_UID_ENV)
        if not pod_uid:
            raise click.UsageError(
                f"--unless-handed-over needs ${POD_UID_ENV} (this agent pod's uid, from the "
                "downward API) to find its registration"
            )
        successor = newer_live_agent(registry_dir(config.state_dir), pod_uid)
        if successor is not None:
            click.echo(f"handed over to {successor}; datapath left in place")
            return
    settings = loader.datapath_settings(config)
    ours = [p for p in loader.attached_programs(settings) if p.pinned]
    pinned = config.pin_dir.exists()
    loader.uninstall(settings)
    cleared = _clear_folder(config.state_dir)
    if ours:
        names = ", ".join(p.name for p in ours)
        click.echo(f"detached {names} from {config.cgroup_path}")
    else:
        click.echo(f"no programs of ours attached at {config.cgroup_path}")
    click.echo(f"removed pins {config.pin_dir}" if pinned else f"no pins at {config.pin_dir}")
    click.echo(
        f"removed {', '.join(cleared)}" if cleared else f"no saved state in {config.state_dir}"
    )


if __name__ == "__main__":
    sys.exit(main())
