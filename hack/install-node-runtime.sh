#!/usr/bin/env bash
# Installs the Debian packages the real test node, the image build and the quota tests
# need: containerd, runc, the CNI plugins, iptables and conntrack (the node), buildah,
# mmdebstrap, umoci and skopeo (images without a Docker engine or registry), redis-server
# (tests/tests/quotas.rs runs its own instance on a loopback port, for quotas shared by
# frontends). Idempotent: when every package is already installed it does nothing, so a
# second run costs a fraction of a second.
#
# Versions are Debian bookworm's (containerd 1.6, runc 1.1, CNI plugins 1.1): kubelet 1.37
# still falls back to its own cgroup driver setting with containerd 1.6; Kubernetes 1.38
# will need containerd 2.x (hack/README.md).
# Usage: hack/install-node-runtime.sh
set -euo pipefail

packages=(containerd runc containernetworking-plugins iptables conntrack iproute2
  buildah mmdebstrap umoci skopeo redis-server)

log() { printf '[install-node-runtime %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  log "all node runtime packages are installed"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "install-node-runtime: FAILED: packages missing (${missing[*]}) and not running as root;" \
    "run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
log "installing ${missing[*]} (about 30 s after apt-get update)..."
start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || { echo "install-node-runtime: FAILED at step 'apt-get update'" >&2; exit 1; }
apt-get install -y -qq "${missing[@]}" >/dev/null ||
  { echo "install-node-runtime: FAILED at step 'apt-get install ${missing[*]}'" >&2; exit 1; }
# Debian starts containerd and redis-server as services where it can; the test node and the
# quota tests run their own instances with their own sockets, ports and state, so system
# ones are not needed (and there is no systemd here).
log "installed in $((SECONDS - start))s"
