"""The Kubernetes manifests in daemonset/, as `kubectl kustomize` renders them.

Every variant must render and validate strictly (unknown fields fail) against the
Kubernetes 1.30 and newest schemas that kubernetes-validate ships; custom resources
must validate against the bundled CRDs. Then the agent DaemonSet, the controller and
the RBAC are checked field by field against what daemonset/README.md promises.
"""

from __future__ import annotations

import ast
import copy
import functools
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from meshagent.agent.cli import run as run_command
from meshagent.agent.config import AgentConfig, load_config
from meshagent.agent.datapath.loader import HEADERS_ENV, fallback_kernel_headers
from meshagent.agent.workers.launch import WORKER_ALLOCATOR
from meshagent.common.istio import SUPPORTED_KINDS
from meshagent.common.istio.networking import NETWORKING_API_VERSIONS
from meshagent.common.istio.security import SECURITY_API_VERSIONS
from meshagent.common.istio.telemetry import TELEMETRY_API_VERSIONS
from meshagent.controller.app import ROOT_CONFIGMAP, ROOT_CONFIGMAP_KEY
from meshagent.controller.sources.kubernetes import ALL_KINDS, KIND_SPECS
from meshagent.controller.webhook import WEBHOOK_CONFIGURATION, WEBHOOK_PATH, WEBHOOK_PORT

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "daemonset"
VARIANTS = {
    "default": DAEMONSET,
    **{p.name: p for p in sorted((DAEMONSET / "overlays").iterdir()) if p.is_dir()},
}
K8S_VERSIONS = ("1.30", latest_version())
ISTIO_KINDS = {
    "authorizationpolicies.security.istio.io",
    "peerauthentications.security.istio.io",
    "requestauthentications.security.istio.io",
    "virtualservices.networking.istio.io",
    "destinationrules.networking.istio.io",
    "serviceentries.networking.istio.io",
    "telemetries.telemetry.istio.io",
}
AGENT_CAPABILITIES = {"BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "SYS_RESOURCE"}

Obj = dict[str, Any]


@functools.cache
def render(variant: str) -> tuple[Obj, ...]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to render daemonset/")
    out = subprocess.run(
        ["kubectl", "kustomize", str(VARIANTS[variant])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize {variant}: {out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def one(objs: tuple[Obj, ...], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def validate_strict(obj: Obj, version: str) -> None:
    """Raises kubernetes_validate.ValidationError on any unknown or mistyped field."""
    kubernetes_validate.validate(obj, version, strict=True)


def closed(schema: Any) -> Any:
    """A copy of a CRD's schema in which objects admit only the fields it types.

    The bundled CRDs keep unknown fields for the controller to refuse by name; the
    samples we ship must stay inside the typed subset, which this checks.
    """
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def crd_validator(crds: list[Obj], obj: Obj) -> jsonschema.Draft7Validator:
    group, version = obj["apiVersion"].split("/")
    for crd in crds:
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == obj["kind"]:
            served = {v["name"]: v for v in crd["spec"]["versions"] if v["served"]}
            assert version in served, f"{obj['kind']} {version} is not served by the CRD"
            root = copy.deepcopy(served[version]["schema"]["openAPIV3Schema"])
            root["properties"] |= {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
            }
            return jsonschema.Draft7Validator(closed(root))
    raise AssertionError(f"no bundled CRD for {obj['apiVersion']} {obj['kind']}")


def bundled_crds() -> list[Obj]:
    return [o for o in render("default") if o["kind"] == "CustomResourceDefinition"]


def pod_spec(obj: Obj) -> Obj:
    return obj["spec"]["template"]["spec"]


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


# --- rendering and schemas ---------------------------------------------------------


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_renders_and_validates_strictly(variant: str, k8s: str) -> None:
    objs = render(variant)
    assert objs
    for obj in objs:
        try:
            validate_strict(obj, k8s)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(
                f"{variant}: {obj['kind']}/{obj['metadata']['name']} {where}: {exc.message}"
            )


def test_strict_validation_rejects_a_misspelt_field() -> None:
    daemonset = copy.deepcopy(one(render("default"), "DaemonSet", "meshagent"))
    pod_spec(daemonset)["containers"][0]["securityContext"]["capabilites"] = {"add": ["BPF"]}
    with pytest.raises(kubernetes_validate.ValidationError, match="capabilites"):
        validate_strict(daemonset, K8S_VERSIONS[0])


def test_default_bundles_the_istio_crds_and_without_crds_leaves_only_them_out() -> None:
    def names(objs: tuple[Obj, ...]) -> set[tuple[str, str]]:
        return {(o["kind"], o["metadata"]["name"]) for o in objs}

    crds = {("CustomResourceDefinition", name) for name in ISTIO_KINDS}
    default = names(render("default"))
    assert {n for n in default if n[0] == "CustomResourceDefinition"} == crds
    assert names(render("without-crds")) == default - crds


def test_crds_serve_the_api_versions_the_controller_accepts() -> None:
    served: set[str] = set()
    for crd in bundled_crds():
        versions = crd["spec"]["versions"]
        assert [v["name"] for v in versions if v["storage"]] == ["v1"]
        schemas = [v["schema"] for v in versions]
        assert all(s == schemas[0] for s in schemas), "versions must share one schema"
        served |= {f"{crd['spec']['group']}/{v['name']}" for v in versions if v["served"]}
    assert served == SECURITY_API_VERSIONS | NETWORKING_API_VERSIONS | TELEMETRY_API_VERSIONS


def test_crd_schemas_keep_unknown_fields_for_the_controller_to_refuse() -> None:
    """Every typed object keeps unknown fields: pruning would ignore them silently."""

    def objects(schema: Obj, path: str) -> list[tuple[str, Obj]]:
        found = [(path, schema)] if schema.get("type") == "object" else []
        for name, sub in schema.get("properties", {}).items():
            found += objects(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                found += objects(schema[key], f"{path}[]")
        return found

    for crd in bundled_crds():
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        for path, node in objects(spec, "spec"):
            if "properties" in node or node is spec:
                assert node.get("x-kubernetes-preserve-unknown-fields") is True, (
                    f"{crd['metadata']['name']}: {path} would prune unknown fields"
                )


def test_sample_app_validates_against_kubernetes_and_the_bundled_crds() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "vagrant" / "sample-app.yaml").read_text()) if d]
    crds = bundled_crds()
    custom = [d for d in docs if d["apiVersion"].split("/")[0].endswith(".istio.io")]
    assert {d["kind"] for d in custom} == {"PeerAuthentication", "AuthorizationPolicy"}
    for doc in docs:
        if doc in custom:
            errors = list(crd_validator(crds, doc).iter_errors(doc))
            assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors[0].message}"
        else:
            for k8s in K8S_VERSIONS:
                validate_strict(doc, k8s)


@pytest.mark.parametrize(
    ("kind", "spec", "wrong"),
    [
        ("PeerAuthentication", {"mtls": {"mode": "STRICTLY"}}, "STRICTLY"),
        ("AuthorizationPolicy", {"action": "ALLOW", "rules": [{"to": "everyone"}]}, "everyone"),
        ("AuthorizationPolicy", {"actoin": "DENY"}, "actoin"),
    ],
)
def test_bundled_crds_refuse_mistyped_resources(kind: str, spec: Obj, wrong: str) -> None:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "shop"},
        "spec": spec,
    }
    errors = [e.message for e in crd_validator(bundled_crds(), doc).iter_errors(doc)]
    assert any(wrong in message for message in errors), errors


