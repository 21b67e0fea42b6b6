"""The named transitions of jobs, their tasks, attempts and stacks: the only code that changes their statuses.

Where this sits: below the controller and the services, above the tables (`state.models`). Each function is
one transaction that checks the state it expects (`UPDATE ... WHERE id = :id AND <status> IN (:expected)`, the
row count checked), writes its event in the same transaction, and raises `TransitionError` when the row is not
where the caller thought. The moves each may make are `state.machine.TRANSITIONS`.

`end_attempt` is the one that matters most: it closes an attempt and, in the same transaction, sets its task's
status and advances the pipeline or finishes the job, so no crash can leave a finished task looking unfinished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, exists, func, select, update
from sqlalchemy.exc import IntegrityError

from state.apply import ANY, apply, create, guard_leases
from state.group_rules import group_verdict, is_group
from state.leases import hold_job, owner_of
from state.machine import (
    ACTIVE,
    OPEN_PHASES,
    TERMINAL,
    WORKING_PHASES,
    AfterTeardown,
    JobStatus,
    Outcome,
    Phase,
    StackKind,
    StackStatus,
    TransitionError,
)
from state.models import AttemptRow, EventRow, JobRow, StackRow, TaskRow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

_ACTIVE = sorted(ACTIVE)


@dataclass(frozen=True)
class Relaunch:
    """The recovery policy's answer when an attempt fails and the task is to run again."""

    reason: str
    prefer_region: str | None = None
    avoid_regions: tuple[str, ...] = ()
    spends_restart: bool = False
    strategy: str | None = None


def rowcount(result: Any) -> int:
    """Rows an UPDATE matched (its result is a cursor result; the ORM's signature says only `Result`)."""
    return cast("CursorResult[Any]", result).rowcount


TRANSITION_MARK = "sortie.transition"  # set in a session by every event: the store counts transitions committed


def event(session: Session, job_id: int, what: str, why: str | None = None, *, task_index: int | None = None,
          who: str = "controller", data: dict[str, Any] | None = None, at: float | None = None,
          lease: bool = True) -> None:
    """The transition's event, in its transaction, naming the replica that wrote it. With a replica's session, the
    job's lease is checked here too (`lease=False`: a request any replica may make, or work under another lease),
    so no transition of a job commits without it."""
    if lease:
        guard_leases(session, job_lease=job_id)
    session.info[TRANSITION_MARK] = True
    session.add(EventRow(job_id=job_id, task_index=task_index, at=at or time.time(), who=who, what=what, why=why,
                         data={k: v for k, v in (data or {}).items() if v is not None} or None,
                         replica=owner_of(session)))


def _open_attempt_exists(job_id: int, task_index: int | None = None) -> Any:
    """An attempt in progress of the job (of one of its tasks, for a job group, whose tasks run at once)."""
    conditions = [AttemptRow.job_id == job_id, AttemptRow.phase.in_(sorted(OPEN_PHASES))]
    if task_index is not None:
        conditions.append(AttemptRow.task_index == task_index)
    return exists().where(*conditions)


def _finish_group(session: Session, transition: str, job: JobRow, now: float, who: str) -> None:
    """A job group ends once none of its tasks is in progress, with `group_verdict`, in the caller's transaction."""
    rows = session.execute(select(TaskRow.status, TaskRow.failure_reason).where(TaskRow.job_id == job.id)
                           .order_by(TaskRow.task_index)).all()
    if any(status in ACTIVE for status, _ in rows):
        return
    status, why = group_verdict(job.spec, [(s, r) for s, r in rows], bool(job.cancel_requested))
    apply(session, transition, "job", [JobRow.id == job.id], to=status, expect=ACTIVE,
          what=f"finish job group {job.id}", job_lease=job.id, final_status=status, ended_at=now, updated_at=now,
          failure_reason=why, worker_id=None)
    cost = sum(attempt_cost(a, now) for a in session.scalars(select(AttemptRow).where(AttemptRow.job_id == job.id)))
    event(session, job.id, "finished", status.value + (f": {why}" if why and status != JobStatus.SUCCEEDED else ""),
          who=who, data={"cost": round(cost, 6)}, at=now)


