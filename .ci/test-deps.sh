#!/usr/bin/env bash
# What the tests need from Debian, installed only when its commands are missing (run by `make test`, so a fresh
# machine's one command runs every test): chromium (the dashboard's browser tests), OpenSSH (the tunnel to a cloud
# controller's dashboard, tests/support/sshd.py), rclone, fuse3 and s3fs (S3 MOUNTs), etcd (the Kubernetes test
# cluster, tests/support/kube_cluster.py), and containerd, runc and the CNI plugins (its real node,
# tests/support/kube_node.py). As root (or with passwordless sudo) it runs apt-get; otherwise it prints the one
# command to run and fails.
set -euo pipefail
debian_packages=()
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || debian_packages+=(chromium)
if ! command -v ssh >/dev/null || { ! command -v sshd >/dev/null && [[ ! -x /usr/sbin/sshd ]]; }; then
    debian_packages+=(openssh-server openssh-client)
fi
command -v rclone >/dev/null && command -v fusermount3 >/dev/null || debian_packages+=(rclone fuse3)
command -v s3fs >/dev/null || debian_packages+=(s3fs)
# Container images (image_id: docker:...) on the local cloud run in podman: the tests build an image from a local
# root filesystem (no registry needed).
command -v podman >/dev/null || debian_packages+=(podman)
command -v etcd >/dev/null || [[ -x /usr/bin/etcd ]] || debian_packages+=(etcd-server)
# The Kubernetes test cluster's real node (tests/kube_node.py): a kubelet runs pods in containerd and runc, on the
# CNI bridge.
command -v containerd >/dev/null && command -v ctr >/dev/null || debian_packages+=(containerd)
command -v runc >/dev/null || debian_packages+=(runc)
[[ -x /usr/lib/cni/bridge ]] || debian_packages+=(containernetworking-plugins)
command -v ip >/dev/null || debian_packages+=(iproute2)
(( ${#debian_packages[@]} )) || exit 0
command -v apt-get >/dev/null \
    || { echo "test-deps: ${debian_packages[*]} missing and there is no apt-get: install them" >&2; exit 1; }
sudo=()
if [[ "$(id -u)" != 0 ]]; then
    sudo -n true 2>/dev/null \
        || { echo "test-deps: run: sudo apt-get update && sudo apt-get install -y ${debian_packages[*]}" >&2; exit 1; }
    sudo=(sudo -n)
fi
echo "test-deps: installing ${debian_packages[*]} from Debian (apt-get)" >&2
{ DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${debian_packages[@]}"; } >&2 \
    || { echo "test-deps: apt-get could not install ${debian_packages[*]}" >&2; exit 1; }
# Debian starts etcd as a service on install where systemd runs; the tests start their own on free ports.
