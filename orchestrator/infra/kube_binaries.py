"""Infra, the binaries of a real Kubernetes control plane, built from the Go module proxy (the test cluster's parts).

`kube-apiserver`, `kube-controller-manager` and `kube-scheduler` come from `k8s.io/kubernetes`, whose go.mod
replaces its ~33 staging modules (`k8s.io/api`, `k8s.io/client-go`, ...) with local paths that a module download
does not have. Our throwaway main module requires `k8s.io/kubernetes` and maps each staging module to its published
version (`k8s.io/api => k8s.io/api v0.37.2` for v1.37.2), read from that version's own go.mod. The version is
stamped with `-ldflags` (`k8s.io/component-base/version.gitVersion`, `gitMajor`, `gitMinor`); built plainly they
report `v0.0.0-master`. Simulated nodes come from `sigs.k8s.io/kwok` (`go install` works: no `replace`).

Cached outside any checkout, keyed by version: `${XDG_CACHE_HOME:-~/.cache}/sortie/kubernetes/v<version>/bin` and
`.../kwok/v<version>/bin`, so only a machine's first run builds them. etcd is Debian's `etcd-server` (3.4), which
this API server version runs against.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import EngineError
from orchestrator.infra.engine import Progress, cache_dir
from orchestrator.infra.go_build import install_atomically, module_file, run_go

KUBERNETES_VERSION = "1.37.2"
KWOK_VERSION = "0.8.0"
CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
KWOK_STAGES = ("node/fast/node-initialize.yaml", "node/heartbeat/node-heartbeat.yaml", "pod/fast/pod-ready.yaml",
               "pod/fast/pod-complete.yaml", "pod/fast/pod-delete.yaml")
_STAGING = re.compile(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", re.MULTILINE)


@dataclass(frozen=True)
class KubeBinaries:
    bin_dir: Path
    kwok: Path
    etcd: Path

    @property
    def kwok_stages(self) -> Path:
        return self.kwok.parent.parent / "stages.yaml"

    def path(self, name: str) -> Path:
        return self.bin_dir / name


def kube_dir(version: str = KUBERNETES_VERSION) -> Path:
    return cache_dir() / "kubernetes" / f"v{version}"


def kwok_dir(version: str = KWOK_VERSION) -> Path:
    return cache_dir() / "kwok" / f"v{version}"


def reported_version(binary: Path) -> str | None:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"v(\d+\.\d+\.\d+)", out.stdout + out.stderr)
    return match.group(1) if match else None


def find_etcd() -> Path | None:
    found = shutil.which("etcd") or next((p for p in ("/usr/bin/etcd", "/usr/local/bin/etcd")
                                          if Path(p).is_file()), None)
    return Path(found) if found else None


def staging_replaces(k8s_go_mod: str, version: str) -> list[str]:
    """`replace` lines mapping each staging module of k8s.io/kubernetes v1.X.Y to its published v0.X.Y."""
    published = "v0." + version.split(".", 1)[1]
    return [f"\t{module} => {module} {published}" for module in _STAGING.findall(k8s_go_mod)]


def _build_control_plane(version: str, progress: Progress) -> None:
    what = f"Kubernetes v{version} (kube-apiserver, kube-controller-manager, kube-scheduler)"
    build_dir = cache_dir() / "kubernetes-build" / f"v{version}"
    build_dir.mkdir(parents=True, exist_ok=True)
    log = kube_dir(version) / "install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"build of {what}\n")
    head = f"module sortie.local/kubebuild\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes v{version}\n"
    (build_dir / "go.mod").write_text(head)
    source = module_file("k8s.io/kubernetes", f"v{version}", build_dir, log, progress, what)
    replaces = staging_replaces((source / "go.mod").read_text(), version)
    if not replaces:
        raise EngineError(f"{what}: no staging modules found in k8s.io/kubernetes@v{version}'s go.mod (log: {log})")
    (build_dir / "go.mod").write_text(head + "\nreplace (\n" + "\n".join(replaces) + "\n)\n")
    imports = "\n".join(f'\t_ "k8s.io/kubernetes/cmd/{name}"' for name in (*CONTROL_PLANE, "kubelet"))
    (build_dir / "tools.go").write_text(f"//go:build tools\n\npackage kubebuild\n\nimport (\n{imports}\n)\n")
    run_go(["mod", "tidy"], build_dir, log, progress, "resolving Kubernetes' dependencies", what)
    major, minor, _patch = version.split(".")
    stamp = " ".join(f"-X k8s.io/component-base/version.{key}={value}" for key, value in (
        ("gitVersion", f"v{version}"), ("gitMajor", major), ("gitMinor", minor), ("gitTreeState", "clean")))
    building = build_dir / "bin.building"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    run_go(["build", "-v", "-trimpath", "-ldflags", f"-s -w {stamp}", "-o", f"{building}/",
            *(f"k8s.io/kubernetes/cmd/{name}" for name in CONTROL_PLANE)], build_dir, log, progress,
           "compiling the control plane", what)
    for name in CONTROL_PLANE:
        install_atomically(building / name, kube_dir(version) / "bin" / name)


def _build_kwok(version: str, progress: Progress) -> None:
    what = f"kwok v{version}"
    build_dir = cache_dir() / "kwok-build" / f"v{version}"
    build_dir.mkdir(parents=True, exist_ok=True)
    log = kwok_dir(version) / "install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"build of {what}\n")
    building = build_dir / "bin"
    # `go install module@version` builds outside any main module (kwok's go.mod has no `replace`).
    run_go(["install", "-v", "-trimpath", "-ldflags", "-s -w", f"sigs.k8s.io/kwok/cmd/kwok@v{version}"],
           build_dir, log, progress, "compiling kwok", what, extra_env={"GOBIN": str(building), "GOFLAGS": ""})
    install_atomically(building / "kwok", kwok_dir(version) / "bin" / "kwok")
    write_kwok_stages(module_file("sigs.k8s.io/kwok", f"v{version}", build_dir, log, progress, what), version)


def write_kwok_stages(source: Path, version: str = KWOK_VERSION) -> Path:
    """kwok simulates nothing without stages: its own `fast` node and pod stages (nodes become Ready and keep
    their heartbeat; pods are Running at once, complete and go away when deleted), as one multi-document file."""
    docs = [(source / "kustomize" / "stage" / rel).read_text().strip() for rel in KWOK_STAGES]
    target = kwok_dir(version) / "stages.yaml"
    target.write_text("\n---\n".join(docs) + "\n")
    return target


def install_kubelet(progress: Progress | None = None) -> Path:
    """The kubelet of the same version (a real node in the tests), built like the control plane when missing."""
    report = progress or (lambda _msg: None)
    binary = kube_dir() / "bin" / "kubelet"
    if reported_version(binary) == KUBERNETES_VERSION:
        return binary
    what = f"kubelet v{KUBERNETES_VERSION}"
    build_dir = cache_dir() / "kubernetes-build" / f"v{KUBERNETES_VERSION}"
    if not (build_dir / "go.mod").is_file() or not (build_dir / "go.sum").is_file():
        _build_control_plane(KUBERNETES_VERSION, report)  # writes and resolves the wrapper module
    major, minor, _patch = KUBERNETES_VERSION.split(".")
    stamp = " ".join(f"-X k8s.io/component-base/version.{key}={value}" for key, value in (
        ("gitVersion", f"v{KUBERNETES_VERSION}"), ("gitMajor", major), ("gitMinor", minor), ("gitTreeState", "clean")))
    building = build_dir / "kubelet.building"
    run_go(["build", "-v", "-trimpath", "-ldflags", f"-s -w {stamp}", "-o", str(building),
            "k8s.io/kubernetes/cmd/kubelet"], build_dir, kube_dir() / "install.log", report, "compiling the kubelet",
           what)
    install_atomically(building, binary)
    return binary


def find_kube_binaries() -> KubeBinaries | None:
    bin_dir = kube_dir() / "bin"
    kwok = kwok_dir() / "bin" / "kwok"
    etcd = find_etcd()
    if etcd is None or not kwok.is_file() or not (kwok.parent.parent / "stages.yaml").is_file():
        return None
    if any(reported_version(bin_dir / name) != KUBERNETES_VERSION for name in CONTROL_PLANE):
        return None
    return KubeBinaries(bin_dir, kwok, etcd)


def install_kube_binaries(progress: Progress | None = None) -> tuple[KubeBinaries, float]:
    """Build what is missing; returns the binaries and the seconds spent building (0 when all were cached)."""
    report = progress or (lambda _msg: None)
    started = time.monotonic()
    if find_etcd() is None:
        raise EngineError("etcd is not installed: run `apt-get install etcd-server` (make test does it as root)")
    if any(reported_version(kube_dir() / "bin" / name) != KUBERNETES_VERSION for name in CONTROL_PLANE):
        _build_control_plane(KUBERNETES_VERSION, report)
    if not (kwok_dir() / "bin" / "kwok").is_file() or not (kwok_dir() / "stages.yaml").is_file():
        _build_kwok(KWOK_VERSION, report)
    found = find_kube_binaries()
    if found is None:
        raise EngineError(f"the Kubernetes binaries under {kube_dir()} do not report v{KUBERNETES_VERSION} "
                          "after their build")
    return found, time.monotonic() - started


def main() -> None:
    """`python -m orchestrator.infra.kube_binaries`: build the test cluster's binaries, kubelet included (what
    `make test` runs)."""
    last_step, last_at = "", 0.0

    def say(msg: str) -> None:
        nonlocal last_step, last_at
        if sys.stdout.isatty():
            print(f"\r\033[K{msg[:150]}", end="", flush=True)
            return
        step, now = msg.split(":", 1)[0], time.monotonic()  # a log (make, CI): a line per step, every 15 s
        if step != last_step or now - last_at >= 15.0:
            last_step, last_at = step, now
            print(f"kubernetes binaries: {msg[:200]}", flush=True)

    found, took = install_kube_binaries(say)
    started = time.monotonic()
    install_kubelet(say)  # the tests' real node
    took += time.monotonic() - started
    how = f"built in {took:.0f}s" if took > 1 else "cached"
    clear = "\r\033[K" if sys.stdout.isatty() else ""
    print(f"{clear}Kubernetes v{KUBERNETES_VERSION} control plane and kwok v{KWOK_VERSION} in {found.bin_dir.parent}"
          f" and {found.kwok.parent} ({how}); etcd: {found.etcd}")


if __name__ == "__main__":
    main()
