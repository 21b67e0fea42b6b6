"""One tick: load every job in progress, move each one step along its attempt's phase.

Each phase handler loads what it needs, asks a pure function in `decide` where available, and
applies the result with guarded writes. Slow work (stack operations, agent calls) runs in bounded
pools keyed by what it is for; a later tick collects the result. Every operation is idempotent, so
a restarted controller simply issues again whatever was in flight when it died.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.agent_client import AgentClient, AgentError
from orchestrator.cloud_features import attempt_features  # issue 16
from orchestrator.config import SortieConfig
from orchestrator.controller.decide import NodeRun, first_failure, judge_runs, run_outcome, setup_outcome
from orchestrator.controller.node_files import (
    JobFiles,
    NodeStorageError,
    node_fuse_for,
    node_package_for,
    task_steps,
)
from orchestrator.controller.ops import OperationPool
from orchestrator.controller.pool_workers import PoolWorkers, job_dir
from orchestrator.errors import NoCapacityError, PolicyViolationError, StackOperationError
from orchestrator.job_logs import JobLogs
from orchestrator.job_status import JobStatus, Phase
from orchestrator.placement import Infeasible, capacity_key, place
from orchestrator.recovery import Failure, History, RecoveryRules, decide
from orchestrator.run_env import node_env, pool_job_env
from orchestrator.stack_driver import StackDriver, copy_engine_output, stack_name
from stacks.spec import ClusterSpec, StackProgram, cloud_fields, new_cluster_token
from state.models import AttemptRow, JobRow
from state.store import StateStore

log = logging.getLogger("sortie.controller")
JANITOR_SECONDS = 10.0
STAGING_STALE_SECONDS = 600.0  # `jobs launch` refreshes its heartbeat while it uploads
STORAGE_CLEAN_SECONDS = 2.0


class Reconciler:
    def __init__(self, store: StateStore, driver: StackDriver, config: SortieConfig, home: Path,
                 wake: Callable[[], None] | None = None) -> None:
        self.store = store
        self.driver = driver
        self.config = config
        self.logs = JobLogs(home)
        self.stack_ops = OperationPool(config.pulumi.operation_slots, "stack-op", wake)
        self.agent_ops = OperationPool(config.controller.agent_workers, "agent-op", wake)
        self._last_poll: dict[int, float] = {}
        self.files = JobFiles(self)
        self.pools = PoolWorkers(self)
        self._last_janitor = 0.0
        self._last_storage_clean = 0.0

    # --- the tick ---------------------------------------------------------------------------------------

    def tick(self) -> int:
        """One pass over every pool and job in progress. Returns how many of them there are (the controller
        does not stop itself while a pool exists: its workers need watching)."""
        pools = self.pools.tick()
        jobs = self.store.active_jobs()
        attempts = self.store.open_attempts([j.id for j in jobs])
        for job in jobs:
            try:
                self._step(job, attempts.get(job.id))
            except Exception as exc:  # one job's trouble never stops the others
                self._controller_error(job, attempts.get(job.id), exc)
        if time.monotonic() - self._last_janitor >= JANITOR_SECONDS:
            self._last_janitor = time.monotonic()
            self._janitor()
        if time.monotonic() - self._last_storage_clean >= STORAGE_CLEAN_SECONDS:
            self._last_storage_clean = time.monotonic()
            self.files.clean_storage(STAGING_STALE_SECONDS)
        return len(jobs) + pools

    def _janitor(self) -> None:
        """The stacks reconciler: a stack row not yet DESTROYED whose attempt is over (a failed up whose
        own cleanup failed, a crash between two writes) is destroyed. Nothing Sortie made is forgotten.
        Open attempts are read after the stacks, so a stack placed meanwhile is never taken for a leftover
        (an attempt and its stack row are written in one transaction)."""
        live = self.store.live_stacks()
        open_stacks = self.store.open_stack_names()
        for row in live:
            if row.name in open_stacks:
                continue
            key = ("destroy", row.name)
            result = self.stack_ops.collect(key)
            if result is None:
                self.stack_ops.submit(key, self.driver.destroy, row.name)
            elif result.ok:
                self.store.set_stack(row.name, "DESTROYED")
                log.info("janitor: destroyed leftover stack %s", row.name)
            else:
                self.store.set_stack(row.name, "FAILED", str(result.error))
                log.warning("janitor: destroy of %s failed, will retry: %s", row.name, result.error)

    def busy(self) -> bool:
        return bool(self.stack_ops.in_flight() or self.agent_ops.in_flight())

    def note(self, job: JobRow, what: str, why: str, **data: Any) -> None:
        self.store.add_event(job.id, what, why, task_index=job.current_task, data=data or None)
        self.logs.note(job.id, f"[{what}] {why}")
        log.info("job %s: %s: %s", job.id, what, why)

    def _step(self, job: JobRow, attempt: AttemptRow | None) -> None:
        if attempt is None:
            self._start_attempt(job)
            return
        handler: dict[str, Callable[[JobRow, AttemptRow], None]] = {
            Phase.PROVISIONING: self._provisioning, Phase.SYNCING: self._syncing,
            Phase.SETTING_UP: self._setting_up, Phase.RUNNING: self._running, Phase.TEARDOWN: self._teardown,
        }
        if attempt.phase != Phase.TEARDOWN and job.next_attempt_at and time.time() < job.next_attempt_at:
            return  # backing off after a controller error
        if job.cancel_requested and attempt.phase not in (Phase.TEARDOWN, Phase.PROVISIONING):
            self._begin_teardown(job, attempt, JobStatus.CANCELLED, "cancelled by the user")
            return
        handler[attempt.phase](job, attempt)

    def _task(self, job: JobRow) -> dict[str, Any]:
        return job.spec["tasks"][job.current_task]

    # --- no attempt: place the task, or finish ------------------------------------------------------------

    def _start_attempt(self, job: JobRow) -> None:
        if job.final_status:  # the teardown finished but the final write did not land (crash): land it
            self._finish(job, JobStatus(job.final_status), job.failure_reason)
            return
        if job.cancel_requested:
            self._finish(job, JobStatus.CANCELLED, "cancelled before it was placed")
            return
        if job.next_attempt_at and time.time() < job.next_attempt_at:
            return
        if job.staging_heartbeat is not None:  # `jobs launch` is still uploading the job's files
            if time.time() - job.staging_heartbeat > STAGING_STALE_SECONDS:
                why = "the uploads of `jobs launch` stopped before they finished (was it killed?); launch again"
                self._finish(job, JobStatus.FAILED_PRECHECKS, why)
            return
        if job.pool:
            self._start_pool_job(job)
            return
        task = self._task(job)
        hint = job.placement_hint or {}
        exclude = {capacity_key(a.region or "", a.use_spot)
                   for a in self.store.attempts(job.id)
                   if a.task_index == job.current_task and a.outcome == "NO_CAPACITY"
                   and a.started_at >= (job.round_started_at or 0)}
        choice = place(task["resources"], self.config, exclude, prefer=hint.get("prefer"),
                       avoid=hint.get("avoid") or (), ordered=bool(task.get("resources_ordered")),
                       num_nodes=int(task["num_nodes"]))
        if isinstance(choice, Infeasible):
            if choice.no_capacity:
                self._wait_for_capacity(job, choice.reason)
            else:
                self.note(job, "infeasible", choice.reason)
                self._finish(job, JobStatus.FAILED_PRECHECKS, choice.reason)
            return
        cand = task["resources"][choice.candidate_index]
        number = self.store.count_attempts(job.id, job.current_task) + 1
        name = stack_name(self.config.pulumi.stack_prefix, "job", f"{job.id}-t{job.current_task}", number)
        status = JobStatus.RECOVERING if job.status == JobStatus.RECOVERING else JobStatus.STARTING
        spot = " (spot)" if choice.use_spot else ""
        attempt = self.store.create_attempt(
            job, stack_name=name, infra=choice.infra, region=choice.region, num_nodes=int(task["num_nodes"]),
            use_spot=choice.use_spot, instance_type=choice.instance_type or cand.get("instance_type"), status=status,
            price_per_hour=choice.price_per_hour,
            why=f"{choice.infra}/{choice.region}{spot}, {task['num_nodes']} node(s), stack {name}")
        self.store.update_attempt(attempt.id, token_enc=self.store.box.seal(new_cluster_token()))
        self.logs.note(job.id, f"[placed] task {job.current_task} attempt {number} on "
                               f"{choice.infra}/{choice.region}{spot} as stack {name}")

    def _start_pool_job(self, job: JobRow) -> None:
        """A pool job waits PENDING for a READY worker with a free slot, then runs there at once."""
        pool = self.store.pool(job.pool or "")
        if pool is None or pool.status != "ACTIVE":
            self._finish(job, JobStatus.CANCELLED, f"pool {job.pool} was taken down")
            return
        worker = self.pools.assign(job)
        if worker is None:
            if job.waiting_reason is None:
                self.store.update_job(job.id, waiting_reason=f"waiting for a free worker of pool {job.pool}")
            return
        self.store.update_job(job.id, waiting_reason=None)
        attempt = self.store.assign_worker(job, worker, (worker.price_per_hour or 0.0) / pool.jobs_per_worker)
        self.logs.note(job.id, f"[placed] on pool {pool.name} worker {worker.number} ({worker.stack_name}), "
                               f"slot {attempt.slot}")

    def _wait_for_capacity(self, job: JobRow, reason: str) -> None:
        """Every feasible region refused in this round: back off and go round again, or give up."""
        now = time.time()
        task = self._task(job)
        rules = RecoveryRules.from_task(task, bool(task["resources"] and task["resources"][0].get("use_spot")))
        history = History(backoff_rounds=job.backoff_rounds, waiting_since=job.waiting_since)
        decision = decide(Failure.NO_CAPACITY, rules, history, now, reason=reason)
        if decision.action == "give_up":
            self.note(job, "gave-up", decision.reason)
            self._finish(job, JobStatus.FAILED_NO_RESOURCE, decision.reason)
            return
        retry_at = now + decision.delay_s
        status = JobStatus.STARTING if job.status == JobStatus.PENDING else job.status
        self.store.update_job(job.id, status=status, next_attempt_at=retry_at, round_started_at=retry_at,
                              backoff_rounds=job.backoff_rounds + 1, waiting_since=job.waiting_since or now,
                              waiting_reason=reason)
        self.note(job, "backoff", decision.reason, next_try_at=retry_at, round=job.backoff_rounds + 1)

    # --- PROVISIONING: pulumi up ----------------------------------------------------------------------------

    def _program(self, job: JobRow, attempt: AttemptRow) -> StackProgram:
        task = self._task(job)
        accelerators = (task["resources"][0].get("accelerators") or {}) if task["resources"] else {}
        steps = task_steps(job.storage, job.current_task)
        spec = ClusterSpec(name=attempt.stack_name, infra=attempt.infra, region=attempt.region,
                           instance_type=attempt.instance_type, disk_size=task["resources"][0].get("disk_size"),
                           num_nodes=attempt.num_nodes, use_spot=attempt.use_spot,
                           accelerators={k: int(v) for k, v in accelerators.items()},
                           labels={"sortie-job": str(job.id)}, token=self.store.box.open(attempt.token_enc),
                           local_root=str(self.store.home / "local"), **cloud_fields(self.config),
                           node_package=node_package_for(steps, attempt.infra, self.config),
                           node_fuse=node_fuse_for(steps, attempt.infra),
                           job_id=str(job.id), attempt=str(attempt.number), user=job.user,
                           **attempt_features(task, attempt.infra, attempt.region))  # issue 16: ports, tiers, image
        return StackProgram("cluster", spec)

    def _stack_op(self, job_id: int, op: str, stack: str, fn: Callable[[], Any]) -> Any:
        """Run a stack operation and copy its engine output into the job's controller log."""
        return copy_engine_output(self.driver, stack, fn,
                                  lambda data: self.logs.append(self.logs.controller_log(job_id), data))

    def _drive_stack_op(self, job: JobRow, op: str, stack: str, fn: Callable[[], Any]) -> Any:
        """The finished result of a stack operation, else None after making sure it runs."""
        key = (op, stack)
        result = self.stack_ops.collect(key)
        if result is None:
            self.stack_ops.submit(key, self._stack_op, job.id, op, stack, fn)
        return result

    def _provisioning(self, job: JobRow, attempt: AttemptRow) -> None:
        key = ("up", attempt.stack_name)
        result = self.stack_ops.collect(key)
        if result is None:
            if not self.stack_ops.busy(key):
                if job.cancel_requested:
                    self._begin_teardown(job, attempt, JobStatus.CANCELLED, "cancelled while starting")
                    return
                program = self._program(job, attempt)
                self.stack_ops.submit(key, self._stack_op, job.id, "up", attempt.stack_name,
                                      lambda: self.driver.up(attempt.stack_name, program))
            elif job.cancel_requested and job.status != JobStatus.CANCELLING:
                self.store.update_job(job.id, status=JobStatus.CANCELLING)
            return
        if not result.ok:
            self._provision_failed(job, attempt, result.error)
            return
        nodes = [{k: n[k] for k in ("rank", "node_id", "ip", "url", "region")} for n in result.value.outputs["nodes"]]
        self.store.update_attempt(attempt.id, nodes=nodes, phase=Phase.SYNCING)
        self.store.set_stack(attempt.stack_name, "UP")
        self.store.update_job(job.id, waiting_since=None, backoff_rounds=0, placement_hint=None,
                              waiting_reason=None, next_attempt_at=None)
        self.note(job, "provisioned", f"{len(nodes)} node(s) up in {attempt.infra}/{attempt.region}",
                   stack=attempt.stack_name)
        if job.cancel_requested:
            attempt.phase = Phase.SYNCING
            self._begin_teardown(job, attempt, JobStatus.CANCELLED, "cancelled while starting")

    def _provision_failed(self, job: JobRow, attempt: AttemptRow, error: BaseException | None) -> None:
        # A failed `up` destroys what it made and removes the stack (cleanup_on_failure); if that cleanup
        # failed too, the stack stays FAILED and the janitor destroys it.
        cleaned = "cleanup failed" not in str(error)
        self.store.set_stack(attempt.stack_name, "DESTROYED" if cleaned else "FAILED", str(error))
        if isinstance(error, NoCapacityError):
            self.store.update_attempt(attempt.id, phase=Phase.DONE, outcome="NO_CAPACITY", ended_at=time.time())
            self.note(job, "no-capacity", f"{attempt.infra}/{attempt.region}: {error}", region=attempt.region,
                       stack=attempt.stack_name)
            if job.cancel_requested:
                self._finish(job, JobStatus.CANCELLED, "cancelled while starting")
            return
        self.store.update_attempt(attempt.id, phase=Phase.DONE, outcome="ERROR", ended_at=time.time())
        if job.cancel_requested:
            self._finish(job, JobStatus.CANCELLED, "cancelled while starting")
            return
        if isinstance(error, PolicyViolationError):  # the team's policy said no: retrying cannot help
            self.note(job, "policy-violation", str(error.message))
            self._finish(job, JobStatus.FAILED_PRECHECKS, error.message)
            return
        self._controller_error(job, None, error or StackOperationError("up failed"))

    # --- SYNCING: workdir and file mounts to every node --------------------------------------------------------

    def clients(self, attempt: AttemptRow) -> list[tuple[dict[str, Any], AgentClient]]:
        token = self.store.box.open(attempt.token_enc)
        nodes = sorted(attempt.nodes or [], key=lambda n: n["rank"])
        return [(n, AgentClient(n["url"], token, timeout=10)) for n in nodes]

    def _syncing(self, job: JobRow, attempt: AttemptRow) -> None:
        task = self._task(job)
        key = ("sync", attempt.id)
        result = self.agent_ops.collect(key)
        if result is None:
            self.agent_ops.submit(key, self.files.sync, job, attempt)
            return
        if isinstance(result.error, NodeStorageError):
            self._after_failure(job, attempt, Failure.SETUP_ERROR, f"file mounts failed: {result.error}")
            return
        if not result.ok:
            self._node_trouble(job, attempt, f"file sync failed: {result.error}")
            return
        next_phase = Phase.SETTING_UP if task.get("setup") else Phase.RUNNING
        self.store.update_attempt(attempt.id, phase=next_phase)
        self.store.update_job(job.id, expect=[JobStatus.STARTING, JobStatus.RECOVERING], status=JobStatus.RUNNING)
        now = time.time()
        self.store.update_task(job.id, job.current_task, status=JobStatus.RUNNING,
                               **({} if next_phase == Phase.SETTING_UP else {"run_started_at": now}))
        steps = task_steps(job.storage, job.current_task)
        self.note(job, "synced", f"{len(steps)} workdir/file mount step(s) done on every node" if steps
                   else "nothing to sync")

    # --- SETTING_UP and RUNNING: start on every node, poll, judge ------------------------------------------------

    def _start_runs(self, job: JobRow, attempt: AttemptRow, kind: str) -> None:
        task = self._task(job)
        secrets = self.store.secrets(job)[job.current_task]
        ips = [n["ip"] for n in sorted(attempt.nodes or [], key=lambda n: n["rank"])]
        accelerators = (task["resources"][0].get("accelerators") or {}) if task["resources"] else {}
        for node, client in self.clients(attempt):
            env = node_env(envs=task.get("envs") or {}, secrets=secrets, job_id=job.id, job_name=job.name,
                           task_index=job.current_task, submitted_at=job.submitted_at, rank=node["rank"], ips=ips,
                           accelerators=accelerators, task_name=task.get("name"), is_pipeline=job.is_pipeline)
            command = task[kind]
            if job.pool:
                pool = self.store.pool(job.pool)
                worker_resources = (pool.spec.get("resources") or [{}])[0] if pool else {}
                worker_accelerators = worker_resources.get("accelerators") or {}
                env.update(pool_job_env(job_rank=job.job_rank or 0, num_jobs=job.num_jobs or 1, slot=attempt.slot or 0,
                                        jobs_per_worker=pool.jobs_per_worker if pool else 1,
                                        accelerators=worker_accelerators))
                scratch = job_dir(job.id)
                command = (f'mkdir -p "{scratch}" && export SORTIE_JOB_DIR="{scratch}" TMPDIR="{scratch}"\n'
                           f"{command}")
            try:
                client.run(command, env=env, run_id=f"{kind}-{attempt.id}")
            except AgentError as exc:
                if exc.status != 409:  # 409: already started (a restarted controller asked again)
                    raise

    def _poll(self, job: JobRow, attempt: AttemptRow, kind: str) -> list[NodeRun]:
        """Each node's run status, then the new log bytes (after the status, so an exited run's log is whole)."""
        found = []
        for node, client in self.clients(attempt):
            rank, run_id = node["rank"], f"{kind}-{attempt.id}"
            try:
                status = client.status(run_id)
                path = self.logs.run_log(job.id, job.current_task, attempt.number, kind, rank)
                offset = path.stat().st_size if path.exists() else 0
                while True:
                    data, offset = client.log(run_id, offset)
                    if not data:
                        break
                    self.logs.append(path, data)
                found.append(NodeRun(rank, status.state, status.exit_code))  # type: ignore[arg-type]
            except AgentError as exc:
                found.append(NodeRun(rank, "missing" if exc.status == 404 else "unreachable"))
        return found

    def _runs(self, job: JobRow, attempt: AttemptRow, kind: str) -> tuple[int, ...] | None:
        """Drive one kind of run on every node; the exit codes once all ended, else None."""
        start_key = ("start", attempt.id, kind)
        if not self.agent_ops.busy(start_key) and not self._last_poll.get(attempt.id):
            self.agent_ops.submit(start_key, self._start_runs, job, attempt, kind)
            self._last_poll[attempt.id] = 0.0
            return None
        started = self.agent_ops.collect(start_key)
        if started is not None and not started.ok:
            self._node_trouble(job, attempt, f"could not start {kind}: {started.error}")
            return None
        if self.agent_ops.busy(start_key):
            return None
        poll_key = ("poll", attempt.id, kind)
        polled = self.agent_ops.collect(poll_key)
        if polled is None:
            if time.time() - self._last_poll.get(attempt.id, 0.0) >= self.config.controller.poll_interval_seconds:
                self._last_poll[attempt.id] = time.time()
                self.agent_ops.submit(poll_key, self._poll, job, attempt, kind)
            return None
        if not polled.ok:
            raise polled.error  # type: ignore[misc]
        nodes: list[NodeRun] = polled.value
        if any(n.state == "missing" for n in nodes):  # a restarted controller: start what never started
            self._last_poll.pop(attempt.id, None)
            return None
        grace = self.config.controller.grace_misses
        verdict = judge_runs(nodes, attempt.missed_polls, grace)
        misses = attempt.missed_polls + 1 if any(n.state == "unreachable" for n in nodes) else 0
        if misses != attempt.missed_polls:
            self.store.update_attempt(attempt.id, missed_polls=misses)
            attempt.missed_polls = misses
        if verdict.kind == "node_lost":
            self._confirm_node_loss(job, attempt, verdict.lost_ranks)
            return None
        return verdict.exit_codes if verdict.kind == "done" else None

    def _confirm_node_loss(self, job: JobRow, attempt: AttemptRow, ranks: tuple[int, ...]) -> None:
        """Agents missed `grace_misses` polls: ask the infra (`refresh`). Gone nodes mean a preemption;
        nodes the infra still has are given more time (up to three graces) before they count as lost."""
        result = self._drive_stack_op(job, "refresh", attempt.stack_name,
                                      lambda: self.driver.refresh(attempt.stack_name))
        if result is None:
            return
        gone = sorted(r.name for r in result.value.gone) if result.ok else []
        if gone:
            self._node_trouble(job, attempt, f"node(s) {', '.join(gone)} of {attempt.infra}/{attempt.region} "
                                             "gone (preempted or dead, says refresh)")
        elif attempt.missed_polls >= 3 * self.config.controller.grace_misses:
            self._node_trouble(job, attempt, f"agent(s) of rank {list(ranks)} unreachable for "
                                             f"{attempt.missed_polls} polls")
        else:
            self.note(job, "agent-slow", f"rank(s) {list(ranks)} missed {attempt.missed_polls} polls, but "
                                          "refresh says the nodes are there; waiting")

    def _setting_up(self, job: JobRow, attempt: AttemptRow) -> None:
        codes = self._runs(job, attempt, "setup")
        if codes is None:
            return
        self._last_poll.pop(attempt.id, None)
        if setup_outcome(codes):
            self.store.update_attempt(attempt.id, exit_codes=list(codes))
            self._after_failure(job, attempt, Failure.SETUP_ERROR, f"setup failed: {first_failure(codes)}", codes)
            return
        self.store.update_attempt(attempt.id, phase=Phase.RUNNING)
        self.store.update_task(job.id, job.current_task, run_started_at=time.time())
        self.note(job, "setup-done", "setup succeeded on every node")

    def _running(self, job: JobRow, attempt: AttemptRow) -> None:
        codes = self.files.ended.get(attempt.id) or self._runs(job, attempt, "run")
        if codes is None or not self.files.flushed(job, attempt, codes):
            return
        self._last_poll.pop(attempt.id, None)
        outcome = run_outcome(codes)
        self.store.update_attempt(attempt.id, exit_codes=list(codes))
        self.store.update_task(job.id, job.current_task, exit_codes=list(codes))
        if outcome == JobStatus.SUCCEEDED:
            self._begin_teardown(job, attempt, outcome, "run succeeded on every node", codes)
        else:
            self._after_failure(job, attempt, Failure.USER_ERROR, f"run failed: {first_failure(codes)}", codes)

    def _node_trouble(self, job: JobRow, attempt: AttemptRow, why: str) -> None:
        """A node is gone or unusable: the policy relaunches elsewhere."""
        self.store.update_attempt(attempt.id, outcome="PREEMPTED")
        self.note(job, "preempted", why, stack=attempt.stack_name, region=attempt.region)
        self._after_failure(job, attempt, Failure.PREEMPTED, why)

    def _after_failure(self, job: JobRow, attempt: AttemptRow, failure: Failure, why: str,
                       codes: tuple[int, ...] = ()) -> None:
        """Ask the recovery policy, then tear down and either give up or relaunch."""
        if attempt.outcome is None:
            attempt.outcome = failure.value
            self.store.update_attempt(attempt.id, outcome=failure.value)
        task_row = self.store.tasks([job.id])[job.id][job.current_task]
        rules = RecoveryRules.from_task(self._task(job), attempt.use_spot)
        history = History(restarts_on_errors=task_row.restarts_on_errors, last_region=attempt.region,
                          backoff_rounds=job.backoff_rounds, waiting_since=job.waiting_since)
        decision = decide(failure, rules, history, time.time(), exit_codes=codes, reason=why)
        if decision.action == "give_up":
            self._begin_teardown(job, attempt, decision.status, decision.reason, codes)
            return
        hint = {"prefer": decision.prefer_region, "avoid": sorted(decision.avoid_regions)}
        self.store.update_job(job.id, status=JobStatus.RECOVERING, placement_hint=hint, round_started_at=time.time(),
                              waiting_reason=decision.reason)
        if decision.spends_restart:
            self.store.update_task(job.id, job.current_task, restarts_on_errors=task_row.restarts_on_errors + 1)
        self.note(job, "recovering", decision.reason, stack=attempt.stack_name, region=attempt.region,
                   strategy=rules.strategy)
        self._begin_teardown(job, attempt, None, decision.reason, codes)

    # --- TEARDOWN: destroy, then finish or relaunch ---------------------------------------------------------------

    def _begin_teardown(self, job: JobRow, attempt: AttemptRow, final: JobStatus | None, why: str,
                        exit_codes: tuple[int, ...] = ()) -> None:
        """Tear the attempt's stack down; `final` None means relaunch afterwards."""
        task_done = final == JobStatus.SUCCEEDED and job.current_task + 1 < len(job.spec["tasks"])
        after = "relaunch" if final is None else ("next" if task_done else "finish")
        fields: dict[str, Any] = {}
        if after == "finish":
            fields = {"final_status": final, "failure_reason": None if final == JobStatus.SUCCEEDED else why}
            if final == JobStatus.CANCELLED:
                fields["status"] = JobStatus.CANCELLING
        if fields:
            self.store.update_job(job.id, **fields)
        self.store.update_attempt(attempt.id, phase=Phase.TEARDOWN, after_teardown=after,
                                  outcome=attempt.outcome or (final.value if final else "RELAUNCH"))
        if not job.pool:  # a pool job's stack is its worker's, which stays
            self.store.set_stack(attempt.stack_name, "DESTROYING")
        self.note(job, "teardown", why, stack=attempt.stack_name, exit_codes=list(exit_codes) or None)

    def _release_worker(self, job: JobRow, attempt: AttemptRow) -> None:
        """A pool job's end: the worker stays; its job's run is stopped (cancel), its scratch dir cleaned. A worker
        lost under its job is FAILED at once (the pool reconciler destroys and replaces it), so the job's recovery
        never lands on it again."""
        if attempt.outcome == "PREEMPTED":
            worker = next((w for w in self.store.workers(job.pool) if w.id == job.worker_id), None)
            pool = self.store.pool(job.pool or "")
            if worker is not None and pool is not None and worker.status in ("READY", "DRAINING"):
                self.pools.fail(pool, worker, f"lost while running job {job.id}")
        else:
            for _node, client in self.clients(attempt):
                with contextlib.suppress(AgentError):
                    client.cancel(f"run-{attempt.id}")
            self.pools.release(job, attempt.id)
        self.store.update_job(job.id, worker_id=None)

    def _teardown(self, job: JobRow, attempt: AttemptRow) -> None:
        if job.pool:
            self._release_worker(job, attempt)
            now = time.time()
            self.store.update_attempt(attempt.id, phase=Phase.DONE, ended_at=now)
            self._after_teardown(job, attempt, now)
            return
        result = self._drive_stack_op(job, "destroy", attempt.stack_name,
                                      lambda: self.driver.destroy(attempt.stack_name))
        if result is None:
            return
        if not result.ok:  # never give up on destroying: log, and the next tick tries again
            self.store.set_stack(attempt.stack_name, "FAILED", str(result.error))
            self.note(job, "destroy-failed", f"{result.error}; retrying", stack=attempt.stack_name)
            return
        now = time.time()
        self.store.set_stack(attempt.stack_name, "DESTROYED")
        self.store.update_attempt(attempt.id, phase=Phase.DONE, ended_at=now)
        cost = (attempt.price_per_hour or 0.0) * attempt.num_nodes * (now - attempt.started_at) / 3600
        self.note(job, "destroyed", f"stack {attempt.stack_name} destroyed", stack=attempt.stack_name,
                   region=attempt.region, attempt_cost=round(cost, 6))
        self._after_teardown(job, attempt, now)

    def _after_teardown(self, job: JobRow, attempt: AttemptRow, now: float) -> None:
        fresh = self.store.job(job.id) or job
        if attempt.after_teardown == "relaunch":
            tasks = self.store.tasks([job.id])[job.id]
            self.store.update_task(job.id, job.current_task, status=JobStatus.RECOVERING,
                                   recoveries=tasks[job.current_task].recoveries + 1)
        elif attempt.after_teardown == "next":
            self.store.update_task(job.id, job.current_task, status=JobStatus.SUCCEEDED, ended_at=now)
            self.store.update_job(job.id, current_task=job.current_task + 1, status=JobStatus.STARTING)
            self.note(job, "task-done", f"task {job.current_task} succeeded; starting task {job.current_task + 1}")
        else:
            self._finish(fresh, JobStatus(fresh.final_status or JobStatus.FAILED_CONTROLLER), fresh.failure_reason)

    def _finish(self, job: JobRow, status: JobStatus, why: str | None) -> None:
        now = time.time()
        self.store.update_job(job.id, status=status, final_status=status, ended_at=now, failure_reason=why,
                              cancel_requested=job.cancel_requested)
        for index in range(job.current_task, len(job.spec["tasks"])):
            task_status = status if index == job.current_task else (
                JobStatus.CANCELLED if status != JobStatus.SUCCEEDED else status)
            self.store.update_task(job.id, index, status=task_status, ended_at=now,
                                   failure_reason=why if index == job.current_task else None)
        self.note(job, "finished", f"{status.value}" + (f": {why}" if why and status != JobStatus.SUCCEEDED else ""),
                   cost=round(self.store.costs([job.id])[job.id], 6))

    # --- errors inside the controller ------------------------------------------------------------------------------

    def _controller_error(self, job: JobRow, attempt: AttemptRow | None, exc: BaseException) -> None:
        """An unexpected error for one job: retry it a bounded number of times with backoff, then
        FAILED_CONTROLLER, its stack destroyed. The other jobs are untouched."""
        log.exception("job %s: controller error", job.id, exc_info=exc)
        failures = job.controller_failures + 1
        why = f"{type(exc).__name__}: {exc}"
        if failures > self.config.controller.controller_error_retries:
            if attempt is not None and attempt.phase != Phase.TEARDOWN:
                self.store.update_job(job.id, controller_failures=failures)
                self._begin_teardown(job, attempt, JobStatus.FAILED_CONTROLLER, why)
            elif attempt is None:
                self._finish(job, JobStatus.FAILED_CONTROLLER, why)
            return
        delay = min(2.0 ** failures, 60.0)
        self.store.update_job(job.id, controller_failures=failures, next_attempt_at=time.time() + delay)
        self.note(job, "controller-error", f"{why}; retry {failures} in {delay:.0f}s")
