"""`sortie jobs launch`: SkyPilot's flags, the plan, the checks that refuse what nothing can serve, and the
submission (or, with -p, jobs on a pool's workers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from cli.jobs import jobs_app
from cli.output import UploadProgress, get_console, job_service, useful_commands

if TYPE_CHECKING:
    from orchestrator.spec import Pipeline


def _pairs(items: list[str]) -> tuple[tuple[str, str | None], ...]:
    return tuple((i.split("=", 1)[0], i.split("=", 1)[1] if "=" in i else None) for i in items)


@jobs_app.command("launch")
def launch(
    entrypoint: list[str] = typer.Argument(..., help="A task YAML, or a command to run."),
    name: str = typer.Option(None, "-n", "--name", help="Name of the job (or pipeline)."),
    env: list[str] = typer.Option([], "--env", help="K=V, or K to take it from your environment. Repeatable."),
    env_file: str = typer.Option(None, "--env-file", help="A dotenv file of K=V lines; fills envs, and the "
                                 "task's secrets of those names."),
    secret: list[str] = typer.Option([], "--secret", help="K=V, or K from your environment; never shown."),
    secret_file: str = typer.Option(None, "--secret-file", help="A dotenv file of secrets (K=V lines)."),
    infra: str = typer.Option(None, "--infra", help="local, local/region-a, aws/us-east-1, */us-east-1, ..."),
    cpus: str = typer.Option(None, "--cpus", help="vCPUs per node: 4 or 4+."),
    memory: str = typer.Option(None, "--memory", help="GB per node: 16 or 16+."),
    gpus: str = typer.Option(None, "--gpus", help="Accelerators per node, like H100:8."),
    instance_type: str = typer.Option(None, "-t", "--instance-type", help="Cloud instance type."),
    num_nodes: int = typer.Option(None, "--num-nodes", help="Nodes of the cluster."),
    use_spot: bool = typer.Option(None, "--use-spot/--no-use-spot", help="Spot instances."),
    image_id: str = typer.Option(None, "--image-id", help="Machine image of the nodes."),
    disk_size: str = typer.Option(None, "--disk-size", help="OS disk size in GB."),
    disk_tier: str = typer.Option(None, "--disk-tier", help="low, medium, high, ultra or best."),
    network_tier: str = typer.Option(None, "--network-tier", help="standard or best."),
    ports: list[str] = typer.Option([], "--ports", help="Ports to open: 8080, 8000-8010 (repeatable)."),
    job_recovery: str = typer.Option(None, "--job-recovery", help="FAILOVER, EAGER_NEXT_REGION or none."),
    config: list[str] = typer.Option([], "--config", help="Per-task config: KEY.PATH=VALUE or a YAML file."),
    workdir: str = typer.Option(None, "--workdir", help="Local directory synced to every node."),
    git_url: str = typer.Option(None, "--git-url", help="A git repository as the workdir."),
    git_ref: str = typer.Option(None, "--git-ref", help="With --git-url: the branch, tag or commit."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Do not ask for confirmation."),
    detach_run: bool = typer.Option(False, "-d", "--detach-run", help="Return once submitted; do not stream logs."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Validate and plan; launch nothing."),
    as_json: bool = typer.Option(False, "--json", help="With --dryrun: print the normalized task as JSON."),
    pool: str = typer.Option(None, "-p", "--pool", help="Run on this pool's workers instead of a new cluster."),
    num_jobs: int = typer.Option(1, "--num-jobs", help="This many jobs (each on its own cluster, or with -p on the "
                                 "pool), told SKYPILOT_JOB_RANK 0..N-1 and SKYPILOT_NUM_JOBS N."),
    workspace: str = typer.Option(None, "--workspace", help="With an API server: the workspace (default: your "
                                  "first)."),
) -> None:
    """Launch a managed job: a temporary cluster runs it and is destroyed when it ends (or, with -p, a pool's
    worker runs it). A request nothing can serve is refused (exit 1) and nothing is submitted."""
    from orchestrator.errors import UsageError
    from orchestrator.service import check_num_jobs
    from orchestrator.spec import Overrides, SpecError, load_entrypoint

    text = " ".join(entrypoint)
    overrides = Overrides(name=name, envs=_pairs(env), env_file=env_file, secrets=_pairs(secret), infra=infra,
                          cpus=cpus, memory=memory, gpus=gpus, num_nodes=num_nodes, use_spot=use_spot,
                          workdir=workdir, secret_file=secret_file, git_url=git_url, git_ref=git_ref,
                          disk_size=disk_size, disk_tier=disk_tier, network_tier=network_tier, image_id=image_id,
                          instance_type=instance_type, ports=tuple(ports), job_recovery=job_recovery,
                          config=tuple(config))
    pipeline = load_entrypoint(text, overrides)
    console = get_console(stderr=as_json)
    for warning in pipeline.warnings:
        get_console(stderr=True).print(f"Warning: {warning}")
    if pool is not None:
        _launch_on_pool(pool, pipeline, num_jobs, yes=yes, dryrun=dryrun)
        return
    check_num_jobs(num_jobs)
    if any(t.pool for t in pipeline.tasks):
        raise UsageError("this YAML has a pool: section; create the pool with `sortie jobs pool apply -p NAME`")
    service = job_service()
    width = get_console().width
    plan = service.plan_launch(pipeline, width, workspace)
    if dryrun and as_json:
        if plan.refusals:
            raise SpecError(plan.refusals)
        plan.raise_storage_error()  # issue 28: every check a launch makes, --json or not
        print(json.dumps({**pipeline.to_json(), "is_pipeline": pipeline.is_pipeline}, indent=2))
        return
    is_file = text.endswith((".yaml", ".yml")) or Path(text).is_file()
    console.print(f"Task from {'YAML spec' if is_file else 'command'}: {text}")
    label = pipeline.name or "sortie-job"
    what = "job group" if pipeline.is_job_group else "job"
    console.print(f"Managed {what} {label!r} will be launched on (estimated):")
    for table in plan.tables:
        console.print(table)
    if plan.refusals:
        raise SpecError(plan.refusals)
    if plan.shared_infra:
        console.print(f"Every task of the group on one infra: {plan.shared_infra} (the cheapest for the whole "
                      "group, where it has room)")
    plan.raise_storage_error()
    if plan.storage_lines:
        console.print("Files and buckets:")
        for line in plan.storage_lines:
            console.print(f"  {escape(line)}")
    if dryrun:
        console.print("Dry run: nothing launched.")
        return
    many = f"{num_jobs} managed jobs" if num_jobs > 1 else "a managed job"
    if not yes and not typer.confirm(f"Launching {many} {label!r}. Proceed?", default=True):
        raise typer.Exit(1)
    if num_jobs > 1:  # each on its own cluster; like -p, submitted and not followed
        ids = service.launch(pipeline, count=num_jobs, progress=UploadProgress(console), storage=plan.storage,
                             workspace=workspace)
        console.print(f"Submitted {len(ids)} managed jobs {label!r}, each on its own cluster: ID {ids[0]}-{ids[-1]}")
        return
    (job_id,) = service.launch(pipeline, progress=UploadProgress(console), storage=plan.storage, workspace=workspace)
    console.print(f"Managed job {label!r} submitted: ID {job_id}")
    if not detach_run:
        job = service.resolve(job_id)
        for line in service.log_lines(job, follow=True):
            print(line, flush=True)
        final = service.resolve(job_id)
        mark = "✓" if final.status == "SUCCEEDED" else "✗"
        reason = f": {final.failure_reason}" if final.failure_reason and final.status != "SUCCEEDED" else ""
        console.print(f"{mark} Managed job finished: {job_id} (status: {final.status}){reason}.")
    console.print(useful_commands(job_id))
    if not detach_run and service.resolve(job_id).status != "SUCCEEDED":
        raise typer.Exit(1)


def _launch_on_pool(pool: str, pipeline: Pipeline, num_jobs: int, *, yes: bool, dryrun: bool) -> None:
    from cli.output import pool_service
    from orchestrator.errors import UsageError

    if pipeline.is_job_group:  # as in SkyPilot, whose job groups do not take pools
        raise UsageError("-p: a job group (execution: parallel) runs each task on its own cluster, not on a pool")
    console = get_console()
    service = pool_service()
    service.resolve_pool(pool)
    label = pipeline.name or "sortie-job"
    console.print(f"{num_jobs} job(s) {label!r} will run on pool {escape(pool)}.")
    if dryrun:
        console.print("Dry run: nothing launched.")
        return
    if not yes and not typer.confirm("Proceed?", default=True):
        raise typer.Exit(1)
    ids, notes = service.launch_on_pool(pool, pipeline, num_jobs)
    for note in notes:
        console.print(f"Note: {escape(note)}")
    shown = f"{ids[0]}" if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"
    console.print(f"Submitted {len(ids)} job(s) to pool {escape(pool)}: ID {shown}")
