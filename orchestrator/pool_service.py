"""Services, the service layer for pools: plan and apply a pool YAML, show pools, take them down, launch jobs on them.
The CLI (and later the dashboard) go through it; the controller's pool reconciler does the stack work."""

from __future__ import annotations

import re
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from orchestrator.auth.identity import ForbiddenError
from orchestrator.errors import UsageError
from orchestrator.policy.pools import ApplyPlan, PoolPolicy, WorkerView, follow_provider_diff, plan_apply, worker_hash
from orchestrator.service import JobService, UnknownJobError, check_num_jobs

if TYPE_CHECKING:
    from orchestrator.infra.stack_driver import StackDriver
    from orchestrator.spec import Pipeline, Task
    from state.models import JobRow, PoolRow, WorkerRow

POOL_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


class UnknownPoolError(UnknownJobError):
    """No pool of that name."""


@dataclass(frozen=True)
class PoolStatus:
    pool: PoolRow
    workers: list[WorkerRow]
    jobs_on: dict[int, list[int]]
    jobs: list[JobRow]

    def ready(self) -> int:
        return sum(1 for w in self.workers if w.status == "READY")


def _pool_task(name: str, pipeline: Pipeline, allowed_run_options: Collection[str] = ()) -> Task:
    if not POOL_NAME.match(name):
        raise UsageError(f"pool name {name!r}: lowercase letters, digits and -, starting with a letter, "
                         "at most 31 characters")
    if len(pipeline.tasks) != 1:
        raise UsageError("a pool YAML holds one task (the workers' setup and resources), not a pipeline")
    task = pipeline.tasks[0]
    if task.pool is None:
        raise UsageError("the YAML has no pool: section; a pool YAML says how many workers, e.g. `pool: {workers: 3}`"
                         " (run is ignored for a pool: jobs bring their own with `sortie jobs launch -p`)")
    if task.num_nodes != 1:
        raise UsageError("num_nodes: pool workers are single nodes for now; remove num_nodes or set it to 1")
    from orchestrator.policy.run_options import task_problems

    problems = task.unsupported_features() + task_problems([task], allowed_run_options)
    if problems:
        raise UsageError("; ".join(problems))
    return task


