"""What the e2e tests on a real control plane share: a control plane of their own for a
module (`own_control_plane`), and free loopback ports for it and for controllers."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshagent.lab.kubecontrol import (
    ControlPlane,
    ControlPlaneError,
    find_binaries,
    open_control_plane,
)

from tests.e2e.conftest import _require_root


def missing(message: str) -> None:
    """A prerequisite is missing: a failure under CI (CI=true), else a skip."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """Any free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_free_port(first: int, count: int = 60) -> int:
    """The first free loopback port from `first` on (so each test module keeps clear of the
    others' and of the lab's), else any free one."""
    for port in range(first, first + count):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


@contextlib.contextmanager
def own_control_plane(name: str, first_port: int, **options: Any) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver and kube-controller-manager for one test module, in a temporary
    folder removed afterwards (also on failure); the apiserver on the first free port from
    `first_port`. `options` go to `open_control_plane` (e.g. ``service_cidr``)."""
    _require_root()
    try:
        find_binaries()
    except ControlPlaneError as exc:
        missing(str(exc))
    if shutil.which("kubectl") is None:
        missing("kubectl is not installed (Debian: kubernetes-client)")
    workdir = Path(tempfile.mkdtemp(prefix=f"meshagent-{name}-"))
    try:
        with open_control_plane(workdir, secure_port=first_free_port(first_port), **options) as cp:
            yield cp
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
