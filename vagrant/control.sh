#!/usr/bin/env bash
# Provisions the control-plane VM (as root, after node.sh): the k3s server, then the
# mesh (daemonset/) and the sample application, and the `smoke` command.
# Environment from the Vagrantfile: NODE_IP, K3S_TOKEN, K3S_CHANNEL.
set -euo pipefail
log() { printf '[control] %s\n' "$*"; }

# k3s must use the private network the VMs share, not the provider's NAT interface.
iface=$(ip -o -4 addr show | awk -v ip="${NODE_IP}" 'index($4, ip "/") == 1 { print $2; exit }')
[ -n "${iface}" ] || { echo "no interface holds ${NODE_IP}" >&2; exit 1; }

if ! systemctl is-active --quiet k3s; then
  log "installing the k3s server (${K3S_CHANNEL}) on ${iface}"
  curl -sfL https://get.k3s.io |
    INSTALL_K3S_CHANNEL="${K3S_CHANNEL}" K3S_TOKEN="${K3S_TOKEN}" sh -s - server \
      --node-ip "${NODE_IP}" --advertise-address "${NODE_IP}" --flannel-iface "${iface}" \
      --write-kubeconfig-mode 0644 --disable traefik --disable servicelb
fi
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml

log "waiting for the API server"
for _ in $(seq 120); do
  kubectl get --raw /readyz >/dev/null 2>&1 && break
  sleep 2
done
kubectl get --raw /readyz >/dev/null

log "applying daemonset/ (mesh and CRDs)"
kubectl apply -k /vagrant/daemonset
kubectl wait --for condition=established --timeout=60s \
  crd -l app.kubernetes.io/part-of=meshagent
log "applying the sample application"
kubectl apply -f /vagrant/vagrant/sample-app.yaml

install -m 0755 /vagrant/vagrant/smoke /usr/local/bin/smoke
log "done: the workers join next; then run 'vagrant ssh control -- smoke'"
