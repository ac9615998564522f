"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

For the lab and the tests. `open_control_plane(workdir)` (or `ControlPlane.start`/`stop`)
makes, under ``workdir``:

    pki/        a CA, the apiserver's serving certificate (127.0.0.1, 10.96.0.1,
                kubernetes.default.svc, ...), the service-account key pair, the admin's
                client certificate (group system:masters); kept and reused by a later start
    etcd/       etcd's data (reused by a later start: the cluster's objects survive)
    logs/       etcd.log, kube-apiserver.log, kube-controller-manager.log
    admin.kubeconfig
    pids.json   the running processes, so another process can stop them (`stop_recorded`)

etcd listens on free loopback ports, kube-apiserver on 127.0.0.1:``secure_port`` (16443 by
default: clear of the lab's 15012/15014 and of a host's 6443; ``address`` puts it on another
address of this network namespace, which its certificate then names too, as it does any
``server_names``; ``service_cidr`` may name an IPv4 and an IPv6 range, comma-separated, for
dual-stack Services), kube-controller-manager serves no port. `start` returns once
``/readyz`` answers ok (bounded; the error carries the log tails). `stop` sends SIGTERM and
SIGKILL after a bound (a SIGTERM'd apiserver keeps serving watches for up to 60 s) and
removes nothing: the caller owns ``workdir``.

The binaries: kube-apiserver and kube-controller-manager v1.36.2 from ``bin_dir``,
$MESHAGENT_KUBE_BIN, the repository's ``.kube-bin/`` (where ``scripts/install.sh`` unpacks
them) or $PATH; etcd (Debian's ``etcd-server``) from the same places.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "ControlPlane",
    "ControlPlaneError",
    "find_binaries",
    "open_control_plane",
    "stop_recorded",
    "write_kubeconfig",
]

KUBE_VERSION = "v1.36.2"
REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR_ENV = "MESHAGENT_KUBE_BIN"
DEFAULT_BIN_DIR = REPO_ROOT / ".kube-bin"
DEFAULT_SECURE_PORT = 16443
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service's ClusterIP: first address of the range
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
READY_TIMEOUT = 60.0
STOP_GRACE = 5.0
CERT_LIFETIME = timedelta(days=365)
LOG_TAIL_LINES = 30
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
# Controllers a lab without cloud, node IPAM or volumes has no use for.
CONTROLLERS = "*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-persistentvolume-binder"
ADMIN_USER = "kubernetes-admin"


class ControlPlaneError(RuntimeError):
    """The control plane could not start (the message says why, with log tails)."""


def find_binaries(bin_dir: Path | None = None) -> dict[str, Path]:
    """Paths of etcd, kube-apiserver and kube-controller-manager; raises ControlPlaneError."""
    folders = [bin_dir] if bin_dir else []
    if os.environ.get(BIN_DIR_ENV):
        folders.append(Path(os.environ[BIN_DIR_ENV]))
    folders.append(DEFAULT_BIN_DIR)
    found, missing = {}, []
    for name in BINARIES:
        candidates = [folder / name for folder in folders]
        on_path = shutil.which(name)
        if on_path:
            candidates.append(Path(on_path))
        path = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        raise ControlPlaneError(
            f"{', '.join(missing)} not found in {', '.join(map(str, folders))} or $PATH;"
            " run scripts/install.sh (it installs etcd-server and unpacks Kubernetes"
            f" {KUBE_VERSION} into {DEFAULT_BIN_DIR})"
        )
    return found


