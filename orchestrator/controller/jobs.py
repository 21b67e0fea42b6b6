"""The job reconciler: each tick, every job in progress moves one step along its attempt's phase.

Where this sits: composed by the daemon (`Controller`) beside the pool reconciler and the janitors, over one
`ControllerContext`. Each step loads the rows, decides (the recovery policy `orchestrator.policy.recovery.decide`, the
runs verdict `orchestrator.controller.decide`, placement), and applies the decision through one named
transition of `state.transitions`: one guarded transaction with its event. A `TransitionError` (the row moved
on meanwhile) is logged and the job re-read on the next tick; nothing is written over it.

Slow work (stack operations, agent calls) runs in the context's bounded pools; a later tick takes the result.
Every operation is idempotent, so a restarted controller re-issues whatever was in flight when it died.

Job groups (SkyPilot's `execution: parallel`) drive one attempt per task at once, each task along the same phases
as a pipeline's task; `_step_group` adds what a group has on top: a barrier (no task starts its files, setup and
run until every task in progress has its nodes, so each sees the others' addresses), the end of the auxiliary tasks
once the primary tasks are done (after `termination_delay` when they all succeeded, at once otherwise), and
`jobs cancel --task`. A task's failure ends that task only (after its own recovery budget), except a failure to
launch (infeasible, no capacity until out of patience), which fails the group: the other tasks are cancelled at once,
as SkyPilot does. Every task runs on one infra (`orchestrator.policy.group_placement`). The group ends with its last
task (`state.group_rules.group_verdict`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from orchestrator.controller.context import ControllerContext
from orchestrator.controller.decide import agent_refusal, first_failure, run_outcome, setup_outcome
from orchestrator.controller.node_files import (
    JobFiles,
    NodeStorageError,
    node_buckets_for,
    node_fuse_for,
    node_package_for,
    task_steps,
)
from orchestrator.controller.node_reports import DISK_FULL_REASON, node_disk_full
from orchestrator.controller.notices import noticed
from orchestrator.controller.pools import PoolReconciler
from orchestrator.controller.runs import NodeRuns, RunRefused
from orchestrator.errors import InfraUnfitError, NoCapacityError, PolicyViolationError, StackOperationError
from orchestrator.infra.stack_driver import stack_name
from orchestrator.policy.cloud_features import attempt_features
from orchestrator.policy.group_placement import GROUP_LAUNCHES_IN_FLIGHT
from orchestrator.policy.placement import Infeasible, capacity_key, place
from orchestrator.policy.recovery import Failure, History, RecoveryRules, decide
from stacks.spec import ClusterSpec, StackProgram, cloud_fields, new_cluster_token
from state.group_rules import is_group, launch_failure, primary_indexes
from state.leases import LeaseLost
from state.machine import ACTIVE, JobStatus, Outcome, Phase, StackStatus, TransitionError
from state.models import AttemptRow, JobRow, TaskRow
from state.pool_transitions import POOL_LEASE_PREFIX
from state.transitions import Relaunch

log = logging.getLogger("sortie.controller")
STAGING_STALE_SECONDS = 600.0  # `jobs launch` refreshes its heartbeat while it uploads (the janitor waits as long)


class JobReconciler:
    def __init__(self, ctx: ControllerContext, pools: PoolReconciler) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.pools = pools
        self.runs = NodeRuns(ctx)
        self.files = JobFiles(ctx)
        self._group: tuple[dict[int, AttemptRow], list[TaskRow]] = ({}, [])  # the job group being stepped
        self.noticed: set[int] = set()  # attempts whose preemption notice was told (controller.notices)

    def tick(self) -> int:
        """One pass over every job in progress; returns how many there are."""
        leases = self.ctx.leases
        if leases is not None:  # issue 14: take free or expired jobs (pool jobs with their pool), drive held ones
            leases.claim_jobs({n.removeprefix(POOL_LEASE_PREFIX) for n in leases.held(POOL_LEASE_PREFIX)})
        jobs = self.store.active_jobs(held_by=leases.me if leases is not None else None)
        attempts = self.store.open_attempts_of([j.id for j in jobs])
        groups = self.store.tasks([j.id for j in jobs if is_group(j.spec)])
        for job in jobs:
            if job.id in groups:
                self._step_group(job, attempts.get(job.id, []), groups[job.id])
                continue
            open_now = attempts.get(job.id)
            attempt = open_now[0] if open_now else None
            try:
                self._step(job, attempt)
            except TransitionError as exc:  # another writer moved the row: re-read next tick
                log.warning("job %s: %s; re-reading", job.id, exc)
            except Exception as exc:  # one job's trouble never stops the others
                self._controller_error(job, attempt, exc)
        return len(jobs)

    def say(self, job: JobRow, what: str, why: str) -> None:
        """The job's controller log and the daemon's (the event itself is written by the transition)."""
        self.ctx.logs.note(job.id, f"[{what}] {why}")
        log.info("job %s: %s: %s", job.id, what, why)

    def _step(self, job: JobRow, attempt: AttemptRow | None) -> None:
        if attempt is None:
            self._no_attempt(job)
            return
        handler: dict[str, Callable[[JobRow, AttemptRow], None]] = {
            Phase.PROVISIONING: self._provisioning, Phase.SYNCING: self._syncing,
            Phase.SETTING_UP: self._setting_up, Phase.RUNNING: self._running, Phase.TEARDOWN: self._teardown,
        }
        if attempt.phase != Phase.TEARDOWN and job.next_attempt_at and time.time() < job.next_attempt_at \
                and (attempt.phase == Phase.PROVISIONING or not is_group(job.spec)):
            return  # backing off after a controller error (a group's other tasks, already up, go on)
        if job.cancel_requested and attempt.phase not in (Phase.TEARDOWN, Phase.PROVISIONING):
            if job.graceful_cancel and not self._stopped_gracefully(job, attempt):
                return
            self._teardown_for(job, attempt, "cancelled by the user", final=JobStatus.CANCELLED)
            return
        if noticed(self, job, attempt):  # issue 24: the node goes soon; recovery starts at the notice
            return
        handler[attempt.phase](job, attempt)

    # --- jobs cancel --graceful ------------------------------------------------------------------------------

    def _stopped_gracefully(self, job: JobRow, attempt: AttemptRow) -> bool:
        """Before a graceful cancel's teardown: SIGTERM to the running setup or run on every node (the agent
        SIGKILLs what is left after its grace), then the MOUNT_CACHED writes uploaded, as SkyPilot's
        `jobs cancel --graceful` waits for them; False while that goes on. Past `--graceful-timeout` the teardown
        goes ahead. Nothing is written: a restarted controller stops (idempotently) and uploads again."""
        if attempt.phase not in (Phase.SETTING_UP, Phase.RUNNING):
            return True  # nothing of the user's runs yet
        if job.graceful_deadline is not None and time.time() >= job.graceful_deadline:
            self.say(job, "graceful-timeout", f"task {attempt.task_index}: --graceful-timeout passed; tearing down")
            return True
        result = self.ctx.agent_ops.ensure(("graceful", attempt.id), self._stop_runs, job, attempt)
        if result is None:
            return False
        self.say(job, "stopped", f"task {attempt.task_index}: runs stopped (SIGTERM)" +
                 (", MOUNT_CACHED writes uploaded" if result.ok and result.value else "") +
                 (f"; {result.error}" if not result.ok else ""))
        return True

    def _stop_runs(self, job: JobRow, attempt: AttemptRow) -> bool:
        """(In the agent pool.) SIGTERM, grace, SIGKILL on every node; then the MOUNT_CACHED flush, if any."""
        kind = "setup" if attempt.phase == Phase.SETTING_UP else "run"
        self.runs.stop(attempt, kind, job)
        if kind == "run" and self.files.has_cached(job):
            self.files.flush(job, attempt, ())
            return True
        return False

    # --- job groups: every task at once ----------------------------------------------------------------------

    def _step_group(self, job: JobRow, attempts: list[AttemptRow], tasks: list[TaskRow]) -> None:
        """One step of every task in progress of a job group, each as a pipeline's task would take it."""
        by_task = {a.task_index: a for a in attempts}
        ending = self._auxiliaries_to_end(job, tasks)
        # A task that failed to launch fails the group, as in SkyPilot: the others are cancelled at once.
        failed = launch_failure(job.spec, [(t.status, t.failure_reason) for t in tasks])
        self._group = (by_task, tasks)
        launching = sum(1 for a in attempts if a.phase == Phase.PROVISIONING)  # issue 28: bounded per job
        for task in tasks:
            if task.status not in ACTIVE:
                continue
            job.current_task = task.task_index  # this in-memory view only: the handlers read the task from it
            attempt = by_task.get(task.task_index)
            try:
                if job.cancel_requested or task.cancel_requested:
                    self._stop_task(job, attempt, "cancelled by the user", graceful=bool(job.graceful_cancel))
                elif failed is not None:
                    self._stop_task(job, attempt, f"the group failed: {failed[1]}", graceful=False)
                elif task.task_index in ending:
                    self._stop_task(job, attempt, ending[task.task_index], graceful=True)
                elif attempt is None and launching < GROUP_LAUNCHES_IN_FLIGHT:
                    launching += 1
                    self._no_attempt(job)
                elif attempt is None:
                    continue  # waits until one of the group's launches in flight is up
                else:
                    self._step(job, attempt)
            except TransitionError as exc:
                log.warning("job %s task %s: %s; re-reading", job.id, task.task_index, exc)
            except Exception as exc:
                self._controller_error(job, attempt, exc)

    def _auxiliaries_to_end(self, job: JobRow, tasks: list[TaskRow]) -> dict[int, str]:
        """Once every primary task has ended, the auxiliary tasks still in progress end: after their
        `termination_delay` when every primary task succeeded, at once otherwise (SkyPilot's rule)."""
        primaries = primary_indexes(job.spec)
        if any(tasks[i].status in ACTIVE for i in primaries):
            return {}
        succeeded = all(tasks[i].status == JobStatus.SUCCEEDED for i in primaries)
        done_at = max(tasks[i].ended_at or 0.0 for i in primaries)
        delays = job.spec.get("termination_delay")
        ending = {}
        for task in tasks:
            if task.status not in ACTIVE:
                continue
            delay = 0.0
            if succeeded and isinstance(delays, dict):
                delay = float(delays.get(task.name or "", delays.get("default", 0.0)) or 0.0)
            elif succeeded and delays:
                delay = float(delays)
            if time.time() >= done_at + delay:
                ending[task.task_index] = ("auxiliary task: the primary tasks " +
                                           ("succeeded" if succeeded else "ended, not all succeeded") +
                                           (f" (termination_delay {delay:g}s)" if delay else ""))
        return ending

    def _stop_task(self, job: JobRow, attempt: AttemptRow | None, why: str, *, graceful: bool) -> None:
        """End one task of a group CANCELLED: its attempt torn down (an `up` in flight first finishes), or, with no
        attempt, the task ended at once."""
        if attempt is None:
            self.store.end_task(job.id, job.current_task, JobStatus.CANCELLED, why)
            self.say(job, "task-ended", f"task {job.current_task}: CANCELLED: {why}")
            return
        if attempt.phase == Phase.TEARDOWN:
            self._teardown(job, attempt)
            return
        if attempt.phase == Phase.PROVISIONING and self.ctx.stack_ops.busy(("up", attempt.stack_name)):
            self._provisioning(job, attempt)  # an `up` cannot be interrupted: collect it, then tear down
            return
        if graceful and not self._stopped_gracefully(job, attempt):
            return
        self._teardown_for(job, attempt, why, final=JobStatus.CANCELLED)

    def _group_ready(self, job: JobRow, attempt: AttemptRow) -> bool:
        """The barrier: every other task in progress has its nodes (SkyPilot launches every cluster of a group
        before any task runs), so each task's run sees the others' addresses."""
        by_task, tasks = self._group
        for task in tasks:
            if task.task_index == attempt.task_index or task.status not in ACTIVE or task.cancel_requested:
                continue
            other = by_task.get(task.task_index)
            if other is None or other.phase not in (Phase.SYNCING, Phase.SETTING_UP, Phase.RUNNING):
                return False
        return True

    def _task(self, job: JobRow) -> dict[str, Any]:
        task: dict[str, Any] = job.spec["tasks"][job.current_task]
        return task

    def _finish(self, job: JobRow, status: JobStatus, why: str | None) -> None:
        self.store.finish_job(job.id, status, why)
        self.say(job, "finished", status.value + (f": {why}" if why and status != JobStatus.SUCCEEDED else ""))

    def _end(self, job: JobRow, status: JobStatus, why: str | None) -> None:
        """A task that has no attempt ends: the job with it, or, in a job group, that task alone."""
        if not is_group(job.spec):
            self._finish(job, status, why)
            return
        self.store.end_task(job.id, job.current_task, status, why)
        self.say(job, "task-ended", f"task {job.current_task}: {status.value}" + (f": {why}" if why else ""))

    # --- no attempt: place the task, or finish ------------------------------------------------------------

    def _no_attempt(self, job: JobRow) -> None:
        if job.final_status:  # a job of an older Sortie whose teardown ended before its final write: land it
            self._finish(job, JobStatus(job.final_status), job.failure_reason)
            return
        if job.cancel_requested:
            self._finish(job, JobStatus.CANCELLED, "cancelled before it was placed")
            return
        if job.next_attempt_at and time.time() < job.next_attempt_at:
            return
        if job.staging_heartbeat is not None:  # `jobs launch` is still uploading the job's files
            if time.time() - job.staging_heartbeat > STAGING_STALE_SECONDS:
                self._finish(job, JobStatus.FAILED_PRECHECKS, "the uploads of `jobs launch` stopped before they "
                                                              "finished (was it killed?); launch again")
            return
        if job.pool:
            self._place_on_pool(job)
        else:
            self._place(job)

    def _place(self, job: JobRow) -> None:
        task = self._task(job)
        hint = job.placement_hint or {}
        exclude = {capacity_key(a.region or "", a.use_spot)
                   for a in self.store.attempts(job.id)
                   if a.task_index == job.current_task and a.outcome == Outcome.NO_CAPACITY
                   and a.started_at >= (job.round_started_at or 0)}
        within = self._group_infras(job) if is_group(job.spec) else None
        if isinstance(within, str):
            self._end(job, JobStatus.FAILED_PRECHECKS, within)
            return
        choice = place(task["resources"], self.ctx.config, exclude, prefer=hint.get("prefer"),
                       avoid=hint.get("avoid") or (), ordered=bool(task.get("resources_ordered")),
                       num_nodes=int(task["num_nodes"]), within=within)
        if isinstance(choice, Infeasible):
            if choice.no_capacity:
                self._wait_for_capacity(job, choice.reason)
            else:
                self._end(job, JobStatus.FAILED_PRECHECKS, choice.reason)
            return
        cand = task["resources"][choice.candidate_index]
        spot = " (spot)" if choice.use_spot else ""
        prefix, index = self.ctx.config.pulumi.stack_prefix, f"{job.id}-t{job.current_task}"
        attempt = self.store.place_attempt(
            job.id, job.current_task, name_for=lambda n: stack_name(prefix, "job", index, n), infra=choice.infra,
            region=choice.region, num_nodes=int(task["num_nodes"]), use_spot=choice.use_spot,
            instance_type=choice.instance_type or cand.get("instance_type"), price_per_hour=choice.price_per_hour,
            token_enc=self.store.box.seal(new_cluster_token()),
            why=f"{choice.infra}/{choice.region}{spot}, {task['num_nodes']} node(s)")
        self.say(job, "placed", f"task {job.current_task} attempt {attempt.number} on {choice.infra}/"
                                f"{choice.region}{spot} as stack {attempt.stack_name}")

    def _group_infras(self, job: JobRow) -> list[tuple[str, str]] | str | None:
        """Where a group's task may go (`orchestrator.policy.group_placement`): where its other tasks have
        clusters, else the infras every task still in progress can use; a str when there is none."""
        from orchestrator.policy.group_placement import group_infras, no_shared_infra
        from orchestrator.policy.optimizer import plan_for

        _by_task, tasks = self._group
        pinned = [(a.infra, a.region or "") for a in self.store.open_attempts_of([job.id]).get(job.id, [])
                  if a.task_index != job.current_task]  # read now: a task placed earlier in this tick counts
        if pinned:
            return group_infras({}, pinned)
        specs = job.spec["tasks"]
        plans = {t.task_index: plan_for(specs[t.task_index]["resources"], int(specs[t.task_index]["num_nodes"]),
                                        self.ctx.config, ordered=bool(specs[t.task_index].get("resources_ordered")))
                 for t in tasks if t.status in ACTIVE}
        feasible = {i: plan for i, plan in plans.items() if plan.options}  # an infeasible task fails on its own
        if job.current_task not in feasible:
            return None  # its own placement says why nothing can serve it
        found = group_infras(feasible, [])
        if found:
            return found
        names = [specs[i].get("name") or str(i) for i in sorted(feasible)]
        return no_shared_infra(names, [feasible[i] for i in sorted(feasible)])

    def _place_on_pool(self, job: JobRow) -> None:
        """A pool job waits PENDING for a READY worker with a free slot, then runs there at once."""
        pool = self.store.pool(job.pool or "")
        if pool is None or pool.status != "ACTIVE":
            self._finish(job, JobStatus.CANCELLED, f"pool {job.pool} was taken down")
            return
        worker = self.pools.free_worker(pool)
        if worker is None:
            waiting = f"waiting for a free worker of pool {job.pool}"
            if job.waiting_reason != waiting:
                self.store.set_waiting(job.id, waiting)
            return
        attempt = self.store.assign_worker(job.id, worker.id, (worker.price_per_hour or 0.0) / pool.jobs_per_worker)
        self.say(job, "placed", f"on pool {pool.name} worker {worker.number} ({worker.stack_name}), "
                                f"slot {attempt.slot}")

    def _wait_for_capacity(self, job: JobRow, reason: str) -> None:
        """Every feasible region refused in this round: back off and go round again, or give up."""
        now = time.time()
        task = self._task(job)
        rules = RecoveryRules.from_task(task, bool(task["resources"] and task["resources"][0].get("use_spot")))
        history = History(backoff_rounds=job.backoff_rounds, waiting_since=job.waiting_since)
        decision = decide(Failure.NO_CAPACITY, rules, history, now, reason=reason)
        if decision.action == "give_up":
            self._end(job, JobStatus.FAILED_NO_RESOURCE, decision.reason)
            return
        self.store.wait_for_capacity(job.id, retry_at=now + decision.delay_s, reason=reason, why=decision.reason,
                                     task_index=job.current_task if is_group(job.spec) else None)
        self.say(job, "backoff", decision.reason)

    # --- PROVISIONING: pulumi up ----------------------------------------------------------------------------

    def _program(self, job: JobRow, attempt: AttemptRow) -> StackProgram:
        task = self._task(job)
        accelerators = (task["resources"][0].get("accelerators") or {}) if task["resources"] else {}
        steps = task_steps(job.storage, job.current_task)
        config = self.ctx.config
        spec = ClusterSpec(name=attempt.stack_name, infra=attempt.infra, region=attempt.region,
                           instance_type=attempt.instance_type, disk_size=task["resources"][0].get("disk_size"),
                           num_nodes=attempt.num_nodes, use_spot=attempt.use_spot,
                           accelerators={k: int(v) for k, v in accelerators.items()},
                           labels={"sortie-job": str(job.id)}, token=self.store.box.open(attempt.token_enc),
                           local_root=str(config.local.root_dir(self.ctx.home)), **cloud_fields(config),
                           node_package=node_package_for(steps, attempt.infra, config),
                           node_fuse=node_fuse_for(steps, attempt.infra),
                           node_buckets=node_buckets_for(steps, attempt.infra),
                           job_id=str(job.id), attempt=str(attempt.number), user=job.user,
                           **attempt_features(task, attempt.infra, attempt.region))  # ports, tiers, images
        return StackProgram("cluster", spec)

    def _stack_op(self, job: JobRow, op: str, stack: str, fn: Callable[[], Any]) -> Any:
        leases = self.ctx.leases
        if leases is not None and not self.ctx.stack_ops.busy((op, stack)) and not leases.still_holds_job(job.id):
            raise LeaseLost(f"job {job.id}: lease lost or expired; no new {op} of {stack}")  # fence: a stalled
            # replica that resumes must not start an operation another replica may be driving
        return self.ctx.stack_op(op, stack, fn, self.ctx.logs.controller_log(job.id))

    def _provisioning(self, job: JobRow, attempt: AttemptRow) -> None:
        if job.cancel_requested and not self.ctx.stack_ops.busy(("up", attempt.stack_name)):
            self._teardown_for(job, attempt, "cancelled while starting", final=JobStatus.CANCELLED)
            return
        program = self._program(job, attempt)
        result = self._stack_op(job, "up", attempt.stack_name, lambda: self.ctx.driver.up(attempt.stack_name, program))
        if result is None:
            if job.cancel_requested and job.status != JobStatus.CANCELLING:
                self.store.mark_cancelling(job.id)
            return
        if not result.ok:
            self._provision_failed(job, attempt, result.error)
            return
        nodes = [{k: n[k] for k in ("rank", "node_id", "ip", "url", "region")} |
                 {k: n[k] for k in ("public_ip", "endpoints") if n.get(k)}  # where `ports` are reached
                 for n in result.value.outputs["nodes"]]
        why = f"{len(nodes)} node(s) up in {attempt.infra}/{attempt.region}"
        self.store.attempt_provisioned(attempt.id, nodes, why)
        self.say(job, "provisioned", why)

    def _provision_failed(self, job: JobRow, attempt: AttemptRow, error: BaseException | None) -> None:
        """A failed `up` destroys what it made and removes the stack; if that cleanup failed too, the stack stays
        FAILED and the janitor destroys it."""
        cleaned = not (isinstance(error, StackOperationError) and error.cleanup_failed)
        stack = StackStatus.DESTROYED if cleaned else StackStatus.FAILED
        where = f"{attempt.infra}/{attempt.region}: {error}"
        finish: tuple[JobStatus, str | None] | None = None
        retry_at: float | None = None
        if job.cancel_requested:
            finish = (JobStatus.CANCELLED, "cancelled while starting")
        elif isinstance(error, (PolicyViolationError, InfraUnfitError)):  # the team's policy said no, or the infra
            # cannot do it (a load balancer that gets no address): retrying cannot help
            finish = (JobStatus.FAILED_PRECHECKS, error.message)
        elif not isinstance(error, NoCapacityError):
            failures = job.controller_failures + 1
            if failures > self.ctx.config.controller.controller_error_retries:
                finish = (JobStatus.FAILED_CONTROLLER, f"{type(error).__name__}: {error}")
            else:
                retry_at = time.time() + min(2.0 ** failures, 60.0)
        outcome = Outcome.NO_CAPACITY if isinstance(error, NoCapacityError) else Outcome.ERROR
        self.store.end_attempt(attempt.id, stack=stack, stack_error=str(error), outcome=outcome, finish=finish,
                               retry_at=retry_at, what="no-capacity" if outcome == Outcome.NO_CAPACITY
                               else "up-failed", why=where)
        self.say(job, "no-capacity" if outcome == Outcome.NO_CAPACITY else "up-failed", where)

    # --- SYNCING: workdir and file mounts to every node --------------------------------------------------------

    def _syncing(self, job: JobRow, attempt: AttemptRow) -> None:
        if is_group(job.spec) and not self.ctx.agent_ops.busy(("sync", attempt.id)) \
                and not self._group_ready(job, attempt):
            return  # waiting for the group's other clusters
        result = self.ctx.agent_ops.ensure(("sync", attempt.id), self.files.sync, job, attempt)
        if result is None:
            return
        if isinstance(result.error, NodeStorageError):
            self._after_failure(job, attempt, Failure.SETUP_ERROR, f"file mounts failed: {result.error}")
            return
        refused = agent_refusal(result.error, "sync")  # the node refuses what the task asks: no relaunch can help
        if refused is not None:
            self._teardown_for(job, attempt, f"file sync refused by the node: {result.error}", final=refused)
            return
        if not result.ok:
            self._node_trouble(job, attempt, f"file sync failed: {result.error}")
            return
        steps = task_steps(job.storage, job.current_task)
        why = f"{len(steps)} workdir/file mount step(s) done on every node" if steps else "nothing to sync"
        next_phase = Phase.SETTING_UP if self._task(job).get("setup") else Phase.RUNNING
        self.store.attempt_running(attempt.id, next_phase, "synced", why)
        self.say(job, "synced", why)

    # --- SETTING_UP and RUNNING ---------------------------------------------------------------------------------

    def _codes(self, job: JobRow, attempt: AttemptRow, kind: Literal["setup", "run"]) -> tuple[int, ...] | None:
        try:
            verdict = self.runs.drive(job, attempt, kind)
        except RunRefused as exc:  # a 4xx to the start: the task's failure, never a relaunch
            self._teardown_for(job, attempt, f"the node refused to start {kind}: {exc.error}", final=exc.status)
            return None
        if verdict is None:
            return None
        if verdict.kind == "node_suspect":
            self.ctx.refresh_early(attempt.stack_name, lambda: self._stack_op(
                job, "refresh", attempt.stack_name, lambda: self.ctx.driver.refresh(attempt.stack_name)))
            return None
        if verdict.kind == "node_lost":
            self._confirm_node_loss(job, attempt, verdict.lost_ranks)
            return None
        self.ctx.drop_early_refresh(attempt.stack_name)  # a poll came back: the suspicion is over
        return verdict.exit_codes if verdict.kind == "done" else None

    def _setting_up(self, job: JobRow, attempt: AttemptRow) -> None:
        codes = self._codes(job, attempt, "setup")
        if codes is None:
            return
        if setup_outcome(codes):
            self._after_failure(job, attempt, Failure.SETUP_ERROR, f"setup failed: {first_failure(codes)}", codes)
            return
        self.store.attempt_running(attempt.id, Phase.RUNNING, "setup-done", "setup succeeded on every node")
        self.say(job, "setup-done", "setup succeeded on every node")

    def _running(self, job: JobRow, attempt: AttemptRow) -> None:
        """The run's exit codes, after MOUNT_CACHED writes are uploaded (the flush carries the codes)."""
        flush_key = ("flush", attempt.id)
        codes: tuple[int, ...] | None
        if not self.ctx.agent_ops.busy(flush_key):
            codes = self._codes(job, attempt, "run")
            if codes is None:
                return
            if self.files.has_cached(job):
                self.ctx.agent_ops.ensure(flush_key, self.files.flush, job, attempt, codes)
                return
        else:
            flushed = self.ctx.agent_ops.ensure(flush_key, self.files.flush, job, attempt, ())
            if flushed is None:
                return
            codes = tuple(flushed.value)
        if run_outcome(codes) == JobStatus.SUCCEEDED:
            self._teardown_for(job, attempt, "run succeeded on every node", final=JobStatus.SUCCEEDED, codes=codes)
        else:
            full = f"; {DISK_FULL_REASON}" if node_disk_full(job.waiting_reason) else ""
            self._after_failure(job, attempt, Failure.USER_ERROR, f"run failed: {first_failure(codes)}{full}", codes)

    def _confirm_node_loss(self, job: JobRow, attempt: AttemptRow, ranks: tuple[int, ...]) -> None:
        """Agents missed `grace_misses` polls: ask the infra (`refresh`). Gone nodes mean a preemption;
        nodes the infra still has are given more time (up to three graces) before they count as lost."""
        result = self._stack_op(job, "refresh", attempt.stack_name, lambda: self.ctx.driver.refresh(attempt.stack_name))
        if result is None:
            return
        self.ctx.early_refreshes.discard(attempt.stack_name)
        gone = sorted(r.name for r in result.value.gone) if result.ok else []
        if gone:
            self._node_trouble(job, attempt, f"node(s) {', '.join(gone)} of {attempt.infra}/{attempt.region} "
                                             "gone (preempted or dead, says refresh)")
        elif attempt.missed_polls >= 3 * self.ctx.config.controller.grace_misses:
            self._node_trouble(job, attempt, f"agent(s) of rank {list(ranks)} unreachable for "
                                             f"{attempt.missed_polls} polls")
        else:
            why = f"rank(s) {list(ranks)} missed {attempt.missed_polls} polls, but refresh says the nodes are there"
            self.store.add_event(job.id, "agent-slow", why, task_index=job.current_task)
            self.say(job, "agent-slow", why + "; waiting")

    def _node_trouble(self, job: JobRow, attempt: AttemptRow, why: str) -> None:
        """A node is gone or unusable: the policy relaunches elsewhere. Issue 28: a node that said its disk was full
        is not preempted (a relaunch would fill the next disk the same way): the job failed, and is restarted only
        where the user asked for restarts on errors (`max_restarts_on_errors`)."""
        if node_disk_full(job.waiting_reason):
            self._after_failure(job, attempt, Failure.USER_ERROR, f"{DISK_FULL_REASON} ({why})")
            return
        self._after_failure(job, attempt, Failure.PREEMPTED, why)

    def _after_failure(self, job: JobRow, attempt: AttemptRow, failure: Failure, why: str,
                       codes: tuple[int, ...] = ()) -> None:
        """Ask the recovery policy, then tear down to give up or to relaunch (one transition: the failure, the
        restart it spends and the teardown land together)."""
        task_row = self.store.tasks([job.id])[job.id][job.current_task]
        rules = RecoveryRules.from_task(self._task(job), attempt.use_spot)
        history = History(restarts_on_errors=task_row.restarts_on_errors, last_region=attempt.region,
                          backoff_rounds=job.backoff_rounds, waiting_since=job.waiting_since)
        decision = decide(failure, rules, history, time.time(), exit_codes=codes, reason=why)
        outcome = Outcome(failure.value)
        if decision.action == "give_up":
            self._teardown_for(job, attempt, decision.reason, final=decision.status, codes=codes, outcome=outcome,
                               failure=why)
            return
        relaunch = Relaunch(decision.reason, decision.prefer_region, tuple(sorted(decision.avoid_regions)),
                            decision.spends_restart, rules.strategy)
        self._teardown_for(job, attempt, decision.reason, relaunch=relaunch, codes=codes, outcome=outcome,
                           failure=why)

    # --- TEARDOWN: destroy, then finish, next task or relaunch -----------------------------------------------------

    def _teardown_for(self, job: JobRow, attempt: AttemptRow, why: str, *, final: JobStatus | None = None,
                      relaunch: Relaunch | None = None, codes: tuple[int, ...] = (),
                      outcome: Outcome | None = None, failure: str | None = None) -> None:
        self.store.begin_teardown(attempt.id, why=why, final=final, relaunch=relaunch, outcome=outcome,
                                  exit_codes=codes, cancelling=bool(job.cancel_requested), failure=failure)
        if self.ctx.watchers is not None:  # a pool job's nodes are its worker's, still watched
            self.ctx.watchers.forget(("attempt", attempt.id), () if job.pool else attempt.nodes or [])
        if outcome == Outcome.PREEMPTED:
            self.say(job, "preempted", failure or why)
        if relaunch is not None:
            self.say(job, "recovering", relaunch.reason)
        self.say(job, "teardown", why)

    def _teardown(self, job: JobRow, attempt: AttemptRow) -> None:
        if job.pool:
            if attempt.outcome == Outcome.PREEMPTED:  # the worker was lost under its job: replace it
                self.pools.worker_lost(job, f"lost while running job {job.id}")
            else:
                result = self.ctx.agent_ops.ensure(("release", attempt.id), self.pools.release, job, attempt)
                if result is None:
                    return
            self.store.end_attempt(attempt.id, stack=None, what="released", why=f"worker {job.worker_id} released")
            self.say(job, "released", "the worker stays for the next job")
            return
        if self.ctx.stack_ops.running(("refresh", attempt.stack_name)):
            return  # an early refresh (issue 15) still holds the stack: destroy after it
        self.ctx.drop_early_refresh(attempt.stack_name)
        result = self._stack_op(job, "destroy", attempt.stack_name, lambda: self.ctx.driver.destroy(attempt.stack_name))
        if result is None:
            return
        if not result.ok:  # never give up on destroying: log, and the next tick tries again
            self.store.stack_failed(attempt.stack_name, str(result.error))
            self.say(job, "destroy-failed", f"{result.error}; retrying")
            return
        self.store.end_attempt(attempt.id, stack=StackStatus.DESTROYED, why=f"stack {attempt.stack_name} destroyed")
        self.say(job, "destroyed", f"stack {attempt.stack_name} destroyed")

    # --- errors inside the controller ------------------------------------------------------------------------------

    def _controller_error(self, job: JobRow, attempt: AttemptRow | None, exc: BaseException) -> None:
        """An unexpected error for one job: retry it a bounded number of times with backoff, then
        FAILED_CONTROLLER, its stack destroyed. The other jobs are untouched."""
        log.exception("job %s: controller error", job.id, exc_info=exc)
        failures = job.controller_failures + 1
        why = f"{type(exc).__name__}: {exc}"
        try:
            if failures <= self.ctx.config.controller.controller_error_retries:
                delay = min(2.0 ** failures, 60.0)
                self.store.controller_error(job.id, failures=failures, retry_at=time.time() + delay,
                                            why=f"{why}; retry {failures} in {delay:.0f}s")
            elif attempt is None:
                self._end(job, JobStatus.FAILED_CONTROLLER, why)
            elif attempt.phase in (Phase.SYNCING, Phase.SETTING_UP, Phase.RUNNING):
                self._teardown_for(job, attempt, why, final=JobStatus.FAILED_CONTROLLER)
        except TransitionError as again:
            log.warning("job %s: %s; re-reading", job.id, again)
