"""The named transitions of pools, their workers and the jobs that run on them; and their reads. Held by
`StateStore`. Like `state.transitions`: one guarded transaction each, its event (`pool_events`, or the job's
`events` for a pool job) in that same transaction, `TransitionError` when a row is not where expected."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import exists, func, select, update

from state.apply import ANY, apply, create, guard_leases
from state.leases import owner_of
from state.machine import (
    ACTIVE,
    LIVE_WORKER,
    OPEN_PHASES,
    JobStatus,
    Phase,
    PoolStatus,
    StackKind,
    StackStatus,
    TransitionError,
    WorkerStatus,
)
from state.models import AttemptRow, JobRow, PoolEventRow, PoolRow, StackRow, TaskRow, WorkerRow
from state.transitions import TRANSITION_MARK, JobTransitions, event

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

_ACTIVE = sorted(ACTIVE)
_LIVE = sorted(LIVE_WORKER)


POOL_LEASE_PREFIX = "pool:"


def pool_lease(pool: str) -> str:
    """The lease of a pool: its holder converges the pool's workers and drives the pool's jobs."""
    return f"{POOL_LEASE_PREFIX}{pool}"


def pool_event(session: Session, pool: str, what: str, why: str | None = None, *, worker: int | None = None,
               who: str = "controller") -> None:
    """The transition's event, naming the replica; with a replica's session, the pool's lease is checked here."""
    guard_leases(session, lease=pool_lease(pool))
    session.info[TRANSITION_MARK] = True
    session.add(PoolEventRow(pool=pool, worker=worker, at=time.time(), who=who, what=what, why=why,
                             replica=owner_of(session)))


