"""Services, the one row model of `jobs queue` (issue 23): what both transports return, the in-process service from
the state and the HTTP client from the server's JSON; `cli/queue.py` renders it as a table or as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.service import JobService


@dataclass(frozen=True)
class TaskLine:
    task: int
    name: str | None
    status: str
    resources: str
    recoveries: int
    exit_codes: Any
    started_at: float | None
    ended_at: float | None
    run_started_at: float | None


@dataclass(frozen=True)
class QueueRow:
    id: int
    name: str | None
    user: str
    status: str
    pool: str | None
    workspace: str | None
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    failure_reason: str | None
    details: str
    cost: float
    is_pipeline: bool
    tasks: list[TaskLine]
    # With -v: the latest attempt's infra, cluster (stack) and endpoints.
    placement: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueueRow:
        return cls(**{**data, "tasks": [TaskLine(**t) for t in data["tasks"]]})


def placement(service: JobService, job_ids: list[int], specs: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per job: the infra, cluster (stack) and endpoints of its latest attempt."""
    from orchestrator.policy.endpoints import endpoints

    found: dict[int, dict[str, Any]] = {}
    for job_id in job_ids:
        attempts = service.store.attempts(job_id)
        if not attempts:
            found[job_id] = {"infra": None, "worker_cluster": None, "endpoints": {}}
            continue
        last = max(attempts, key=lambda a: (a.task_index, a.number))
        tasks = specs[job_id].get("tasks") or [{}]
        task = tasks[last.task_index] if last.task_index < len(tasks) else {}
        live = last.ended_at is None
        infra = f"{last.infra}/{last.region}" if last.region and "/" not in last.infra else last.infra
        found[job_id] = {"infra": infra, "worker_cluster": last.stack_name,
                         "endpoints": {str(k): v for k, v in
                                       (endpoints(task, last.infra, last.nodes) if live else {}).items()}}
    return found


def queue_rows(service: JobService, *, all_jobs: bool, all_users: bool, skip_finished: bool,
               statuses: list[str] | None, limit: int | None, verbose: bool) -> list[QueueRow]:
    from orchestrator.service import job_details

    rows = service.queue(all_jobs=all_jobs, all_users=all_users, skip_finished=skip_finished, statuses=statuses,
                         limit=limit)
    costs = service.store.costs([r.job.id for r in rows])
    placed = placement(service, [r.job.id for r in rows], {r.job.id: r.job.spec for r in rows}) if verbose else {}
    return [QueueRow(
        id=r.job.id, name=r.job.name, user=r.job.user, status=r.job.status, pool=r.job.pool,
        workspace=r.job.workspace, submitted_at=r.job.submitted_at, started_at=r.job.started_at,
        ended_at=r.job.ended_at, failure_reason=r.job.failure_reason, details=job_details(r.job),
        cost=round(costs[r.job.id], 6), is_pipeline=bool(r.job.is_pipeline),
        tasks=[TaskLine(t.task_index, t.name, t.status, t.resources, t.recoveries, t.exit_codes, t.started_at,
                        t.ended_at, t.run_started_at) for t in r.tasks],
        placement=placed.get(r.job.id)) for r in rows]
