"""A real Kubernetes node for the test cluster: a kubelet built from the Go module proxy, Debian's containerd and
runc, the CNI bridge plugin, and images built here from the host's files (no registry is reachable):

- `python:3.11-slim` (the builder's default pod image): Debian's python3.11 with its standard library, bash and a
  few coreutils, copied with their shared libraries into one layer; it runs Sortie's node agent;
- `sortie.local/pause:1`: the pod sandbox, a static Go program that waits for a signal.

Both are written as `docker save` archives and imported into containerd's `k8s.io` namespace. Everything runs
under one short temporary directory and is stopped and removed at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.kube_cluster import KubeCluster, _check_alive, _start, free_port

AGENT_IMAGE = "docker.io/library/python:3.11-slim"
PAUSE_IMAGE = "sortie.local/pause:1"
POD_SUBNETS = "10.88.{}.0/24"  # one of 256, and a bridge of its own, per node: runs side by side do not collide
IMAGE_FILES = ("/usr/bin/python3.11", "/bin/bash", "/bin/sh", "/usr/bin/env", "/bin/cat", "/bin/ls", "/bin/sleep",
               "/bin/mkdir", "/bin/rm", "/bin/echo", "/usr/bin/id", "/bin/hostname")
_PAUSE_GO = """package main

import (
\t"os"
\t"os/signal"
\t"syscall"
)

func main() {
\tc := make(chan os.Signal, 1)
\tsignal.Notify(c, syscall.SIGINT, syscall.SIGTERM)
\t<-c
}
"""


def _libraries(binary: str) -> set[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    found = set()
    for line in out.splitlines():
        parts = line.split("=>")
        path = (parts[1] if len(parts) > 1 else parts[0]).strip().split(" ")[0]
        if path.startswith("/"):
            found.add(path)
    return found


def _add(tar: tarfile.TarFile, path: str, seen: set[str]) -> None:
    """Add `path` (following a symlink to its target, kept as a link too) and its parent directories."""
    if path in seen or not os.path.lexists(path):
        return
    seen.add(path)
    parent = os.path.dirname(path)
    if parent not in ("/", ""):
        _add(tar, parent, seen)
    tar.add(path, arcname=path.lstrip("/"), recursive=False)
    if os.path.islink(path):
        _add(tar, os.path.realpath(path), seen)


def agent_rootfs_layer() -> bytes:
    """The agent image's one layer: python3.11 and its stdlib, a shell and a few tools, with their libraries."""
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for binary in IMAGE_FILES:
            if os.path.exists(binary):
                _add(tar, binary, seen)
                for lib in _libraries(os.path.realpath(binary)):
                    _add(tar, lib, seen)
        for root, dirs, files in os.walk("/usr/lib/python3.11"):
            dirs[:] = [d for d in dirs if d not in ("test", "__pycache__", "idlelib", "tkinter", "ensurepip")]
            for name in files:
                _add(tar, os.path.join(root, name), seen)
                if name.endswith(".so"):  # extension modules (lib-dynload): their libraries too (libssl, ...)
                    for lib in _libraries(os.path.join(root, name)):
                        _add(tar, lib, seen)
            for name in dirs:
                _add(tar, os.path.join(root, name), seen)
        for link, target in (("usr/bin/python3", "python3.11"), ("usr/bin/python", "python3.11")):
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"), ("etc/group", "root:x:0:\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for folder in ("tmp", "root", "var/lib/sortie", "opt/sortie"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if folder == "tmp" else 0o755
            tar.addfile(info)
    return buf.getvalue()


def docker_archive(path: Path, tag: str, layer: bytes, cmd: list[str]) -> None:
    """A `docker save` archive of one image with one layer."""
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                                    "Cmd": cmd},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in (("layer.tar", layer), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def pause_layer(work: Path) -> bytes:
    """A layer holding `/pause`, a static Go binary (built once per run: a few seconds)."""
    from orchestrator.infra.go_build import go_binary, go_env

    src = work / "pause-src"
    src.mkdir()
    (src / "go.mod").write_text("module sortie.local/pause\n\ngo 1.24\n")
    (src / "main.go").write_text(_PAUSE_GO)
    subprocess.run([go_binary("the pause image"), "build", "-trimpath", "-ldflags", "-s -w", "-o", "pause", "."],
                   cwd=src, env={**go_env(), "GOFLAGS": "-buildvcs=false"}, check=True, capture_output=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(src / "pause", arcname="pause")
    return buf.getvalue()


def _containerd_config(root: Path) -> str:
    runc = os.environ.get("SORTIE_TEST_RUNC")  # a runc wrapper, for debugging the node
    binary = f'\n        BinaryName = "{runc}"' if runc else ""
    return f"""version = 2
root = "{root}/containerd-root"
state = "{root}/containerd-state"
[grpc]
  address = "{root}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM's root lacks CAP_SYS_RESOURCE, so runc may not lower a container's oom_score_adj below its own (the
  # sandbox's -998 fails: "nsexec: failed to update /proc/self/oom_score_adj: Permission denied"). Clamp it.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false{binary}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{root}/cni"
"""


def _kubelet_config(root: Path, cluster: KubeCluster) -> str:
    return json.dumps({
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "failCgroupV1": False, "cgroupDriver": "cgroupfs", "failSwapOn": False, "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [], "containerRuntimeEndpoint": f"unix://{root}/containerd.sock",
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(cluster.pki / "ca.crt")}},
        "authorization": {"mode": "AlwaysAllow"}, "address": "127.0.0.1", "port": free_port(),
        "readOnlyPort": 0, "healthzPort": 0, "resolvConf": "", "serializeImagePulls": False,
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100, "localStorageCapacityIsolation": False})


