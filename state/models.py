"""Tables of Sortie's durable state (SQLAlchemy 2). Times are UTC epoch seconds (floats), portable
across SQLite and PostgreSQL and cheap to subtract for durations.

Only the named transitions (`state.transitions`, `state.pool_transitions`) write these tables; the
statuses and their legal moves are `state.machine`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    """One managed job (a single task or a pipeline)."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String(255))
    user: Mapped[str] = mapped_column(String(255), default="")
    status: Mapped[str] = mapped_column(String(32), index=True)
    # The terminal status a job reaches once its stack is destroyed (set while it tears down).
    final_status: Mapped[str | None] = mapped_column(String(32))
    is_pipeline: Mapped[bool] = mapped_column(Boolean, default=False)
    # The normalized pipeline (secret values redacted); secrets live encrypted in `secrets_enc`.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    secrets_enc: Mapped[str | None] = mapped_column(Text)
    current_task: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # `jobs cancel --graceful`: the runs get SIGTERM and MOUNT_CACHED writes are uploaded before the teardown,
    # waited for until `graceful_deadline` (None: no limit). Applies to the whole job or to its cancelled tasks.
    graceful_cancel: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    graceful_deadline: Mapped[float | None] = mapped_column(Float)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    controller_failures: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float | None] = mapped_column(Float)
    waiting_reason: Mapped[str | None] = mapped_column(Text)
    # Recovery: capacity rounds waited out, when the current wait began, when this round began (a "no
    # capacity" answer counts for the round it came in), and where the next placement should (not) go.
    backoff_rounds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    waiting_since: Mapped[float | None] = mapped_column(Float)
    round_started_at: Mapped[float | None] = mapped_column(Float)
    placement_hint: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Storage (orchestrator.storage.staging): per task what goes on the nodes, and what to clean at the end.
    # `staging_heartbeat` is set while `jobs launch` uploads; the controller waits for it, and fails the job
    # if it goes stale (the CLI was killed). `storage_cleaned_at`: when buckets/prefixes/dirs were removed.
    storage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    staging_heartbeat: Mapped[float | None] = mapped_column(Float)
    storage_cleaned_at: Mapped[float | None] = mapped_column(Float)
    # Pool jobs: the pool, the worker running it now, and SKYPILOT_JOB_RANK / SKYPILOT_NUM_JOBS.
    pool: Mapped[str | None] = mapped_column(String(63), index=True)
    worker_id: Mapped[int | None] = mapped_column(Integer)
    job_rank: Mapped[int | None] = mapped_column(Integer)
    num_jobs: Mapped[int | None] = mapped_column(Integer)
    submitted_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # The lease of the controller replica that drives the job (`state.leases`): its id, and until when.
    lock_owner: Mapped[str | None] = mapped_column(String(255), index=True)
    lock_expires_at: Mapped[float | None] = mapped_column(Float)
    # Issue 23: the workspace the job belongs to (None: launched in local mode, no API server).
    workspace: Mapped[str | None] = mapped_column(String(64), index=True)


