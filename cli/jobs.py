"""`sortie jobs ...` and `sortie controller ...`: managed jobs from the command line."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from cli.output import get_console, job_service, plain_table, pool_service, print_log_file
from orchestrator.timefmt import duration

if TYPE_CHECKING:

    pass

jobs_app = typer.Typer(no_args_is_help=True, help="Managed jobs: launch, queue, logs, cancel.")
controller_app = typer.Typer(no_args_is_help=True, help="The controller daemon: status, stop, logs.")


DEFAULT_TAIL = 1000  # SkyPilot's `jobs logs --tail` default


@jobs_app.command("logs")
def logs(
    args: list[str] = typer.Argument(None, help="JOB_ID [TASK], or with -n NAME just [TASK]; TASK is a pipeline "
                                     "task's index or name (default: the latest job, every task)."),
    name: str = typer.Option(None, "-n", "--name", help="Job name instead of id."),
    follow: bool = typer.Option(True, "--follow/--no-follow", help="Follow until the job ends."),
    tail: int = typer.Option(DEFAULT_TAIL, "--tail", help="Only the last N lines first (0: all), then follow."),
    controller: bool = typer.Option(False, "--controller", help="The controller's log for this job."),
) -> None:
    """Stream a job's logs (they stay readable after its cluster is gone)."""
    from orchestrator.errors import UsageError

    given = list(args or [])
    if len(given) > (1 if name else 2):
        raise UsageError("give JOB_ID [TASK], or -n NAME [TASK]")
    job_id: int | None = None
    if not name and given:
        if not given[0].isdigit():
            raise UsageError(f"{given[0]!r} is not a job id; use -n NAME for a job's name")
        job_id = int(given.pop(0))
    task = given[0] if given else None
    if tail < 0:
        raise UsageError("--tail: must be 0 (all) or more")
    service = job_service()
    job = service.resolve(job_id, name)
    task_index = None
    if task is not None:
        names = [t.get("name") for t in job.spec["tasks"]]
        if task.isdigit() and int(task) < len(names):
            task_index = int(task)
        elif task in names:
            task_index = names.index(task)
        else:
            known = ", ".join(f"{i} ({n})" if n else str(i) for i, n in enumerate(names))
            raise UsageError(f"job {job.id} has no task {task!r} (tasks: {known})")

    def source(follow_it: bool):
        if controller:
            return service.controller_log_lines(job, follow=follow_it)
        return service.log_lines(job, follow=follow_it, task=task_index)

    existing = list(source(False))
    for line in existing[-tail:] if tail else existing:
        print(line, flush=True)
    if not follow:
        return
    for i, line in enumerate(source(follow)):
        if i >= len(existing):
            print(line, flush=True)


