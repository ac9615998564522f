#!/usr/bin/env bash
# Provisions a worker VM (as root, after node.sh): a k3s agent joining the control
# plane. k3s keeps retrying until the server answers, so the order in which the VMs
# come up does not matter.
# Environment from the Vagrantfile: NODE_IP, CONTROL_IP, K3S_TOKEN, K3S_CHANNEL.
set -euo pipefail
log() { printf '[%s] %s\n' "$(hostname)" "$*"; }

iface=$(ip -o -4 addr show | awk -v ip="${NODE_IP}" 'index($4, ip "/") == 1 { print $2; exit }')
[ -n "${iface}" ] || { echo "no interface holds ${NODE_IP}" >&2; exit 1; }

if ! systemctl is-active --quiet k3s-agent; then
  log "installing the k3s agent (${K3S_CHANNEL}), joining ${CONTROL_IP}"
  curl -sfL https://get.k3s.io |
    INSTALL_K3S_CHANNEL="${K3S_CHANNEL}" K3S_URL="https://${CONTROL_IP}:6443" \
      K3S_TOKEN="${K3S_TOKEN}" sh -s - agent --node-ip "${NODE_IP}" --flannel-iface "${iface}"
fi
log "joined"
