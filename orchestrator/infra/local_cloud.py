"""Infra, the embedded local cloud: nodes are sandboxes on this machine, each with a node agent.

This module is the cloud's "API": launch a node (with per-region capacity), say whether a node is
alive, preempt it on purpose, terminate it. The Pulumi dynamic provider in `stacks/builders/local.py`
calls it, and so do `sortie local ...` and the tests.

Layout under the root (`<sortie home>/local`):
    capacity.lock                   serializes capacity accounting across engine processes
    nodes/<node id>/node.json       cluster, rank, region, pid, port, labels
    nodes/<node id>/preempted       present once the node was preempted
    nodes/<node id>/...             the agent's sandbox (runs/, workdir/, agent.json, agent.log)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import SortieError
from orchestrator.infra.agent_bundle import local_agent_command, local_agent_env
from orchestrator.node import agent as agent_module
from orchestrator.node import node_view

NO_CAPACITY_MARKER = "[no-capacity]"
AGENT_START_TIMEOUT = 20.0


class LocalCapacityError(SortieError):
    """A region of the local cloud is full: recognisable like a cloud's capacity error."""


@dataclass(frozen=True)
class LocalNode:
    """One node as the local cloud records it."""

    node_id: str
    cluster: str
    rank: int
    region: str
    sandbox: str
    pid: int = 0
    port: int = 0
    host: str = "127.0.0.1"
    accelerators: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    preempted: bool = False
    use_spot: bool = False
    container: dict[str, Any] | None = None  # {engine, image, options}: runs go into a container of the image
    link_roots: list[str] = field(default_factory=list)  # the agent's --link-root: the local store's directory

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists and is not a zombie (pid 0 or less: no)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _processes_of_sandbox(sandbox: str) -> list[int]:
    """Pids whose environment marks them as started inside this node's sandbox (Linux /proc)."""
    marker = f"{agent_module.SANDBOX_ENV}={sandbox}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _signal(pid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _kill_tree(agent_pid: int, sandbox: str, grace: float = 3.0) -> None:
    """Stop the agent and every process it started, including ones that left its process groups."""
    _signal(agent_pid, signal.SIGTERM)  # the agent stops its runs' process groups itself
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (pid_alive(agent_pid) or _processes_of_sandbox(sandbox)):
        time.sleep(0.05)
    for _ in range(50):
        leftovers = [p for p in _processes_of_sandbox(sandbox) if p != os.getpid()]
        if pid_alive(agent_pid):
            leftovers.append(agent_pid)
        if not leftovers:
            return
        for pid in leftovers:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.05)
    raise SortieError(f"could not stop the processes of node sandbox {sandbox}; kill them by hand")


def _detach_mounts(sandbox: str) -> None:
    """Detach every mount at or below the sandbox; refuse (and keep the sandbox) if one stays."""
    for _ in range(3):
        points = node_view.mounts_under(sandbox)
        if not points:
            return
        for point in points:
            node_view.detach(point)
    left = node_view.mounts_under(sandbox)
    if left:
        raise SortieError(f"cannot unmount {left[0]} in node sandbox {sandbox}; unmount it by hand "
                          f"(umount -l {left[0]}), then delete the node again")


