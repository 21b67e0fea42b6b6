"""The only code that writes Sortie's tables. Short transactions; every status change is guarded
by the status it expects and leaves an event."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.orm import Session

from orchestrator.config import SortieConfig, load_config, sortie_home
from orchestrator.job_status import ACTIVE, JobStatus, Phase
from state.db import open_engine, session_factory
from state.models import AttemptRow, EventRow, JobRow, StackRow, TaskRow
from state.pool_store import PoolStore
from state.secrets_box import SecretsBox


class StateStore(PoolStore):
    """Durable state of one Sortie home (or one shared database)."""

    def __init__(self, home: Path | None = None, config: SortieConfig | None = None,
                 engine: Engine | None = None) -> None:
        self.home = home or sortie_home()
        self.config = config or load_config(self.home)
        self.engine = engine or open_engine(self.home, self.config)
        self._sessions = session_factory(self.engine)
        self._box: SecretsBox | None = None

    @property
    def box(self) -> SecretsBox:
        if self._box is None:
            self._box = SecretsBox(self.home)
        return self._box

    def session(self) -> Session:
        return self._sessions()

    # --- submitting and reading jobs -----------------------------------------------------------------

    def submit(self, pipeline: dict[str, Any], secrets: Sequence[dict[str, str]], *, user: str,
               name: str | None = None, count: int = 1, task_resources: Sequence[str] = (),
               per_job_envs: Sequence[dict[str, str]] | None = None, staging: bool = False,
               pool: str | None = None) -> list[int]:
        """Submit `count` jobs of one pipeline in one transaction. Returns their ids. `staging`: the caller
        uploads the job's files next, and the controller waits for `finish_staging`."""
        now = time.time()
        sealed = self.box.seal(list(secrets)) if any(secrets) else None
        tasks = pipeline["tasks"]
        ids: list[int] = []
        with self.session() as session, session.begin():
            for i in range(count):
                spec = pipeline
                if per_job_envs is not None:
                    spec = {**pipeline, "tasks": [{**t, "envs": {**t.get("envs", {}), **per_job_envs[i]}}
                                                  for t in tasks]}
                job = JobRow(name=name if name is not None else pipeline.get("name"), user=user,
                             status=JobStatus.PENDING, is_pipeline=bool(pipeline.get("is_pipeline")), spec=spec,
                             secrets_enc=sealed, submitted_at=now, updated_at=now,
                             staging_heartbeat=now if staging else None, pool=pool,
                             job_rank=i if pool else None, num_jobs=count if pool else None)
                session.add(job)
                session.flush()
                for index, task in enumerate(tasks):
                    session.add(TaskRow(job_id=job.id, task_index=index, name=task.get("name"),
                                        status=JobStatus.PENDING,
                                        resources=task_resources[index] if index < len(task_resources) else ""))
                session.add(EventRow(job_id=job.id, at=now, who=user or "user", what="submitted",
                                     why=f"{len(tasks)} task(s)"))
                ids.append(job.id)
        return ids

    def job(self, job_id: int) -> JobRow | None:
        with self.session() as session:
            return session.get(JobRow, job_id)

    def jobs_by_name(self, name: str) -> list[JobRow]:
        with self.session() as session:
            return list(session.scalars(select(JobRow).where(JobRow.name == name).order_by(JobRow.id.desc())))

    def list_jobs(self, *, statuses: Iterable[str] | None = None, active_only: bool = False,
                  user: str | None = None, limit: int | None = None) -> list[JobRow]:
        query = select(JobRow).order_by(JobRow.id.desc())
        if statuses:
            query = query.where(JobRow.status.in_(list(statuses)))
        if active_only:
            query = query.where(JobRow.status.in_([s.value for s in ACTIVE]))
        if user is not None:
            query = query.where(JobRow.user == user)
        if limit:
            query = query.limit(limit)
        with self.session() as session:
            return list(session.scalars(query))

    def page_jobs(self, *, statuses: Iterable[str] | None = None, user: str | None = None, name: str | None = None,
                  pool: str | None = None, search: str | None = None, offset: int = 0,
                  limit: int = 50) -> tuple[list[JobRow], int]:
        """One page of jobs (newest first) matching every filter given, and how many match in all. `search`:
        a job id, or a piece of a name or a user (case-insensitive)."""
        conditions: list[Any] = []
        if statuses:
            conditions.append(JobRow.status.in_(list(statuses)))
        if user:
            conditions.append(JobRow.user == user)
        if name:
            conditions.append(JobRow.name == name)
        if pool:
            conditions.append(JobRow.pool == pool)
        if search:
            pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            matches = [JobRow.name.ilike(pattern, escape="\\"), JobRow.user.ilike(pattern, escape="\\")]
            if search.strip().isdigit() and len(search.strip()) < 18:
                matches.append(JobRow.id == int(search.strip()))
            conditions.append(or_(*matches))
        with self.session() as session:
            total = session.scalar(select(func.count()).select_from(JobRow).where(*conditions)) or 0
            rows = list(session.scalars(select(JobRow).where(*conditions).order_by(JobRow.id.desc())
                                        .offset(max(offset, 0)).limit(max(limit, 0))))
        return rows, total

    def job_users(self) -> list[str]:
        with self.session() as session:
            return list(session.scalars(select(JobRow.user).distinct().order_by(JobRow.user)))

    def job_stacks(self, job_id: int) -> list[StackRow]:
        with self.session() as session:
            return list(session.scalars(select(StackRow).where(StackRow.job_id == job_id)
                                        .order_by(StackRow.created_at)))

    def stack(self, name: str) -> StackRow | None:
        with self.session() as session:
            return session.get(StackRow, name)

    def stacks_busy(self) -> int:
        """Stack operations under way: stacks being created or destroyed."""
        with self.session() as session:
            return session.scalar(select(func.count()).select_from(StackRow).where(
                StackRow.status.in_(["CREATING", "DESTROYING"]))) or 0

    def count_by_status(self) -> dict[str, int]:
        with self.session() as session:
            rows = session.execute(select(JobRow.status, func.count()).group_by(JobRow.status))
            return {status: n for status, n in rows}

    def tasks(self, job_ids: Sequence[int]) -> dict[int, list[TaskRow]]:
        found: dict[int, list[TaskRow]] = {job_id: [] for job_id in job_ids}
        if not job_ids:
            return found
        with self.session() as session:
            query = select(TaskRow).where(TaskRow.job_id.in_(list(job_ids))).order_by(TaskRow.task_index)
            for row in session.scalars(query):
                found[row.job_id].append(row)
        return found

    def secrets(self, job: JobRow) -> list[dict[str, str]]:
        return self.box.open(job.secrets_enc) or [{} for _ in job.spec["tasks"]]

    def events(self, job_id: int) -> list[EventRow]:
        with self.session() as session:
            return list(session.scalars(select(EventRow).where(EventRow.job_id == job_id).order_by(EventRow.id)))

    def attempts(self, job_id: int) -> list[AttemptRow]:
        with self.session() as session:
            return list(session.scalars(select(AttemptRow).where(AttemptRow.job_id == job_id)
                                        .order_by(AttemptRow.id)))

    def request_cancel(self, job_id: int, who: str) -> bool:
        """Ask for a cancel; False if the job had already ended (or does not exist). One conditional
        UPDATE decides, so concurrent requests log one event."""
        now = time.time()
        active = [s.value for s in ACTIVE]
        with self.session() as session, session.begin():
            first = session.execute(update(JobRow).where(
                JobRow.id == job_id, JobRow.status.in_(active), JobRow.cancel_requested.is_(False),
            ).values(cancel_requested=True, updated_at=now)).rowcount == 1
            if first:
                session.add(EventRow(job_id=job_id, at=now, who=who, what="cancel-requested"))
                return True
            status = session.scalar(select(JobRow.status).where(JobRow.id == job_id))
            return status is not None and status in active

    # --- the controller's writes -------------------------------------------------------------------------

    def finish_staging(self, job_id: int, storage: dict[str, Any]) -> bool:
        """The uploads of `jobs launch` are done: record what goes on the nodes; False if the job ended
        meanwhile (cancelled, or failed for a stale upload), when the caller must undo its uploads."""
        now = time.time()
        with self.session() as session, session.begin():
            done = session.execute(update(JobRow).where(
                JobRow.id == job_id, JobRow.status.in_([s.value for s in ACTIVE]),
                JobRow.staging_heartbeat.is_not(None),
            ).values(storage=storage, staging_heartbeat=None, updated_at=now)).rowcount == 1
            if done:
                session.add(EventRow(job_id=job_id, at=now, who="user", what="staged",
                                     why="workdir, file mounts and buckets are ready"))
            return done

    def fail_staging(self, job_id: int, why: str) -> None:
        """`jobs launch` could not stage the job's files: FAILED_PRECHECKS, its storage left to be cleaned."""
        now = time.time()
        with self.session() as session, session.begin():
            session.execute(update(JobRow).where(JobRow.id == job_id).values(
                status=JobStatus.FAILED_PRECHECKS, final_status=JobStatus.FAILED_PRECHECKS, failure_reason=why,
                ended_at=now, updated_at=now, staging_heartbeat=None))
            session.execute(update(TaskRow).where(TaskRow.job_id == job_id).values(
                status=JobStatus.FAILED_PRECHECKS, ended_at=now))
            session.add(EventRow(job_id=job_id, at=now, who="user", what="finished",
                                 why=f"FAILED_PRECHECKS: {why}"))

    def storage_to_clean(self, stale_after: float, limit: int = 100) -> list[JobRow]:
        """Ended jobs whose buckets, job prefixes and upload dirs are not yet removed, once no `jobs launch`
        is still uploading for them (its heartbeat is gone, or older than `stale_after` seconds)."""
        staging_over = or_(JobRow.staging_heartbeat.is_(None), JobRow.staging_heartbeat < time.time() - stale_after)
        with self.session() as session:
            query = (select(JobRow).where(JobRow.status.not_in([s.value for s in ACTIVE]),
                                          JobRow.storage.is_not(None), JobRow.storage_cleaned_at.is_(None),
                                          staging_over)
                     .order_by(JobRow.id).limit(limit))
            return list(session.scalars(query))

    def active_jobs(self) -> list[JobRow]:
        with self.session() as session:
            query = select(JobRow).where(JobRow.status.in_([s.value for s in ACTIVE])).order_by(JobRow.id)
            return list(session.scalars(query))

    def open_attempts(self, job_ids: Sequence[int]) -> dict[int, AttemptRow]:
        """The attempt in progress (phase not DONE) of each job, if any."""
        if not job_ids:
            return {}
        with self.session() as session:
            query = select(AttemptRow).where(AttemptRow.job_id.in_(list(job_ids)), AttemptRow.phase != Phase.DONE)
            return {row.job_id: row for row in session.scalars(query)}

    def open_stack_names(self) -> set[str]:
        """Stacks of every attempt in progress, read now (not from an earlier snapshot)."""
        with self.session() as session:
            attempts = set(session.scalars(select(AttemptRow.stack_name).where(AttemptRow.phase != Phase.DONE)))
            controllers = set(session.scalars(select(StackRow.name).where(  # a cloud controller's own stack
                StackRow.kind == "controller", StackRow.status != "DESTROYED")))
        return attempts | controllers | self.live_worker_stacks()

    def count_attempts(self, job_id: int, task_index: int) -> int:
        with self.session() as session:
            return session.scalar(select(func.count()).select_from(AttemptRow).where(
                AttemptRow.job_id == job_id, AttemptRow.task_index == task_index)) or 0

    def create_attempt(self, job: JobRow, *, stack_name: str, infra: str, region: str | None, num_nodes: int,
                       use_spot: bool, instance_type: str | None = None, status: JobStatus = JobStatus.STARTING,
                       price_per_hour: float = 0.0, why: str = "") -> AttemptRow:
        now = time.time()
        with self.session() as session, session.begin():
            number = session.scalar(select(func.count()).select_from(AttemptRow).where(
                AttemptRow.job_id == job.id, AttemptRow.task_index == job.current_task)) or 0
            attempt = AttemptRow(job_id=job.id, task_index=job.current_task, number=number + 1,
                                 stack_name=stack_name, infra=infra, region=region, num_nodes=num_nodes,
                                 use_spot=use_spot, instance_type=instance_type, phase=Phase.PROVISIONING,
                                 started_at=now, price_per_hour=price_per_hour)
            session.add(attempt)
            session.add(StackRow(name=stack_name, job_id=job.id, kind="cluster", status="CREATING", created_at=now))
            session.execute(update(JobRow).where(JobRow.id == job.id).values(
                status=status, updated_at=now, started_at=func.coalesce(JobRow.started_at, now)))
            session.execute(update(TaskRow).where(TaskRow.job_id == job.id, TaskRow.task_index == job.current_task)
                            .values(status=status, started_at=func.coalesce(TaskRow.started_at, now)))
            session.flush()
            session.execute(update(StackRow).where(StackRow.name == stack_name).values(attempt_id=attempt.id))
            session.add(EventRow(job_id=job.id, task_index=job.current_task, at=now, who="controller",
                                 what="placed", why=why or f"{infra}/{region}",
                                 data={"stack": stack_name, "infra": infra, "region": region,
                                       "attempt": number + 1, "use_spot": use_spot}))
        return attempt

    @staticmethod
    def attempt_cost(attempt: AttemptRow, now: float | None = None) -> float:
        """Price x nodes x hours of one attempt (to now while it runs)."""
        end = attempt.ended_at or now or time.time()
        return (attempt.price_per_hour or 0.0) * attempt.num_nodes * max(end - attempt.started_at, 0.0) / 3600

    def costs(self, job_ids: Sequence[int]) -> dict[int, float]:
        """Cost so far per job: the sum over its attempts of price x nodes x hours (to now if running)."""
        found = dict.fromkeys(job_ids, 0.0)
        if not job_ids:
            return found
        now = time.time()
        with self.session() as session:
            rows = session.execute(select(AttemptRow.job_id, AttemptRow.price_per_hour, AttemptRow.num_nodes,
                                          AttemptRow.started_at, AttemptRow.ended_at)
                                   .where(AttemptRow.job_id.in_(list(job_ids))))
            for job_id, price, nodes, started, ended in rows:
                found[job_id] += (price or 0.0) * nodes * max((ended or now) - started, 0.0) / 3600
        return found

    def update_attempt(self, attempt_id: int, **fields: Any) -> None:
        with self.session() as session, session.begin():
            session.execute(update(AttemptRow).where(AttemptRow.id == attempt_id).values(**fields))

    def update_job(self, job_id: int, *, expect: Iterable[str] | None = None, **fields: Any) -> bool:
        """Guarded write: applies only while the job's status is one of `expect` (when given)."""
        fields["updated_at"] = time.time()
        with self.session() as session, session.begin():
            query = update(JobRow).where(JobRow.id == job_id)
            if expect is not None:
                query = query.where(JobRow.status.in_(list(expect)))
            return session.execute(query.values(**fields)).rowcount == 1

    def update_task(self, job_id: int, task_index: int, **fields: Any) -> None:
        with self.session() as session, session.begin():
            session.execute(update(TaskRow).where(TaskRow.job_id == job_id, TaskRow.task_index == task_index)
                            .values(**fields))

    def record_stack(self, name: str, kind: str) -> None:
        """A stack that belongs to no job or worker (the cloud controller's), written before it is created."""
        with self.session() as session, session.begin():
            row = session.get(StackRow, name)
            if row is None:
                session.add(StackRow(name=name, kind=kind, status="CREATING", created_at=time.time()))
            else:
                row.status, row.destroyed_at = "CREATING", None

    def set_stack(self, name: str, status: str, error: str | None = None,
                  outputs: dict[str, Any] | None = None) -> None:
        values: dict[str, Any] = {"status": status, "last_error": error}
        if outputs is not None:
            values["outputs"] = outputs
        if status == "DESTROYED":
            values["destroyed_at"] = time.time()
        with self.session() as session, session.begin():
            session.execute(update(StackRow).where(StackRow.name == name).values(**values))

    def live_stacks(self) -> list[StackRow]:
        with self.session() as session:
            return list(session.scalars(select(StackRow).where(StackRow.status != "DESTROYED")))

    def add_event(self, job_id: int, what: str, why: str | None = None, *, who: str = "controller",
                  task_index: int | None = None, data: dict[str, Any] | None = None) -> None:
        with self.session() as session, session.begin():
            session.add(EventRow(job_id=job_id, task_index=task_index, at=time.time(), who=who, what=what, why=why,
                                 data=data))