@contextlib.contextmanager
def real_node(cluster: KubeCluster, name: str = "sortie-node-0", timeout: float = 180.0) -> Iterator[str]:
    """Start containerd and a kubelet registering node `name`; yield the name once it is Ready."""
    from orchestrator.infra.kube_binaries import install_kubelet

    kubelet = install_kubelet()
    missing = [tool for tool in ("containerd", "ctr", "runc", "ip") if shutil.which(tool) is None]
    missing += [f"/usr/lib/cni/{plugin}" for plugin in ("bridge", "host-local", "loopback")
                if not Path(f"/usr/lib/cni/{plugin}").exists()]
    if missing:
        raise RuntimeError(f"a real node needs {', '.join(missing)}: `make test` installs them (.ci/test-deps.sh: "
                           "apt-get install containerd runc containernetworking-plugins iproute2)")
    root = Path(tempfile.mkdtemp(prefix="sk-", dir="/tmp"))  # short: unix socket paths are limited to 108 bytes
    started: list[str] = []
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=False).stdout
    third = next(n for n in random.sample(range(256), 256) if f" 10.88.{n}." not in used)
    bridge, subnet = f"sortie{third}", POD_SUBNETS.format(third)
    try:
        (root / "cni").mkdir()
        (root / "cni" / "10-sortie.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "sortie-test", "plugins": [
                {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": str(root / "ipam"),
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "loopback"}]}))
        (root / "containerd.toml").write_text(_containerd_config(root))
        _start(cluster, "containerd", ["containerd", "--config", str(root / "containerd.toml")])
        started.append("containerd")
        cluster.wait("containerd's socket", lambda: (_check_alive(cluster), (root / "containerd.sock").exists())[1])
        agent_tar, pause_tar = root / "agent.tar", root / "pause.tar"
        docker_archive(agent_tar, AGENT_IMAGE, agent_rootfs_layer(), ["python3"])
        docker_archive(pause_tar, PAUSE_IMAGE, pause_layer(root), ["/pause"])
        for tar in (agent_tar, pause_tar):
            subprocess.run(["ctr", "--address", str(root / "containerd.sock"), "-n", "k8s.io", "images", "import",
                            "--no-unpack", str(tar)], check=True, capture_output=True, timeout=300)
        (root / "kubelet.yaml").write_text(_kubelet_config(root, cluster))
        _start(cluster, "kubelet", [str(kubelet), f"--config={root / 'kubelet.yaml'}",
                                    f"--kubeconfig={cluster.kubeconfig}", f"--root-dir={root / 'kubelet'}",
                                    f"--hostname-override={name}", "--node-ip=127.0.0.1", "--v=1"])
        started.append("kubelet")
        cluster.wait(f"node {name} Ready", lambda: (_check_alive(cluster), _ready_node(cluster, name))[1], timeout)
        yield name
    finally:
        for proc_name in reversed(started):
            proc = cluster.processes.pop(proc_name, None)
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        _stop_leftover_shims(root)
        subprocess.run(["umount", "-R", str(root / "kubelet")], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21


def node_unavailable() -> str | None:
    """Why this machine cannot run a real node, or None when it can. Only what no install fixes: missing Debian
    packages (containerd, runc, the CNI plugins) are installed by `make test` (.ci/test-deps.sh), and a node that
    then fails to start fails its tests."""
    if not os.path.isdir("/sys/fs/cgroup") or not os.listdir("/sys/fs/cgroup"):
        return "no cgroup filesystem at /sys/fs/cgroup (the kubelet and runc need one)"
    if os.geteuid() != 0:
        return "not root: a kubelet and containerd manage cgroups, mounts and network namespaces"
    status = Path("/proc/self/status").read_text()
    caps = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    for bit, name in ((_CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (_CAP_NET_ADMIN, "CAP_NET_ADMIN")):
        if not caps >> bit & 1:
            return f"root without {name} (an unprivileged container?): containers and pod networks need it"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlay filesystem (containerd's snapshotter)"
    return None


def _ready_node(cluster: KubeCluster, name: str) -> bool:
    status, node = cluster.api("GET", f"/api/v1/nodes/{name}")
    return status == 200 and any(c["type"] == "Ready" and c["status"] == "True"
                                 for c in node.get("status", {}).get("conditions", []))


def _stop_leftover_shims(root: Path) -> None:
    """containerd's runc shims (and their containers) outlive containerd by design: stop those of this root."""
    marker = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmdline and marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(entry.name), signal.SIGKILL)