class LocalCloud:
    """The local cloud rooted at `root` (normally `<sortie home>/local`)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.nodes_dir = self.root / "nodes"

    @contextmanager
    def _capacity_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "capacity.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _record_path(self, node_id: str) -> Path:
        return self.nodes_dir / node_id / "node.json"

    def _save(self, node: LocalNode) -> None:
        agent_module.write_json_atomic(self._record_path(node.node_id), asdict(node))

    def get(self, node_id: str) -> LocalNode | None:
        try:
            data = json.loads(self._record_path(node_id).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        data["preempted"] = (self.nodes_dir / node_id / "preempted").exists()
        return LocalNode(**data)

    def nodes(self, cluster: str | None = None) -> list[LocalNode]:
        if not self.nodes_dir.exists():
            return []
        found = [n for d in sorted(self.nodes_dir.iterdir()) if (n := self.get(d.name)) is not None]
        return sorted((n for n in found if cluster is None or n.cluster == cluster), key=lambda n: n.rank)

    def in_use(self, region: str, spot_only: bool = False) -> int:
        """Nodes of a region that hold capacity (every node not preempted); spot ones only if asked."""
        return sum(1 for n in self.nodes()
                   if n.region == region and not n.preempted and (n.use_spot or not spot_only))

    def launch(self, node_id: str, cluster: str, rank: int, region: str, token: str,
               capacity: int | None = None, accelerators: dict[str, int] | None = None,
               labels: dict[str, str] | None = None, use_spot: bool = False,
               spot_capacity: int | None = None, container: dict[str, Any] | None = None,
               link_roots: list[str] | None = None) -> LocalNode:
        """Start a node: claim capacity, make its sandbox, start its agent detached, wait until it answers."""
        sandbox = self.nodes_dir / node_id
        with self._capacity_lock():
            used = self.in_use(region)
            if capacity is not None and used >= capacity:
                raise LocalCapacityError(
                    f"{NO_CAPACITY_MARKER} local/{region} is full: capacity {capacity} node(s), {used} in use"
                )
            spot_used = self.in_use(region, spot_only=True) if use_spot else 0
            if use_spot and spot_capacity is not None and spot_used >= spot_capacity:
                raise LocalCapacityError(f"{NO_CAPACITY_MARKER} local/{region} has no spot capacity: "
                                         f"spot capacity {spot_capacity} node(s), {spot_used} in use")
            sandbox.mkdir(parents=True, exist_ok=False)
            node = LocalNode(node_id=node_id, cluster=cluster, rank=rank, region=region, sandbox=str(sandbox),
                             accelerators=dict(accelerators or {}), labels=dict(labels or {}),
                             created_at=time.time(), use_spot=use_spot, container=container or None,
                             link_roots=list(link_roots or []))
            self._save(node)
        try:
            return self._start_agent(node, token)
        except BaseException:
            self.terminate(node_id)
            raise

    def hidden_from_runs(self) -> list[str]:
        """What a node's runs see empty (issue 17): the Sortie home (state DB, keys, logs, other nodes'
        sandboxes), when this local cloud lives in it as `<home>/local`; always this cloud's own root."""
        hidden = [str(self.root)]
        if self.root.name == "local":
            hidden.append(str(self.root.parent))
        return hidden

    def _start_agent(self, node: LocalNode, token: str) -> LocalNode:
        sandbox = Path(node.sandbox)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PULUMI_", "SORTIE_AGENT"))}
        env.update({agent_module.SANDBOX_ENV: node.sandbox, "SORTIE_NODE_ID": node.node_id})
        env = local_agent_env(env)
        with (sandbox / "agent.log").open("ab") as log:
            container = node.container or {}
            flags = ["--container-image", container["image"], "--container-engine", container["engine"],
                     *[f"--container-option={o}" for o in container.get("options") or []]] if container else []
            proc = subprocess.Popen(
                [*local_agent_command(), "--sandbox", node.sandbox, "--node-id", node.node_id,
                  "--token-stdin", "--confine", *[f"--hide={h}" for h in self.hidden_from_runs()],
                  *[f"--link-root={r}" for r in node.link_roots], *flags, "--notices", "local"],
                env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, cwd=node.sandbox,
            )
        assert proc.stdin is not None
        proc.stdin.write(f"{token}\n".encode())
        proc.stdin.close()
        info_path = sandbox / "agent.json"
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        while not info_path.exists():
            if proc.poll() is not None:
                tail = (sandbox / "agent.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise SortieError(f"node agent of {node.node_id} exited with {proc.returncode}: {' '.join(tail)}")
            if time.monotonic() > deadline:
                raise SortieError(f"node agent of {node.node_id} did not start in {AGENT_START_TIMEOUT:.0f}s")
            time.sleep(0.02)
        info = json.loads(info_path.read_text())
        started = LocalNode(**{**asdict(node), "pid": proc.pid, "port": int(info["port"])})
        self._save(started)
        return started

    def alive(self, node_id: str) -> bool:
        """The infra's word on a node: it exists, was not preempted, and its agent process runs."""
        node = self.get(node_id)
        return node is not None and not node.preempted and pid_alive(node.pid)

    def set_labels(self, node_id: str, labels: dict[str, str]) -> LocalNode:
        node = self.get(node_id)
        if node is None:
            raise SortieError(f"local node {node_id} does not exist")
        updated = LocalNode(**{**asdict(node), "labels": dict(labels), "preempted": False})
        self._save(updated)
        return updated

    def preempt(self, node_id: str) -> LocalNode:
        """Reclaim a node as a cloud reclaims a spot VM: every process dies, its capacity is freed.

        The sandbox stays until the stack's destroy deletes the node, as a cloud's record of a
        terminated VM does.
        """
        node = self.get(node_id)
        if node is None:
            raise SortieError(f"local node {node_id} does not exist; see `sortie local nodes`")
        with self._capacity_lock():
            (self.nodes_dir / node_id / "preempted").touch()
        _kill_tree(node.pid, node.sandbox)
        return self.get(node_id) or node

    def preempt_cluster(self, cluster: str, rank: int | None = None, notice: float = 0.0) -> list[LocalNode]:
        """Preempt a cluster's nodes (or one): at once, or with `notice` seconds of warning first (`notify`)."""
        nodes = [n for n in self.nodes(cluster) if rank is None or n.rank == rank]
        if not nodes:
            which = f"node {rank} of cluster {cluster}" if rank is not None else f"cluster {cluster}"
            raise SortieError(f"no local {which}; see `sortie local nodes`")
        if notice > 0:
            return [self.notify(n.node_id, notice) for n in nodes]
        return [self.preempt(n.node_id) for n in nodes]

    def notify(self, node_id: str, seconds: float) -> LocalNode:
        """A preemption notice, as a cloud gives one before it takes a spot VM back: the node's agent sees the
        deadline (`orchestrator.node.notices`), and a detached process (`local_notice`) preempts the node then,
        unless the node was deleted before."""
        from orchestrator.infra.local_notice import notify

        node = self.get(node_id)
        if node is None or node.preempted:
            raise SortieError(f"local node {node_id} does not exist or was preempted; see `sortie local nodes`")
        notify(self.root, node, time.time() + seconds)
        return node

    def terminate(self, node_id: str) -> None:
        """Delete a node: detach what its runs mounted in the sandbox (a bucket's FUSE mount: removing the
        sandbox must never reach into a bucket), stop its agent and everything it started, remove its
        sandbox. Idempotent."""
        sandbox = self.nodes_dir / node_id
        node = self.get(node_id)
        _detach_mounts(str(sandbox))
        _kill_tree(node.pid if node else 0, str(sandbox))
        if node is not None and node.container:  # the task's container, even when its agent died first
            with suppress(OSError, subprocess.SubprocessError):
                subprocess.run([node.container["engine"], "rm", "-f", "-t", "1",
                                agent_module.container_name(node_id)], capture_output=True, timeout=120)
        _detach_mounts(str(sandbox))  # a mount made while the processes were stopping
        with self._capacity_lock():
            shutil.rmtree(sandbox, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """Sandboxes and processes that exist now (for checks that nothing outlived its stack)."""
        found = [f"sandbox {n.node_id}" for n in self.nodes()]
        if self.nodes_dir.exists():
            for sandbox in self.nodes_dir.iterdir():
                found += [f"process {pid} of {sandbox.name}" for pid in _processes_of_sandbox(str(sandbox))]
            found += [f"mount {point}" for point in node_view.mounts_under(str(self.nodes_dir))]
        return found
