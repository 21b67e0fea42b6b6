"""Policy, pools, the pure parts: what defines a worker, the plan an apply shows, and what the pool reconciler does
next. No I/O here, so every rule is tested against plain values.

In place or recreate (the seed's rule, refined by the provider's diff where it can tell: see
`follow_provider_diff`): a worker is defined by its setup, file mounts, workdir, resources, node count, envs and
`config` (pod_config, docker run options). An apply that changes only the worker count (or the autoscaling policy)
scales in place: new worker stacks, or idle workers destroyed, never a busy one. An apply that changes what
defines a worker recreates them, rolling: new workers are created and set up first, old ones drain (finish their
jobs) and are destroyed, one old worker per new READY worker, so a pool with pending jobs never drops to zero
READY workers. With `workdir` or `file_mounts`, every apply recreates (the files may have changed), as SkyPilot
does.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from orchestrator.policy.cloud_features import attempt_features
from stacks.spec import ClusterSpec, StackProgram, cloud_fields

if TYPE_CHECKING:
    from orchestrator.config import SortieConfig
    from state.models import PoolRow

# `config` too: its `kubernetes.pod_config` and `docker.run_options` shape the worker (a pod's labels, say).
WORKER_KEYS = ("setup", "workdir", "file_mounts", "storage_mounts", "resources", "num_nodes", "envs", "config")
LIVE = ("PROVISIONING", "SETTING_UP", "READY", "DRAINING")
ApplyMode = Literal["create", "in-place", "update", "recreate", "unchanged"]
# A preview op on a live worker's stack that means the worker does not survive the change.
REPLACING_OPS = ("replace", "create", "delete")


def worker_hash(task: dict[str, Any], secret_names: list[str] | tuple[str, ...] = ()) -> str:
    """The hash of what defines a worker. With a workdir or file mounts it is new on every call."""
    defining = {key: task.get(key) for key in WORKER_KEYS}
    defining["secrets"] = sorted(secret_names)
    if task.get("workdir") or task.get("file_mounts") or task.get("storage_mounts"):
        defining["files"] = secrets.token_hex(8)
    return hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [key for key in WORKER_KEYS if old.get(key) != new.get(key)]


@dataclass(frozen=True)
class PoolPolicy:
    """How many workers a pool keeps."""

    workers: int
    min_workers: int | None = None
    max_workers: int | None = None
    idle_timeout: float | None = None
    jobs_per_worker: int = 1

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> PoolPolicy:
        low, high = section.get("min_workers"), section.get("max_workers")
        workers = section.get("workers")
        if workers is None:
            workers = low or 0
        return cls(workers=workers, min_workers=low, max_workers=high, idle_timeout=section.get("idle_timeout"),
                   jobs_per_worker=section.get("jobs_per_worker") or 1)

    @property
    def autoscaling(self) -> bool:
        return self.min_workers is not None or self.max_workers is not None

    def describe(self) -> str:
        per = f", {self.jobs_per_worker} jobs per worker" if self.jobs_per_worker > 1 else ""
        if not self.autoscaling:
            return f"{self.workers} worker(s){per}"
        idle = f", idle workers removed after {self.idle_timeout:g}s" if self.idle_timeout else ""
        return (f"autoscaling {self.min_workers or 0}..{self.max_workers if self.max_workers is not None else '-'}"
                f" worker(s) (starting at {self.workers}){idle}{per}")

    def target(self, current: int, demand_jobs: int, idle_for: float | None) -> int:
        """Workers wanted now. `demand_jobs`: jobs running or pending; `idle_for`: seconds since the pool last
        had a job running or pending (None while it has one). Scaling up is at once; scaling down waits until
        the whole pool has been idle for `idle_timeout`, then goes to the floor."""
        if not self.autoscaling:
            return self.workers
        low = self.min_workers or 0
        high = self.max_workers if self.max_workers is not None else max(self.workers, low)
        need = min(max(math.ceil(demand_jobs / self.jobs_per_worker), low), high)
        if need >= current or current > high:
            return need
        if demand_jobs == 0 and idle_for is not None and idle_for >= (self.idle_timeout or 0.0):
            return need
        return current


@dataclass(frozen=True)
class WorkerView:
    """What the planner needs to know of one worker."""

    id: int
    number: int
    stack: str
    spec_hash: str
    status: str
    jobs: int = 0


@dataclass(frozen=True)
class ApplyPlan:
    """What an apply will do, shown before it does it."""

    pool: str
    mode: ApplyMode
    workers_before: int | None
    workers_after: int
    policy_before: str | None
    policy_after: str
    changed: tuple[str, ...] = ()
    create: int = 0
    remove: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    previews: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"pool": self.pool, "mode": self.mode, "workers": {"before": self.workers_before,
                                                                   "after": self.workers_after},
                "policy": {"before": self.policy_before, "after": self.policy_after}, "changed": list(self.changed),
                "create": self.create, "remove": list(self.remove), "keep": list(self.keep), "notes": list(self.notes),
                "previews": self.previews}


def plan_apply(name: str, old_spec: dict[str, Any] | None, old_hash: str | None, old_policy: PoolPolicy | None,
               workers: list[WorkerView], new_spec: dict[str, Any], new_hash: str,
               new_policy: PoolPolicy) -> ApplyPlan:
    """The plan of `pool apply`: create a pool, scale it in place, recreate its workers, or nothing."""
    live = [w for w in workers if w.status in LIVE and w.status != "DRAINING"]
    after = new_policy.workers
    if old_spec is None or old_policy is None:
        return ApplyPlan(name, "create", None, after, None, new_policy.describe(), create=after)
    if old_hash != new_hash:
        changed = tuple(changed_keys(old_spec, new_spec)) or ("workdir/file_mounts (always re-synced)",)
        notes: tuple[str, ...] = (
            "rolling: new workers are set up before old ones drain (finish their jobs) and are destroyed",)
        return ApplyPlan(name, "recreate", len(live), after, old_policy.describe(), new_policy.describe(),
                         changed=changed, create=after, remove=tuple(w.stack for w in live), notes=notes)
    current = len(live)
    if after == current and old_policy == new_policy:
        return ApplyPlan(name, "unchanged", current, after, old_policy.describe(), new_policy.describe(),
                         keep=tuple(w.stack for w in live))
    removable = _removal_order(live)[: max(current - after, 0)]
    busy = [w.stack for w in removable if w.jobs]
    notes = (f"{len(busy)} busy worker(s) are removed once their jobs end",) if busy else ()
    return ApplyPlan(name, "in-place", current, after, old_policy.describe(), new_policy.describe(),
                     create=max(after - current, 0), remove=tuple(w.stack for w in removable),
                     keep=tuple(w.stack for w in live if w not in removable), notes=notes)


def follow_provider_diff(plan: ApplyPlan, worker_ops: dict[str, list[str]]) -> ApplyPlan:
    """A recreate that Sortie's hash decided, checked against the provider's preview of the new spec on each live
    worker's own stack (`worker_ops`: stack -> the ops of its resources). When no resource of any worker would be
    replaced, created or deleted (e.g. only labels change on Kubernetes pods), the workers are updated in place
    (`update`: an `up` of each worker's stack, jobs keep running); any replacement keeps the rolling recreate.
    Workdir and file mounts always recreate (their files are synced at setup)."""
    if plan.mode != "recreate" or not plan.remove or set(worker_ops) != set(plan.remove):
        return plan
    if any(key.startswith("workdir/file_mounts") or key in ("workdir", "file_mounts", "storage_mounts", "setup")
           for key in plan.changed):
        return plan
    replacing = sorted(stack for stack, ops in worker_ops.items() if any(op in REPLACING_OPS for op in ops))
    if replacing:
        return replace(plan, notes=(*plan.notes, "the provider replaces resources of " + ", ".join(replacing)))
    after = plan.workers_after
    keep, remove = plan.remove[:after], plan.remove[after:]
    note = "the provider updates every worker's resources in place (its diff has no replacement): jobs keep running"
    return replace(plan, mode="update", create=max(after - len(plan.remove), 0), keep=keep, remove=remove,
                   notes=(note,))


def _removal_order(workers: list[WorkerView]) -> list[WorkerView]:
    """Which workers go first when a pool shrinks: not ready yet, then idle, then busy; newest first."""
    rank = {"PROVISIONING": 0, "SETTING_UP": 0, "READY": 1}
    return sorted(workers, key=lambda w: (rank.get(w.status, 2) + (1 if w.jobs else 0), -w.number))


@dataclass(frozen=True)
class PoolActions:
    """What the pool reconciler does this tick."""

    create: int = 0
    drain: tuple[int, ...] = ()      # worker ids: no new jobs; destroyed once their jobs end
    destroy: tuple[int, ...] = ()    # worker ids: destroy the stack now


def decide_pool(policy: PoolPolicy, spec_hash: str, workers: list[WorkerView], demand_jobs: int,
                idle_for: float | None, *, down: bool = False) -> PoolActions:
    """Converge the workers on the pool's spec and size (see the module docstring for the rules)."""
    if down:
        return PoolActions(destroy=tuple(w.id for w in workers if w.status in (*LIVE, "FAILED")))
    destroy = [w.id for w in workers if w.status == "FAILED" or (w.status == "DRAINING" and not w.jobs)]
    current = [w for w in workers if w.spec_hash == spec_hash and w.status in LIVE and w.status != "DRAINING"]
    outdated = [w for w in workers if w.spec_hash != spec_hash and w.status in LIVE and w.status != "DRAINING"]
    draining = [w for w in workers if w.spec_hash != spec_hash and w.status == "DRAINING"]
    target = policy.target(len(current), demand_jobs, idle_for)
    create = max(target - len(current), 0)
    drain: list[int] = []
    if len(current) > target:
        for worker in _removal_order(current)[: len(current) - target]:
            (drain if worker.jobs else destroy).append(worker.id)
    # Rolling: each READY new worker lets one old worker go; with no new workers wanted, all may go.
    ready_new = sum(1 for w in current if w.status == "READY")
    allowance = len(outdated) if target == 0 else max(ready_new - len(draining), 0)
    for worker in sorted(outdated, key=lambda w: (w.jobs > 0, w.number))[:allowance]:
        (drain if worker.jobs else destroy).append(worker.id)
    return PoolActions(create=create, drain=tuple(drain), destroy=tuple(dict.fromkeys(destroy)))


def policy_of(pool: PoolRow) -> PoolPolicy:
    return PoolPolicy(workers=pool.workers, min_workers=pool.min_workers, max_workers=pool.max_workers,
                      idle_timeout=pool.idle_timeout, jobs_per_worker=pool.jobs_per_worker)


def worker_program(pool: str, task: dict[str, Any], stack: str, number: int, infra: str | None, region: str | None,
                   use_spot: bool, token: str, home: Path, config: SortieConfig | None = None,
                   node_package: str | None = None, node_fuse: bool = False,
                   node_buckets: tuple[str, ...] = ()) -> StackProgram:
    """The stack program of one worker (also what `pool apply` previews; a pool with files is recreated at every
    apply, so a preview without `node_package`, `node_fuse` and `node_buckets`, which staging decides, shows no
    false change). `node_buckets`: the S3 URLs of the pool's own file mounts and staged files; on AWS the worker's
    instance profile is scoped to exactly those (issue 17), as a job cluster's is to its job's."""
    accelerators = (task["resources"][0].get("accelerators") or {}) if task["resources"] else {}
    spec = ClusterSpec(name=stack, infra=infra or "local", region=region, num_nodes=int(task.get("num_nodes") or 1),
                       use_spot=use_spot, accelerators={k: int(v) for k, v in accelerators.items()},
                       labels={"sortie-pool": pool}, token=token,
                       local_root=str(config.local.root_dir(home) if config else home / "local"),
                       # the task's sizes (a Kubernetes worker's pod requests them; other infras ignore them)
                       cpus=(task["resources"][0].get("cpus") if task["resources"] else None),
                       memory=(task["resources"][0].get("memory") if task["resources"] else None),
                       node_package=node_package, node_fuse=node_fuse, node_buckets=node_buckets,
                       **(cloud_fields(config) if config else {}),
                       **attempt_features(task, infra or "local", region))  # ports, tiers, images
    return StackProgram("pool-worker", spec, pool=pool, worker_index=number)
