"""Putting a task's files on its nodes, and taking MOUNT_CACHED writes back, through each node's agent.

The steps come from the job's storage record (`orchestrator.storage.staging.NodeStep`): two-hop pushes go
from the controller to the agent; a local-store MOUNT is a link from the node's path to the store's directory
(local-cloud nodes share this machine); COPY, MOUNT_CACHED and S3 MOUNTs run on the node as
`python -m orchestrator.node.node_storage`, so the node downloads from the bucket itself and a recovery in
another region needs nothing from the user's machine. Those runs are outside a local-cloud node's path view
(`view=False`): an S3 MOUNT is a FUSE mount under the node's mounts/, which the runs after it see at its path.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import SortieConfig
from orchestrator.errors import SortieError
from orchestrator.infra.agent_client import AgentClient, AgentError
from orchestrator.node.node_storage import encode_plan
from orchestrator.storage.staging import NodeStep
from orchestrator.storage.stores import LocalStore, StorageError, open_store, parse_bucket_url

if TYPE_CHECKING:
    from orchestrator.controller.context import ControllerContext
    from state.models import AttemptRow, JobRow

log = logging.getLogger("sortie.controller")
FETCH_TIMEOUT_SECONDS = 3600.0
CACHE_INTERVAL_SECONDS = 2.0


class NodeStorageError(SortieError):
    """A bucket step failed on a node (a user-side problem: the job fails as at setup, no relaunch)."""


def task_steps(storage: dict[str, Any] | None, task_index: int) -> list[NodeStep]:
    if not storage or not storage.get("tasks"):
        return []
    return [NodeStep.from_json(s) for s in storage["tasks"][task_index]]


def has_cached(steps: Sequence[NodeStep]) -> bool:
    return any(s.kind == "cached" for s in steps)


def _is_node_side(step: NodeStep) -> bool:
    if step.kind in ("copy", "cached"):
        return True
    return step.kind == "mount" and parse_bucket_url(step.url or "").store != "local"


def node_package_for(steps: Sequence[NodeStep], infra: str | None, config: SortieConfig) -> str | None:
    """What a cloud node must pip-install to run these steps itself (`ClusterSpec.node_package`): the package
    the controller VM installs, when a step runs on the node; None on the local cloud (its nodes run this
    machine's Python) and when no step does."""
    if (infra or "local") == "local" or not any(_is_node_side(s) for s in steps):
        return None
    return config.jobs.controller.package


def node_fuse_for(steps: Sequence[NodeStep], infra: str | None) -> bool:
    """Whether a cloud node FUSE-mounts an S3 bucket for these steps (`ClusterSpec.node_fuse`: its boot installs
    rclone); False on the local cloud, whose nodes use this machine's tools."""
    return (infra or "local") != "local" and any(s.kind == "mount" and _is_node_side(s) for s in steps)


def node_buckets_for(steps: Sequence[NodeStep], infra: str | None) -> tuple[str, ...]:
    """The S3 URLs a cloud node reads or writes for these steps (`ClusterSpec.node_buckets`: on AWS, what the
    cluster's own instance profile is scoped to); () on the local cloud and for other stores."""
    if (infra or "local") == "local":
        return ()
    return tuple(sorted({s.url for s in steps if s.url and _is_node_side(s) and s.url.startswith("s3://")}))


def node_python(infra: str | None) -> str | None:
    """The Python a node runs its bucket steps with: NODE_PYTHON on a cloud (None: this machine's)."""
    if (infra or "local") == "local":
        return None
    from stacks.builders import NODE_PYTHON

    return NODE_PYTHON


def _credentials_env(infra: str | None = "local") -> dict[str, str]:
    from orchestrator.policy.node_credentials import node_credentials_env

    return node_credentials_env(infra, os.environ)  # issue 17: never the controller's keys on a cloud node


class NodeFiles:
    """The storage steps of one attempt on its nodes."""

    def __init__(self, config: SortieConfig, home: Path, steps: Sequence[NodeStep], attempt_id: int,
                 python: str | None = None, infra: str | None = "local") -> None:
        self.infra = infra
        self.config = config
        self.home = home
        self.steps = list(steps)
        self.attempt_id = attempt_id
        self.python = python or sys.executable

    def _command(self, verb: str, steps: Sequence[NodeStep]) -> str:
        plan = {"storage": self.config.storage.model_dump(mode="json"), "home": str(self.home),
                "steps": [s.to_json() for s in steps], "interval": CACHE_INTERVAL_SECONDS}
        return f"exec {self.python} -m orchestrator.node.node_storage {verb} {encode_plan(plan)}"

    def _run_to_end(self, client: AgentClient, verb: str, steps: Sequence[NodeStep],
                    note: Callable[[str], None]) -> None:
        run_id = f"{verb}-{self.attempt_id}"
        client.start(self._command(verb, steps), run_id, env=_credentials_env(self.infra), view=False)
        status = client.wait(run_id, timeout=FETCH_TIMEOUT_SECONDS, interval=0.2)
        output, _ = client.log(run_id, 0)
        lines = output.decode(errors="replace").splitlines()
        for line in lines:
            note(line)
        if status.exit_code != 0:
            last = next((ln for ln in reversed(lines) if ln.strip()), f"exit code {status.exit_code}")
            raise NodeStorageError(last.removeprefix("sortie-storage: "))

    def put(self, client: AgentClient, note: Callable[[str], None]) -> None:
        """Every step on one node, in order; then the MOUNT_CACHED uploader in the background."""
        for step in self.steps:
            if step.kind == "push":
                client.upload(step.path or "", step.dest)
            elif step.kind == "mount" and not _is_node_side(step):
                url = parse_bucket_url(step.url or "")
                store = open_store(url.store, self.config.storage, self.home)
                if not isinstance(store, LocalStore):
                    raise NodeStorageError(f"{step.where}: {step.url} has no local directory to mount")
                try:  # every component a directory of the bucket's own, no symlink followed (issue 28)
                    folder = store.make_dir(url.bucket, url.prefix)
                except StorageError as exc:
                    raise NodeStorageError(f"{step.where}: {exc}") from None
                client.link(step.dest, str(folder))
            elif step.dest != "." and step.kind in ("copy", "cached", "mount"):
                client.link(step.dest, None)  # declare the path, so later runs see it there (local-cloud views)
        node_side = [s for s in self.steps if _is_node_side(s)]
        if node_side:
            self._run_to_end(client, "fetch", node_side, note)
        if has_cached(self.steps):
            client.start(self._command("cache", [s for s in self.steps if s.kind == "cached"]),
                         f"cache-{self.attempt_id}", env=_credentials_env(self.infra), view=False)

    def flush(self, client: AgentClient, note: Callable[[str], None]) -> None:
        """Upload MOUNT_CACHED writes once more, then stop the background uploader."""
        cached = [s for s in self.steps if s.kind == "cached"]
        if not cached:
            return
        self._run_to_end(client, "flush", cached, note)
        try:
            client.cancel(f"cache-{self.attempt_id}")
        except AgentError as exc:
            if exc.status != 404:
                raise


class JobFiles:
    """The job reconciler's file work: sync at the start of an attempt, and the MOUNT_CACHED flush before a task
    ends."""

    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx

    def _files(self, job: JobRow, attempt: AttemptRow) -> NodeFiles:
        return NodeFiles(self.ctx.config, self.ctx.home, task_steps(job.storage, attempt.task_index), attempt.id,
                         python=node_python(attempt.infra), infra=attempt.infra)

    def _note(self, job: JobRow, rank: int) -> Callable[[str], None]:
        return lambda line: self.ctx.logs.note(job.id, f"[files] node {rank}: {line}")

    def has_cached(self, job: JobRow) -> bool:
        return has_cached(task_steps(job.storage, job.current_task))

    def sync(self, job: JobRow, attempt: AttemptRow) -> None:
        """Every storage step on every node of the attempt (runs in the agent pool)."""
        files = self._files(job, attempt)
        for node, client in self.ctx.clients(attempt.nodes, attempt.token_enc):
            files.put(client, self._note(job, node["rank"]))

    def flush(self, job: JobRow, attempt: AttemptRow, codes: tuple[int, ...]) -> tuple[int, ...]:
        """MOUNT_CACHED writes uploaded before the task ends (runs in the agent pool); hands the run's exit codes
        back. A failed upload is told in the job's events and does not change the job's outcome."""
        files = self._files(job, attempt)
        try:
            for node, client in self.ctx.clients(attempt.nodes, attempt.token_enc):
                files.flush(client, self._note(job, node["rank"]))
        except Exception as exc:
            self.ctx.store.add_event(job.id, "flush-failed", f"MOUNT_CACHED upload before the end failed: {exc}",
                                     task_index=attempt.task_index)
        return codes
