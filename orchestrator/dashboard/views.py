"""What the dashboard shows, as typed models (the JSON API's schema) built from the service layer's rows.
Only fields chosen here leave the process: no spec, no sealed secrets, no node tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from orchestrator.job_status import JobStatus

if TYPE_CHECKING:
    from orchestrator.pool_service import PoolStatus
    from orchestrator.service import ControllerStatus, JobDetail, JobPage, JobSummary
    from state.models import AttemptRow, EventRow, StackRow, TaskRow


class TaskOut(BaseModel):
    index: int
    name: str | None
    status: str
    resources: str
    started_at: float | None
    run_started_at: float | None
    ended_at: float | None
    recoveries: int
    exit_codes: list[int] | None
    failure_reason: str | None


class JobOut(BaseModel):
    id: int
    name: str | None
    user: str
    status: str
    pool: str | None
    is_pipeline: bool
    resources: str
    submitted_at: float
    started_at: float | None
    run_started_at: float | None
    ended_at: float | None
    recoveries: int
    cost: float
    details: str
    cancel_requested: bool
    cancellable: bool
    tasks: list[TaskOut]


class JobsPageOut(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[JobOut]


class AttemptOut(BaseModel):
    task: int
    number: int
    stack: str
    infra: str
    region: str | None
    instance_type: str | None
    use_spot: bool
    num_nodes: int
    phase: str
    started_at: float
    ended_at: float | None
    outcome: str | None
    exit_codes: list[int] | None
    price_per_hour: float | None
    cost: float


class EventOut(BaseModel):
    at: float
    task: int | None
    who: str
    what: str
    why: str | None
    data: dict[str, Any] | None


class StackOut(BaseModel):
    name: str
    kind: str
    status: str
    job_id: int | None
    created_at: float
    destroyed_at: float | None
    last_error: str | None


class JobDetailOut(BaseModel):
    job: JobOut
    waiting: str | None
    attempts: list[AttemptOut]
    events: list[EventOut]
    stacks: list[StackOut]


class WorkerOut(BaseModel):
    number: int
    stack: str
    infra: str | None
    region: str | None
    use_spot: bool
    status: str
    jobs: list[int]
    created_at: float
    ready_at: float | None
    failure_reason: str | None


class PoolJobOut(BaseModel):
    id: int
    name: str | None
    rank: int | None
    status: str


class PoolOut(BaseModel):
    name: str
    status: str
    user: str
    policy: str
    workers_wanted: int
    min_workers: int | None
    max_workers: int | None
    idle_timeout: float | None
    jobs_per_worker: int
    ready: int
    total: int
    spec: dict[str, Any]
    updated_at: float
    workers: list[WorkerOut]
    jobs: list[PoolJobOut]
    last_plan: dict[str, Any] | None


class StatusOut(BaseModel):
    version: str
    controller_running: bool
    controller_pid: int | None
    controller_version: str | None
    uptime: float | None
    jobs_in_progress: dict[str, int]
    stack_operations: int
    backend: str


class CancelOut(BaseModel):
    id: int
    requested: bool


class LogOut(BaseModel):
    lines: list[str]
    ended: bool


def task_out(t: TaskRow) -> TaskOut:
    return TaskOut(index=t.task_index, name=t.name, status=t.status, resources=t.resources, started_at=t.started_at,
                   run_started_at=t.run_started_at, ended_at=t.ended_at, recoveries=t.recoveries,
                   exit_codes=t.exit_codes, failure_reason=t.failure_reason)


def job_out(summary: JobSummary, cost: float) -> JobOut:
    from orchestrator.service import job_details

    job, tasks = summary.job, summary.tasks
    active = not JobStatus(job.status).terminal
    return JobOut(id=job.id, name=job.name, user=job.user, status=job.status, pool=job.pool,
                  is_pipeline=job.is_pipeline, resources=tasks[0].resources if len(tasks) == 1 else "-",
                  submitted_at=job.submitted_at, started_at=job.started_at,
                  run_started_at=min((t.run_started_at for t in tasks if t.run_started_at), default=None),
                  ended_at=job.ended_at, recoveries=sum(t.recoveries for t in tasks), cost=round(cost, 6),
                  details=job_details(job), cancel_requested=job.cancel_requested,
                  cancellable=active and not job.cancel_requested, tasks=[task_out(t) for t in tasks])


def page_out(page: JobPage, offset: int, limit: int) -> JobsPageOut:
    return JobsPageOut(total=page.total, offset=offset, limit=limit,
                       items=[job_out(s, page.costs.get(s.job.id, 0.0)) for s in page.items])


def attempt_out(a: AttemptRow, cost: float) -> AttemptOut:
    return AttemptOut(task=a.task_index, number=a.number, stack=a.stack_name, infra=a.infra, region=a.region,
                      instance_type=a.instance_type, use_spot=a.use_spot, num_nodes=a.num_nodes,
                      phase=a.phase, started_at=a.started_at, ended_at=a.ended_at, outcome=a.outcome,
                      exit_codes=a.exit_codes, price_per_hour=a.price_per_hour, cost=round(cost, 6))


def event_out(e: EventRow) -> EventOut:
    return EventOut(at=e.at, task=e.task_index, who=e.who, what=e.what, why=e.why, data=e.data)


def stack_out(s: StackRow) -> StackOut:
    return StackOut(name=s.name, kind=s.kind, status=s.status, job_id=s.job_id, created_at=s.created_at,
                    destroyed_at=s.destroyed_at, last_error=s.last_error)


def detail_out(d: JobDetail) -> JobDetailOut:
    from orchestrator.service import JobSummary

    return JobDetailOut(job=job_out(JobSummary(d.job, d.tasks), d.cost),
                        waiting=d.details if not JobStatus(d.job.status).terminal and d.details else None,
                        attempts=[attempt_out(a, c) for a, c in d.attempts], events=[event_out(e) for e in d.events],
                        stacks=[stack_out(s) for s in d.stacks])


def _spec_summary(spec: dict[str, Any]) -> dict[str, Any]:
    """What defines a worker, without values that could be secret (env names only)."""
    return {"resources": spec.get("resources_str") or "", "num_nodes": spec.get("num_nodes", 1),
            "setup": spec.get("setup"), "workdir": bool(spec.get("workdir")),
            "file_mounts": sorted((spec.get("file_mounts") or {}).keys()),
            "envs": sorted((spec.get("envs") or {}).keys()), "secrets": sorted((spec.get("secrets") or {}).keys())}


def worker_status(status: str, jobs: list[int]) -> str:
    return "BUSY" if status == "READY" and jobs else status


def pool_out(s: PoolStatus) -> PoolOut:
    from orchestrator.policy.pools import policy_of

    p = s.pool
    workers = [WorkerOut(number=w.number, stack=w.stack_name, infra=w.infra, region=w.region, use_spot=w.use_spot,
                         status=worker_status(w.status, s.jobs_on.get(w.id, [])), jobs=s.jobs_on.get(w.id, []),
                         created_at=w.created_at, ready_at=w.ready_at, failure_reason=w.failure_reason)
               for w in s.workers]
    return PoolOut(name=p.name, status=p.status, user=p.user, policy=policy_of(p).describe(),
                   workers_wanted=p.workers, min_workers=p.min_workers, max_workers=p.max_workers,
                   idle_timeout=p.idle_timeout, jobs_per_worker=p.jobs_per_worker, ready=s.ready(),
                   total=len(s.workers), spec=_spec_summary(p.spec), updated_at=p.updated_at, workers=workers,
                   jobs=[PoolJobOut(id=j.id, name=j.name, rank=j.job_rank, status=j.status) for j in s.jobs],
                   last_plan=p.last_plan)


def status_out(c: ControllerStatus) -> StatusOut:
    from orchestrator import __version__

    return StatusOut(version=__version__, controller_running=c.running, controller_pid=c.pid,
                     controller_version=c.version, uptime=c.uptime, jobs_in_progress=c.jobs_in_progress,
                     stack_operations=c.stack_operations, backend=c.backend)