def _end_group_task(session: Session, transition: str, job: JobRow, task_index: int, status: JobStatus,
                    why: str | None, now: float, who: str) -> None:
    """One task of a job group ends with `status`; the group ends with its last task (same transaction)."""
    values: dict[str, Any] = {"ended_at": now}
    if why is not None and status != JobStatus.SUCCEEDED:
        values["failure_reason"] = why
    apply(session, transition, "task", [TaskRow.job_id == job.id, TaskRow.task_index == task_index], to=status,
          expect=ACTIVE, what=f"end task {task_index} of job group {job.id}", job_lease=job.id, **values)
    event(session, job.id, "task-ended", status.value + (f": {why}" if why and status != JobStatus.SUCCEEDED else ""),
          task_index=task_index, who=who, at=now)
    _finish_group(session, transition, job, now, who)


def _finish(session: Session, transition: str, job: JobRow, status: JobStatus, why: str | None, now: float,
            who: str) -> None:
    """The job ends with `status`: its current task takes it, later tasks are CANCELLED (or SUCCEEDED with it)."""
    apply(session, transition, "job", [JobRow.id == job.id], to=status, expect=ACTIVE, what=f"finish job {job.id}",
          final_status=status, ended_at=now, updated_at=now, failure_reason=why, worker_id=None)
    for index in range(job.current_task, len(job.spec["tasks"])):
        task_status = status if index == job.current_task or status == JobStatus.SUCCEEDED else JobStatus.CANCELLED
        apply(session, transition, "task", [TaskRow.job_id == job.id, TaskRow.task_index == index], to=task_status,
              expect=ACTIVE, rows=ANY, ended_at=now, failure_reason=why if index == job.current_task else None)
    cost = sum(attempt_cost(a, now) for a in session.scalars(
        select(AttemptRow).where(AttemptRow.job_id == job.id)))
    event(session, job.id, "finished", status.value + (f": {why}" if why and status != JobStatus.SUCCEEDED else ""),
          task_index=job.current_task, who=who, data={"cost": round(cost, 6)}, at=now)


def attempt_cost(attempt: AttemptRow, now: float | None = None) -> float:
    """Price x nodes x hours of one attempt (to now while it runs)."""
    end = attempt.ended_at or now or time.time()
    return (attempt.price_per_hour or 0.0) * attempt.num_nodes * max(end - attempt.started_at, 0.0) / 3600


