"""`meshctl`: run the controller and ask it about the mesh."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

import click
import trio
from lightkube import ConfigError
from meshagent.common.httpserve import http_get
from meshagent.common.spiffe import DEFAULT_TRUST_DOMAIN
from meshagent.controller.app import (
    CONTROLLER_NAMESPACE,
    DEFAULT_AGENT_SERVICE_ACCOUNT,
    Controller,
    ControllerSettings,
)
from meshagent.controller.ca import CAError
from meshagent.controller.sources.files import PATTERNS
from meshagent.controller.webhook import WEBHOOK_CONFIGURATION

# Where `meshctl status` and `meshctl authz check` look for a token the controller accepts on
# its debug endpoints (controller/debugauth.py), after --token-file / $MESHCTL_TOKEN_FILE:
# the node's agent token, named by the agent config ($MESHAGENT_CONFIG, as the lab sets it on
# a node), then the agent pod's projected token. The pod's own API token is never sent.
AGENT_TOKEN_FILE = Path("/var/run/secrets/meshagent/token")


def _hostport(value: str, default_port: int) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host or "0.0.0.0"), int(port or default_port)


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}
TOKEN_OPTION = click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="MESHCTL_TOKEN_FILE",
    help="A bearer token for the controller's status and debug endpoints ($MESHCTL_TOKEN_FILE;"
    " default: the agent's token on a node). Not needed on the controller's own host or pod.",
)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _verbose(ctx: click.Context) -> bool:
    """Whether -v/--verbose was given to `meshctl` (the one place it belongs)."""
    return bool(ctx.find_root().params.get("verbose"))


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="meshagent", prog_name="meshctl")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages (any subcommand).")
def main(verbose: bool) -> None:
    """meshctl: the meshagent control plane and operator commands."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format=LOG_FORMAT)


class Duration(click.ParamType):
    """A duration like 60s, 30m, 24h or 7d (a bare number is seconds)."""

    name = "duration"
    _UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value, param, ctx) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(value))
        if not match:
            self.fail(f"{value!r} is not a duration like 60s, 30m, 24h or 7d", param, ctx)
        return timedelta(seconds=int(match[1]) * self._UNITS[match[2] or "s"])


