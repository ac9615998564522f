"""`meshagent`: the node agent (run), its status, and removal of its datapath."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import trio
from meshagent.agent.config import load_config

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
    from meshagent.agent.run import Agent

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = load_config(config_file, **overrides)
    trio.run(Agent(config).serve)


@main.command()
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(config_file: Path | None, as_json: bool) -> None:
    """Show the agent, the attached programs, meshed pods and counters.

    Works when the agent is down too: it then reads the pinned maps directly.

    \b
    Examples:
      meshagent status
      meshagent status --json | jq .datapath.counters
    """
    from meshagent.agent.status import gather, render

    report = gather(load_config(config_file))
    click.echo(json.dumps(report, indent=2) if as_json else render(report))


@main.command()
@_config_option
def uninstall(config_file: Path | None) -> None:
    """Detach the datapath's programs and remove their pins: pods' traffic flows directly.

    \b
    Examples:
      meshagent uninstall
    """
    from meshagent.agent.datapath import loader
    from meshagent.agent.run import datapath_settings

    config = load_config(config_file)
    loader.uninstall(datapath_settings(config))
    click.echo(f"detached from {config.cgroup_path}; removed {config.pin_dir}")


if __name__ == "__main__":
    sys.exit(main())
