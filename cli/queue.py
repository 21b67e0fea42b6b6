"""`sortie jobs queue` and `sortie jobs endpoints`, with SkyPilot's habits: `-s A,B` comma lists, `-o json`,
`-v` (INFRA, WORKER_CLUSTER, STARTED, ENDPOINTS), the REQUESTED and POOL columns, and at most 50 jobs unless
`-a` (or `-l N`)."""

from __future__ import annotations

import json

import typer

from cli.jobs import jobs_app
from cli.output import get_console, job_service, plain_table
from orchestrator.timefmt import ago, duration

DEFAULT_LIMIT = 50  # SkyPilot's default for `jobs queue`


def _statuses(given: list[str]) -> list[str]:
    from orchestrator.errors import UsageError
    from orchestrator.job_status import JobStatus

    wanted = [s.strip().upper() for item in given for s in item.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in JobStatus.__members__]
    if unknown:
        raise UsageError(f"--status {unknown[0]}: not a job status (one of {', '.join(JobStatus.__members__)})")
    return wanted


@jobs_app.command("queue")
def queue(
    all_jobs: bool = typer.Option(False, "-a", "--all", help="Every job: also those finished more than a day ago, "
                                  "and no limit."),
    all_users: bool = typer.Option(False, "-u", "--all-users", help="Jobs of every user (adds USER)."),
    skip_finished: bool = typer.Option(False, "--skip-finished", help="Only jobs in progress."),
    status: list[str] = typer.Option([], "-s", "--status", help="Only these statuses: -s FAILED,FAILED_SETUP."),
    limit: int = typer.Option(None, "-l", "--limit", help=f"At most this many jobs (default {DEFAULT_LIMIT})."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Add INFRA, WORKER_CLUSTER, STARTED, ENDPOINTS."),
    cost: bool = typer.Option(False, "--cost", help="Add the cost so far (price x nodes x hours, all attempts)."),
    output: str = typer.Option(None, "-o", "--output", help="json: JSON, for scripts (like --json)."),
    as_json: bool = typer.Option(False, "--json", help="JSON, for scripts."),
) -> None:
    """Managed jobs, newest first; DETAILS says why a job waits or failed."""
    from orchestrator.errors import UsageError
    from orchestrator.job_status import JobStatus

    if output is not None and output.lower() not in ("json", "table"):
        raise UsageError(f"-o {output}: use json or table")
    as_json = as_json or (output or "").lower() == "json"
    if limit is not None and limit < 1:
        raise UsageError("--limit: must be at least 1")
    wanted = _statuses(status)
    rows = job_service().queue_rows(all_jobs=all_jobs, all_users=all_users, skip_finished=skip_finished,
                                    statuses=wanted or None, limit=limit or (None if all_jobs else DEFAULT_LIMIT),
                                    verbose=verbose)
    if as_json:
        print(json.dumps([{
            "id": r.id, "name": r.name, "user": r.user, "status": r.status, "pool": r.pool,
            "submitted_at": r.submitted_at, "started_at": r.started_at, "ended_at": r.ended_at,
            "failure_reason": r.failure_reason, "details": r.details, "cost": r.cost,
            **({"infra": r.placement["infra"], "worker_cluster": r.placement["worker_cluster"],
                "endpoints": r.placement["endpoints"]} if verbose and r.placement is not None else {}),
            "tasks": [{"task": t.task, "name": t.name, "status": t.status, "resources": t.resources,
                       "recoveries": t.recoveries, "exit_codes": t.exit_codes} for t in r.tasks],
        } for r in rows], indent=2))
        return
    in_progress = [r for r in rows if not JobStatus(r.status).terminal]
    counts: dict[str, int] = {}
    for r in in_progress:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    get_console().print(f"In progress jobs: {summary or 'none'}")
    extra = ["INFRA", "WORKER_CLUSTER", "STARTED", "ENDPOINTS"] if verbose else []
    columns = ["ID", "TASK", "NAME", *(["USER"] if all_users else []), "REQUESTED", "SUBMITTED", "TOT. DURATION",
               "JOB DURATION", "#RECOVERIES", *(["COST ($)"] if cost else []), "STATUS", "POOL", *extra, "DETAILS"]
    table: list[list[str]] = []
    for job in rows:
        tasks = job.tasks
        user = [job.user] if all_users else []
        run_start = min((t.run_started_at for t in tasks if t.run_started_at), default=None)
        recoveries = sum(t.recoveries for t in tasks)
        resources = tasks[0].resources if len(tasks) == 1 else "-"
        money = [f"{job.cost:.4f}"] if cost else []
        more: list[str] = []
        if verbose:
            where = job.placement or {}
            more = [where["infra"] or "-", where["worker_cluster"] or "-",
                    ago(job.started_at) if job.started_at else "-",
                    ", ".join(where["endpoints"].values()) or "-"]
        table.append([str(job.id), "-", job.name or "-", *user, resources, ago(job.submitted_at),
                      duration(job.submitted_at, job.ended_at), duration(run_start, job.ended_at),
                      str(recoveries), *money, job.status, job.pool or "-", *more, job.details])
        if job.is_pipeline:
            for t in tasks:
                table.append(["", str(t.task), f"↳ {t.name or '-'}", *[""] * len(user), t.resources, "",
                              duration(t.started_at, t.ended_at) if t.started_at else "-",
                              duration(t.run_started_at, t.ended_at), str(t.recoveries), *[""] * len(money),
                              t.status, "", *[""] * len(more), ""])
    print(plain_table(columns, table))


@jobs_app.command("endpoints")
def endpoints_command(
    job_id: int = typer.Argument(..., help="Job id."),
    port: int = typer.Argument(None, help="Only this port."),
    as_json: bool = typer.Option(False, "--json", help="JSON, for scripts."),
) -> None:
    """The endpoints of a running job's `ports`: the head node's address (on the local cloud its loopback)."""
    from orchestrator.errors import UsageError

    found = {int(k): v for k, v in job_service().endpoints(job_id).items()}
    if port is not None:
        if port not in found:
            raise UsageError(f"job {job_id} has no endpoint on port {port} (ports: "
                             f"{', '.join(map(str, found)) or 'none while it is not running'})")
        found = {port: found[port]}
    if as_json:
        print(json.dumps({str(k): v for k, v in found.items()}, indent=2))
        return
    if not found:
        get_console().print(f"Job {job_id} has no endpoints: it opened no ports, or no cluster runs it now.")
        return
    print(plain_table(["PORT", "ENDPOINT"], [[str(k), v] for k, v in found.items()]))
