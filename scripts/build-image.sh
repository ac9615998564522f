#!/usr/bin/env bash
# Builds the meshagent image (daemonset/Containerfile) on this machine with Debian's
# podman, without any container registry, then prints its size.
#
#   scripts/build-image.sh              # -> meshagent:<version of pyproject.toml>
#   IMAGE=meshagent:dev scripts/build-image.sh
#
# 1. The base image named by the Containerfile's FROM line (debian:bookworm-slim) is
#    built from Debian's packages with `mmdebstrap --variant=minbase bookworm`, trimmed
#    like the official slim image (no docs, man pages, locales, downloaded .debs), and
#    imported into podman's store under that name. Skipped when the store already has it.
# 2. podman is configured by a containers.conf of its own, build/image/containers.conf
#    (CONTAINERS_CONF points at it; the host's /etc/containers is not changed): runc
#    as the runtime (crun 1.8 refuses a hybrid cgroup v1/v2 layout) and default
#    ulimits no higher than this shell's hard limits (podman's default nofile of
#    1048576 fails where root cannot raise its limits). Use the same file to run
#    the image: `CONTAINERS_CONF=build/image/containers.conf podman run ...`.
# 3. `podman build --pull=never` with the host's CA bundle mounted into the build (at
#    /mnt, not stored in the image) for pip, so pip verifies TLS wherever
#    the host does; podman's layer cache makes a rebuild of unchanged sources quick.
#
# Needs root and podman, buildah, runc, mmdebstrap (scripts/install.sh installs them).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build/image
CONTAINERFILE=$ROOT/daemonset/Containerfile
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n 1)
IMAGE=${IMAGE:-meshagent:$VERSION}
BASE=$(awk 'toupper($1) == "FROM" { print $2; exit }' "$CONTAINERFILE")
SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY=${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

log() { printf '[build-image] %s\n' "$*"; }
die() { printf '[build-image] %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (podman's store in /var/lib/containers, mmdebstrap)"
[ -n "$VERSION" ] || die "no version in $ROOT/pyproject.toml"
[ -n "$BASE" ] || die "no FROM line in $CONTAINERFILE"
started=$(date +%s)

tools_ok() {
  local tool
  for tool in podman buildah runc mmdebstrap; do command -v "$tool" >/dev/null || return 1; done
}
if ! tools_ok; then
  log "podman, buildah, runc or mmdebstrap missing: running scripts/install.sh"
  "$ROOT/scripts/install.sh"
  tools_ok || die "podman, buildah, runc and mmdebstrap are still not all installed"
fi

mkdir -p "$BUILD"
limit() {
  # A hard limit of this shell ("unlimited" as podman's own default), at most $2.
  local value
  value=$(ulimit -H "$1")
  [ "$value" = unlimited ] && value=1048576
  [ -n "${2:-}" ] && [ "$2" -lt "$value" ] && value=$2
  printf '%s' "$value"
}
# nproc also at most kernel.pid_max: here (pid_max 32768) runc's "error setting rlimit
# type 6: operation not permitted" came for any nproc above it, even below the hard limit.
nofile=$(limit -n)
nproc=$(limit -u "$(cat /proc/sys/kernel/pid_max)")
cat >"$BUILD/containers.conf" <<EOF
# Written by scripts/build-image.sh; CONTAINERS_CONF=$BUILD/containers.conf
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$BUILD/containers.conf

if podman image exists "$BASE"; then
  log "base image $BASE: already in podman's store"
else
  log "base image $BASE: mmdebstrap --variant=minbase $SUITE"
  rm -f "$BUILD/base.tar"
  trap 'rm -f "$BUILD/base.tar.tmp" "$BUILD/base.tar"' EXIT
  # The official slim image's trimming (its /etc/dpkg/dpkg.cfg.d/docker; apt keeps no
  # downloaded .debs, as its docker-clean does), kept in the base so that the image's
  # own apt-get installs are trimmed as well. (As an --aptopt the last would break
  # mmdebstrap's own download step.) $1 in the hook is mmdebstrap's, the chroot.
  # shellcheck disable=SC2016
  mmdebstrap --variant=minbase --format=tar \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/groff/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --dpkgopt='path-exclude=/usr/share/linda/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --aptopt='APT::Install-Recommends "false"' \
    --customize-hook='echo "APT::Keep-Downloaded-Packages \"false\";" >"$1/etc/apt/apt.conf.d/90no-debs"' \
    "$SUITE" "$BUILD/base.tar.tmp" \
    "deb $DEBIAN_MIRROR $SUITE main" \
    "deb $DEBIAN_MIRROR $SUITE-updates main" \
    "deb $DEBIAN_SECURITY $SUITE-security main"
  mv "$BUILD/base.tar.tmp" "$BUILD/base.tar"
  podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    "$BUILD/base.tar" "$BASE" >/dev/null
  rm -f "$BUILD/base.tar"
  log "base image $BASE: imported"
fi

# Mounted at /mnt, a folder the base has: a mount point the image lacks would stay
# behind in it, empty. Not over the image's /etc/ssl/certs/ca-certificates.crt: the
# image installs Debian's ca-certificates, whose set-up writes that file (dpkg fails
# on a read-only mount). pip finds it through the Containerfile's ARG PIP_CERT.
[ -r "$CA_BUNDLE" ] || die "no CA bundle at $CA_BUNDLE (set CA_BUNDLE)"
mkdir -p "$BUILD/host-ca"
cp "$CA_BUNDLE" "$BUILD/host-ca/ca-certificates.crt"

log "podman build -t $IMAGE -f daemonset/Containerfile ."
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
cd "$ROOT"
podman build --pull=never --network host \
  --volume "$BUILD/host-ca:/mnt:ro" \
  --build-arg PIP_CERT=/mnt/ca-certificates.crt \
  --build-arg "VERSION=$VERSION" \
  -t "$IMAGE" -f daemonset/Containerfile .

# The image this one replaces, and its layers no other image uses (the cached ones stay):
# rebuilds after source changes would otherwise pile up untagged ~400 MB layers.
current=$(podman image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  podman rmi "$previous" >/dev/null 2>&1 || log "left the previous image ${previous:0:12} (in use)"
fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "built $IMAGE in $(($(date +%s) - started)) s: $((size / 1000000)) MB ($size bytes)"
