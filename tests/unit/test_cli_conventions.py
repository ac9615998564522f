"""The three CLIs follow one set of conventions: -h is --help (every subcommand too), --version
prints the installed distribution's version, -v/--verbose sits on the top-level group, and
manifests are given with -f/--filename (kubectl's name; --file still works). Plus `meshagent
status` where there is no agent: one sentence and a non-zero exit."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from meshagent.agent import cli as agent_cli
from meshagent.agent.status import assemble, describe_denial, no_agent_here, render
from meshagent.controller import cli as controller_cli
from meshagent.lab import cli as lab_cli

CLIS = {"meshagent": agent_cli.main, "meshctl": controller_cli.main, "meshlab": lab_cli.main}
MANIFEST_PARAMS = {"files", "paths", "manifest_dir"}  # how the commands name what -f gives
POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: shop}
spec:
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]}]
"""


def commands(group: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The path of every command under `group`, the group itself first."""
    yield path
    if isinstance(group, click.Group):
        for name, command in sorted(group.commands.items()):
            yield from commands(command, (*path, name))


def command_at(group: click.Command, path: tuple[str, ...]) -> click.Command:
    for name in path:
        assert isinstance(group, click.Group)
        group = group.commands[name]
    return group


def all_commands() -> list[tuple[str, tuple[str, ...]]]:
    return [(name, path) for name, main in CLIS.items() for path in commands(main)]


@pytest.mark.parametrize(("cli", "path"), all_commands(), ids=lambda v: " ".join(v) or "-")
def test_dash_h_is_help(cli: str, path: tuple[str, ...]) -> None:
    runner = CliRunner()
    short = runner.invoke(CLIS[cli], [*path, "-h"], prog_name=cli)
    long = runner.invoke(CLIS[cli], [*path, "--help"], prog_name=cli)
    assert long.exit_code == 0, long.output
    assert short.exit_code == 0, short.output
    assert short.output == long.output
    assert "-h, --help" in long.output


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_version_prints_the_installed_version(cli: str) -> None:
    result = CliRunner().invoke(CLIS[cli], ["--version"], prog_name=cli)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{cli}, version {version('meshagent')}"


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_verbose_is_on_the_top_level_group_only(cli: str) -> None:
    main = CLIS[cli]
    [verbose] = [p for p in main.params if p.name == "verbose"]
    assert set(verbose.opts) == {"-v", "--verbose"}
    assert verbose.help
    assert "-v, --verbose" in CliRunner().invoke(main, ["--help"]).output
    for path in commands(main):
        if path:
            shown = [p for p in command_at(main, path).params if "-v" in getattr(p, "opts", [])]
            # an old spelling (`meshagent run -v`) may stay accepted, but not shown twice
            assert all(p.hidden for p in shown), path


@pytest.mark.parametrize(
    ("cli", "argv", "code"),
    [
        ("meshctl", ["validate", "-f", "{policy}"], 0),
        ("meshlab", ["exec"], 1),  # "give NAMESPACE/POD or --node NODE": touches nothing
        ("meshagent", ["status", "--config", "{config}"], 1),  # no agent here
    ],
)
def test_top_level_verbose_sets_debug_logging_for_any_subcommand(
    cli: str, argv: list[str], code: int, tmp_path: Path, monkeypatch
) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: calls.append(kw))
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    config = no_agent_config(tmp_path, free_port())
    argv = [a.format(policy=policy, config=config) for a in argv]
    result = CliRunner().invoke(CLIS[cli], ["-v", *argv])
    assert result.exit_code == code, result.output
    assert calls and calls[0]["level"] == logging.DEBUG


@pytest.mark.parametrize(("cli", "command"), [("meshagent", "run"), ("meshctl", "serve")])
def test_the_old_subcommand_verbose_still_parses(cli: str, command: str) -> None:
    ctx = command_at(CLIS[cli], (command,)).make_context(command, ["-v"])
    assert ctx.params["verbose"] is True


def test_manifest_flags_are_where_manifests_are_taken() -> None:
    taking = {
        (cli, path)
        for cli, path in all_commands()
        if any(p.name in MANIFEST_PARAMS for p in command_at(CLIS[cli], path).params)
    }
    assert taking == {
        ("meshctl", ("serve",)),
        ("meshctl", ("validate",)),
        ("meshlab", ("up",)),
        ("meshlab", ("apply",)),
        ("meshlab", ("delete",)),
    }
    for cli, path in taking:
        [param] = [p for p in command_at(CLIS[cli], path).params if p.name in MANIFEST_PARAMS]
        assert {"-f", "--filename", "--file"} <= set(param.opts), (cli, path)


@pytest.mark.parametrize("flag", ["-f", "--filename", "--file"])
@pytest.mark.parametrize("command", ["up", "apply", "delete"])
def test_meshlab_takes_manifests_by_every_spelling(flag: str, command: str, tmp_path) -> None:
    manifest = tmp_path / "app.yaml"
    manifest.write_text(POLICY)
    ctx = lab_cli.main.commands[command].make_context(command, [flag, str(manifest)])
    assert ctx.params["files"] == (manifest,)


@pytest.mark.parametrize("flag", ["-f", "--filename", "--file", "--files"])
def test_meshctl_serve_takes_its_manifest_folder_by_every_spelling(flag: str, tmp_path) -> None:
    ctx = controller_cli.serve.make_context("serve", [flag, str(tmp_path)])
    assert ctx.params["manifest_dir"] == tmp_path


@pytest.mark.parametrize("flag", ["-f", "--filename", "--file"])
def test_meshctl_validate_takes_manifests_by_every_spelling(flag: str, tmp_path) -> None:
    manifest = tmp_path / "policy.yaml"
    manifest.write_text(POLICY)
    result = CliRunner().invoke(controller_cli.main, ["validate", flag, str(manifest)])
    assert result.exit_code == 0, result.output
    assert "ok AuthorizationPolicy shop/allow-frontend" in result.output


# --- meshagent status where there is no agent ---------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_agent_config(tmp_path: Path, admin_port: int) -> Path:
    (tmp_path / "pins").mkdir(exist_ok=True)  # there, but empty: nothing pinned
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps(
            {
                "node_name": "node-x",
                "pin_dir": str(tmp_path / "pins"),
                "cgroup_path": str(tmp_path / "no-such-cgroup"),
                "state_dir": str(tmp_path / "state"),
                "admin_port": admin_port,
            }
        )
    )
    return config


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused, and no one else gets it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_status_where_there_is_no_agent_says_so_in_one_sentence(tmp_path, unanswered_port):
    config = no_agent_config(tmp_path, unanswered_port)
    result = CliRunner().invoke(agent_cli.main, ["status", "--config", str(config)])
    assert result.exit_code == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(
        f"meshagent: no meshagent datapath found at {tmp_path / 'pins'}: "
        "is the agent running on this node? (pins missing"
    )
    assert "Bad file descriptor" not in line and "Errno" not in line


def test_status_json_where_there_is_no_agent_is_an_error_object(tmp_path, unanswered_port):
    config = no_agent_config(tmp_path, unanswered_port)
    result = CliRunner().invoke(agent_cli.main, ["status", "--json", "--config", str(config)])
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error.startswith(f"no meshagent datapath found at {tmp_path / 'pins'}")


def test_status_watch_where_there_is_no_agent_shows_the_sentence_and_exits_1(
    tmp_path, unanswered_port
):
    config = no_agent_config(tmp_path, unanswered_port)
    argv = ["status", "--json", "--watch", "0.1", "--count", "2", "--config", str(config)]
    result = CliRunner().invoke(agent_cli.main, argv)
    assert result.exit_code == 1
    assert [set(json.loads(line)) for line in result.stdout.splitlines()] == [{"error"}] * 2


def down(datapath: dict) -> dict:
    base = {"pin_dir": "/sys/fs/bpf/meshagent", "cgroup": "/sys/fs/cgroup", "programs": []}
    return assemble(
        "node-x",
        None,
        "connection refused",
        {**base, **datapath},
        None,
        trust_domain="cluster.local",
        now=0,
    )


def test_a_wrong_cgroup_path_is_named_not_a_bare_ebadf() -> None:
    report = down(
        {
            "programs_error": "/sys/fs/cgroup is not a cgroup-v2 folder",
            "pins_found": True,
            "state_found": True,
            "meshed_netns": [],
            "counters": {"redirected": 0, "established": 0, "excluded": 0, "strict_dropped": 0},
        }
    )
    problem = no_agent_here(report)
    assert problem is not None
    assert "cgroup_path in the agent config" in problem and "/sys/fs/cgroup" in problem


def test_an_uninstalled_node_still_gets_a_report() -> None:
    """`meshagent uninstall` empties the state folder but leaves it: status reports the node
    as it is (nothing attached, no pins) rather than 'no agent here'."""
    report = down({"pins_found": False, "state_found": True, "maps_error": "no pinned maps in /x"})
    assert no_agent_here(report) is None
    assert "Programs attached:\n  (none)" in render(report)


def test_a_running_agent_is_never_no_agent_here() -> None:
    report = assemble(
        "node-x",
        {"version": "0.1.0"},
        "",
        {"pin_dir": "/p", "cgroup": "/c", "pins_found": False, "state_found": False},
        None,
        trust_domain="cluster.local",
        now=0,
    )
    assert no_agent_here(report) is None


# --- one wording of a denial, for status and the demo -------------------------------------


def test_denial_without_a_policy_reads_as_status_shows_it() -> None:
    denial = {
        "source": "spiffe://cluster.local/ns/shop/sa/intruder",
        "destination": "shop/reviews-v1:9080",
        "policy": None,
        "reason": "no ALLOW policy matched",
    }
    line = describe_denial(denial)
    assert line == (
        "spiffe://cluster.local/ns/shop/sa/intruder -> shop/reviews-v1:9080 "
        "denied by policy default: no ALLOW policy matched"
    )
    assert "None" not in line