@main.command()
@click.option(
    "-f",
    "--filename",
    "--file",
    "--files",
    "manifest_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Watch this folder of manifests as the cluster (the lab's source).",
)
@click.option(
    "--kubernetes", is_flag=True, help="Watch the Kubernetes API (in-cluster, or --kubeconfig)."
)
@click.option(
    "--kubeconfig",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="With --kubernetes: this kubeconfig instead of the in-cluster account or $KUBECONFIG.",
)
@click.option("--listen", default="0.0.0.0:15012", show_default=True, help="Agent stream address.")
@click.option(
    "--metrics", default="0.0.0.0:15014", show_default=True, help="Metrics and status address."
)
@click.option(
    "--webhook",
    metavar="HOST:PORT",
    help="Serve the admission webhook here (HTTPS, POST /validate), e.g. 0.0.0.0:15017."
    " Off unless given.",
)
@click.option(
    "--webhook-configuration",
    default=WEBHOOK_CONFIGURATION,
    show_default=True,
    metavar="NAME",
    help="With --kubernetes --webhook: the ValidatingWebhookConfiguration whose caBundle"
    " the controller keeps equal to its CA.",
)
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The root CA (certificate and key, 0600), created there on first start.",
)
@click.option(
    "--ca-secret",
    metavar="NAME",
    help="With --kubernetes: keep the root CA in this Secret (the leader creates it once).",
)
@click.option(
    "--trust-bundle-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the root certificate (PEM) here, for agents to check the controller with.",
)
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    metavar="NAME|IP",
    help="A DNS name or IP agents dial, for the stream certificate. Repeatable."
    " Default: the --listen address, and the Service's names with --kubernetes.",
)
@click.option(
    "--node-tokens",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Node bootstrap tokens (digests, as `meshlab` writes them) agents authenticate with.",
)
@click.option(
    "--agent-service-account",
    default=DEFAULT_AGENT_SERVICE_ACCOUNT,
    show_default=True,
    metavar="NS/NAME",
    help="With --kubernetes: the service account whose tokens identify agents.",
)
@click.option(
    "--cert-lifetime",
    type=Duration(),
    default="24h",
    show_default=True,
    help="Lifetime of signed workload certificates (60s, 24h, ...).",
)
@click.option(
    "--namespace",
    envvar="POD_NAMESPACE",
    default=CONTROLLER_NAMESPACE,
    show_default=True,
    help="The controller's namespace, for its Lease and CA Secret ($POD_NAMESPACE).",
)
@click.option(
    "--pod-name",
    envvar="POD_NAME",
    default=lambda: os.uname().nodename,
    help="This replica's leader-election identity ($POD_NAME; default: the host name).",
)
@click.option(
    "--plaintext",
    is_flag=True,
    help="Serve the agent stream without TLS. Development only: agents cannot tell who"
    " answers, and tokens travel in clear.",
)
# `meshctl serve -v`, as before the flag moved to `meshctl -v`: still accepted, not shown.
@click.option("-v", "--verbose", is_flag=True, hidden=True)
@click.pass_context
def serve(
    ctx: click.Context,
    manifest_dir: Path | None,
    kubernetes: bool,
    kubeconfig: Path | None,
    listen: str,
    metrics: str,
    webhook: str | None,
    webhook_configuration: str,
    trust_domain: str,
    ca_file: Path | None,
    ca_secret: str | None,
    trust_bundle_out: Path | None,
    server_names: tuple[str, ...],
    node_tokens: Path | None,
    agent_service_account: str,
    cert_lifetime: timedelta,
    namespace: str,
    pod_name: str,
    plaintext: bool,
    verbose: bool,
) -> None:
    """Run the controller.

    Agents connect over TLS on --listen and authenticate with their node credential:
    a bootstrap token (--node-tokens) in the lab, their projected service-account token
    (TokenReview) with --kubernetes.

    \b
    Examples:
      meshctl serve -f /run/meshlab/cluster --listen 172.30.0.1:15012 \\
          --ca-file /run/meshlab/ca/ca.pem --trust-bundle-out /run/meshlab/ca/root.pem \\
          --node-tokens /run/meshlab/node-tokens.json
      meshctl serve --kubernetes --ca-secret meshagent-ca
      meshctl serve --kubernetes --kubeconfig ~/.kube/config --ca-file ./ca.pem --pod-name dev
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose or _verbose(ctx) else logging.INFO, format=LOG_FORMAT
    )
    lh, lp = _hostport(listen, 15012)
    mh, mp = _hostport(metrics, 15014)
    wh, wp = _hostport(webhook, 15017) if webhook else ("0.0.0.0", None)
    settings = ControllerSettings(
        listen_host=lh,
        listen_port=lp,
        metrics_host=mh,
        metrics_port=mp,
        webhook_host=wh,
        webhook_port=wp,
        webhook_configuration=webhook_configuration,
        manifest_dir=manifest_dir,
        kubernetes=kubernetes,
        kubeconfig=kubeconfig,
        namespace=namespace,
        pod_name=pod_name,
        trust_domain=trust_domain,
        ca_file=ca_file,
        ca_secret=ca_secret,
        trust_bundle_out=trust_bundle_out,
        server_names=server_names,
        node_tokens=node_tokens,
        agent_service_account=agent_service_account,
        cert_lifetime=cert_lifetime,
        plaintext=plaintext,
    )
    problems = settings.problems()
    if problems:
        raise click.UsageError("; ".join(problems))
    failed = interrupted = False
    try:
        # Serves until SIGTERM/SIGINT, then hands the Lease back and says goodbye: exit 0.
        trio.run(Controller(settings).run)
    except* (CAError, ConfigError, ValueError) as group:
        # Unusable CA material, kubeconfig or Secret: say what, without a traceback.
        for exc in group.exceptions:
            click.echo(f"meshctl: {exc}", err=True)
        failed = True
    except* KeyboardInterrupt:
        interrupted = True  # Ctrl-C before the controller's signal handling was set up
    if failed or interrupted:
        sys.exit(130 if interrupted else 1)


@main.command()
@click.option(
    "--controller",
    default="127.0.0.1:15014",
    show_default=True,
    envvar="MESHCTL_CONTROLLER",
    help="The controller's metrics/status address ($MESHCTL_CONTROLLER; the lab sets it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@TOKEN_OPTION
def status(controller: str, as_json: bool, token_file: Path | None) -> None:
    """Show the source, leadership, CA, connected agents, rejected resources and the DENY
    policies enforced as deny-all because they cannot be enforced as written.

    The controller answers from loopback, or to a bearer token of its namespace's service
    accounts (the lab: a node's token); see --token-file.

    \b
    Examples:
      kubectl exec -n meshagent-system deploy/meshctl -- meshctl status
      meshctl status --controller 172.30.0.1:15014 --json
    """
    host, port = _hostport(controller, 15014)
    body = _controller_get(host, port, "/status", token_file)
    data = json.loads(body)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"model generation: {data['generation']}")
    _echo_source(data.get("source"))
    leader = data.get("leader")
    if leader:
        role = "leader" if leader["leader"] else f"follower (leader: {leader['holder'] or '-'})"
        error = f"  error: {leader['last_error']}" if leader.get("last_error") else ""
        click.echo(f"lease {leader['lease']}: {leader['identity']} is {role}{error}")
    stream = data.get("stream")
    if stream:
        click.echo(
            f"agent stream: {'TLS' if stream['tls'] else 'PLAINTEXT'},"
            f" {stream['auth_failures']} authentication failures"
            + (f" (last: {stream['last_auth_failure']})" if stream["last_auth_failure"] else "")
        )
    ca = data.get("ca")
    if ca:
        kind = "root" if ca["root"] else f"intermediate (issuer {ca['issuer']})"
        click.echo(
            f"CA: {ca['subject']}, {kind}, valid until {ca['not_after']};"
            f" signed {ca['signed']}, refused {ca['refused']} on current streams"
        )
    click.echo("AGENTS")
    for a in data["agents"]:
        state = "connected" if a["connected"] else "disconnected"
        certs = ""
        if "csr_signed" in a:
            certs = f"certs signed={a['csr_signed']} refused={a['csr_refused']}  "
        click.echo(
            f"  {a['node']:<12} {state:<13} acked={a['acked_version'] or '-':<17} "
            f"for {a['connected_for_s']}s  {certs}"
            f"{('NACK: ' + a['last_nack']) if a['last_nack'] else ''}".rstrip()
        )
        if a.get("last_csr_refusal"):
            click.echo(f"      last refusal: {a['last_csr_refusal']}")
    click.echo("REJECTED RESOURCES")
    if not data["rejected"]:
        click.echo("  (none)")
    for r in data["rejected"]:
        where = f"{r['path']}: " if r.get("path") else ""
        click.echo(f"  {r['resource']}\n      {where}{r['reason']}")
    skipped = data.get("skipped") or []
    if skipped:
        click.echo("SKIPPED RESOURCES (not for the mesh: not applied)")
    for r in skipped:
        click.echo(f"  {r['resource']}\n      {r['path']}: {r['reason']}")
    unenforceable = data.get("unenforceable") or []
    if unenforceable:
        click.echo("UNENFORCEABLE DENY POLICIES (fail closed: all traffic to them denied)")
    for u in unenforceable:
        if u["selector"]:
            scope = ", ".join(f"{k}={v}" for k, v in sorted(u["selector"].items()))
        else:
            scope = "every workload" + ("" if u["selector_readable"] else " (selector unreadable)")
        click.echo(f"  {u['resource']} -> {u['policy']}  selects: {scope}")
        if u.get("workloads"):
            click.echo(f"      now denies: {', '.join(u['workloads'])}")
        click.echo(f"      {u['reason']}")


def _token_from_agent_config() -> Path | None:
    config = os.environ.get("MESHAGENT_CONFIG")
    if not config:
        return None
    try:
        token = json.loads(Path(config).read_text()).get("token_file")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(token) if isinstance(token, str) and token else None


def _controller_token(token_file: Path | None) -> str | None:
    """The bearer token for the controller's debug endpoints (see AGENT_TOKEN_FILE)."""
    candidates = [token_file] if token_file else [_token_from_agent_config(), AGENT_TOKEN_FILE]
    for path in candidates:
        if path is None:
            continue
        try:
            token = path.read_text().strip()
        except OSError:
            if token_file:
                raise click.BadParameter(f"cannot read {path}", param_hint="--token-file") from None
            continue
        if token:
            return token
    return None


def _controller_get(host: str, port: int, path: str, token_file: Path | None) -> bytes:
    """GET a debug endpoint of the controller; exits 1 with the reason if it fails."""
    token = _controller_token(token_file)
    extra = {"headers": [("authorization", f"Bearer {token}")]} if token else {}
    try:
        code, body = trio.run(partial(http_get, host, port, path, **extra))
    except OSError as exc:
        click.echo(f"controller at {host}:{port} is not reachable: {exc}", err=True)
        sys.exit(1)
    if code in (401, 403):
        click.echo(
            f"controller at {host}:{port} refused {path} (HTTP {code}): run meshctl where the"
            " controller runs, or give --token-file with a token of its namespace's service"
            " accounts (audience meshagent-controller)",
            err=True,
        )
        sys.exit(1)
    return body


def _echo_source(source: dict | None) -> None:
    if not source:
        return
    if source["type"] == "files":
        bad = source["unreadable_files"]
        click.echo(f"source: files in {source['folder']}" + (f", {bad} unreadable" if bad else ""))
    elif source["type"] == "kubernetes":
        click.echo(f"source: kubernetes ({'synced' if source['complete'] else 'syncing'})")
        for kind, state in source["kinds"].items():
            if not state["installed"]:
                what = "not installed"
            else:
                what = "watching" if state["connected"] else "disconnected"
                what += f" at {state['resource_version']}" if state["resource_version"] else ""
            error = f"  error: {state['last_error']}" if state["last_error"] else ""
            click.echo(f"  {kind:<20} {what}  relists={state['relists']}{error}")


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
    "--file",
    "paths",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path, exists=True),
    help="A manifest file, or a folder of them (*.yaml, *.yml, *.json). Repeatable.",
)
@click.option(
    "--explain", is_flag=True, help="Say what the mesh will do with each accepted resource."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def validate(paths: tuple[Path, ...], explain: bool, as_json: bool) -> None:
    """Check Istio resources offline, as the controller would.

    Parses every AuthorizationPolicy, PeerAuthentication, VirtualService and
    DestinationRule with the controller's own code and prints, per resource:
    `ok` (with a `warning` line for each setting the mesh does not fully
    honour), `skipped` (does not concern the mesh: bound to gateways only,
    exportTo narrower than ['*'], hosts that are not Kubernetes Services; not
    applied) or `rejected` and the field at fault. With --explain, each
    accepted resource is followed by what the mesh does with it and on which
    ports (L7 on http/http2/grpc ports, L4 on tcp/unnamed ones; Services in
    the same files are named with their ports). Other kinds are skipped.
    Exits 1 if anything is rejected, 0 otherwise.

    \b
    Examples:
      meshctl validate -f reviews-route.yaml
      meshctl validate -f policies/ -f reviews-route.yaml --explain
      meshctl validate -f policies/ --json
    """
    from meshagent.controller.checkfiles import check_files

    report = check_files(_manifest_files(paths))
    rejected = report.count("rejected") + len(report.file_errors)
    if as_json:
        body = {
            "resources": [v.as_dict(report.services, explain) for v in report.verdicts],
            "file_errors": report.file_errors,
            "ok": report.count("ok"),
            "rejected": rejected,
            "skipped": report.count("skipped"),
            "other_kinds": report.other_kinds,
        }
        click.echo(json.dumps(body, indent=2))
        sys.exit(1 if rejected else 0)
    for error in report.file_errors:
        click.echo(f"rejected {error}")
    for v in report.verdicts:
        if v.outcome == "rejected":
            click.echo(f"rejected {v.ref}: {v.reasons()}")
        elif v.outcome == "skipped":
            click.echo(f"skipped {v.ref}: {v.reasons()}")
        else:
            click.echo(f"ok {v.ref}")
            for path, message in v.warnings:
                click.echo(f"  warning {path}: {message}")
            if explain:
                for line in v.explain(report.services):
                    click.echo(f"  {line}")
    click.echo(
        f"{report.count('ok')} ok, {rejected} rejected, {report.count('skipped')} skipped "
        f"(not for the mesh), {report.other_kinds} of other kinds skipped"
    )
    sys.exit(1 if rejected else 0)


@main.group()
def authz() -> None:
    """Authorization tools."""


@authz.command("check")
@click.option("--from", "source", required=True, help="The client pod, NAMESPACE/POD.")
@click.option(
    "--to", "destination", required=True, help="The server pod and port, NAMESPACE/POD:PORT."
)
@click.option("--method", help="An HTTP method, to check a request rather than a connection.")
@click.option("--path", help="An HTTP path, to check a request rather than a connection.")
@click.option("--header", "headers", multiple=True, help="NAME:VALUE, repeatable.")
@click.option(
    "--trust-domain-alias",
    "aliases",
    multiple=True,
    help="The agents' trust_domain_aliases (Istio's meshConfig.trustDomainAliases), repeatable.",
)
@click.option(
    "--controller",
    default="127.0.0.1:15014",
    show_default=True,
    envvar="MESHCTL_CONTROLLER",
    help="The controller's metrics/status address ($MESHCTL_CONTROLLER; the lab sets it).",
)
@TOKEN_OPTION
def authz_check(
    source: str,
    destination: str,
    method: str | None,
    path: str | None,
    headers: tuple[str, ...],
    aliases: tuple[str, ...],
    controller: str,
    token_file: Path | None,
) -> None:
    """Evaluate the current AuthorizationPolicies for one connection or request, offline,
    and print the decision and the policy and rule that made it.

    Exits 0 when allowed, 3 when denied.

    \b
    Examples:
      meshctl authz check --from shop/frontend --to shop/reviews-v1:9080
      meshctl authz check --from shop/frontend --to shop/reviews-v1:9080 \\
          --method GET --path /admin/x
    """
    from meshagent.common.snapshot import Snapshot
    from meshagent.controller.explain import ExplainError, explain

    host, port = _hostport(controller, 15014)
    body = _controller_get(host, port, "/debug/config", token_file)
    parsed = {}
    for item in headers:
        name, sep, value = item.partition(":")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME:VALUE", param_hint="--header")
        parsed[name.strip()] = value.strip()
    try:
        result = explain(
            Snapshot.model_validate_json(body),
            source,
            destination,
            method=method,
            path=path,
            headers=parsed,
            trust_domain_aliases=aliases,
        )
    except ExplainError as exc:
        click.echo(f"meshctl: {exc}", err=True)
        sys.exit(1)
    click.echo(result.render())
    sys.exit(0 if result.decision.allowed else 3)