@jobs_app.command("cancel")
def cancel(
    job_ids: list[int] = typer.Argument(None, help="Job ids."),
    name: str = typer.Option(None, "-n", "--name", help="Cancel the job of this name."),
    all_jobs: bool = typer.Option(False, "-a", "--all", help="Cancel all of your jobs in progress."),
    all_users: bool = typer.Option(False, "-u", "--all-users", help="Cancel every user's jobs in progress."),
    pool: str = typer.Option(None, "-p", "--pool", help="Cancel every job of this pool in progress."),
    task: str = typer.Option(None, "--task", help="Only this task (index or name) of a job group; of a pipeline, "
                                                  "its running task."),
    graceful: bool = typer.Option(False, "--graceful", help="SIGTERM to the runs and their MOUNT_CACHED writes "
                                                            "uploaded before the clusters go."),
    graceful_timeout: int = typer.Option(None, "--graceful-timeout", help="With --graceful: wait at most this many "
                                                                          "seconds (default: no limit)."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Do not ask for confirmation."),
) -> None:
    """Cancel managed jobs: CANCELLING, then CANCELLED once their clusters are destroyed."""
    from orchestrator.errors import UsageError

    if graceful_timeout is not None and not graceful:
        raise UsageError("--graceful-timeout: only with --graceful")
    if graceful_timeout is not None and graceful_timeout < 0:
        raise UsageError("--graceful-timeout: must be 0 or more seconds")
    service = job_service()
    if sum(bool(x) for x in (job_ids, name, all_jobs, all_users, pool)) != 1:
        raise UsageError("give job ids, -n NAME, -a, -u or -p POOL (exactly one of them)")
    if task is not None and (all_jobs or all_users or pool or len(job_ids or []) > 1):
        raise UsageError("--task: give one job (an id or -n NAME)")
    ids = list(job_ids or [])
    if pool:
        ids = pool_service().pool_job_ids(pool)
        if not ids:
            get_console().print(f"No jobs of pool {escape(pool)} in progress.")
            return
    if name:
        ids = [service.resolve(None, name).id]
    if all_jobs or all_users:
        ids = service.active_ids(None if all_users else service.identity.user)
        if not ids:
            get_console().print("No jobs in progress to cancel.")
            return
    if not yes and not typer.confirm(f"Cancel managed job(s) {', '.join(map(str, ids))}?", default=True):
        raise typer.Exit(1)
    what = f"task {task} of job" if task is not None else "Job"
    for job_id, requested in service.cancel(ids, task=task, graceful=graceful,
                                            graceful_timeout=graceful_timeout):
        state = ("cancelling" + (" gracefully" if graceful else "")) if requested else \
            "already finished; nothing to cancel"
        get_console().print(f"{what[0].upper()}{what[1:]} {job_id}: {state}")


@jobs_app.command("events")
def events(job_id: int = typer.Argument(..., help="Job id."),
           as_json: bool = typer.Option(False, "--json", help="JSON, for scripts.")) -> None:
    """A job's history: submitted, placed, provisioned, exit codes, finished."""
    from rich.table import Table

    rows = job_service().events(job_id)
    if as_json:
        print(json.dumps([{"at": e.at, "task": e.task_index, "who": e.who, "what": e.what, "why": e.why,
                           "data": e.data} for e in rows], indent=2))
        return
    table = Table("TIME", "TASK", "WHO", "WHAT", "WHY", box=None)
    for e in rows:
        task = "-" if e.task_index is None else str(e.task_index)
        table.add_row(time.strftime("%H:%M:%S", time.localtime(e.at)), task, e.who, e.what, e.why or "")
    get_console().print(table)


@controller_app.command("status")
def controller_status() -> None:
    """Whether the controller runs, since when, and what it holds (on a cloud VM: its stack and address)."""
    from orchestrator.config import load_config
    from orchestrator.controller_service import controller_info, remote_status

    console = get_console()
    config = load_config()
    if config.jobs.controller.infra != "local":
        console.print(remote_status(config))
        return
    info = controller_info()
    from orchestrator.config import sortie_home
    from orchestrator.disk import home_space_problem

    full = home_space_problem(sortie_home())  # issue 17: a full home is said here
    if full is not None:
        console.print(f"disk: {full}: new launches are refused; jobs in progress go on", markup=False)
    if not info.running:
        console.print("controller: not running (the next `sortie jobs launch` starts it)")
    else:
        console.print(f"controller: running, pid {info.pid}, version {info.version}, "
                      f"up {duration(info.started_at, None)}")
    _print_replicas(console, config)


def _print_replicas(console: Any, config: Any) -> None:
    """Issue 14: every replica sharing this state DB: its id, host, jobs held and lease age."""
    from orchestrator.controller_service import replicas

    found = replicas(config)
    if len(found) < 2 and not any(r.jobs_held or r.leases_held for r in found):
        return  # one controller, nothing to add
    rows = [[r.id, r.host, str(r.pid), "stopped" if r.stopped_at else ("live" if r.live else "lease expired"),
             str(r.jobs_held), ", ".join(r.leases_held) or "-", f"{time.time() - r.heartbeat_at:.0f}s"]
            for r in found]
    console.print(plain_table(["REPLICA", "HOST", "PID", "STATE", "JOBS", "LEASES", "LEASE AGE"], rows),
                  markup=False, highlight=False)


@controller_app.command("start")
def controller_start() -> None:
    """Start the controller if it is not running (`jobs launch` and `jobs cancel` do this themselves)."""
    from orchestrator.controller_service import ensure_controller

    info = ensure_controller()
    get_console().print(f"controller running, pid {info.pid}")


@controller_app.command("up")
def controller_up(yes: bool = typer.Option(False, "-y", "--yes", help="Do not ask for confirmation."),
                  replicas: int | None = typer.Option(None, "--replicas", help="Controller replicas (1-16; more "
                                                      "than 1 on jobs.controller.infra: kubernetes, issue 14)."),
                  image: str = typer.Option("", "--image", envvar="SORTIE_CONTROLLER_IMAGE",
                                            help="Kubernetes: the controller pods' image, with Sortie installed."),
                  logs_claim: str | None = typer.Option(None, "--logs-claim", help="Kubernetes: a ReadWriteMany "
                                                        "PersistentVolumeClaim the replicas keep job logs on."),
                  ) -> None:
    """Create the jobs controller's VM on the cloud of `jobs.controller.infra` (its own stack), running the
    controller against the shared PostgreSQL state; on kubernetes, a Deployment of `--replicas` controllers."""
    from orchestrator.config import load_config, sortie_home
    from orchestrator.controller_service import controller_up_vm
    from orchestrator.errors import UsageError

    home = sortie_home()
    config = load_config(home)
    if config.jobs.controller.infra == "local":
        raise UsageError("jobs.controller.infra is local: the controller runs here (`sortie controller start`)")
    count = 1 if replicas is None else replicas
    confirm = None if yes else lambda q: typer.confirm(q, default=True)
    if config.jobs.controller.infra == "kubernetes" or count != 1:  # issue 14: replicas, a Deployment
        from orchestrator.controller_service import controller_up_kubernetes

        if not controller_up_kubernetes(config, home, count, image, logs_claim, say=get_console().print,
                                        confirm=confirm):
            raise typer.Exit(1)
        return
    if not controller_up_vm(config, home, say=get_console().print, confirm=confirm):
        raise typer.Exit(1)


@controller_app.command("down")
def controller_down(yes: bool = typer.Option(False, "-y", "--yes", help="Do not ask for confirmation.")) -> None:
    """Destroy the cloud controller's VM (jobs stay in the shared state and resume at the next `up`)."""
    from orchestrator.config import load_config, sortie_home
    from orchestrator.controller_service import controller_down_vm, controller_stack
    from orchestrator.dashboard import server as dashboard_server

    home = sortie_home()
    config = load_config(home)
    name = controller_stack(config)
    if not yes and not typer.confirm(f"Destroy the controller stack {name}?", default=True):
        raise typer.Exit(1)
    controller_down_vm(config, home)
    found = dashboard_server.recorded(home)
    if found and found.get("kind") == "tunnel":
        dashboard_server.stop(home)
    get_console().print(f"controller stack {name} destroyed")


@controller_app.command("stop")
def controller_stop() -> None:
    """Stop the controller; jobs stay in the state and resume at its next start."""
    from orchestrator.config import load_config
    from orchestrator.controller_service import stop_controller
    from orchestrator.errors import UsageError

    if load_config().jobs.controller.infra != "local":
        raise UsageError("the controller runs on a cloud VM (jobs.controller.infra): `sortie controller down` "
                         "destroys it (jobs wait in the state)")
    info = stop_controller()
    get_console().print(f"controller stopped (pid {info.pid})" if info.running else "controller was not running")


@controller_app.command("logs")
def controller_logs(follow: bool = typer.Option(False, "--follow/--no-follow", help="Follow the log."),
                    tail: int = typer.Option(50, "--tail", help="The last N lines.")) -> None:
    """The controller daemon's own log."""

    from orchestrator.config import sortie_home
    from orchestrator.controller_service import controller_log_path

    path = controller_log_path(sortie_home())
    if not path.exists():
        get_console().print("the controller has not written a log yet")
        return
    print_log_file(path, tail, follow)