class PoolTransitions:
    """The transitions of pools and workers, and their reads, each one transaction of a session from `sessions`
    (`StateStore` holds one and forwards its methods); a pool's jobs are cancelled through `jobs`."""

    def __init__(self, sessions: Callable[[], Session], jobs: JobTransitions) -> None:
        self.session = sessions
        self._jobs = jobs

    # --- pools ------------------------------------------------------------------------------------------

    def apply_pool(self, name: str, *, user: str, spec: dict[str, Any], spec_hash: str, policy: dict[str, Any],
                   plan: dict[str, Any], storage: dict[str, Any] | None, updated_workers: Sequence[int] = ()) -> None:
        """Create the pool, or give it a new spec and policy; the pool reconciler converges its workers.
        `updated_workers` were updated in place to the new spec (the provider's diff said so): they get its hash in
        this transaction."""
        now = time.time()
        with self.session() as session, session.begin():
            row = session.get(PoolRow, name)
            # The files of earlier applies stay until the pool goes down (old workers may still use them).
            previous = (row.storage if row is not None else None) or {}
            older = [*previous.get("older", []), *([previous["cleanup"]] if previous.get("cleanup") else [])]
            values: dict[str, Any] = dict(
                user=user, spec=spec, spec_hash=spec_hash, workers=policy["workers"],
                min_workers=policy["min_workers"], max_workers=policy["max_workers"],
                idle_timeout=policy["idle_timeout"], jobs_per_worker=policy["jobs_per_worker"], last_plan=plan,
                updated_at=now, last_busy_at=now, storage={**(storage or {}), "older": older})
            if row is None:
                create(session, "apply_pool", PoolRow(name=name, created_at=now, status=PoolStatus.ACTIVE, **values))
            elif row.status == PoolStatus.DOWN:
                raise TransitionError(f"pool {name} is going down (its workers are being destroyed): apply it again "
                                      "once `sortie jobs pool status` shows it TERMINATED")
            else:
                apply(session, "apply_pool", "pool", [PoolRow.name == name], to=PoolStatus.ACTIVE,
                      expect=[row.status], what=f"pool {name} applied", lease=pool_lease(name), **values)
            if updated_workers:
                session.execute(update(WorkerRow).where(WorkerRow.pool == name, WorkerRow.id.in_(updated_workers))
                                .values(spec_hash=spec_hash))
            pool_event(session, name, "applied", f"{policy['workers']} worker(s), spec {spec_hash[:12]}", who=user)

    def pool_down(self, name: str, who: str) -> None:
        with self.session() as session, session.begin():
            apply(session, "pool_down", "pool", [PoolRow.name == name], to=PoolStatus.DOWN,
                  expect=[PoolStatus.ACTIVE], what=f"pool {name} down", updated_at=time.time())
            pool_event(session, name, "down", "every worker is to be destroyed", who=who)

    def pool_terminated(self, name: str) -> None:
        with self.session() as session, session.begin():
            if session.scalar(select(exists().where(WorkerRow.pool == name, WorkerRow.status.in_(_LIVE)))):
                raise TransitionError(f"pool {name} still has workers")
            apply(session, "pool_terminated", "pool", [PoolRow.name == name], to=PoolStatus.TERMINATED,
                  expect=[PoolStatus.DOWN], what=f"pool {name} terminated", lease=pool_lease(name),
                  updated_at=time.time())
            pool_event(session, name, "terminated", "every worker destroyed")

    def pool_busy(self, name: str) -> None:
        """The pool has jobs now (its idle time starts again); not a status."""
        with self.session() as session, session.begin():
            guard_leases(session, lease=pool_lease(name))
            session.execute(update(PoolRow).where(PoolRow.name == name).values(last_busy_at=time.time()))

    def pool(self, name: str) -> PoolRow | None:
        with self.session() as session:
            return session.get(PoolRow, name)

    def pools(self, *, include_terminated: bool = False) -> list[PoolRow]:
        with self.session() as session:
            query = select(PoolRow).order_by(PoolRow.name)
            if not include_terminated:
                query = query.where(PoolRow.status != PoolStatus.TERMINATED)
            return list(session.scalars(query))

    def pool_events(self, name: str) -> list[PoolEventRow]:
        with self.session() as session:
            return list(session.scalars(select(PoolEventRow).where(PoolEventRow.pool == name)
                                        .order_by(PoolEventRow.id)))

    # --- workers ----------------------------------------------------------------------------------------

    def workers(self, pool: str | None = None, *, live_only: bool = True) -> list[WorkerRow]:
        with self.session() as session:
            query = select(WorkerRow).order_by(WorkerRow.pool, WorkerRow.number)
            if pool is not None:
                query = query.where(WorkerRow.pool == pool)
            if live_only:
                query = query.where(WorkerRow.status.in_(_LIVE))
            return list(session.scalars(query))

    def create_worker(self, pool: str, *, spec_hash: str, stack_prefix: str, infra: str, region: str | None,
                      use_spot: bool, price_per_hour: float, token_enc: str) -> WorkerRow:
        """A new worker row and its stack row, in one transaction (the janitor never sees one without the other)."""
        now = time.time()
        with self.session() as session, session.begin():
            apply(session, "create_worker", "pool", [PoolRow.name == pool], expect=[PoolStatus.ACTIVE],
                  what=f"new worker of pool {pool}", lease=pool_lease(pool), updated_at=now)
            number = (session.scalar(select(func.max(WorkerRow.number)).where(WorkerRow.pool == pool)) or 0) + 1
            stack = f"{stack_prefix}-pool-{pool}-w{number}"
            worker = WorkerRow(pool=pool, number=number, stack_name=stack, spec_hash=spec_hash,
                               status=WorkerStatus.PROVISIONING, infra=infra, region=region, use_spot=use_spot,
                               price_per_hour=price_per_hour, token_enc=token_enc, created_at=now)
            create(session, "create_worker", worker)
            create(session, "create_worker", StackRow(name=stack, kind=StackKind.POOL_WORKER,
                                                      status=StackStatus.CREATING, created_at=now, destroyed_at=None),
                   merge=True)
            pool_event(session, pool, "creating", f"{stack} in {infra}/{region}", worker=number)
            session.flush()
            session.expunge(worker)
            return worker

    def _worker_move(self, transition: str, worker: WorkerRow, expect: Sequence[str], to: WorkerStatus, what: str,
                     why: str, stack: StackStatus | None = None, stack_error: str | None = None,
                     **values: Any) -> None:
        now = time.time()
        with self.session() as session, session.begin():
            apply(session, transition, "worker", [WorkerRow.id == worker.id], to=to, expect=expect,
                  what=f"worker {worker.number} of pool {worker.pool} {what}", lease=pool_lease(worker.pool),
                  **values)
            if stack is not None:
                stack_values: dict[str, Any] = {"last_error": stack_error}
                if stack == StackStatus.DESTROYED:
                    stack_values["destroyed_at"] = now
                apply(session, transition, "stack", [StackRow.name == worker.stack_name], to=stack, rows=ANY,
                      **stack_values)
            pool_event(session, worker.pool, what, why, worker=worker.number)

    def worker_provisioned(self, worker: WorkerRow, nodes: list[dict[str, Any]]) -> None:
        self._worker_move("worker_provisioned", worker, [WorkerStatus.PROVISIONING], WorkerStatus.SETTING_UP,
                          "provisioned", f"{len(nodes)} node(s) up; setting up", stack=StackStatus.UP, nodes=nodes)

    def worker_ready(self, worker: WorkerRow) -> None:
        now = time.time()
        self._worker_move("worker_ready", worker, [WorkerStatus.SETTING_UP], WorkerStatus.READY, "ready",
                          "files and setup done", ready_at=now, idle_since=now)

    def drain_worker(self, worker: WorkerRow) -> None:
        self._worker_move("drain_worker", worker, [WorkerStatus.READY], WorkerStatus.DRAINING, "draining",
                          "finishes its jobs, then goes")

    def fail_worker(self, worker: WorkerRow, why: str, *, destroyed: bool | None = None) -> None:
        """The worker's setup failed or its node was lost: FAILED (the pool reconciler destroys and replaces it).
        A failed `up` cleaned up after itself (`destroyed` True: TERMINATED at once; False: its stack FAILED, for
        the janitor)."""
        if destroyed is None:
            self._worker_move("fail_worker", worker, [WorkerStatus.PROVISIONING, WorkerStatus.SETTING_UP,
                                                      WorkerStatus.READY, WorkerStatus.DRAINING], WorkerStatus.FAILED,
                              "failed", why, failure_reason=why)
        else:
            self._worker_move("fail_worker", worker, [WorkerStatus.PROVISIONING],
                              WorkerStatus.TERMINATED if destroyed else WorkerStatus.FAILED, "failed", why,
                              stack=StackStatus.DESTROYED if destroyed else StackStatus.FAILED, stack_error=why,
                              failure_reason=why, **({"ended_at": time.time()} if destroyed else {}))

    def terminate_worker(self, worker: WorkerRow, why: str) -> None:
        self._worker_move("terminate_worker", worker, [WorkerStatus.PROVISIONING, WorkerStatus.SETTING_UP,
                                                       WorkerStatus.READY, WorkerStatus.DRAINING,
                                                       WorkerStatus.FAILED], WorkerStatus.TERMINATING,
                          "terminating", why, stack=StackStatus.DESTROYING)

    def worker_terminated(self, worker: WorkerRow) -> None:
        self._worker_move("worker_terminated", worker, [WorkerStatus.TERMINATING], WorkerStatus.TERMINATED,
                          "terminated", f"{worker.stack_name} destroyed", stack=StackStatus.DESTROYED,
                          ended_at=time.time())

    def record_worker_health(self, worker_id: int, *, missed_polls: int | None = None,
                             idle_since: float | None = None) -> None:
        """Health observations of a worker (not a status)."""
        values: dict[str, Any] = {}
        if missed_polls is not None:
            values["missed_polls"] = missed_polls
        if idle_since is not None:
            values["idle_since"] = idle_since
        with self.session() as session, session.begin():
            pool = session.scalar(select(WorkerRow.pool).where(WorkerRow.id == worker_id))
            if pool is not None:
                guard_leases(session, lease=pool_lease(pool))
            session.execute(update(WorkerRow).where(WorkerRow.id == worker_id).values(**values))

    def live_worker_stacks(self) -> set[str]:
        with self.session() as session:
            return set(session.scalars(select(WorkerRow.stack_name).where(WorkerRow.status.in_(_LIVE))))

    # --- pool jobs ----------------------------------------------------------------------------------------

    def pool_jobs(self, pool: str, *, active_only: bool = True) -> list[JobRow]:
        with self.session() as session:
            query = select(JobRow).where(JobRow.pool == pool).order_by(JobRow.id)
            if active_only:
                query = query.where(JobRow.status.in_(_ACTIVE))
            return list(session.scalars(query))

    def assign_worker(self, job_id: int, worker_id: int, price_per_hour: float) -> AttemptRow:
        """Start a pool job on a READY worker: an attempt on the worker's stack, straight to RUNNING, in the
        lowest slot no other job of the worker holds. Refused (`TransitionError`) when the worker is not READY,
        has no free slot, or the job already has an attempt in progress."""
        now = time.time()
        with self.session() as session, session.begin():
            job = session.get(JobRow, job_id)
            worker = session.get(WorkerRow, worker_id)
            pool = session.get(PoolRow, worker.pool) if worker else None
            if job is None or worker is None or pool is None or worker.status != WorkerStatus.READY:
                raise TransitionError(f"job {job_id} on worker {worker_id}: the worker is not READY")
            guard_leases(session, lease=pool_lease(pool.name), job_lease=job_id)
            taken = set(session.scalars(select(AttemptRow.slot).join(JobRow, JobRow.id == AttemptRow.job_id).where(
                JobRow.worker_id == worker.id, AttemptRow.stack_name == worker.stack_name,
                AttemptRow.phase.in_(sorted(OPEN_PHASES)))))
            if len(taken) >= pool.jobs_per_worker:
                raise TransitionError(f"job {job_id} on worker {worker.number}: no free slot")
            slot = next(i for i in range(len(taken) + 1) if i not in taken)
            number = (session.scalar(select(func.max(AttemptRow.number)).where(
                AttemptRow.job_id == job.id, AttemptRow.task_index == job.current_task)) or 0) + 1
            apply(session, "assign_worker", "job", [JobRow.id == job.id, JobRow.final_status.is_(None), ~exists().where(
                AttemptRow.job_id == job.id, AttemptRow.phase.in_(sorted(OPEN_PHASES)))], to=JobStatus.RUNNING,
                  expect=[JobStatus.PENDING, JobStatus.RECOVERING], what=f"assign job {job.id}", worker_id=worker.id,
                  updated_at=now, waiting_reason=None, started_at=func.coalesce(JobRow.started_at, now))
            attempt = AttemptRow(job_id=job.id, task_index=job.current_task, number=number,
                                 stack_name=worker.stack_name, infra=worker.infra or "local", region=worker.region,
                                 num_nodes=len(worker.nodes or []), use_spot=worker.use_spot, phase=Phase.RUNNING,
                                 started_at=now, price_per_hour=price_per_hour, nodes=worker.nodes,
                                 token_enc=worker.token_enc, slot=slot)
            create(session, "assign_worker", attempt)
            apply(session, "assign_worker", "task", [TaskRow.job_id == job.id, TaskRow.task_index == job.current_task],
                  to=JobStatus.RUNNING, what=f"task {job.current_task} of job {job.id} on worker {worker.number}",
                  started_at=func.coalesce(TaskRow.started_at, now), run_started_at=now)
            session.execute(update(WorkerRow).where(WorkerRow.id == worker.id).values(idle_since=None))
            event(session, job.id, "placed", f"pool {worker.pool} worker {worker.number} ({worker.stack_name})",
                  task_index=job.current_task, at=now,
                  data={"stack": worker.stack_name, "worker": worker.number, "attempt": number, "slot": slot})
            session.flush()
            session.expunge(attempt)
            return attempt

    def cancel_pool_jobs(self, pool: str, who: str) -> list[int]:
        """Ask every job of the pool in progress to cancel; their ids."""
        ids = [j.id for j in self.pool_jobs(pool)]
        return [job_id for job_id in ids if self._jobs.request_cancel(job_id, who)]

    def jobs_on_workers(self, worker_ids: Sequence[int]) -> dict[int, list[int]]:
        """Active job ids per worker."""
        found: dict[int, list[int]] = {w: [] for w in worker_ids}
        if not worker_ids:
            return found
        with self.session() as session:
            rows = session.execute(select(JobRow.worker_id, JobRow.id).where(
                JobRow.worker_id.in_(list(worker_ids)), JobRow.status.in_(_ACTIVE)))
            for worker_id, job_id in rows:
                found.setdefault(worker_id, []).append(job_id)
        return found