# -- certificates ---------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class _CA:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert, self.key = cert, key

    @classmethod
    def create(cls, crt: Path, key_path: Path) -> _CA:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        name = _name("meshlab-kubernetes-ca")
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + CERT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(key_path, _key_pem(key))
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert, key)

    @classmethod
    def load(cls, crt: Path, key_path: Path) -> _CA:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(cert, key)

    def issue(
        self,
        crt: Path,
        key_path: Path,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        server_names: Sequence[str] = (),
        client: bool = False,
    ) -> None:
        """A leaf for ``common_name`` (a server with ``server_names``, else a client)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organizations))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + CERT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server_names:
            sans: list[x509.GeneralName] = []
            for name in server_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    sans.append(x509.DNSName(name))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        _write_private(key_path, _key_pem(key))
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _valid(crt: Path, key: Path) -> bool:
    """Both files there and the certificate good for at least another day."""
    if not (crt.is_file() and key.is_file()):
        return False
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    return cert.not_valid_after_utc > datetime.now(UTC) + timedelta(days=1)


def _names_all(crt: Path, names: Sequence[str]) -> bool:
    """Whether the certificate's SANs include every one of ``names``."""
    sans = _sans(x509.load_pem_x509_certificate(crt.read_bytes()))
    return set(names) <= sans


def _sans(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)} | set(
        ext.get_values_for_type(x509.DNSName)
    )


def write_kubeconfig(
    path: Path,
    server: str,
    ca_file: Path,
    *,
    user: str,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    token: str | None = None,
) -> Path:
    """A one-context kubeconfig for ``user`` at ``server``, by client certificate or token."""
    if (client_cert is None) == (token is None):
        raise ValueError("a kubeconfig user needs exactly one of a client certificate or a token")
    credential: dict[str, str] = {"token": token} if token is not None else {}
    if client_cert is not None:
        if client_key is None:
            raise ValueError("a client certificate needs its key")
        credential = {
            "client-certificate": str(client_cert.resolve()),
            "client-key": str(client_key.resolve()),
        }
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "meshlab",
                "cluster": {"server": server, "certificate-authority": str(ca_file.resolve())},
            }
        ],
        "users": [{"name": user, "user": credential}],
        "contexts": [{"name": user, "context": {"cluster": "meshlab", "user": user}}],
        "current-context": user,
    }
    _write_private(path, yaml.safe_dump(config, sort_keys=False).encode())
    return path


