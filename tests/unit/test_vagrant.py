"""The Vagrant cluster in vagrant/: its scripts, its Vagrantfile, its sample application.

The cluster itself is not brought up here (no VMs in unit tests). The Vagrantfile is
evaluated by Ruby against a recording stand-in for Vagrant's configuration DSL, so the
machines, providers, network and provisioning it declares are checked without Vagrant.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VAGRANT = ROOT / "vagrant"
SHELL_SCRIPTS = sorted(
    p for p in VAGRANT.iterdir() if p.is_file() and p.read_text().startswith("#!/usr/bin/env bash")
)

# Records what a Vagrantfile sets and calls: `x.y = v` lands in "settings", a bare
# `x.y` is a child recorder, any call with arguments or a block lands in "calls" with
# what its block recorded (provider blocks also get an `override` recorder).
RECORDER = r"""
require "json"

class Recorder
  def initialize
    @settings = {}
    @children = {}
    @calls = []
  end

  def to_h
    { "settings" => @settings, "children" => @children.transform_values(&:to_h), "calls" => @calls }
  end

  def method_missing(name, *args, **options, &block)
    key = name.to_s
    if key.end_with?("=")
      @settings[key.chomp("=")] = args.first
      return args.first
    end
    return (@children[key] ||= Recorder.new) if args.empty? && options.empty? && block.nil?

    inner = Recorder.new
    block&.call(inner, Recorder.new)
    @calls << { "method" => key, "args" => args, "options" => options, "block" => inner.to_h }
    inner
  end

  def respond_to_missing?(*)
    true
  end
end

module Vagrant
  ROOT = Recorder.new
  def self.configure(_version)
    yield ROOT
  end
end