class PoolService(JobService):
    def plan(self, name: str, pipeline: Pipeline, driver: StackDriver | None = None) -> tuple[ApplyPlan, str]:
        """The plan of applying `pipeline` as pool `name` (with each worker stack's Pulumi preview when a
        driver is given); changes nothing. Returns the plan and the new worker hash."""
        task = _pool_task(name, pipeline, self.config.docker.allowed_run_options)
        spec = task.to_json()
        new_hash = worker_hash(spec, list(task.secrets))
        policy = PoolPolicy.from_section(spec["pool"])
        row = self.store.pool(name)
        live = row is not None and row.status != "TERMINATED"
        workers = self.store.workers(name) if live else []
        jobs_on = self.store.jobs_on_workers([w.id for w in workers])
        views = [WorkerView(w.id, w.number, w.stack_name, w.spec_hash, w.status, len(jobs_on.get(w.id, [])))
                 for w in workers]
        old_policy = PoolPolicy(row.workers, row.min_workers, row.max_workers, row.idle_timeout,
                                row.jobs_per_worker) if live and row else None
        plan = plan_apply(name, row.spec if live and row else None, row.spec_hash if live and row else None,
                          old_policy, views, spec, new_hash, policy)
        if driver is not None:
            plan = replace(plan, previews=self._previews(name, spec, plan, workers, driver))
            # On Kubernetes the provider's diff of each live worker decides update-in-place versus recreate.
            plan = follow_provider_diff(plan, {stack: [r["op"] for r in p["resources"]]
                                               for stack, p in plan.previews.items() if p.get("provider_diff")})
        return plan, new_hash

    def _previews(self, name: str, spec: dict[str, Any], plan: ApplyPlan, workers: list[WorkerRow],
                  driver: StackDriver) -> dict[str, Any]:
        """Per worker stack: the Pulumi preview of what apply does to it (created, kept, or deleted)."""
        from orchestrator.policy.placement import Infeasible, place
        from orchestrator.policy.pools import worker_program
        from stacks.spec import new_cluster_token

        previews: dict[str, Any] = {}
        jobs: list[tuple[str, Any]] = []
        next_number = max((w.number for w in self.store.workers(name, live_only=False)), default=0) + 1
        choice = place(spec["resources"], self.config)
        if plan.create and isinstance(choice, Infeasible):
            raise UsageError(f"pool {name}: cannot place a worker: {choice.reason}")
        placed = choice if not isinstance(choice, Infeasible) else None
        for i in range(plan.create if placed else 0):
            assert placed is not None
            number = next_number + i
            stack = f"{self.config.pulumi.stack_prefix}-pool-{name}-w{number}"
            program = worker_program(name, spec, stack, number, placed.infra, placed.region, placed.use_spot,
                                     new_cluster_token(), self.home, self.config)
            jobs.append((stack, program))
        by_stack = {w.stack_name: w for w in workers}
        for stack in plan.keep:
            w = by_stack[stack]
            jobs.append((stack, worker_program(name, spec, stack, w.number, w.infra, w.region, w.use_spot,
                                               self.store.box.open(w.token_enc), self.home, self.config)))
        for stack in plan.remove:
            w = by_stack[stack]
            if plan.mode == "recreate" and w.infra == "kubernetes":  # the new spec on the worker's own stack
                jobs.append((stack, worker_program(name, spec, stack, w.number, w.infra, w.region, w.use_spot,
                                                   self.store.box.open(w.token_enc), self.home, self.config)))
                continue
            nodes = len(by_stack[stack].nodes or []) or 1
            previews[stack] = {"op": "delete", "resources": [{"op": "delete", "type": "sortie:local:Node",
                                                              "keys": []} for _ in range(nodes)]}
        with ThreadPoolExecutor(max_workers=max(self.config.pulumi.operation_slots, 1)) as pool:
            results = list(pool.map(lambda item: driver.preview(item[0], item[1]), jobs))
        for (stack, _), preview in zip(jobs, results, strict=True):
            changes = [{"op": c.op, "type": c.type, "name": c.name, "keys": list(c.keys)} for c in preview.changes]
            op = "create" if stack not in by_stack else ("update" if preview.has_changes else "same")
            previews[stack] = {"op": op, "resources": changes, "counts": preview.counts(),
                               "provider_diff": stack in plan.remove}
        return previews

    def apply(self, name: str, pipeline: Pipeline, plan: ApplyPlan, new_hash: str,
              driver: StackDriver | None = None) -> None:
        """Record the pool's new spec and policy (staging its workdir and file mounts first) and make sure the
        controller runs; the controller's pool reconciler creates, drains and destroys workers. An `update` plan
        (the provider's diff has no replacement) first runs `up` of each kept worker's stack with the new spec,
        then records the new hash on those workers in the pool's own transaction."""
        from orchestrator.controller_service import check_controller, ensure_controller
        from orchestrator.storage.staging import prepare, stage

        self.admin_only("pool apply")
        check_controller(self.config)
        task = _pool_task(name, pipeline, self.config.docker.allowed_run_options)
        spec = {**task.to_json(), "resources_str": task.resources_str()}
        storage_plan = prepare(pipeline, self.config, self.home)
        storage = None
        if not storage_plan.empty:
            key = f"pool-{name}-{new_hash[:8]}"
            storage = stage(storage_plan, key, self.config, self.home, record=lambda _: None)
        policy = PoolPolicy.from_section(spec["pool"])
        updated = self._update_in_place(name, spec, plan, driver) if plan.mode == "update" else []
        self.store.apply_pool(name, user=self.identity.user, spec=spec, spec_hash=new_hash, updated_workers=updated,
                              policy={"workers": policy.workers, "min_workers": policy.min_workers,
                                      "max_workers": policy.max_workers, "idle_timeout": policy.idle_timeout,
                                      "jobs_per_worker": policy.jobs_per_worker},
                              plan=plan.to_json(), storage=storage)
        ensure_controller(self.home)
        self.audit("pool apply", f"pool {name}", detail=f"{policy.workers} worker(s)")

    def admin_only(self, what: str) -> None:
        if not self.identity.admin:
            raise ForbiddenError(f"{what}: only an admin may do that (your role: {self.identity.role})")

    def _update_in_place(self, name: str, spec: dict[str, Any], plan: ApplyPlan,
                         driver: StackDriver | None) -> list[int]:
        """`up` of each kept worker's stack with the new spec; returns their ids."""
        from orchestrator.policy.pools import worker_program

        if driver is None:
            raise UsageError(f"pool {name}: an in-place update needs the stack driver")
        by_stack = {w.stack_name: w for w in self.store.workers(name)}
        updated = []
        for stack in plan.keep:
            w = by_stack[stack]
            driver.up(stack, worker_program(name, spec, stack, w.number, w.infra, w.region, w.use_spot,
                                            self.store.box.open(w.token_enc), self.home, self.config),
                      cleanup_on_failure=False)
            updated.append(w.id)
        return updated

    def resolve_pool(self, name: str) -> PoolRow:
        row = self.store.pool(name)
        if row is None or row.status == "TERMINATED" or not self._sees_pool(row):
            raise UnknownPoolError(f"no pool named {name!r}; see `sortie jobs pool status`")
        return row

    def pool_job_ids(self, name: str) -> list[int]:
        """The pool's jobs in progress that the identity may see."""
        self.resolve_pool(name)
        return [j.id for j in self.store.pool_jobs(name) if self.identity.can_see(j)]

    def _sees_pool(self, row: PoolRow) -> bool:
        """A pool of no workspace is shared by all; one of a workspace is seen by its users (and admins)."""
        return row.workspace is None or self.identity.can_see(row)

    def status(self, name: str | None = None) -> list[PoolStatus]:
        pools = [self.resolve_pool(name)] if name else [p for p in self.store.pools() if self._sees_pool(p)]
        found = []
        for pool in pools:
            workers = self.store.workers(pool.name)
            found.append(PoolStatus(pool, workers, self.store.jobs_on_workers([w.id for w in workers]),
                                    self.store.pool_jobs(pool.name, active_only=False)[-20:]))
        return found

    def down(self, names: list[str], *, cancel_jobs: bool = True) -> list[str]:
        """Take pools down: their jobs cancelled (or left to finish), every worker stack destroyed by the
        controller in the background."""
        self.admin_only("pool down")
        rows = [self.resolve_pool(n) for n in names]
        for row in rows:
            if cancel_jobs:
                self.store.cancel_pool_jobs(row.name, self.identity.user)
            self.store.pool_down(row.name, self.identity.user)
            self.audit("pool down", f"pool {row.name}")
        from orchestrator.controller_service import ensure_controller

        ensure_controller(self.home)
        return [r.name for r in rows]

    def launch_on_pool(self, pool_name: str, pipeline: Pipeline, num_jobs: int) -> tuple[list[int], list[str]]:
        """Submit `num_jobs` jobs of `pipeline` to a pool in one transaction; each runs only `run`. Returns the
        ids and notes on what was ignored."""
        pool = self.resolve_pool(pool_name)
        check_num_jobs(num_jobs)
        if len(pipeline.tasks) != 1:
            raise UsageError("a pool runs single-task jobs; launch a pipeline without -p")
        task = pipeline.tasks[0]
        if not task.run:
            raise UsageError("the job has no run: section; on a pool only `run` executes")
        notes = [f"{what} of the job YAML is ignored on a pool (the workers' own was done once)"
                 for what, present in (("setup", task.setup), ("file_mounts", task.file_mounts or task.storage_mounts),
                                       ("workdir", task.workdir)) if present]
        misfit = _misfit(task, pool)
        if misfit:
            raise UsageError(f"the job does not fit pool {pool_name}: {misfit}")
        outside = _outside_buckets(task.storage_mounts, pool)
        if outside:
            raise UsageError(outside)
        from orchestrator.controller_service import check_controller, ensure_controller

        check_controller(self.config)
        workspace = self.identity.workspace_for(pool.workspace, self.config)
        spec = {**pipeline.to_json(), "is_pipeline": False}
        spec["tasks"][0].update(setup=None, workdir=None, file_mounts={}, storage_mounts={})
        ids = self.store.submit(spec, [dict(task.secrets)], user=self.identity.user, name=pipeline.name,
                                count=num_jobs, task_resources=[task.resources_str()], pool=pool_name,
                                workspace=workspace)
        self.audit("launch", f"jobs {ids[0]}-{ids[-1]} on pool {pool_name}", workspace)
        ensure_controller(self.home)
        return ids, notes


