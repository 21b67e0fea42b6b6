#!/usr/bin/env bash
# The first thing `make test` prints: what it will install or build before the tests run, and about how long each
# takes on 2 cores (a fresh machine builds the Pulumi engine, the Kubernetes provider plugin and the test cluster's
# binaries from the Go module proxy when their official releases cannot be had). Reads only the cache folders and
# the pinned versions in the source, so it runs before the venv exists. Prints nothing to build on a warm machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${XDG_CACHE_HOME:-$HOME/.cache}/sortie"
pinned() { sed -n "s/^$1 = \"\\(.*\\)\"/\\1/p" "$2" | head -1; }
engine_version="$(pinned PINNED_VERSION orchestrator/infra/engine.py)"
kube_version="$(pinned KUBERNETES_VERSION orchestrator/infra/kube_binaries.py)"
kwok_version="$(pinned KWOK_VERSION orchestrator/infra/kube_binaries.py)"
steps=()
minutes=0
add() { steps+=("$1 (~$2 min)"); minutes=$((minutes + $2)); }
[[ -x .venv/bin/python && -f .venv/.installed ]] || add "the Python venv (pip install -e '.[dev]')" 3
engine_root="${SORTIE_ENGINE_ROOT:-$cache/engine/v$engine_version}"
[[ -x "$engine_root/bin/pulumi" ]] || add "the Pulumi engine v$engine_version (its release, else a Go build)" 6
compgen -G "$cache/plugins/kubernetes/v*/pulumi-resource-kubernetes" >/dev/null \
    || add "the Kubernetes provider plugin (its release, else a Go build)" 7
[[ -x "$cache/kubernetes/v$kube_version/bin/kube-apiserver" && -x "$cache/kubernetes/v$kube_version/bin/kubelet" ]] \
    || add "Kubernetes v$kube_version's control plane and kubelet (Go build)" 15
[[ -x "$cache/kwok/v$kwok_version/bin/kwok" ]] || add "kwok v$kwok_version (Go build)" 3
if (( ${#steps[@]} )); then
    echo "make test: a first run on this machine; before the tests it installs or builds:" >&2
    for step in "${steps[@]}"; do echo "  - $step" >&2; done
    echo "  about $minutes min of builds on 2 cores (cached under $cache for the next run), then the tests;" \
        "progress follows" >&2
fi