load ARGV.fetch(0)
puts JSON.generate(Vagrant::ROOT.to_h)
"""

Rec = dict[str, Any]


def calls(rec: Rec, method: str) -> list[Rec]:
    return [c for c in rec["calls"] if c["method"] == method]


@pytest.fixture(scope="module")
def vagrantfile(tmp_path_factory: pytest.TempPathFactory) -> Rec:
    if shutil.which("ruby") is None:
        pytest.fail("ruby is needed to check the Vagrantfile (scripts/install.sh installs it)")
    # A copy, so that evaluating it leaves no cluster token in the repository.
    where = tmp_path_factory.mktemp("vagrant")
    shutil.copy(VAGRANT / "Vagrantfile", where / "Vagrantfile")
    (where / "recorder.rb").write_text(RECORDER)
    out = subprocess.run(
        ["ruby", str(where / "recorder.rb"), str(where / "Vagrantfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def machines(vagrantfile: Rec) -> dict[str, Rec]:
    return {c["args"][0]: c for c in calls(vagrantfile["children"]["vm"], "define")}


def test_vagrantfile_parses() -> None:
    out = subprocess.run(
        ["ruby", "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Syntax OK"


@pytest.mark.skipif(
    shutil.which("vagrant") is None,
    reason="the vagrant binary is not installed (Debian package `vagrant`); ruby -c and the "
    "recorded Vagrantfile checks still run",
)
def test_vagrant_validate(tmp_path: Path) -> None:
    # --ignore-provider: the configuration is checked without a VM provider (libvirt,
    # VirtualBox), which this machine need not have; plain `vagrant validate` fails with
    # "No usable default provider could be found for your system." where there is none.
    # A copy, so that evaluating it leaves no cluster token in the repository; no
    # checkpoint (version check over the network).
    shutil.copytree(VAGRANT, tmp_path / "vagrant", ignore=shutil.ignore_patterns(".vagrant"))
    out = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=tmp_path / "vagrant",
        env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Vagrantfile validated successfully." in out.stdout, out.stdout + out.stderr


def test_one_control_plane_and_two_workers_on_debian_12(
    vagrantfile: Rec, machines: dict[str, Rec]
) -> None:
    assert vagrantfile["children"]["vm"]["settings"]["box"] == "debian/bookworm64"
    assert list(machines) == ["control", "worker1", "worker2"]
    assert machines["control"]["options"] == {"primary": True}
    for name, machine in machines.items():
        assert machine["block"]["children"]["vm"]["settings"]["hostname"] == name


def test_both_providers_are_configured(vagrantfile: Rec) -> None:
    providers = {
        c["args"][0]: c["block"]["settings"]
        for c in calls(vagrantfile["children"]["vm"], "provider")
    }
    assert set(providers) == {"libvirt", "virtualbox"}
    for settings in providers.values():
        assert settings["memory"] >= 2048
        assert settings["cpus"] >= 2


def test_the_repository_is_synced_as_the_image_build_context(vagrantfile: Rec) -> None:
    folders = {c["args"][0]: c for c in calls(vagrantfile["children"]["vm"], "synced_folder")}
    assert folders["."]["options"] == {"disabled": True}
    repo = folders[".."]
    assert repo["args"][1] == "/vagrant"
    assert repo["options"]["type"] == "rsync"
    # The host's venv and git history are neither needed nor wanted on the VMs.
    assert {".venv/", ".git/"} <= set(repo["options"]["rsync__exclude"])
    assert (VAGRANT / ".." / "daemonset" / "Containerfile").is_file()


def test_nodes_share_one_private_network(machines: dict[str, Rec]) -> None:
    ips = {}
    for name, machine in machines.items():
        (network,) = calls(machine["block"]["children"]["vm"], "network")
        assert network["args"] == ["private_network"]
        ips[name] = ipaddress.ip_address(network["options"]["ip"])
    assert len(set(ips.values())) == 3
    assert len({ipaddress.ip_network(f"{ip}/24", strict=False) for ip in ips.values()}) == 1


def test_every_node_builds_the_image_then_runs_its_k3s_role(machines: dict[str, Rec]) -> None:
    control_ip = calls(machines["control"]["block"]["children"]["vm"], "network")[0]["options"][
        "ip"
    ]
    for name, machine in machines.items():
        provisions = calls(machine["block"]["children"]["vm"], "provision")
        paths = [p["options"]["path"] for p in provisions]
        role = "control" if name == "control" else "worker"
        assert paths == ["node.sh", f"{role}.sh"]
        for path in paths:
            assert (VAGRANT / path).is_file()
        for provision in provisions:
            env = provision["options"]["env"]
            assert env["CONTROL_IP"] == control_ip
            assert len(env["K3S_TOKEN"]) >= 32
            assert env["K3S_CHANNEL"].startswith("v1.")


def test_cluster_token_is_kept_between_runs(tmp_path: Path) -> None:
    """Re-provisioning a worker must join the same cluster: the token is made once."""
    shutil.copy(VAGRANT / "Vagrantfile", tmp_path / "Vagrantfile")
    (tmp_path / "recorder.rb").write_text(RECORDER)

    def token() -> str:
        out = subprocess.run(
            ["ruby", str(tmp_path / "recorder.rb"), str(tmp_path / "Vagrantfile")],
            capture_output=True,
            text=True,
            check=True,
        )
        vm = json.loads(out.stdout)["children"]["vm"]
        first = calls(vm, "define")[0]["block"]["children"]["vm"]
        return calls(first, "provision")[0]["options"]["env"]["K3S_TOKEN"]

    assert token() == token()
    assert (tmp_path / ".vagrant" / "k3s-token").read_text().strip() == token()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script: Path) -> None:
    out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout


def test_provisioning_and_smoke_scripts_are_all_there() -> None:
    names = {p.name for p in SHELL_SCRIPTS}
    assert names == {"node.sh", "control.sh", "worker.sh", "smoke"}
    for script in SHELL_SCRIPTS:
        assert "set -euo pipefail" in script.read_text(), script.name
    # control.sh installs smoke as the command the README tells users to run.
    assert (
        "install -m 0755 /vagrant/vagrant/smoke /usr/local/bin/smoke"
        in (VAGRANT / "control.sh").read_text()
    )


def test_sample_app_spreads_reviews_and_frontend_over_nodes() -> None:
    docs = {
        (d["kind"], d["metadata"]["name"]): d
        for d in yaml.safe_load_all((VAGRANT / "sample-app.yaml").read_text())
        if d
    }
    assert docs[("Namespace", "shop")]["metadata"]["labels"] == {"meshagent.io/mesh": "enabled"}
    reviews = docs[("Deployment", "reviews")]["spec"]
    frontend = docs[("Deployment", "frontend")]["spec"]
    outsider = docs[("Deployment", "outsider")]["spec"]
    assert reviews["replicas"] == 2

    def repelled_by(spec: dict[str, Any]) -> list[dict[str, str]]:
        terms = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert {t["topologyKey"] for t in terms} == {"kubernetes.io/hostname"}
        return [t["labelSelector"]["matchLabels"] for t in terms]

    # Reviews replicas on different nodes, frontend on neither: every call crosses nodes.
    assert repelled_by(reviews) == [{"app": "reviews"}]
    assert repelled_by(frontend) == [{"app": "reviews"}]
    assert outsider["template"]["metadata"]["labels"]["meshagent.io/mesh"] == "disabled"
    assert docs[("Service", "reviews")]["spec"]["ports"][0]["port"] == 9080
    assert docs[("PeerAuthentication", "default")]["spec"] == {"mtls": {"mode": "STRICT"}}
