#!/usr/bin/env bash
# Provisions every VM (run by Vagrant as root): what k3s and the meshagent DaemonSet
# need from a node, then the meshagent image, built here from the repository in
# /vagrant and left where k3s imports images when it starts.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
log() { printf '[node %s] %s\n' "$(hostname)" "$*"; }

log "installing podman and kernel headers"
apt-get update -q >/dev/null
apt-get install -y -q ca-certificates curl podman >/dev/null
# bcc compiles against the node's headers (the DaemonSet mounts /lib/modules and
# /usr/src). A box whose kernel is older than the archive has none to install; the
# agent then uses the headers inside the image.
if ! apt-get install -y -q --no-install-recommends "linux-headers-$(uname -r)" >/dev/null; then
  log "no linux-headers-$(uname -r) in the archive: the agent will use the image's headers"
fi

# The agent pins its programs in the bpffs and attaches them in cgroup v2.
if ! findmnt -n -t bpf /sys/fs/bpf >/dev/null; then
  log "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
if [ "$(stat -f -c %T /sys/fs/cgroup)" != cgroup2fs ]; then
  echo "meshagent needs the unified cgroup v2 hierarchy at /sys/fs/cgroup" >&2
  exit 1
fi

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' /vagrant/pyproject.toml)
# The manifests say `meshagent:<version>`, which the runtime reads as this name.
image="docker.io/library/meshagent:${version}"
log "building ${image} (a few minutes)"
# Host networking for the build's RUN steps (apt, pip): no container network needed.
podman build --quiet --network host --build-arg "VERSION=${version}" \
  -f /vagrant/daemonset/Containerfile -t "${image}" /vagrant >/dev/null
images=/var/lib/rancher/k3s/agent/images
mkdir -p "${images}"
rm -f "${images}/meshagent.tar"
podman save --quiet --format docker-archive -o "${images}/meshagent.tar" "${image}"
# k3s reads that folder when it starts; when it already runs (re-provisioning),
# import into its containerd now.
if systemctl is-active --quiet k3s || systemctl is-active --quiet k3s-agent; then
  log "importing ${image} into the running k3s"
  k3s ctr images import "${images}/meshagent.tar" >/dev/null
fi
log "image ready"
