"""lab/kubecontrol.py without running anything: the certificates and kubeconfigs it makes,
where it looks for the binaries, and its clear error when they are missing."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from meshagent.lab import kubecontrol
from meshagent.lab.kubecontrol import ControlPlane, ControlPlaneError, find_binaries


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_apiserver_certificate_names_every_address_pods_and_tests_dial(tmp_path) -> None:
    plane = ControlPlane(tmp_path, secure_port=16999)
    plane._ensure_pki()
    ca, cert = load(plane.pki / "ca.crt"), load(plane.pki / "apiserver.crt")
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.96.0.1"),
    }
    assert "kubernetes.default.svc" in sans.get_values_for_type(x509.DNSName)
    assert "kubernetes.default.svc.cluster.local" in sans.get_values_for_type(x509.DNSName)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for key in ("ca.key", "apiserver.key", "admin.key", "sa.key"):
        assert stat.S_IMODE((plane.pki / key).stat().st_mode) == 0o600


def test_the_admin_is_a_system_masters_client_and_a_second_start_reuses_the_pki(
    tmp_path,
) -> None:
    plane = ControlPlane(tmp_path)
    plane._ensure_pki()
    admin = load(plane.pki / "admin.crt")
    orgs = [a.value for a in admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    assert orgs == ["system:masters"]
    before = {p.name: p.read_bytes() for p in plane.pki.iterdir()}
    ControlPlane(tmp_path)._ensure_pki()
    assert {p.name: p.read_bytes() for p in plane.pki.iterdir()} == before


def test_kubeconfigs_by_client_certificate_or_token(tmp_path) -> None:
    plane = ControlPlane(tmp_path, secure_port=16998)
    plane._ensure_pki()
    node = yaml.safe_load(
        plane.kubeconfig_for("system:node:node-1", groups=["system:nodes"]).read_text()
    )
    assert node["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:16998"
    user = node["users"][0]["user"]
    cert = load(Path(user["client-certificate"]))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "system:node:node-1"
    )
    cert.verify_directly_issued_by(load(plane.ca_file))
    sa = yaml.safe_load(plane.kubeconfig_for("system:serviceaccount:x:y", token="t0k").read_text())
    assert sa["users"][0]["user"] == {"token": "t0k"}
    assert sa["current-context"] == "system:serviceaccount:x:y"


def test_missing_binaries_name_the_install_script(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(kubecontrol.BIN_DIR_ENV, raising=False)
    monkeypatch.setattr(kubecontrol, "DEFAULT_BIN_DIR", tmp_path / "none")
    with pytest.raises(ControlPlaneError, match=r"scripts/install\.sh"):
        find_binaries()
    for name in kubecontrol.BINARIES:
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    assert find_binaries(tmp_path) == {n: tmp_path / n for n in kubecontrol.BINARIES}


def test_another_address_and_names_are_in_the_certificate_issued_again(tmp_path) -> None:
    ControlPlane(tmp_path)._ensure_pki()
    plane = ControlPlane(tmp_path, address="172.30.0.1", server_names=["apiserver.lab"])
    plane._ensure_pki()
    assert plane.url == "https://172.30.0.1:16443"
    cert = load(plane.pki / "apiserver.crt")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("172.30.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "apiserver.lab" in sans.get_values_for_type(x509.DNSName)
    cert.verify_directly_issued_by(load(plane.ca_file))  # same CA: old kubeconfigs still work