def _mounted(storage_mounts: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Destination -> (bucket, prefix) of each bucket mount (a storage object by name: the whole bucket)."""
    found = {}
    for dest, obj in (storage_mounts or {}).items():
        source = obj.get("source") if isinstance(obj, dict) else None
        if isinstance(source, str) and "://" in source:
            bucket, _, prefix = source.split("://", 1)[1].partition("/")
            found[str(dest)] = (bucket, prefix.strip("/"))
        elif isinstance(obj, dict) and obj.get("name"):
            found[str(dest)] = (str(obj["name"]), "")
    return found


def _outside_buckets(storage_mounts: dict[str, Any], pool: PoolRow) -> str | None:
    """Issue 17: a pool's workers reach only the pool's own buckets (on AWS their instance profile names exactly
    those): a job that names another bucket is refused, in one line, rather than run without it."""
    own = list(_mounted(pool.spec.get("storage_mounts") or {}).values())
    for dest, (bucket, prefix) in _mounted(storage_mounts).items():
        if not any(b == bucket and (not p or prefix == p or prefix.startswith(p + "/")) for b, p in own):
            where = f"{bucket}/{prefix}" if prefix else bucket
            return (f"file_mounts: {dest} uses bucket {where}, which pool {pool.name} does not mount; a pool's "
                    "workers reach only the pool's own buckets: add it to the pool's file_mounts and apply the pool "
                    "again, or launch without -p")
    return None


def _misfit(task: Task, pool: PoolRow) -> str | None:
    """Why a job's resources do not fit on a pool's worker (None when they do)."""
    worker = (pool.spec.get("resources") or [{}])[0]
    have = worker.get("accelerators") or {}
    per_job = pool.jobs_per_worker
    reasons = []
    for cand in task.candidates()[:1]:
        data = cand.to_json()
        for acc, count in (data.get("accelerators") or {}).items():
            share = have.get(acc, 0) / per_job
            if share < count:
                reasons.append(f"it asks for {acc}:{count:g} and a worker offers {acc}:{share:g} per job")
        if data.get("use_spot") and not worker.get("use_spot"):
            reasons.append("it asks for spot and the workers are on demand")
        for key in ("cpus", "memory"):
            want = _amount(data.get(key))
            if want is not None and (offer := _amount(worker.get(key))) is not None and want > offer:
                reasons.append(f"it asks for {key} {data.get(key)} and a worker has {worker.get(key)}")
    return "; ".join(reasons) or None


def _amount(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(str(value).rstrip("+"))
    except ValueError:
        return None