class JobTransitions:
    """The transitions of jobs, tasks, attempts and stacks, each one transaction of a session from `sessions`
    (`StateStore` holds one and forwards its methods)."""

    def __init__(self, sessions: Callable[[], Session]) -> None:
        self.session = sessions

    def _job_in(self, session: Session, job_id: int) -> JobRow:
        job = session.get(JobRow, job_id)
        if job is None:
            raise TransitionError(f"job {job_id} does not exist")
        return job

    def _attempt_in(self, session: Session, attempt_id: int) -> tuple[AttemptRow, JobRow]:
        attempt = session.get(AttemptRow, attempt_id)
        if attempt is None:
            raise TransitionError(f"attempt {attempt_id} does not exist")
        return attempt, self._job_in(session, attempt.job_id)

    # --- before a cluster ---------------------------------------------------------------------------------

    def place_attempt(self, job_id: int, task_index: int, *, name_for: Callable[[int], str], infra: str,
                      region: str | None, num_nodes: int, use_spot: bool, instance_type: str | None,
                      price_per_hour: float, token_enc: str, why: str) -> AttemptRow:
        """A new attempt of the job's current task, its stack row (CREATING) and its sealed cluster token, in
        one transaction. The attempt number is the task's next; a unique constraint refuses a second writer."""
        now = time.time()
        try:
            with self.session() as session, session.begin():
                job = self._job_in(session, job_id)
                number = (session.scalar(select(func.max(AttemptRow.number)).where(
                    AttemptRow.job_id == job_id, AttemptRow.task_index == task_index)) or 0) + 1
                status = JobStatus.RECOVERING if job.status == JobStatus.RECOVERING else JobStatus.STARTING
                task_status, job_status = status, status
                job_expect = [JobStatus.PENDING, JobStatus.STARTING, JobStatus.RECOVERING]
                job_guard = [JobRow.id == job_id, JobRow.current_task == task_index, JobRow.final_status.is_(None),
                             ~_open_attempt_exists(job_id)]
                if is_group(job.spec):  # its tasks run at once: one attempt in progress per task
                    task = session.get(TaskRow, (job_id, task_index))
                    task_status = (JobStatus.RECOVERING if task is not None and task.status == JobStatus.RECOVERING
                                   else JobStatus.STARTING)
                    job_status = (JobStatus(job.status) if job.status in (JobStatus.RUNNING, JobStatus.RECOVERING)
                                  else JobStatus.STARTING)
                    job_expect.append(JobStatus.RUNNING)
                    job_guard = [JobRow.id == job_id, JobRow.final_status.is_(None),
                                 ~_open_attempt_exists(job_id, task_index)]
                apply(session, "place_attempt", "job", job_guard, to=job_status, expect=job_expect,
                      what=f"place job {job_id}", job_lease=job_id, updated_at=now,
                      started_at=func.coalesce(JobRow.started_at, now), waiting_reason=None)
                apply(session, "place_attempt", "task", [TaskRow.job_id == job_id, TaskRow.task_index == task_index],
                      to=task_status, expect=[JobStatus.PENDING, JobStatus.STARTING, JobStatus.RECOVERING],
                      what=f"place task {task_index}", started_at=func.coalesce(TaskRow.started_at, now))
                stack = name_for(number)
                attempt = AttemptRow(job_id=job_id, task_index=task_index, number=number, stack_name=stack,
                                     infra=infra, region=region, num_nodes=num_nodes, use_spot=use_spot,
                                     instance_type=instance_type, phase=Phase.PROVISIONING, started_at=now,
                                     price_per_hour=price_per_hour, token_enc=token_enc)
                create(session, "place_attempt", attempt)
                session.flush()
                create(session, "place_attempt", StackRow(
                    name=stack, job_id=job_id, attempt_id=attempt.id, kind=StackKind.CLUSTER,
                    status=StackStatus.CREATING, created_at=now, destroyed_at=None), merge=True)
                event(session, job_id, "placed", why, task_index=task_index, at=now,
                      data={"stack": stack, "infra": infra, "region": region, "attempt": number,
                            "use_spot": use_spot})
                session.flush()
                session.expunge(attempt)
                return attempt
        except IntegrityError as exc:  # another writer placed this attempt number first
            raise TransitionError(f"place job {job_id}: attempt already placed ({exc.orig})") from None

    def wait_for_capacity(self, job_id: int, *, retry_at: float, reason: str, why: str,
                          task_index: int | None = None) -> None:
        """Every feasible region refused this round: wait until `retry_at` and go round again (`task_index`: the
        task of a job group that waits; its other tasks go on)."""
        now = time.time()
        with self.session() as session, session.begin():
            job = self._job_in(session, job_id)
            status = JobStatus.STARTING if job.status == JobStatus.PENDING else job.status
            expect = [JobStatus.PENDING, JobStatus.STARTING, JobStatus.RECOVERING]
            if task_index is not None:
                expect.append(JobStatus.RUNNING)
            apply(session, "wait_for_capacity", "job", [JobRow.id == job_id, ~_open_attempt_exists(job_id, task_index)],
                  to=status, expect=expect, what=f"back off job {job_id}", job_lease=job_id, next_attempt_at=retry_at,
                  round_started_at=retry_at, backoff_rounds=JobRow.backoff_rounds + 1,
                  waiting_since=func.coalesce(JobRow.waiting_since, now), waiting_reason=reason, updated_at=now)
            event(session, job_id, "backoff", why, task_index=job.current_task if task_index is None else task_index,
                  at=now,
                  data={"next_try_at": retry_at, "round": job.backoff_rounds + 1})

    def set_waiting(self, job_id: int, reason: str | None) -> None:
        """Why a job waits (shown by the queue and the dashboard); not a status change."""
        with self.session() as session, session.begin():
            hold_job(session, job_id)
            session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status.in_(_ACTIVE)).values(
                waiting_reason=reason))

    def report_node_condition(self, job_id: int, task_index: int, *, expected: str | None, wanted: str | None,
                              what: str, why: str) -> bool:
        """A condition the job's nodes report without failing (a full disk) goes into its DETAILS, or leaves them,
        with its event. Guarded by the DETAILS the caller saw, so a repeated report writes nothing."""
        now = time.time()
        with self.session() as session, session.begin():
            hold_job(session, job_id)
            guard = JobRow.waiting_reason.is_(None) if expected is None else JobRow.waiting_reason == expected
            done = rowcount(session.execute(update(JobRow).where(JobRow.id == job_id, guard).values(
                waiting_reason=wanted, updated_at=now))) == 1
            if done:
                event(session, job_id, what, why, task_index=task_index, at=now)
            return done

    def mark_cancelling(self, job_id: int) -> None:
        """A cancel arrived while an operation that cannot be interrupted (`up`) is under way."""
        now = time.time()
        with self.session() as session, session.begin():
            job = self._job_in(session, job_id)
            was, task_index = job.status, job.current_task  # read before the update below syncs the row
            moved = apply(session, "mark_cancelling", "job", [JobRow.id == job_id, JobRow.cancel_requested.is_(True)],
                          to=JobStatus.CANCELLING, expect=[JobStatus.PENDING, JobStatus.STARTING,
                                                            JobStatus.RECOVERING, JobStatus.RUNNING,
                                                            JobStatus.CANCELLING],
                          what=f"cancelling job {job_id}", job_lease=job_id, updated_at=now)
            if moved and was != JobStatus.CANCELLING:
                event(session, job_id, "cancelling", "a cancel arrived during an operation that cannot be interrupted",
                      task_index=task_index, at=now)

    # --- a cluster's life ---------------------------------------------------------------------------------

    def attempt_provisioned(self, attempt_id: int, nodes: list[dict[str, Any]], why: str) -> None:
        """`up` finished: the nodes are known, the stack is UP, the capacity wait (if any) is over."""
        now = time.time()
        with self.session() as session, session.begin():
            attempt, job = self._attempt_in(session, attempt_id)
            apply(session, "attempt_provisioned", "attempt", [AttemptRow.id == attempt_id], to=Phase.SYNCING,
                  expect=[Phase.PROVISIONING], what=f"provisioned attempt {attempt_id}", job_lease=job.id, nodes=nodes)
            apply(session, "attempt_provisioned", "stack", [StackRow.name == attempt.stack_name], to=StackStatus.UP,
                  rows=ANY, last_error=None)
            session.execute(update(JobRow).where(JobRow.id == job.id).values(
                waiting_since=None, backoff_rounds=0, placement_hint=None, waiting_reason=None, next_attempt_at=None,
                controller_failures=0, updated_at=now))
            event(session, job.id, "provisioned", why, task_index=attempt.task_index, at=now,
                  data={"stack": attempt.stack_name})

    def attempt_running(self, attempt_id: int, phase: Phase, what: str, why: str) -> None:
        """Files synced (to SETTING_UP, or RUNNING without a setup) or setup done (to RUNNING). The job and the
        task are RUNNING from the first of these."""
        now = time.time()
        expect = [Phase.SYNCING] if phase == Phase.SETTING_UP else [Phase.SYNCING, Phase.SETTING_UP]
        with self.session() as session, session.begin():
            attempt, job = self._attempt_in(session, attempt_id)
            apply(session, "attempt_running", "attempt", [AttemptRow.id == attempt_id], to=phase, expect=expect,
                  what=f"{what} attempt {attempt_id}", job_lease=job.id)
            apply(session, "attempt_running", "job", [JobRow.id == job.id], to=JobStatus.RUNNING,
                  expect=[JobStatus.STARTING, JobStatus.RECOVERING], rows=ANY, updated_at=now)
            task_values: dict[str, Any] = {"run_started_at": now} if phase == Phase.RUNNING else {}
            this_task = [TaskRow.job_id == job.id, TaskRow.task_index == attempt.task_index]
            apply(session, "attempt_running", "task", this_task, to=JobStatus.RUNNING,
                  expect=[JobStatus.STARTING, JobStatus.RECOVERING, JobStatus.RUNNING], rows=ANY, **task_values)
            event(session, job.id, what, why, task_index=attempt.task_index, at=now)

    def begin_teardown(self, attempt_id: int, *, why: str, final: JobStatus | None = None,
                       relaunch: Relaunch | None = None, outcome: Outcome | None = None,
                       exit_codes: Sequence[int] = (), cancelling: bool = False, failure: str | None = None) -> None:
        """The attempt is over: its stack is to be destroyed, then the job ends with `final`, moves on to the next
        task (`final` SUCCEEDED with tasks left), or relaunches (`relaunch`, the policy's decision: the restart it
        spends is counted here, with the failure, so a crash can never count it twice)."""
        now = time.time()
        with self.session() as session, session.begin():
            attempt, job = self._attempt_in(session, attempt_id)
            group = is_group(job.spec)
            if relaunch is not None:
                after = AfterTeardown.RELAUNCH
            elif group:  # the task ends with `final`, kept as the attempt's outcome until `end_attempt`
                after = AfterTeardown.END_TASK
            elif final == JobStatus.SUCCEEDED and attempt.task_index + 1 < len(job.spec["tasks"]):
                after = AfterTeardown.NEXT
            else:
                after = AfterTeardown.FINISH
            settled = outcome or (Outcome(final.value) if final else Outcome.RELAUNCH)
            if after == AfterTeardown.END_TASK:
                settled = Outcome((final or JobStatus.FAILED_CONTROLLER).value)
            was_running = attempt.phase == Phase.RUNNING  # read before the update below changes it
            apply(session, "begin_teardown", "attempt", [AttemptRow.id == attempt_id], to=Phase.TEARDOWN,
                  expect=WORKING_PHASES, what=f"teardown of attempt {attempt_id}", job_lease=job.id,
                  after_teardown=after,
                  outcome=settled if after == AfterTeardown.END_TASK else attempt.outcome or settled,
                  exit_codes=list(exit_codes) or attempt.exit_codes)
            job_to: JobStatus | None = None
            job_values: dict[str, Any] = {"updated_at": now}
            if after == AfterTeardown.FINISH:
                job_values.update(final_status=final or JobStatus.FAILED_CONTROLLER,
                                  failure_reason=None if final == JobStatus.SUCCEEDED else why)
                if final == JobStatus.CANCELLED or cancelling:
                    job_to = JobStatus.CANCELLING
            if after == AfterTeardown.END_TASK and cancelling:  # the whole group is cancelled
                job_to = JobStatus.CANCELLING
            if relaunch is not None:
                job_to = JobStatus.RECOVERING
                job_values.update(round_started_at=now, waiting_reason=relaunch.reason,
                                  placement_hint={"prefer": relaunch.prefer_region,
                                                  "avoid": sorted(relaunch.avoid_regions)})
            apply(session, "begin_teardown", "job", [JobRow.id == job.id], to=job_to, expect=ACTIVE,
                  what=f"teardown of job {job.id}", **job_values)
            task_values: dict[str, Any] = {}
            if exit_codes and was_running:
                task_values["exit_codes"] = list(exit_codes)
            if relaunch is not None and relaunch.spends_restart:
                task_values["restarts_on_errors"] = TaskRow.restarts_on_errors + 1
            if after == AfterTeardown.END_TASK and final != JobStatus.SUCCEEDED:
                task_values["failure_reason"] = failure or why
            if task_values:
                session.execute(update(TaskRow).where(TaskRow.job_id == job.id,
                                                      TaskRow.task_index == attempt.task_index).values(**task_values))
            if not job.pool:  # a pool job's stack is its worker's, which stays
                apply(session, "begin_teardown", "stack", [StackRow.name == attempt.stack_name],
                      to=StackStatus.DESTROYING, rows=ANY)
            if outcome == Outcome.PREEMPTED:
                event(session, job.id, "preempted", failure or why, task_index=attempt.task_index, at=now,
                      data={"stack": attempt.stack_name, "region": attempt.region})
            if relaunch is not None:
                event(session, job.id, "recovering", relaunch.reason, task_index=attempt.task_index, at=now,
                      data={"stack": attempt.stack_name, "region": attempt.region, "strategy": relaunch.strategy})
            event(session, job.id, "teardown", why, task_index=attempt.task_index, at=now,
                  data={"stack": attempt.stack_name, "exit_codes": list(exit_codes) or None})

    def end_attempt(self, attempt_id: int, *, stack: StackStatus | None = StackStatus.DESTROYED,
                    stack_error: str | None = None, outcome: Outcome | None = None,
                    finish: tuple[JobStatus, str | None] | None = None, retry_at: float | None = None,
                    what: str = "destroyed", why: str = "") -> None:
        """Close the attempt and, in the same transaction, do what follows it: after a teardown, what
        `begin_teardown` decided (relaunch: the task RECOVERING; next: the task SUCCEEDED and the pipeline's next
        task; finish: the job's final status). A failed `up` (PROVISIONING, which cleaned up after itself) ends
        the attempt with its `outcome` and, if given, finishes the job (`finish`) or backs it off after a
        controller error (`retry_at`)."""
        now = time.time()
        with self.session() as session, session.begin():
            attempt, job = self._attempt_in(session, attempt_id)
            after = (AfterTeardown(attempt.after_teardown) if attempt.phase == Phase.TEARDOWN and attempt.after_teardown
                     else (AfterTeardown.FINISH if finish else None))
            if after == AfterTeardown.FINISH and is_group(job.spec):  # a failed `up` ends only its task
                after = AfterTeardown.END_TASK
            apply(session, "end_attempt", "attempt", [AttemptRow.id == attempt_id], to=Phase.DONE,
                  expect=[Phase.TEARDOWN, Phase.PROVISIONING], what=f"end of attempt {attempt_id}", job_lease=job.id,
                  ended_at=now, outcome=outcome or attempt.outcome)
            if stack is not None and not job.pool:
                values: dict[str, Any] = {"last_error": stack_error}
                if stack == StackStatus.DESTROYED:
                    values["destroyed_at"] = now
                apply(session, "end_attempt", "stack", [StackRow.name == attempt.stack_name], to=stack, rows=ANY,
                      **values)
            cost = attempt_cost(attempt, now)
            event(session, job.id, what, why, task_index=attempt.task_index, at=now,
                  data={"stack": attempt.stack_name, "region": attempt.region, "attempt_cost": round(cost, 6)})
            job_to: JobStatus | None = None
            job_values: dict[str, Any] = {"updated_at": now}
            if job.pool:
                job_values["worker_id"] = None
            this_task = [TaskRow.job_id == job.id, TaskRow.task_index == attempt.task_index]
            if after == AfterTeardown.RELAUNCH:
                apply(session, "end_attempt", "task", this_task,
                      to=JobStatus.RECOVERING, what=f"task {attempt.task_index} of job {job.id} to recover",
                      recoveries=TaskRow.recoveries + 1)
            elif after == AfterTeardown.NEXT:
                apply(session, "end_attempt", "task", this_task,
                      to=JobStatus.SUCCEEDED, expect=ACTIVE, what=f"task {attempt.task_index} of job {job.id} done",
                      ended_at=now)
                job_to = JobStatus.STARTING
                job_values.update(current_task=attempt.task_index + 1)
                event(session, job.id, "task-done", f"task {attempt.task_index} succeeded; starting task "
                                                     f"{attempt.task_index + 1}", task_index=attempt.task_index,
                      at=now)
            elif after == AfterTeardown.FINISH:
                status, reason = finish or (JobStatus(job.final_status or JobStatus.FAILED_CONTROLLER),
                                            job.failure_reason)
                apply(session, "end_attempt", "job", [JobRow.id == job.id], **job_values)
                session.flush()
                session.refresh(job)
                _finish(session, "end_attempt", job, status, reason, now, "controller")
                return
            elif after == AfterTeardown.END_TASK:
                apply(session, "end_attempt", "job", [JobRow.id == job.id], expect=ACTIVE,
                      what=f"end of attempt {attempt_id}", **job_values)
                status, reason = finish or (JobStatus(attempt.outcome or JobStatus.FAILED_CONTROLLER),
                                            None)
                session.flush()
                session.refresh(job)
                _end_group_task(session, "end_attempt", job, attempt.task_index, status, reason, now, "controller")
                return
            elif retry_at is not None:
                job_values.update(controller_failures=JobRow.controller_failures + 1, next_attempt_at=retry_at)
            apply(session, "end_attempt", "job", [JobRow.id == job.id], to=job_to, expect=ACTIVE,
                  what=f"end of attempt {attempt_id}", **job_values)

    # --- jobs without a cluster ---------------------------------------------------------------------------

    def finish_job(self, job_id: int, status: JobStatus, why: str | None, *, who: str = "controller") -> None:
        """End a job that has no attempt in progress (cancelled before placement, infeasible, out of patience)."""
        now = time.time()
        with self.session() as session, session.begin():
            job = self._job_in(session, job_id)
            if session.scalar(select(_open_attempt_exists(job_id))):
                raise TransitionError(f"finish job {job_id}: an attempt is in progress")
            _finish(session, "finish_job", job, status, why, now, who)

    def end_task(self, job_id: int, task_index: int, status: JobStatus, why: str | None, *,
                 who: str = "controller") -> None:
        """End one task of a job group that has no attempt in progress (infeasible, out of patience, cancelled
        before it was placed, an auxiliary task whose primary tasks are done); the group ends with its last task."""
        now = time.time()
        with self.session() as session, session.begin():
            job = self._job_in(session, job_id)
            if session.scalar(select(_open_attempt_exists(job_id, task_index))):
                raise TransitionError(f"end task {task_index} of job {job_id}: an attempt is in progress")
            apply(session, "end_task", "job", [JobRow.id == job_id], expect=ACTIVE,
                  what=f"end task {task_index} of job {job_id}", updated_at=now)
            _end_group_task(session, "end_task", job, task_index, status, why, now, who)

    def controller_error(self, job_id: int, *, failures: int, retry_at: float, why: str) -> None:
        """An unexpected error while driving the job: count it and back off (`failures` is the new count)."""
        now = time.time()
        with self.session() as session, session.begin():
            job = self._job_in(session, job_id)
            apply(session, "controller_error", "job", [JobRow.id == job_id, JobRow.controller_failures == failures - 1],
                  expect=ACTIVE, what=f"controller error of job {job_id}", job_lease=job_id,
                  controller_failures=failures, next_attempt_at=retry_at, updated_at=now)
            event(session, job_id, "controller-error", why, task_index=job.current_task, at=now)

    def request_cancel(self, job_id: int, who: str, *, task_index: int | None = None, graceful: bool = False,
                       graceful_timeout: float | None = None) -> bool:
        """Ask for a cancel (of one task of a job group with `task_index`); False if the job (or that task) had
        already ended, or does not exist. `graceful`: the runs get SIGTERM and their MOUNT_CACHED writes are
        uploaded before the teardown, waited for `graceful_timeout` seconds at most (None: no limit). One
        conditional UPDATE decides, so concurrent requests log one event."""
        now = time.time()
        with self.session() as session, session.begin():
            grace: dict[str, Any] = {}
            if graceful:
                grace = {"graceful_cancel": True,
                         "graceful_deadline": None if graceful_timeout is None else now + graceful_timeout}
            if task_index is None:
                first = rowcount(session.execute(update(JobRow).where(
                    JobRow.id == job_id, JobRow.status.in_(_ACTIVE), JobRow.cancel_requested.is_(False),
                ).values(cancel_requested=True, updated_at=now, **grace))) == 1
            else:
                first = rowcount(session.execute(update(TaskRow).where(
                    TaskRow.job_id == job_id, TaskRow.task_index == task_index, TaskRow.status.in_(_ACTIVE),
                    TaskRow.cancel_requested.is_(False),
                ).values(cancel_requested=True))) == 1
                if first:
                    session.execute(update(JobRow).where(JobRow.id == job_id).values(updated_at=now, **grace))
            if first:  # a request, not a move: any replica (or the user) may make it
                event(session, job_id, "cancel-requested", "graceful" if graceful else None, task_index=task_index,
                      who=who, at=now, lease=False, data={"graceful_timeout": graceful_timeout})
                return True
            if task_index is not None:
                status = session.scalar(select(TaskRow.status).where(TaskRow.job_id == job_id,
                                                                     TaskRow.task_index == task_index))
            else:
                status = session.scalar(select(JobRow.status).where(JobRow.id == job_id))
            return status is not None and status in _ACTIVE

    # --- staging (jobs launch uploads the job's files) --------------------------------------------------------

    def finish_staging(self, job_id: int, storage: dict[str, Any]) -> bool:
        """The uploads of `jobs launch` are done: record what goes on the nodes; False if the job ended
        meanwhile (cancelled, or failed for a stale upload): the storage is still recorded, for the cleaner."""
        now = time.time()
        with self.session() as session, session.begin():
            done = rowcount(session.execute(update(JobRow).where(
                JobRow.id == job_id, JobRow.status.in_(_ACTIVE), JobRow.staging_heartbeat.is_not(None),
            ).values(storage=storage, staging_heartbeat=None, updated_at=now))) == 1
            if done:
                event(session, job_id, "staged", "workdir, file mounts and buckets are ready", who="user", at=now)
            else:
                session.execute(update(JobRow).where(JobRow.id == job_id).values(storage=storage,
                                                                                  staging_heartbeat=None))
            return done

    def fail_staging(self, job_id: int, why: str, storage: dict[str, Any] | None = None) -> None:
        """`jobs launch` could not stage the job's files: FAILED_PRECHECKS, its storage left to be cleaned."""
        now = time.time()
        with self.session() as session, session.begin():
            job = self._job_in(session, job_id)
            if storage is not None:
                session.execute(update(JobRow).where(JobRow.id == job_id).values(storage=storage))
            _finish(session, "fail_staging", job, JobStatus.FAILED_PRECHECKS, why, now, "user")
            session.execute(update(JobRow).where(JobRow.id == job_id).values(staging_heartbeat=None))

    def storage_cleaned(self, job_id: int, removed: Sequence[str], *, lease: str | None = None) -> None:
        """An ended job's storage is removed (the storage janitor's, under its `lease`)."""
        now = time.time()
        with self.session() as session, session.begin():
            apply(session, "storage_cleaned", "job", [JobRow.id == job_id, JobRow.storage_cleaned_at.is_(None)],
                  expect=TERMINAL, what=f"storage of job {job_id}", lease=lease, storage_cleaned_at=now)
            if removed:
                event(session, job_id, "storage-cleaned", ", ".join(removed), at=now, lease=False)

    # --- stacks that outlived their attempt (the janitor's), and stacks of no job ----------------------------

    def stack_destroyed(self, name: str, *, missing_ok: bool = False, lease: str | None = None) -> None:
        """A stack is gone (its public outputs with it). `missing_ok`: a stack Sortie has no row for (found in the
        backend by `stacks gc`) is fine. `lease`: the janitor's, checked in the transaction."""
        with self.session() as session, session.begin():
            guard_leases(session, lease=lease)
            if missing_ok and session.get(StackRow, name) is None:
                return
            apply(session, "stack_destroyed", "stack", [StackRow.name == name], to=StackStatus.DESTROYED,
                  expect=[StackStatus.CREATING, StackStatus.UP, StackStatus.DESTROYING, StackStatus.FAILED,
                          *([StackStatus.DESTROYED] if missing_ok else [])],
                  what=f"stack {name} destroyed", destroyed_at=time.time(), last_error=None, outputs=None)

    def stack_failed(self, name: str, error: str, *, lease: str | None = None) -> None:
        with self.session() as session, session.begin():
            apply(session, "stack_failed", "stack", [StackRow.name == name], to=StackStatus.FAILED,
                  expect=[StackStatus.CREATING, StackStatus.UP, StackStatus.DESTROYING, StackStatus.FAILED],
                  what=f"stack {name} failed", lease=lease, last_error=error)

    def record_stack(self, name: str, kind: StackKind) -> None:
        """A stack that belongs to no job or worker (the cloud controller's), written before it is created."""
        with self.session() as session, session.begin():
            row = session.get(StackRow, name)
            if row is None:
                create(session, "record_stack", StackRow(name=name, kind=kind, status=StackStatus.CREATING,
                                                         created_at=time.time()))
            elif row.status in (StackStatus.DESTROYED, StackStatus.FAILED, StackStatus.CREATING):
                apply(session, "record_stack", "stack", [StackRow.name == name], to=StackStatus.CREATING,
                      expect=[row.status], what=f"stack {name} created again", destroyed_at=None)
            elif row.status != StackStatus.UP:  # UP: an `up` again converges it, and `stack_up` follows
                raise TransitionError(f"stack {name} is {row.status}, not to be created again")

    def stack_up(self, name: str, outputs: dict[str, Any] | None = None) -> None:
        with self.session() as session, session.begin():
            values: dict[str, Any] = {"last_error": None}
            if outputs is not None:
                values["outputs"] = outputs
            apply(session, "stack_up", "stack", [StackRow.name == name], to=StackStatus.UP,
                  expect=[StackStatus.CREATING, StackStatus.UP], what=f"stack {name} up", **values)
