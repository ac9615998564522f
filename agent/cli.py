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


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def _verbose(ctx: click.Context) -> bool:
    """Whether -v/--verbose was given to `meshagent` (the one place it belongs)."""
    return bool(ctx.find_root().params.get("verbose"))


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="meshagent", prog_name="meshagent")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages (any subcommand).")
def main(verbose: bool) -> None:
    """meshagent: the per-node mesh agent and proxy."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format=LOG_FORMAT)


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
# `meshagent run -v`, as before the flag moved to `meshagent -v`: still accepted, not shown.
@click.option("-v", "--verbose", is_flag=True, hidden=True)
@click.pass_context
def run(ctx: click.Context, config_file: Path | None, verbose: bool, **overrides: object) -> None:
    """Run the agent: load the datapath, follow the controller, proxy meshed traffic.

    \b
    Examples:
      meshagent run --config /etc/meshagent/agent.json
      meshagent -v run --config /etc/meshagent/agent.json     # debug logs
      meshagent run --node-name node-1 --controller meshctl.meshagent-system.svc:15012 \\
          --cgroup-path /sys/fs/cgroup --bpffs /sys/fs/bpf/meshagent
    """
    from meshagent.agent.workers.launch import start_workers

    logging.basicConfig(
        level=logging.DEBUG if verbose or _verbose(ctx) else logging.INFO, format=LOG_FORMAT
    )
    config = load_config(config_file, **overrides)
    # The proxy workers import their code while the agent imports its own (a restart serves
    # sooner); they wait for the agent before they touch the datapath.
    workers = start_workers(
        config.model_dump_json(), config.worker_count, config.worker_metrics_dir, fork_here=True
    )
    import trio
    from meshagent.agent.run import Agent

    trio.run(Agent(config, workers).serve)


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
@click.option(
    "--pods",
    "all_pods",
    is_flag=True,
    help="One row per meshed pod (shown anyway up to 20 pods; JSON always has them).",
)
@click.option(
    "--services",
    "show_services",
    is_flag=True,
    help="One row per Service endpoint the proxy balances over (JSON always has them).",
)
def status(
    config_file: Path | None,
    as_json: bool,
    interval: float | None,
    count: int | None,
    all_pods: bool,
    show_services: bool,
) -> None:
    """Show the agent, controller link, attached programs, meshed pods (a summary per identity
    and mTLS mode, then one row per pod: identity, certificate, mTLS mode), connections (and
    those handed over at an upgrade or a worker's replacement), tunnels per peer node and
    worker, each proxy process's memory (PSS beside RSS), ejected endpoints and recent
    denials; with --services, every Service's endpoints as the snapshot in force has them.

    Works when the agent is down too: it then reads the pinned maps, the saved snapshot and the
    saved certificates, and says which parts only the running agent knows. Where there is no
    agent at all (no pins and no state folder, or a cgroup path that is not cgroup v2), it says
    so in one sentence and exits 1 (with --json: {"error": "..."}).

    \b
    Examples:
      meshagent status
      meshagent status --pods                 # every pod, also on a full node
      meshagent status --services             # where each Service's connections may go
      meshagent status --json | jq '.pods[] | {ip, identity, mtls_mode}'
      meshagent status --watch 2
      meshagent status --watch 5 --count 3 --json
    """
    from meshagent.agent import status as status_mod

    if count is not None and interval is None:
        raise click.UsageError("--count needs --watch")
    config = load_config(config_file)
    missing: list[str | None] = [None]  # the last report's "no agent here" sentence

    def show(report: dict) -> None:
        missing[0] = problem = status_mod.no_agent_here(report)
        if as_json:
            doc = {"error": problem} if problem else report
            click.echo(json.dumps(doc, indent=None if interval else 2))
        elif interval is None:
            if problem:
                click.echo(f"meshagent: {problem}", err=True)
            else:
                click.echo(status_mod.render(report, pods=all_pods, services=show_services))
        else:
            click.clear()
            screen = problem or status_mod.render(report, pods=all_pods, services=show_services)
            click.echo(f"meshagent status every {interval:g}s (Ctrl-C stops)\n\n{screen}")

    try:
        if interval is None:
            show(status_mod.gather(config))
        else:
            status_mod.watch(
                lambda: status_mod.gather(config), show, interval=interval, count=count
            )
    except KeyboardInterrupt:
        click.echo()  # end the line the terminal's ^C is on
    if missing[0]:
        sys.exit(1)


@main.command()
@_config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for scripts.")
@click.option("-n", "--namespace", help="Only flows from or to this namespace.")
@click.option("--pod", help="Only flows from or to this workload ([namespace/]name).")
@click.option("--denied", is_flag=True, help="Only flows a policy denied.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after COUNT flows.")
@click.option(
    "--timeout", "duration", type=click.FloatRange(min=0), help="Stop after DURATION seconds."
)
def observe(
    config_file: Path | None,
    as_json: bool,
    namespace: str | None,
    pod: str | None,
    denied: bool,
    count: int | None,
    duration: float | None,
) -> None:
    """Watch this node's flows as they happen: one line per TCP connection (when it closes) and
    per HTTP request (when it completes), with time (UTC), source workload, destination service
    and workload, protocol, verdict and the policy that decided it, response code, duration and
    bytes. Read from the proxies' access-log entries; costs them nothing while nobody watches.
    Says on stderr when it watches every proxy process (flows from then on are all shown).

    \b
    Examples:
      meshagent observe
      meshagent observe --denied
      meshagent observe -n shop --pod reviews --json | jq .response_code
      meshagent observe --denied --json --count 1 --timeout 10
    """
    from meshagent.agent import observe as observe_mod

    config = load_config(config_file)
    keep = observe_mod.FlowFilter(namespace=namespace, pod=pod, denied=denied)
    try:
        flows = observe_mod.follow(
            config.state_dir,
            keep,
            count=count,
            duration=duration,
            on_ready=lambda taps: click.echo(
                f"watching flows from {taps} proxy processes (Ctrl-C stops)", err=True
            ),
        )
        for flow in flows:
            if as_json:
                click.echo(json.dumps(flow))
            elif "dropped" in flow:
                click.echo(f"({flow['dropped']} flows dropped: this terminal fell behind)")
            else:
                click.echo(observe_mod.render(flow))
            sys.stdout.flush()  # live also through a pipe (| jq)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo()


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
