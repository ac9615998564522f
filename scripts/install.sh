#!/usr/bin/env bash
# Installs everything meshagent needs on a Debian 12 machine (as root), then the
# project into a virtual environment. README, .ci/run and the container build all
# use this one script. Re-running it is fast and changes nothing.
#
#   scripts/install.sh                # everything: runtime, lab, tests, benchmarks
#   scripts/install.sh --runtime      # only what the agent and controller need (container)
#   VENV=/opt/meshagent scripts/install.sh --runtime
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PROFILE=full
[ "${1:-}" = "--runtime" ] && PROFILE=runtime
# Debian packages: bcc's Python bindings and what the agent runs ...
APT_PACKAGES=(python3-bpfcc python3-venv iproute2 util-linux procps)
# ... plus what the lab, the tests, the benchmarks and the image build (scripts/build-image.sh:
# podman with runc, buildah, mmdebstrap) run.
[ "$PROFILE" = full ] && APT_PACKAGES+=(curl tcpdump nginx-light iperf3 wrk haproxy shellcheck ruby vagrant podman runc buildah mmdebstrap)
# ... and etcd for the lab's Kubernetes control plane (kube-apiserver: see below), and a
# stock gRPC (Debian's grpcio, for the system Python that lab pods run) and h2load/nghttp
# (nghttp2-client) for the e2e tests.
[ "$PROFILE" = full ] && APT_PACKAGES+=(etcd-server python3-grpcio nghttp2-client)
# ... and Debian's Prometheus, which tests/e2e/test_prometheus.py runs against the lab.
[ "$PROFILE" = full ] && APT_PACKAGES+=(prometheus)
EXTRAS="[test,bench]"
[ "$PROFILE" = runtime ] && EXTRAS=""

log() { printf '[install] %s\n' "$*"; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
# bcc compiles against kernel headers; install Debian's when the kernel ships none.
# (A container build skips this: the agent finds the node's headers through a mount.)
KVER=$(uname -r)
if [ "$PROFILE" = full ] && [ ! -e "/lib/modules/$KVER/build/include" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
  dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q 'ok installed' ||
    missing+=(linux-headers-amd64)
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# nginx-light's package starts a server on port 80; the project starts its own.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi
# etcd-server's package starts a cluster member on 2379; the lab starts its own etcd.
if [ "$PROFILE" = full ] && command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi
# prometheus's package starts a server on 9090; tests/e2e/test_prometheus.py starts its own.
if [ "$PROFILE" = full ] && command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

# kube-apiserver and kube-controller-manager for the lab's control plane (lab/kubecontrol.py
# looks in $KUBE_BIN): from ../shared/k8s/ beside the repository, or beside the local repository
# it was cloned from (a fresh clone in /tmp), when it is there; else the official release
# downloads (checked against their published sha256).
KUBE_VERSION=v1.36.2
KUBE_BIN=$ROOT/.kube-bin
kube_ok() { [ -x "$KUBE_BIN/$1" ] && "$KUBE_BIN/$1" --version 2>/dev/null | grep -qF "$KUBE_VERSION"; }
if [ "$PROFILE" = full ] && ! { kube_ok kube-apiserver && kube_ok kube-controller-manager; }; then
  shared=""
  for base in "$ROOT" "$(git -C "$ROOT" config --get remote.origin.url 2>/dev/null || true)"; do
    if [ -n "$base" ] && [ -x "$base/../shared/k8s/unpack" ]; then
      shared=$base/../shared/k8s
      break
    fi
  done
  if [ -n "$shared" ]; then
    log "unpacking Kubernetes $KUBE_VERSION from $shared into $KUBE_BIN"
    "$shared/unpack" "$KUBE_BIN" >/dev/null
  else
    arch=$(dpkg --print-architecture)
    mkdir -p "$KUBE_BIN"
    for bin in kube-apiserver kube-controller-manager; do
      kube_ok "$bin" && continue
      url="https://dl.k8s.io/release/$KUBE_VERSION/bin/linux/$arch/$bin"
      log "downloading $url"
      curl -fsSL --retry 3 -o "$KUBE_BIN/$bin.tmp" "$url"
      echo "$(curl -fsSL --retry 3 "$url.sha256")  $KUBE_BIN/$bin.tmp" | sha256sum -c --quiet
      chmod 0755 "$KUBE_BIN/$bin.tmp"
      mv "$KUBE_BIN/$bin.tmp" "$KUBE_BIN/$bin"
    done
  fi
fi

if [ "$PROFILE" = full ] && [ ! -e "/lib/modules/$KVER/build/include" ] &&
  [ ! -e /sys/kernel/kheaders.tar.xz ]; then
  hdr=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-amd64' | sort -V | tail -n 1)
  common=${hdr%-amd64}-common
  if [ -z "$hdr" ] || [ ! -d "$common" ]; then echo "no kernel headers under /usr/src" >&2; exit 1; fi
  log "linking /lib/modules/$KVER/{build,source} to $hdr"
  mkdir -p "/lib/modules/$KVER"
  ln -sfn "$hdr" "/lib/modules/$KVER/build"
  ln -sfn "$common" "/lib/modules/$KVER/source"
fi

# bpffs: where the agent pins its programs and maps.
if [ "$PROFILE" = full ] && ! awk '$2=="/sys/fs/bpf" && $3=="bpf" {found=1} END {exit !found}' /proc/mounts; then
  log "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

# The venv uses Debian's Python (the one bcc's bindings are built for) and sees only
# the `bcc` package from Debian's dist-packages, none of Debian's other modules.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  /usr/bin/python3 -m venv "$VENV"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$VENV/debian-bcc"
ln -sfn /usr/lib/python3/dist-packages/bcc "$VENV/debian-bcc/bcc"
echo "$VENV/debian-bcc" >"$site/debian_bcc.pth"

stamp="$VENV/.meshagent-installed"
want=$( (cat "$ROOT/pyproject.toml" "$ROOT/setup.py"; echo "$PROFILE") | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing the project into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip >"$VENV/pip-upgrade.log" 2>&1 || cat "$VENV/pip-upgrade.log" >&2
  # pip's and setuptools' chatter (deprecations, "folders with the same name as your
  # package") goes to a log; it is shown only if the install fails
  if ! "$VENV/bin/pip" install -q -e "$ROOT$EXTRAS" >"$VENV/pip-install.log" 2>&1; then
    cat "$VENV/pip-install.log" >&2
    echo "installing the project failed (log: $VENV/pip-install.log)" >&2
    exit 1
  fi
  echo "$want" >"$stamp"
fi
"$VENV/bin/python" -c 'import bcc, meshagent.agent' || { echo "install check failed" >&2; exit 1; }
log "ready: $VENV/bin/meshagent, meshctl, meshlab"
