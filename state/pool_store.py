"""The pools and workers tables, and the jobs that run on pools. Part of `StateStore` (the only writer)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update

from orchestrator.job_status import ACTIVE, JobStatus, Phase
from state.models import AttemptRow, EventRow, JobRow, PoolRow, StackRow, TaskRow, WorkerRow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

LIVE_WORKER = ("PROVISIONING", "SETTING_UP", "READY", "DRAINING", "FAILED", "TERMINATING")


class PoolStore:
    """Mixed into StateStore: `session()` comes from there."""

    def session(self) -> Session:  # pragma: no cover - provided by StateStore
        raise NotImplementedError

    # --- pools ------------------------------------------------------------------------------------------

    def apply_pool(self, name: str, *, user: str, spec: dict[str, Any], spec_hash: str, policy: dict[str, Any],
                   plan: dict[str, Any], storage: dict[str, Any] | None, updated_workers: Sequence[int] = ()) -> None:
        """Create the pool, or give it a new spec and policy; the pool reconciler converges its workers.
        `updated_workers` were updated in place to the new spec (issue 18): they get its hash in this transaction."""
        now = time.time()
        with self.session() as session, session.begin():
            row = session.get(PoolRow, name)
            if row is None:
                row = PoolRow(name=name, created_at=now)
                session.add(row)
            row.user, row.spec, row.spec_hash, row.status = user, spec, spec_hash, "ACTIVE"
            row.workers, row.min_workers, row.max_workers = policy["workers"], policy["min_workers"], \
                policy["max_workers"]
            row.idle_timeout, row.jobs_per_worker = policy["idle_timeout"], policy["jobs_per_worker"]
            row.last_plan, row.updated_at, row.last_busy_at = plan, now, now
            # The files of earlier applies stay until the pool goes down (old workers may still use them).
            previous = row.storage or {}
            older = [*previous.get("older", []), *([previous["cleanup"]] if previous.get("cleanup") else [])]
            row.storage = {**(storage or {}), "older": older}
            if updated_workers:  # issue 18: workers the provider updated in place now match the new spec
                session.execute(update(WorkerRow).where(WorkerRow.pool == name, WorkerRow.id.in_(updated_workers))
                                .values(spec_hash=spec_hash))

    def pool(self, name: str) -> PoolRow | None:
        with self.session() as session:
            return session.get(PoolRow, name)

    def pools(self, *, include_terminated: bool = False) -> list[PoolRow]:
        with self.session() as session:
            query = select(PoolRow).order_by(PoolRow.name)
            if not include_terminated:
                query = query.where(PoolRow.status != "TERMINATED")
            return list(session.scalars(query))

    def update_pool(self, name: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        with self.session() as session, session.begin():
            session.execute(update(PoolRow).where(PoolRow.name == name).values(**fields))

    # --- workers ----------------------------------------------------------------------------------------

    def workers(self, pool: str | None = None, *, live_only: bool = True) -> list[WorkerRow]:
        with self.session() as session:
            query = select(WorkerRow).order_by(WorkerRow.pool, WorkerRow.number)
            if pool is not None:
                query = query.where(WorkerRow.pool == pool)
            if live_only:
                query = query.where(WorkerRow.status.in_(LIVE_WORKER))
            return list(session.scalars(query))

    def create_worker(self, pool: str, *, spec_hash: str, stack_prefix: str, infra: str, region: str | None,
                      use_spot: bool, price_per_hour: float, token_enc: str) -> WorkerRow:
        """A new worker row and its stack row, in one transaction (the janitor never sees one without the other)."""
        now = time.time()
        with self.session() as session, session.begin():
            number = (session.scalar(select(func.max(WorkerRow.number)).where(WorkerRow.pool == pool)) or 0) + 1
            stack = f"{stack_prefix}-pool-{pool}-w{number}"
            worker = WorkerRow(pool=pool, number=number, stack_name=stack, spec_hash=spec_hash, status="PROVISIONING",
                               infra=infra, region=region, use_spot=use_spot, price_per_hour=price_per_hour,
                               token_enc=token_enc, created_at=now)
            session.add(worker)
            session.add(StackRow(name=stack, kind="pool-worker", status="CREATING", created_at=now))
            session.flush()
            return worker

    def update_worker(self, worker_id: int, **fields: Any) -> None:
        with self.session() as session, session.begin():
            session.execute(update(WorkerRow).where(WorkerRow.id == worker_id).values(**fields))

    def live_worker_stacks(self) -> set[str]:
        with self.session() as session:
            return set(session.scalars(select(WorkerRow.stack_name).where(WorkerRow.status.in_(LIVE_WORKER))))

    # --- pool jobs ----------------------------------------------------------------------------------------

    def pool_jobs(self, pool: str, *, active_only: bool = True) -> list[JobRow]:
        with self.session() as session:
            query = select(JobRow).where(JobRow.pool == pool).order_by(JobRow.id)
            if active_only:
                query = query.where(JobRow.status.in_([s.value for s in ACTIVE]))
            return list(session.scalars(query))

    def assign_worker(self, job: JobRow, worker: WorkerRow, price_per_hour: float) -> AttemptRow:
        """Start a pool job on a READY worker: an attempt on the worker's stack, straight to RUNNING, in the
        lowest slot no other job of the worker holds."""
        now = time.time()
        with self.session() as session, session.begin():
            taken = set(session.scalars(select(AttemptRow.slot).join(JobRow, JobRow.id == AttemptRow.job_id).where(
                JobRow.worker_id == worker.id, AttemptRow.stack_name == worker.stack_name,
                AttemptRow.phase != Phase.DONE)))
            slot = next(i for i in range(len(taken) + 1) if i not in taken)
            number = session.scalar(select(func.count()).select_from(AttemptRow).where(
                AttemptRow.job_id == job.id, AttemptRow.task_index == job.current_task)) or 0
            attempt = AttemptRow(job_id=job.id, task_index=job.current_task, number=number + 1,
                                 stack_name=worker.stack_name, infra=worker.infra or "local", region=worker.region,
                                 num_nodes=len(worker.nodes or []), use_spot=worker.use_spot, phase=Phase.RUNNING,
                                 started_at=now, price_per_hour=price_per_hour, nodes=worker.nodes,
                                 token_enc=worker.token_enc, slot=slot)
            session.add(attempt)
            session.execute(update(JobRow).where(JobRow.id == job.id).values(
                status=JobStatus.RUNNING, worker_id=worker.id, updated_at=now,
                started_at=func.coalesce(JobRow.started_at, now)))
            session.execute(update(TaskRow).where(TaskRow.job_id == job.id, TaskRow.task_index == job.current_task)
                            .values(status=JobStatus.RUNNING, started_at=func.coalesce(TaskRow.started_at, now),
                                    run_started_at=now))
            session.execute(update(WorkerRow).where(WorkerRow.id == worker.id).values(idle_since=None))
            session.add(EventRow(job_id=job.id, task_index=job.current_task, at=now, who="controller",
                                 what="placed", why=f"pool {worker.pool} worker {worker.number} ({worker.stack_name})",
                                 data={"stack": worker.stack_name, "worker": worker.number, "attempt": number + 1}))
            session.flush()
            return attempt

    def cancel_pool_jobs(self, pool: str, who: str) -> list[int]:
        """Ask every job of the pool in progress to cancel; their ids."""
        ids = [j.id for j in self.pool_jobs(pool)]
        return [job_id for job_id in ids if self.request_cancel(job_id, who)]  # type: ignore[attr-defined]

    def jobs_on_workers(self, worker_ids: Sequence[int]) -> dict[int, list[int]]:
        """Active job ids per worker."""
        found: dict[int, list[int]] = {w: [] for w in worker_ids}
        if not worker_ids:
            return found
        with self.session() as session:
            rows = session.execute(select(JobRow.worker_id, JobRow.id).where(
                JobRow.worker_id.in_(list(worker_ids)), JobRow.status.in_([s.value for s in ACTIVE])))
            for worker_id, job_id in rows:
                found.setdefault(worker_id, []).append(job_id)
        return found