class TaskRow(Base):
    """One task of a job (a single-task job has one)."""

    __tablename__ = "tasks"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    task_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32))
    resources: Mapped[str] = mapped_column(String(255), default="")
    started_at: Mapped[float | None] = mapped_column(Float)
    run_started_at: Mapped[float | None] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    recoveries: Mapped[int] = mapped_column(Integer, default=0)
    restarts_on_errors: Mapped[int] = mapped_column(Integer, default=0)
    exit_codes: Mapped[list[int] | None] = mapped_column(JSON)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    # `jobs cancel --task`: this task of a job group is to end CANCELLED (the group goes on).
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class AttemptRow(Base):
    """One cluster attempt of a task: where it ran and how it ended."""

    __tablename__ = "attempts"
    # Two writers can never place the same attempt of a task (the loser's transaction fails).
    __table_args__ = (UniqueConstraint("job_id", "task_index", "number", name="uq_attempts_job_task_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    task_index: Mapped[int] = mapped_column(Integer)
    number: Mapped[int] = mapped_column(Integer)
    # A job's own cluster stack, or (pool jobs) its worker's stack, which many attempts share.
    stack_name: Mapped[str] = mapped_column(String(255), index=True)
    infra: Mapped[str] = mapped_column(String(64))
    region: Mapped[str | None] = mapped_column(String(64))
    instance_type: Mapped[str | None] = mapped_column(String(64))
    use_spot: Mapped[bool] = mapped_column(Boolean, default=False)
    num_nodes: Mapped[int] = mapped_column(Integer, default=1)
    # state.machine.Phase: PROVISIONING -> SYNCING -> SETTING_UP -> RUNNING -> TEARDOWN -> DONE
    phase: Mapped[str] = mapped_column(String(32), index=True)
    # state.machine.AfterTeardown: what follows the teardown (finish, next task, relaunch).
    after_teardown: Mapped[str | None] = mapped_column(String(16))
    nodes: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    token_enc: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str | None] = mapped_column(String(32))  # state.machine.Outcome
    exit_codes: Mapped[list[int] | None] = mapped_column(JSON)
    price_per_hour: Mapped[float | None] = mapped_column(Float)
    missed_polls: Mapped[int] = mapped_column(Integer, default=0)
    # Pool jobs: which of the worker's `jobs_per_worker` slots (its share of the accelerators).
    slot: Mapped[int | None] = mapped_column(Integer)


class PoolRow(Base):
    """A pool of reusable workers (`sortie jobs pool apply`), each worker its own stack."""

    __tablename__ = "pools"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    user: Mapped[str] = mapped_column(String(255), default="", server_default="")
    workspace: Mapped[str | None] = mapped_column(String(64))  # issue 23 (None: local mode)
    # The pool YAML's task (normalized; secret values redacted) and the hash of what defines a worker.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64))
    workers: Mapped[int] = mapped_column(Integer)
    min_workers: Mapped[int | None] = mapped_column(Integer)
    max_workers: Mapped[int | None] = mapped_column(Integer)
    idle_timeout: Mapped[float | None] = mapped_column(Float)
    jobs_per_worker: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # ACTIVE -> DOWN (workers being destroyed) -> TERMINATED
    status: Mapped[str] = mapped_column(String(32), index=True)
    storage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    last_plan: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    last_busy_at: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class WorkerRow(Base):
    """One pool worker: a stack of one node (a cluster of `num_nodes`), set up once, reused by jobs."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pool: Mapped[str] = mapped_column(ForeignKey("pools.name"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    stack_name: Mapped[str] = mapped_column(String(255), unique=True)
    spec_hash: Mapped[str] = mapped_column(String(64))
    # PROVISIONING -> SETTING_UP -> READY (BUSY while it has jobs) -> DRAINING -> TERMINATING -> TERMINATED;
    # FAILED (setup failed, or the node was lost) -> TERMINATING
    status: Mapped[str] = mapped_column(String(32), index=True)
    infra: Mapped[str | None] = mapped_column(String(64))
    region: Mapped[str | None] = mapped_column(String(64))
    use_spot: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    price_per_hour: Mapped[float | None] = mapped_column(Float)
    nodes: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    token_enc: Mapped[str | None] = mapped_column(Text)
    missed_polls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    ready_at: Mapped[float | None] = mapped_column(Float)
    idle_since: Mapped[float | None] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)


class StackRow(Base):
    """Every stack Sortie made, so none can be forgotten."""

    __tablename__ = "stacks"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    attempt_id: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32), default="cluster")
    # CREATING -> UP -> DESTROYING -> DESTROYED (or FAILED while an operation errs)
    status: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    destroyed_at: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    # Public outputs (never secrets) of a stack that belongs to no job: the cloud controller's address.
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class EventRow(Base):
    """Append-only history of a job: who did what, when and why."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    task_index: Mapped[int | None] = mapped_column(Integer)
    at: Mapped[float] = mapped_column(Float)
    who: Mapped[str] = mapped_column(String(64))
    what: Mapped[str] = mapped_column(String(64))
    why: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    replica: Mapped[str | None] = mapped_column(String(128))  # the controller replica that wrote it


class PoolEventRow(Base):
    """Append-only history of a pool and its workers, written by the same transactions as their statuses."""

    __tablename__ = "pool_events"
    __table_args__ = (Index("ix_pool_events_pool_id", "pool", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pool: Mapped[str] = mapped_column(String(63))
    worker: Mapped[int | None] = mapped_column(Integer)  # the worker's number in its pool
    at: Mapped[float] = mapped_column(Float)
    who: Mapped[str] = mapped_column(String(64))
    what: Mapped[str] = mapped_column(String(64))
    why: Mapped[str | None] = mapped_column(Text)
    replica: Mapped[str | None] = mapped_column(String(128))


class BucketRefRow(Base):
    """A live job mounts a bucket Sortie makes by name; a `persistent: false` one is deleted when none is left."""

    __tablename__ = "bucket_refs"

    bucket: Mapped[str] = mapped_column(String(1024), primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    delete_when_unused: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())
    created_at: Mapped[float] = mapped_column(Float, nullable=False)


class ReplicaRow(Base):
    """A controller replica: who it is, where it runs, and when it last renewed its leases (`state.leases`)."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    home: Mapped[str] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    lease_seconds: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[float | None] = mapped_column(Float)


class LeaseRow(Base):
    """A lease on work that is not a job: a pool (`pool:<name>`), a janitor (`janitor:stacks`)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(128))
    expires_at: Mapped[float | None] = mapped_column(Float)
    acquired_at: Mapped[float | None] = mapped_column(Float)


class ApiUserRow(Base):
    """A user of the API server (issue 23): a person or a service account, with a role and workspaces."""

    __tablename__ = "api_users"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))  # admin | user
    workspaces: Mapped[list[str]] = mapped_column(JSON)
    service_account: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class ApiTokenRow(Base):
    """A token of an API user, stored only as its SHA-256 hash; revoked or expired, it opens nothing."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class AuditRow(Base):
    """Every change made through the API server (or `sortie users` on its home): who, which request, what."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    user: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255))
    workspace: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
