"""Sortie's durable state: `StateStore` reads the tables, and writes them only through the named transitions it
holds (`state.transitions` for jobs, tasks, attempts and stacks; `state.pool_transitions` for pools and workers),
each one guarded transaction with its event; every status write is `state.apply`'s. The store forwards each
transition as a method of its own (`store.place_attempt(...)` is `store.job_transitions.place_attempt(...)`).
Statuses and their legal moves: `state.machine`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import ColumnElement, Engine, event, func, or_, select, update
from sqlalchemy.orm import Session

from orchestrator.config import SortieConfig, load_config, sortie_home
from state.apply import create, guard_leases
from state.db import open_engine, session_factory
from state.leases import OWNER_KEY, owner_of
from state.machine import ACTIVE, OPEN_PHASES, JobStatus, StackKind, StackStatus
from state.models import AttemptRow, EventRow, JobRow, StackRow, TaskRow
from state.pool_transitions import PoolTransitions
from state.secrets_box import SecretsBox
from state.transitions import TRANSITION_MARK, JobTransitions, attempt_cost
from state.user_transitions import UserTransitions

_P = ParamSpec("_P")
_R = TypeVar("_R")
_T = TypeVar("_T")


def _via(part: str, method: Callable[Concatenate[_T, _P], _R]) -> Callable[Concatenate[StateStore, _P], _R]:
    """`StateStore.<name>`: the transition `method` of the store's `part` (`job_transitions`, `pool_transitions` or
    `user_transitions`)."""
    def forward(self: StateStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return method(getattr(self, part), *args, **kwargs)

    forward.__name__, forward.__qualname__, forward.__doc__ = method.__name__, method.__qualname__, method.__doc__
    return forward


class StateStore:
    """Durable state of one Sortie home (or one shared database)."""

    def __init__(self, home: Path | None = None, config: SortieConfig | None = None,
                 engine: Engine | None = None) -> None:
        self.home = home or sortie_home()
        self.config = config or load_config(self.home)
        self.engine = engine or open_engine(self.home, self.config)
        self._sessions = session_factory(self.engine)
        self._box: SecretsBox | None = None
        # The controller replica whose leases guard this store's transitions (`state.leases`); None for the CLI,
        # the services and the tests, whose writes are not a replica's.
        self.lease_owner: str | None = None
        # Transitions (writes with an event) committed through this store: the controller's ticker makes another
        # pass at once after a pass that moved something, so the next step does not wait for the next interval.
        self.transitions_committed = 0
        event.listen(self._sessions, "after_commit", self._count_transition)
        self.job_transitions = JobTransitions(self.session)
        self.pool_transitions = PoolTransitions(self.session, self.job_transitions)
        self.user_transitions = UserTransitions(self.session)

    # The transitions, forwarded (the store is what the services and the controller hold).
    J, P, U = JobTransitions, PoolTransitions, UserTransitions
    place_attempt = _via("job_transitions", J.place_attempt)
    wait_for_capacity = _via("job_transitions", J.wait_for_capacity)
    set_waiting = _via("job_transitions", J.set_waiting)
    report_node_condition = _via("job_transitions", J.report_node_condition)
    mark_cancelling = _via("job_transitions", J.mark_cancelling)
    attempt_provisioned = _via("job_transitions", J.attempt_provisioned)
    attempt_running = _via("job_transitions", J.attempt_running)
    begin_teardown = _via("job_transitions", J.begin_teardown)
    end_attempt = _via("job_transitions", J.end_attempt)
    finish_job = _via("job_transitions", J.finish_job)
    end_task = _via("job_transitions", J.end_task)
    controller_error = _via("job_transitions", J.controller_error)
    request_cancel = _via("job_transitions", J.request_cancel)
    finish_staging = _via("job_transitions", J.finish_staging)
    fail_staging = _via("job_transitions", J.fail_staging)
    storage_cleaned = _via("job_transitions", J.storage_cleaned)
    stack_destroyed = _via("job_transitions", J.stack_destroyed)
    stack_failed = _via("job_transitions", J.stack_failed)
    record_stack = _via("job_transitions", J.record_stack)
    stack_up = _via("job_transitions", J.stack_up)
    apply_pool = _via("pool_transitions", P.apply_pool)
    pool_down = _via("pool_transitions", P.pool_down)
    pool_terminated = _via("pool_transitions", P.pool_terminated)
    pool_busy = _via("pool_transitions", P.pool_busy)
    pool = _via("pool_transitions", P.pool)
    pools = _via("pool_transitions", P.pools)
    pool_events = _via("pool_transitions", P.pool_events)
    workers = _via("pool_transitions", P.workers)
    create_worker = _via("pool_transitions", P.create_worker)
    worker_provisioned = _via("pool_transitions", P.worker_provisioned)
    worker_ready = _via("pool_transitions", P.worker_ready)
    drain_worker = _via("pool_transitions", P.drain_worker)
    fail_worker = _via("pool_transitions", P.fail_worker)
    terminate_worker = _via("pool_transitions", P.terminate_worker)
    worker_terminated = _via("pool_transitions", P.worker_terminated)
    record_worker_health = _via("pool_transitions", P.record_worker_health)
    live_worker_stacks = _via("pool_transitions", P.live_worker_stacks)
    pool_jobs = _via("pool_transitions", P.pool_jobs)
    assign_worker = _via("pool_transitions", P.assign_worker)
    cancel_pool_jobs = _via("pool_transitions", P.cancel_pool_jobs)
    jobs_on_workers = _via("pool_transitions", P.jobs_on_workers)
    add_api_user = _via("user_transitions", U.add_api_user)
    remove_api_user = _via("user_transitions", U.remove_api_user)
    set_api_role = _via("user_transitions", U.set_api_role)
    rotate_api_token = _via("user_transitions", U.rotate_api_token)
    record_audit = _via("user_transitions", U.record_audit)
    api_user = _via("user_transitions", U.api_user)
    api_users = _via("user_transitions", U.api_users)
    token_owner = _via("user_transitions", U.token_owner)
    audit_events = _via("user_transitions", U.audit_events)
    del J, P, U

    def _count_transition(self, session: Session) -> None:
        if session.info.pop(TRANSITION_MARK, False):
            self.transitions_committed += 1

    @property
    def box(self) -> SecretsBox:
        if self._box is None:
            self._box = SecretsBox(self.home)
        return self._box

    def session(self) -> Session:
        session = self._sessions()
        if self.lease_owner is not None:
            session.info[OWNER_KEY] = self.lease_owner
        return session

    # --- submitting and reading jobs -----------------------------------------------------------------

    def submit(self, pipeline: dict[str, Any], secrets: Sequence[dict[str, str]], *, user: str,
               name: str | None = None, count: int = 1, task_resources: Sequence[str] = (),
               per_job_envs: Sequence[dict[str, str]] | None = None, staging: bool = False,
               pool: str | None = None, ranked: bool = False, workspace: str | None = None) -> list[int]:
        """Submit `count` jobs of one pipeline in one transaction. Returns their ids. `staging`: the caller
        uploads the job's files next, and the controller waits for `finish_staging`. Pool jobs, and with `ranked`
        the others, get their rank 0..count-1 (`SKYPILOT_JOB_RANK`) and `count` (`SKYPILOT_NUM_JOBS`)."""
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
                             job_rank=i if pool or ranked else None,
                             num_jobs=count if pool or ranked else None, workspace=workspace)
                create(session, "submit", job)
                session.flush()
                for index, task in enumerate(tasks):
                    create(session, "submit", TaskRow(
                        job_id=job.id, task_index=index, name=task.get("name"), status=JobStatus.PENDING,
                        resources=task_resources[index] if index < len(task_resources) else ""))
                # a new job: no replica holds it yet, so there is no lease to check
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
                  user: str | None = None, limit: int | None = None,
                  workspaces: Iterable[str] | None = None) -> list[JobRow]:
        """`workspaces`: only jobs of these (None: every job, as in local mode)."""
        query = select(JobRow).order_by(JobRow.id.desc())
        if workspaces is not None:
            query = query.where(JobRow.workspace.in_(list(workspaces)))
        if statuses:
            query = query.where(JobRow.status.in_(list(statuses)))
        if active_only:
            query = query.where(JobRow.status.in_(sorted(ACTIVE)))
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
            matches: list[ColumnElement[bool]] = [JobRow.name.ilike(pattern, escape="\\"),
                                                  JobRow.user.ilike(pattern, escape="\\")]
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
                StackRow.status.in_([StackStatus.CREATING, StackStatus.DESTROYING]))) or 0

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

    # --- the controller's writes -------------------------------------------------------------------------

    def storage_to_clean(self, stale_after: float, limit: int = 100) -> list[JobRow]:
        """Ended jobs whose buckets, job prefixes and upload dirs are not yet removed, once no `jobs launch`
        is still uploading for them (its heartbeat is gone, or older than `stale_after` seconds)."""
        staging_over = or_(JobRow.staging_heartbeat.is_(None), JobRow.staging_heartbeat < time.time() - stale_after)
        with self.session() as session:
            query = (select(JobRow).where(JobRow.status.not_in(sorted(ACTIVE)),
                                          JobRow.storage.is_not(None), JobRow.storage_cleaned_at.is_(None),
                                          staging_over)
                     .order_by(JobRow.id).limit(limit))
            return list(session.scalars(query))

    def active_jobs(self, *, held_by: str | None = None) -> list[JobRow]:
        """Jobs in progress; `held_by`: only those whose lease that replica holds."""
        with self.session() as session:
            query = select(JobRow).where(JobRow.status.in_(sorted(ACTIVE))).order_by(JobRow.id)
            if held_by is not None:
                query = query.where(JobRow.lock_owner == held_by)
            return list(session.scalars(query))

    def work_in_progress(self) -> int:
        """Jobs in progress and pools not terminated, whoever drives them (a replica's autostop looks at all)."""
        from state.machine import PoolStatus
        from state.models import PoolRow

        with self.session() as session:
            jobs = session.scalar(select(func.count()).select_from(JobRow).where(JobRow.status.in_(sorted(ACTIVE))))
            pools = session.scalar(select(func.count()).select_from(PoolRow).where(
                PoolRow.status != PoolStatus.TERMINATED))
        return int(jobs or 0) + int(pools or 0)

    def open_attempts(self, job_ids: Sequence[int]) -> dict[int, AttemptRow]:
        """The attempt in progress (phase not DONE) of each job, if any."""
        if not job_ids:
            return {}
        with self.session() as session:
            query = select(AttemptRow).where(AttemptRow.job_id.in_(list(job_ids)),
                                             AttemptRow.phase.in_(list(OPEN_PHASES)))
            return {row.job_id: row for row in session.scalars(query)}

    def open_attempts_of(self, job_ids: Sequence[int]) -> dict[int, list[AttemptRow]]:
        """Every attempt in progress of each job, by task (a job group has one per running task)."""
        if not job_ids:
            return {}
        found: dict[int, list[AttemptRow]] = {}
        with self.session() as session:
            query = select(AttemptRow).where(AttemptRow.job_id.in_(list(job_ids)),
                                             AttemptRow.phase.in_(list(OPEN_PHASES))).order_by(AttemptRow.task_index)
            for row in session.scalars(query):
                found.setdefault(row.job_id, []).append(row)
        return found

    def open_stack_names(self) -> set[str]:
        """Stacks of every attempt in progress, read now (not from an earlier snapshot)."""
        with self.session() as session:
            attempts = set(session.scalars(select(AttemptRow.stack_name).where(
                AttemptRow.phase.in_(list(OPEN_PHASES)))))
            controllers = set(session.scalars(select(StackRow.name).where(  # a cloud controller's own stack
                StackRow.kind == StackKind.CONTROLLER, StackRow.status != StackStatus.DESTROYED)))
        return attempts | controllers | self.live_worker_stacks()

    attempt_cost = staticmethod(attempt_cost)

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

    def record_missed_polls(self, attempt_id: int, missed: int) -> None:
        """How many polls in a row a node of the attempt missed (not a status: the loss is decided elsewhere)."""
        with self.session() as session, session.begin():
            job_id = session.scalar(select(AttemptRow.job_id).where(AttemptRow.id == attempt_id))
            if job_id is not None:
                guard_leases(session, job_lease=job_id)
            session.execute(update(AttemptRow).where(AttemptRow.id == attempt_id).values(missed_polls=missed))

    def staging_heartbeat(self, job_id: int) -> None:
        """`jobs launch` is still uploading the job's files."""
        with self.session() as session, session.begin():
            session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.staging_heartbeat.is_not(None)).values(
                staging_heartbeat=time.time()))

    def record_storage(self, job_id: int, storage: dict[str, Any]) -> None:
        """What `jobs launch` has uploaded so far (so the cleaner can remove it, whatever happens next)."""
        with self.session() as session, session.begin():
            session.execute(update(JobRow).where(JobRow.id == job_id).values(storage=storage))

    def live_stacks(self) -> list[StackRow]:
        with self.session() as session:
            return list(session.scalars(select(StackRow).where(StackRow.status != StackStatus.DESTROYED)))

    def add_event(self, job_id: int, what: str, why: str | None = None, *, who: str = "controller",
                  task_index: int | None = None, data: dict[str, Any] | None = None) -> None:
        """An event that changes no state (an observation: a slow agent, a node out of disk)."""
        with self.session() as session, session.begin():
            guard_leases(session, job_lease=job_id)  # a replica's observation of a job it drives
            session.add(EventRow(job_id=job_id, task_index=task_index, at=time.time(), who=who, what=what, why=why,
                                 data=data, replica=owner_of(session)))