# --- namespace, image ----------------------------------------------------------------


def test_namespace_admits_the_agent_under_pod_security() -> None:
    ns = one(render("default"), "Namespace", "meshagent-system")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    namespaced = [
        o
        for o in render("default")
        if o["kind"]
        not in {
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
            "ValidatingWebhookConfiguration",
        }
    ]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"meshagent-system"}


def test_agent_and_controller_run_the_project_image_at_its_version() -> None:
    objs = render("default")
    for kind, name in (("DaemonSet", "meshagent"), ("Deployment", "meshctl")):
        (container,) = pod_spec(one(objs, kind, name))["containers"]
        assert container["image"] == f"meshagent:{project_version()}"
        assert container["imagePullPolicy"] == "IfNotPresent"


def test_containerfile_builds_the_runtime_profile_on_debian() -> None:
    text = (DAEMONSET / "Containerfile").read_text()
    assert re.search(r"^FROM (docker\.io/library/)?debian:bookworm-slim$", text, re.M)
    assert re.search(r"^ENV VENV=/opt/meshagent\b", text, re.M)
    assert re.search(r"scripts/install\.sh --runtime", text)
    assert re.search(r"apt-get install .*\"linux-headers-\$\{arch\}\"", text)
    assert re.search(r"^ENV MESHAGENT_KERNEL_HEADERS=/opt/kernel-headers$", text, re.M)