# -- processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def _terminate(pids: Sequence[int], grace: float) -> None:
    """SIGTERM ``pids``, wait up to ``grace`` seconds, SIGKILL those still there."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        _reap(pids)
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        _reap(pids)
        time.sleep(0.02)
    _reap(pids)


def _reap(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


class ControlPlane:
    """etcd, kube-apiserver and kube-controller-manager for ``workdir`` (module docstring)."""

    def __init__(
        self,
        workdir: Path,
        *,
        secure_port: int = DEFAULT_SECURE_PORT,
        address: str = "127.0.0.1",
        server_names: Sequence[str] = (),
        bin_dir: Path | None = None,
        ready_timeout: float = READY_TIMEOUT,
        stop_grace: float = STOP_GRACE,
        controller_manager: bool = True,
        extra_apiserver_args: Sequence[str] = (),
        service_cidr: str = SERVICE_CIDR,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.secure_port = secure_port
        self.address = str(ipaddress.IPv4Address(address))  # where the apiserver listens
        self.server_names = tuple(server_names)
        self.bin_dir = bin_dir
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.controller_manager = controller_manager
        self.extra_apiserver_args = tuple(extra_apiserver_args)
        # One CIDR, or an IPv4 and an IPv6 one separated by a comma (dual-stack Services).
        self.service_cidr = service_cidr
        self.pki = self.workdir / "pki"
        self.log_dir = self.workdir / "logs"
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.url = f"https://{self.address}:{secure_port}"
        self.etcd_url = ""
        self._procs: dict[str, subprocess.Popen] = {}

    # -- paths of what start() makes
    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    def log(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self._procs.items()}

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start all three and return once the apiserver is ready; stops what it started
        and raises ControlPlaneError if that fails."""
        binaries = find_binaries(self.bin_dir)
        if not _port_free(self.address, self.secure_port):
            raise ControlPlaneError(
                f"{self.address}:{self.secure_port} is in use (or not an address here):"
                " another control plane? pick another secure_port"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        self._ensure_pki()
        write_kubeconfig(
            self.kubeconfig,
            self.url,
            self.ca_file,
            user=ADMIN_USER,
            client_cert=self.pki / "admin.crt",
            client_key=self.pki / "admin.key",
        )
        try:
            self._start_etcd(binaries["etcd"])
            self._spawn(
                "kube-apiserver", [str(binaries["kube-apiserver"]), *self._apiserver_args()]
            )
            if self.controller_manager:
                self._spawn(
                    "kube-controller-manager",
                    [str(binaries["kube-controller-manager"]), *self._controller_manager_args()],
                )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate what start() started (controller-manager and apiserver, then etcd)."""
        front = [
            self._procs[n].pid
            for n in ("kube-controller-manager", "kube-apiserver")
            if n in self._procs
        ]
        _terminate(front, self.stop_grace)
        if "etcd" in self._procs:
            _terminate([self._procs["etcd"].pid], self.stop_grace)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self._procs.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.workdir / "pids.json").unlink()

    def kubeconfig_for(self, user: str, *, groups: Sequence[str] = (), token: str | None = None):
        """A kubeconfig for ``user``: with ``token`` (e.g. a service account's), else a client
        certificate this control plane's CA issues (``groups`` become its organizations;
        e.g. ``system:node:node-1`` in ``system:nodes`` for a kubelet)."""
        safe = "".join(c if c.isalnum() or c in "-." else "_" for c in user)
        path = self.workdir / "kubeconfigs" / f"{safe}.kubeconfig"
        path.parent.mkdir(exist_ok=True)
        if token is not None:
            return write_kubeconfig(path, self.url, self.ca_file, user=user, token=token)
        crt, key = self.pki / f"user-{safe}.crt", self.pki / f"user-{safe}.key"
        ca = _CA.load(self.ca_file, self.pki / "ca.key")
        ca.issue(crt, key, user, organizations=groups, client=True)
        return write_kubeconfig(
            path, self.url, self.ca_file, user=user, client_cert=crt, client_key=key
        )

    # -- internals
    def _ensure_pki(self) -> None:
        pki = self.pki
        pki.mkdir(mode=0o700, exist_ok=True)
        if _valid(pki / "ca.crt", pki / "ca.key"):
            ca = _CA.load(pki / "ca.crt", pki / "ca.key")
            fresh = False
        else:
            ca = _CA.create(pki / "ca.crt", pki / "ca.key")
            fresh = True
        names = [
            "127.0.0.1",
            SERVICE_IP,
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        names += [n for n in (self.address, *self.server_names) if n not in names]
        crt, key = pki / "apiserver.crt", pki / "apiserver.key"
        if fresh or not _valid(crt, key) or not _names_all(crt, names):
            ca.issue(
                pki / "apiserver.crt", pki / "apiserver.key", "kube-apiserver", server_names=names
            )
        if fresh or not _valid(pki / "admin.crt", pki / "admin.key"):
            ca.issue(
                pki / "admin.crt",
                pki / "admin.key",
                ADMIN_USER,
                organizations=["system:masters"],
                client=True,
            )
        if not (pki / "sa.key").is_file() or not (pki / "sa.pub").is_file():
            sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write_private(pki / "sa.key", _key_pem(sa))
            (pki / "sa.pub").write_bytes(
                sa.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.log(name), "ab") as log:
            log.write(f"--- {datetime.now(UTC).isoformat()} {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # no terminal signals; outlives its parent if asked
            )
        self._procs[name] = proc
        self._record()
        return proc

    def _record(self) -> None:
        data = {"workdir": str(self.workdir), "pids": self.pids}
        tmp = self.workdir / ".pids.json.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.workdir / "pids.json")

    def _start_etcd(self, etcd: Path, attempts: int = 3) -> None:
        """etcd on two free loopback ports (client, peer); a port taken between choosing it
        and etcd binding it makes etcd exit: then try other ports."""
        data = self.workdir / "etcd"
        for attempt in range(attempts):
            client, peer = _free_port(), _free_port()
            self.etcd_url = f"http://127.0.0.1:{client}"
            peer_url = f"http://127.0.0.1:{peer}"
            proc = self._spawn(
                "etcd",
                [
                    str(etcd),
                    "--name=default",
                    f"--data-dir={data}",
                    f"--listen-client-urls={self.etcd_url}",
                    f"--advertise-client-urls={self.etcd_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=default={peer_url}",
                    "--logger=zap",
                    "--log-outputs=stderr",
                ],
            )
            deadline = time.monotonic() + min(15.0, self.ready_timeout)
            while time.monotonic() < deadline and proc.poll() is None:
                if self._etcd_healthy():
                    return
                time.sleep(0.1)
            if proc.poll() is None:
                break  # running but not healthy in time
            del self._procs["etcd"]
            if attempt + 1 < attempts and "address already in use" in _tail(self.log("etcd")):
                continue
            break
        raise ControlPlaneError(
            f"etcd did not become healthy at {self.etcd_url}; {self.log('etcd')} ends:\n"
            + _tail(self.log("etcd"))
        )

    def _etcd_healthy(self) -> bool:
        host, port = self.etcd_url.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=1)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            return response.status == 200 and b"true" in response.read()
        except OSError:
            return False
        finally:
            conn.close()

    def _apiserver_args(self) -> list[str]:
        pki = self.pki
        return [
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={self.address}",
            f"--advertise-address={self.address}",
            f"--secure-port={self.secure_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--authorization-mode=Node,RBAC",
            # No `kubernetes` endpoints: a loopback one is invalid, and where pods reach the
            # apiserver is the lab's to say (an EndpointSlice of its own).
            "--endpoint-reconciler-type=none",
            # Pods made by the lab name no token volumes; the server still validates them.
            "--disable-admission-plugins=ServiceAccount",
            f"--service-cluster-ip-range={self.service_cidr}",
            "--allow-privileged=true",
            "--profiling=false",
            *self.extra_apiserver_args,
        ]

    def _controller_manager_args(self) -> list[str]:
        pki = self.pki
        return [
            f"--kubeconfig={self.kubeconfig}",
            "--secure-port=0",  # serves nothing: no port to clash, no auth kubeconfigs
            f"--controllers={CONTROLLERS}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={self.service_cidr}",
            "--leader-elect=false",
            "--profiling=false",
        ]

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        return context

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET ``path`` from the apiserver as the admin: (status, body)."""
        conn = http.client.HTTPSConnection(
            self.address, self.secure_port, context=self._ssl_context(), timeout=timeout
        )
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer yet"
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise ControlPlaneError(
                        f"{name} exited with {proc.returncode} during start;"
                        f" {self.log(name)} ends:\n{_tail(self.log(name))}"
                    )
            try:
                status, body = self.get("/readyz", timeout=2)
                if status == 200:
                    return
                last = f"HTTP {status}: {body.decode(errors='replace').strip()[-500:]}"
            except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise ControlPlaneError(
                    f"kube-apiserver not ready at {self.url}/readyz after"
                    f" {self.ready_timeout:.0f}s ({last}); {self.log('kube-apiserver')}"
                    f" ends:\n{_tail(self.log('kube-apiserver'))}"
                )
            time.sleep(0.25)


@contextlib.contextmanager
def open_control_plane(workdir: Path, **options) -> Iterator[ControlPlane]:
    """A started `ControlPlane` (keyword options as its constructor's), stopped on exit,
    also when the body raises."""
    plane = ControlPlane(workdir, **options)
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


def stop_recorded(workdir: Path, grace: float = STOP_GRACE) -> list[int]:
    """Stop the processes a `ControlPlane.start` in another process recorded in
    ``workdir/pids.json`` (only those still running our binaries for that workdir);
    returns the pids signalled."""
    workdir = Path(workdir).resolve()
    record = workdir / "pids.json"
    try:
        pids = json.loads(record.read_text())["pids"]
    except (OSError, ValueError, KeyError):
        return []
    ours = {}
    for name, pid in pids.items():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if name in cmdline and str(workdir) in cmdline:  # not a recycled pid
            ours[name] = pid
    front = [ours[n] for n in ("kube-controller-manager", "kube-apiserver") if n in ours]
    _terminate(front, grace)
    if "etcd" in ours:
        _terminate([ours["etcd"]], grace)
    record.unlink(missing_ok=True)
    return list(ours.values())
