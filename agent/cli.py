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