def test_containerfile_copies_every_folder_setup_py_installs() -> None:
    tree = ast.parse((ROOT / "setup.py").read_text())
    folders = next(
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "FOLDERS"
    )
    copied = set(re.findall(r"^COPY (\S+)/ ", (DAEMONSET / "Containerfile").read_text(), re.M))
    assert set(folders) | {"scripts"} <= copied


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_containerfile_run_steps_pass_shellcheck(tmp_path: Path) -> None:
    steps, current = [], None
    for line in (DAEMONSET / "Containerfile").read_text().splitlines():
        if current is None and line.startswith("RUN "):
            current = [line[4:]]
        elif current is not None:
            current.append(line)
        if current is not None and not line.endswith("\\"):
            steps.append("\n".join(current))
            current = None
    assert len(steps) >= 2
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n" + "\n".join(steps) + "\n")
    out = subprocess.run(["shellcheck", "-s", "sh", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# --- the agent DaemonSet ----------------------------------------------------------------


@pytest.fixture(scope="module")
def daemonset() -> Obj:
    return one(render("default"), "DaemonSet", "meshagent")


@pytest.fixture(scope="module")
def agent(daemonset: Obj) -> Obj:
    (container,) = pod_spec(daemonset)["containers"]
    return container


def volume_at(daemonset: Obj, agent: Obj, mount_path: str) -> tuple[Obj, Obj]:
    (mount,) = [m for m in agent["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod_spec(daemonset)["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def test_daemonset_uses_the_host_namespaces_and_reaches_the_controller(daemonset: Obj) -> None:
    spec = pod_spec(daemonset)
    assert spec["hostNetwork"] is True
    assert spec["hostPID"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"


def test_daemonset_runs_on_every_node_first(daemonset: Obj) -> None:
    spec = pod_spec(daemonset)
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}


def test_daemonset_upgrades_by_surging_so_a_node_never_lacks_an_agent(daemonset: Obj) -> None:
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert daemonset["spec"]["minReadySeconds"] > 0
    # Declared ports on hostNetwork are hostPorts: the surge pod could not be scheduled.
    assert all("ports" not in c for c in pod_spec(daemonset)["containers"])


def test_grace_period_outlasts_the_agents_drain_so_long_connections_survive_upgrades(
    daemonset: Obj,
) -> None:
    """The old agent serves what it holds for up to `drain_timeout_s` (at least an hour)
    after SIGTERM; the kubelet's SIGKILL must come only after that, with time for the hook."""
    from meshagent.lab import upgrade as lab_upgrade

    drain = AgentConfig.model_fields["drain_timeout_s"].default
    grace = pod_spec(daemonset)["terminationGracePeriodSeconds"]
    assert drain >= 3600
    assert drain < grace <= drain + 120
    assert grace == lab_upgrade.GRACE_PERIOD  # the lab's kubelet uses the DaemonSet's


def test_agent_command_is_the_documented_one(agent: Obj) -> None:
    assert agent["command"] == ["meshagent"]
    assert agent["args"] == [
        "run",
        "--node-name", "$(NODE_NAME)",
        "--controller", "meshctl.meshagent-system.svc:15012",
        "--cgroup-path", "/sys/fs/cgroup",
        "--bpffs", "/sys/fs/bpf/meshagent",
        "--state-dir", "/var/lib/meshagent",
        "--token-file", "/var/run/secrets/meshagent/token",
        "--controller-ca-file", "/etc/meshagent/root/root.pem",
        "--proxy-ip", "$(HOST_IP)",
    ]  # fmt: skip
    env = {
        e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"]
    }
    assert env == {
        # the mesh config, from the optional ConfigMap meshagent-config (status and the
        # preStop uninstall, run in the container, read it too)
        "MESHAGENT_CONFIG": "/etc/meshagent/config/agent.json",
        "NODE_NAME": "spec.nodeName",
        "HOST_IP": "status.hostIP",
        "POD_UID": "metadata.uid",
        "POD_NAME": "metadata.name",
        # the proxy workers' allocator, for the agent too: it forks their fork server
        **WORKER_ALLOCATOR,
    }


def test_agent_paths_are_the_config_defaults_that_status_and_uninstall_use(agent: Obj) -> None:
    """`meshagent status` and the preStop `meshagent uninstall` run without flags."""
    args = dict(zip(agent["args"][1::2], agent["args"][2::2], strict=True))
    defaults = AgentConfig()
    assert args["--controller"] == defaults.controller
    assert Path(args["--cgroup-path"]) == defaults.cgroup_path
    assert Path(args["--bpffs"]) == defaults.pin_dir
    assert Path(args["--state-dir"]) == defaults.state_dir


def test_agent_stops_through_the_uninstall_unless_handed_over_hook(agent: Obj) -> None:
    assert agent["lifecycle"] == {
        "preStop": {"exec": {"command": ["meshagent", "uninstall", "--unless-handed-over"]}}
    }
    # A liveness kill would run preStop and remove the redirect on a mere restart.
    assert "livenessProbe" not in agent


def test_agent_is_ready_on_15021(agent: Obj) -> None:
    probe = agent["readinessProbe"]
    assert probe["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert probe["initialDelaySeconds"] > 0


def test_agent_has_named_capabilities_not_privileged(agent: Obj) -> None:
    sc = agent["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == AGENT_CAPABILITIES
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_each_added_capability_is_justified_in_a_comment() -> None:
    lines = (DAEMONSET / "base" / "agent.yaml").read_text().splitlines()
    for cap in AGENT_CAPABILITIES:
        (index,) = [i for i, line in enumerate(lines) if line.strip() == f"- {cap}"]
        assert lines[index - 1].strip().startswith("#"), f"{cap} has no comment above it"


@pytest.mark.parametrize(
    ("mount_path", "host_path", "read_only"),
    [
        ("/sys/fs/bpf", "/sys/fs/bpf", False),
        ("/sys/fs/cgroup", "/sys/fs/cgroup", True),
        ("/lib/modules", "/lib/modules", True),
        ("/usr/src", "/usr/src", True),
        ("/var/lib/meshagent", "/var/lib/meshagent", False),
    ],
)
def test_agent_mounts_the_node_paths_it_works_on(
    daemonset: Obj, agent: Obj, mount_path: str, host_path: str, read_only: bool
) -> None:
    mount, volume = volume_at(daemonset, agent, mount_path)
    assert volume["hostPath"]["path"] == host_path
    assert mount.get("readOnly", False) is read_only


def test_agent_mount_paths_hold_what_its_arguments_name(daemonset: Obj, agent: Obj) -> None:
    args = dict(zip(agent["args"][1::2], agent["args"][2::2], strict=True))
    mounted = {m["mountPath"] for m in agent["volumeMounts"]}
    for flag in ("--cgroup-path", "--bpffs", "--state-dir", "--token-file", "--controller-ca-file"):
        path = Path(args[flag])
        assert any(path == Path(m) or Path(m) in path.parents for m in mounted), flag


def test_agent_carries_only_a_controller_token(daemonset: Obj, agent: Obj) -> None:
    spec = pod_spec(daemonset)
    assert spec["automountServiceAccountToken"] is False
    mount, volume = volume_at(daemonset, agent, "/var/run/secrets/meshagent")
    assert mount["readOnly"] is True
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "meshagent-controller"
    assert source["serviceAccountToken"]["path"] == "token"


def test_agent_has_resource_requests_and_limits(agent: Obj) -> None:
    for bound in ("requests", "limits"):
        assert set(agent["resources"][bound]) == {"cpu", "memory"}


@pytest.mark.parametrize(
    ("kind", "name", "port", "path"),
    [
        ("DaemonSet", "meshagent", "15020", "/stats/prometheus"),
        ("Deployment", "meshctl", "15014", "/metrics"),
    ],
)
def test_pods_carry_prometheus_scrape_annotations(
    kind: str, name: str, port: str, path: str
) -> None:
    annotations = one(render("default"), kind, name)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == port
    assert annotations["prometheus.io/path"] == path


# --- the controller ---------------------------------------------------------------------


def test_controller_runs_two_replicas_kept_by_a_disruption_budget() -> None:
    objs = render("default")
    deployment = one(objs, "Deployment", "meshctl")
    assert deployment["spec"]["replicas"] == 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = one(objs, "PodDisruptionBudget", "meshctl")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod_spec(deployment)["containers"]
    assert container["command"] == ["meshctl"]
    assert container["args"] == [
        "serve", "--kubernetes", "--ca-secret", "meshagent-ca",
        "--listen", "0.0.0.0:15012", "--metrics", "0.0.0.0:15014",
        "--webhook", f"0.0.0.0:{WEBHOOK_PORT}",
    ]  # fmt: skip
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod_spec(deployment)["securityContext"]["runAsNonRoot"] is True


def test_controller_service_exposes_the_stream_and_metrics() -> None:
    objs = render("default")
    service = one(objs, "Service", "meshctl")
    deployment = one(objs, "Deployment", "meshctl")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod_spec(deployment)["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    exposed = {p["port"]: container_ports[p["targetPort"]] for p in service["spec"]["ports"]}
    assert exposed == {15012: 15012, 15014: 15014, 443: WEBHOOK_PORT}


# --- admission ---------------------------------------------------------------------------


def test_webhook_configuration_sends_every_supported_kind_to_the_controller() -> None:
    objs = render("default")
    config = one(objs, "ValidatingWebhookConfiguration", WEBHOOK_CONFIGURATION)
    (webhook,) = config["webhooks"]
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["sideEffects"] == "None"
    assert webhook["failurePolicy"] == "Fail"  # daemonset/README.md "Admission" says why
    assert 1 <= webhook["timeoutSeconds"] <= 10
    # no caBundle in the manifest: the controller sets it, and re-applying must not clear it
    assert "caBundle" not in webhook["clientConfig"]
    assert webhook["clientConfig"]["service"] == {
        "name": "meshctl",
        "namespace": "meshagent-system",
        "port": 443,
        "path": WEBHOOK_PATH,
    }
    sent = set()
    for rule in webhook["rules"]:
        assert rule["operations"] == ["CREATE", "UPDATE"]
        assert rule["apiVersions"] == ["*"]
        assert rule["scope"] == "Namespaced"
        sent |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
    istio = {(KIND_SPECS[k].group, KIND_SPECS[k].plural) for k in SUPPORTED_KINDS}
    assert sent == istio


def test_webhook_service_port_reaches_the_controllers_webhook_listener() -> None:
    objs = render("default")
    service = one(objs, "Service", "meshctl")
    (container,) = pod_spec(one(objs, "Deployment", "meshctl"))["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (https,) = [p for p in service["spec"]["ports"] if p["port"] == 443]
    args = container["args"]
    webhook = args[args.index("--webhook") + 1]
    assert webhook == f"0.0.0.0:{ports[https['targetPort']]}"


def test_readme_documents_the_failure_policy_and_the_debug_endpoints() -> None:
    text = (DAEMONSET / "README.md").read_text()
    assert "failurePolicy: Fail" in text
    assert "/debug/config" in text and "loopback" in text


# --- RBAC --------------------------------------------------------------------------------


def grants(rules: list[Obj]) -> set[tuple[str, str, str, str | None]]:
    """(apiGroup, resource, verb, resourceName or None) for every combination."""
    out = set()
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [None]:
                        out.add((group, resource, verb, name))
    return out


def test_controller_cluster_role_is_exactly_what_it_uses() -> None:
    role = one(render("default"), "ClusterRole", "meshctl")
    watched = [
        ("", "namespaces"), ("", "nodes"), ("", "pods"), ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "peerauthentications"),
        ("security.istio.io", "requestauthentications"),
        ("networking.istio.io", "virtualservices"),
        ("networking.istio.io", "destinationrules"),
        ("networking.istio.io", "serviceentries"),
        ("telemetry.istio.io", "telemetries"),
    ]  # fmt: skip
    expected = {(g, r, verb, None) for g, r in watched for verb in ("list", "watch")}
    expected.add(("authentication.k8s.io", "tokenreviews", "create", None))
    for verb in ("get", "patch"):  # its webhook configuration's caBundle, nothing else
        expected.add(
            (
                "admissionregistration.k8s.io",
                "validatingwebhookconfigurations",
                verb,
                WEBHOOK_CONFIGURATION,
            )
        )
    assert grants(role["rules"]) == expected


def test_controller_may_list_and_watch_every_kind_its_kubernetes_source_reads() -> None:
    role = one(render("default"), "ClusterRole", "meshctl")
    read = {(KIND_SPECS[k].group, KIND_SPECS[k].plural) for k in ALL_KINDS}
    for verb in ("list", "watch"):
        assert {(g, r) for g, r, v, _ in grants(role["rules"]) if v == verb} == read


def test_controller_namespace_role_is_exactly_its_lease_ca_secret_and_root_configmap() -> None:
    role = one(render("default"), "Role", "meshctl")
    assert role["metadata"]["namespace"] == "meshagent-system"
    assert grants(role["rules"]) == {
        ("coordination.k8s.io", "leases", "create", None),
        ("coordination.k8s.io", "leases", "get", "meshctl"),
        ("coordination.k8s.io", "leases", "update", "meshctl"),
        ("", "secrets", "create", None),
        ("", "secrets", "get", "meshagent-ca"),
        ("", "configmaps", "create", None),
        ("", "configmaps", "get", "meshagent-root"),
        ("", "configmaps", "update", "meshagent-root"),
    }


def test_agent_mounts_the_root_configmap_the_controller_publishes(daemonset, agent) -> None:
    args = dict(zip(agent["args"][1::2], agent["args"][2::2], strict=True))
    ca_file = Path(args["--controller-ca-file"])
    mount, volume = volume_at(daemonset, agent, str(ca_file.parent))
    assert mount["readOnly"] is True
    assert volume["configMap"]["name"] == ROOT_CONFIGMAP
    assert volume["configMap"].get("optional") is False  # never start in plaintext
    assert volume["configMap"]["items"] == [{"key": ROOT_CONFIGMAP_KEY, "path": ca_file.name}]


def test_every_agent_argument_is_a_meshagent_run_option(agent: Obj) -> None:
    """The DaemonSet's command line parses, and lands in the agent's settings."""
    assert agent["args"][0] == "run"
    context = run_command.make_context("run", list(agent["args"][1:]))
    params = {k: v for k, v in context.params.items() if k not in ("config_file", "verbose")}
    config = load_config(Path("/nonexistent/agent.json"), **params)
    assert config.controller_ca_file == Path("/etc/meshagent/root/root.pem")
    assert config.token_file == Path("/var/run/secrets/meshagent/token")


def test_only_the_controller_is_bound_and_the_agent_has_no_api_access() -> None:
    objs = render("default")
    bindings = [o for o in objs if o["kind"] in {"RoleBinding", "ClusterRoleBinding"}]
    assert {(b["kind"], b["roleRef"]["name"]) for b in bindings} == {
        ("RoleBinding", "meshctl"),
        ("ClusterRoleBinding", "meshctl"),
    }
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "meshctl", "namespace": "meshagent-system"}
        ]
    agent_account = one(objs, "ServiceAccount", "meshagent")
    assert agent_account["automountServiceAccountToken"] is False
    assert pod_spec(one(objs, "DaemonSet", "meshagent"))["serviceAccountName"] == "meshagent"


# --- kernel headers: the node's, else the image's -----------------------------------------

RELEASE = "6.1.0-99-amd64"
IMAGE_HEADERS = {"MESHAGENT_KERNEL_HEADERS": "/opt/kernel-headers"}


@pytest.mark.parametrize(
    ("node_has", "env", "expected"),
    [
        ([f"lib/modules/{RELEASE}/build/include/generated/"], IMAGE_HEADERS, None),
        (["sys/kernel/kheaders.tar.xz"], IMAGE_HEADERS, None),
        ([], IMAGE_HEADERS, "/opt/kernel-headers"),
        # a build link without generated headers (headers of another flavour) is no use
        ([f"lib/modules/{RELEASE}/build/include/linux/"], IMAGE_HEADERS, "/opt/kernel-headers"),
        # headers for another release only
        (
            ["lib/modules/5.10.0-1-amd64/build/include/generated/"],
            IMAGE_HEADERS,
            "/opt/kernel-headers",
        ),
        ([], {}, None),
        ([], {**IMAGE_HEADERS, "BCC_KERNEL_SOURCE": "/srv/mine"}, None),
    ],
)
def test_agent_falls_back_to_the_image_headers_only_where_the_node_has_none(
    tmp_path: Path, node_has: list[str], env: dict[str, str], expected: str | None
) -> None:
    for entry in node_has:
        if entry.endswith("/"):
            (tmp_path / entry).mkdir(parents=True)
        else:
            (tmp_path / entry).parent.mkdir(parents=True)
            (tmp_path / entry).write_bytes(b"")
    assert fallback_kernel_headers(RELEASE, env, root=tmp_path) == expected


def test_the_image_sets_the_headers_variable_the_agent_reads() -> None:
    text = (DAEMONSET / "Containerfile").read_text()
    assert re.search(rf"^ENV {HEADERS_ENV}=", text, re.M)
