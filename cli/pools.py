"""`sortie jobs pool ...`: pools of reusable workers, each worker its own Pulumi stack."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from cli.jobs import jobs_app
from cli.output import get_console, plain_table, print_log_file
from orchestrator.timefmt import ago

if TYPE_CHECKING:
    from orchestrator.policy.pools import ApplyPlan
    from orchestrator.pool_service import PoolService

pool_app = typer.Typer(no_args_is_help=True, help="Pools of reusable workers: apply, status, down.")
jobs_app.add_typer(pool_app, name="pool")


def _pools(what: str = "this pool command") -> PoolService:
    from cli.output import local_only
    from orchestrator.pool_service import PoolService

    local_only(f"`sortie jobs pool {what}`")
    return PoolService()


def _remote() -> Any:
    """The HTTP transport when this home is logged in to an API server, else None."""
    from cli.output import job_service
    from orchestrator.api_client import RemoteJobService

    service = job_service()
    return service if isinstance(service, RemoteJobService) else None


def _driver(service: PoolService):
    from orchestrator.infra.engine import require_engine
    from orchestrator.infra.pulumi_driver import PulumiStackDriver

    require_engine()
    return PulumiStackDriver(service.home, service.config)


def plan_lines(plan: ApplyPlan) -> list[str]:
    """The plan as a person reads it: the pool-level diff, then each worker stack's preview."""
    data = plan.to_json()
    before, after = data["workers"]["before"], data["workers"]["after"]
    what = {"create": "create the pool", "in-place": "update in place (scale)", "unchanged": "no change",
            "update": "update workers in place (the provider's diff)",
            "recreate": "recreate workers (rolling)"}[plan.mode]
    lines = [f"Pool {plan.pool}: {what}"]
    lines.append(f"  workers: {before if before is not None else '-'} -> {after}")
    if data["policy"]["before"] != data["policy"]["after"]:
        lines.append(f"  policy: {data['policy']['before'] or '-'} -> {data['policy']['after']}")
    else:
        lines.append(f"  policy: {data['policy']['after']}")
    if plan.changed:
        lines.append(f"  changed: {', '.join(plan.changed)}")
    lines += [f"  note: {n}" for n in plan.notes]
    for stack, preview in sorted(data["previews"].items()):
        counts = preview.get("counts") or {}
        summary = ", ".join(f"{n} to {op}" for op, n in sorted(counts.items())) or (
            "no changes" if preview["op"] == "same" else f"{len(preview['resources'])} to delete")
        lines.append(f"  stack {stack}: {preview['op']} ({summary})")
        for res in preview["resources"]:
            if res["op"] == "same":
                continue
            keys = f" [{', '.join(res['keys'])}]" if res.get("keys") else ""
            lines.append(f"    {res['op']:<8} {res['type']} {res.get('name', '')}{keys}")
    return lines


def _load_pool_yaml(yaml_path: str, workers: int | None):
    """The pool YAML, with `--workers N` replacing its pool.workers (and fixing a pool without autoscaling)."""
    from orchestrator.errors import UsageError
    from orchestrator.spec import load_entrypoint

    pipeline = load_entrypoint(yaml_path)
    if workers is None:
        return pipeline
    if workers < 0:
        raise UsageError("--workers: must be 0 or more")
    task = pipeline.tasks[0]
    if task.pool is None:
        raise UsageError(f"{yaml_path}: has no pool: section; add `pool: {{workers: {workers}}}`")
    section = task.pool.model_copy(update={"workers": workers})
    if section.max_workers is not None and workers > section.max_workers:
        raise UsageError(f"--workers {workers}: above the pool's max_workers ({section.max_workers})")
    return pipeline.model_copy(update={"tasks": [task.model_copy(update={"pool": section}), *pipeline.tasks[1:]]})


def generated_pool_name(pipeline: Any, taken: set[str]) -> str:
    """A name for `pool apply` without -p: the YAML's name if free, else `sortie-pool-<4 hex>`."""
    import secrets

    base = pipeline.name
    if base and base not in taken:
        return base
    while True:
        name = f"sortie-pool-{secrets.token_hex(2)}"
        if name not in taken:
            return name


def _show_plan(service: PoolService, name: str, yaml_path: str, as_json: bool, workers: int | None = None,
               pipeline: Any = None):
    pipeline = pipeline if pipeline is not None else _load_pool_yaml(yaml_path, workers)
    plan, new_hash = service.plan(name, pipeline, _driver(service))
    if as_json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        from cli.clouds import considered_tables

        for item in considered_tables(pipeline):  # where each worker goes
            get_console().print(item)
        for line in plan_lines(plan):
            get_console().print(escape(line))
    return pipeline, plan, new_hash


@pool_app.command("apply")
def apply(
    yaml_path: str = typer.Argument(..., help="A pool YAML: a task YAML with a pool: section."),
    name: str = typer.Option(None, "-p", "--pool", help="Pool name (default: the YAML's name, else generated)."),
    workers: int = typer.Option(None, "--workers", help="Workers to keep, instead of the YAML's pool.workers."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Do not ask for confirmation."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan only."),
    as_json: bool = typer.Option(False, "--json", help="The plan as JSON, for scripts."),
) -> None:
    """Create a pool, or update the pool of that name; shows the plan (with each worker stack's Pulumi
    preview) and asks before changing anything."""
    remote = _remote()
    loaded = _load_pool_yaml(yaml_path, workers)
    if remote is not None:  # through the API server: admins only; the plan is made and applied there
        if name is None:
            from orchestrator.errors import UsageError

            raise UsageError("through the API server, name the pool: -p NAME")
        if dry_run or (not yes and not typer.confirm(f"Apply pool {name} on the server?", default=True)):
            raise typer.Exit(0 if dry_run else 1)
        answer = remote.call("POST", f"/api/v1/pools/{name}/apply", {"pipeline": loaded.model_dump(mode="json")})
        if as_json:
            print(json.dumps(answer["plan"], indent=2))
        else:
            get_console().print(f"Pool {name} applied; workers converge in the background.")
        return
    service = _pools("apply")
    if name is None:
        name = generated_pool_name(loaded, {s.pool.name for s in service.status()})
        if not as_json:
            get_console().print(f"Pool name: {escape(name)}")
    pipeline, plan, new_hash = _show_plan(service, name, yaml_path, as_json, pipeline=loaded)
    if dry_run or plan.mode == "unchanged":
        if not as_json:
            get_console().print("Nothing changed." if plan.mode == "unchanged" else "Dry run: nothing changed.")
        return
    if not yes and not typer.confirm("Proceed?", default=True):
        raise typer.Exit(1)
    service.apply(name, pipeline, plan, new_hash, driver=_driver(service) if plan.mode == "update" else None)
    if not as_json:
        get_console().print(f"Pool {name} applied; workers converge in the background. "
                         f"See `sortie jobs pool status {name}`.")


@pool_app.command("diff")
def diff(
    yaml_path: str = typer.Argument(..., help="A pool YAML."),
    name: str = typer.Option(..., "-p", "--pool", help="Pool name."),
    as_json: bool = typer.Option(False, "--json", help="The plan as JSON, for scripts."),
) -> None:
    """The plan of `pool apply` (same as `apply --dry-run`); changes nothing."""
    _show_plan(_pools("diff"), name, yaml_path, as_json)


def _worker_status(worker: Any, jobs: list[int]) -> str:
    if worker.status == "READY" and jobs:
        return f"BUSY (job {', '.join(map(str, jobs))})"
    if worker.status == "DRAINING" and jobs:
        return f"DRAINING (job {', '.join(map(str, jobs))})"
    return worker.status


@pool_app.command("status")
def status(
    name: str = typer.Argument(None, help="One pool (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="JSON, for scripts."),
) -> None:
    """Pools: spec, policy, workers ready/total; per worker its stack, region and status; the pool's jobs."""
    from orchestrator.policy.pools import policy_of

    found = _pools("status").status(name)
    if as_json:
        print(json.dumps([{
            "name": s.pool.name, "status": s.pool.status, "policy": policy_of(s.pool).describe(),
            "ready": s.ready(), "total": len(s.workers),
            "workers": [{"number": w.number, "stack": w.stack_name, "infra": w.infra, "region": w.region,
                         "status": _worker_status(w, s.jobs_on.get(w.id, [])), "jobs": s.jobs_on.get(w.id, [])}
                        for w in s.workers],
            "jobs": [{"id": j.id, "status": j.status, "rank": j.job_rank} for j in s.jobs],
        } for s in found], indent=2))
        return
    console = get_console()
    if not found:
        console.print("No pools. Create one with `sortie jobs pool apply -p NAME pool.yaml`.")
        return
    rows = [[s.pool.name, s.pool.status, policy_of(s.pool).describe(), f"{s.ready()}/{len(s.workers)}",
             (s.pool.spec.get("resources_str") or ""), ago(s.pool.updated_at)] for s in found]
    console.print(escape(plain_table(["POOL", "STATUS", "POLICY", "READY", "RESOURCES", "UPDATED"], rows)))
    for s in found:
        console.print(f"\nPool {escape(s.pool.name)} workers:")
        workers = [[str(w.number), w.stack_name, f"{w.infra}/{w.region}", _worker_status(w, s.jobs_on.get(w.id, []))]
                   for w in s.workers]
        console.print(escape(plain_table(["WORKER", "STACK", "INFRA", "STATUS"], workers)) if workers else "  none")
        if s.jobs:
            jobs = [[str(j.id), str(j.job_rank), j.name or "-", j.status] for j in s.jobs]
            console.print(f"Pool {escape(s.pool.name)} jobs (latest):")
            console.print(escape(plain_table(["ID", "RANK", "NAME", "STATUS"], jobs)))


@pool_app.command("down")
def down(
    names: list[str] = typer.Argument(None, help="Pool names."),
    all_pools: bool = typer.Option(False, "-a", "--all", help="Every pool."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Do not ask for confirmation."),
    no_cancel: bool = typer.Option(False, "--no-cancel", help="Let running jobs finish; only new ones stop."),
) -> None:
    """Take pools down: cancel their jobs (unless --no-cancel) and destroy every worker stack, in the
    background."""
    from orchestrator.errors import UsageError

    remote = _remote()
    if remote is not None and names and not all_pools:  # through the API server: admins only
        if not yes and not typer.confirm(f"Take down pool(s) {', '.join(names)}?", default=True):
            raise typer.Exit(1)
        for pool in remote.call("POST", "/api/v1/pools/down", {"names": names, "cancel_jobs": not no_cancel}):
            get_console().print(f"Pool {escape(pool)}: going down; its worker stacks are being destroyed.")
        return
    service = _pools("down")
    if bool(names) == all_pools:
        raise UsageError("give pool names or -a (one of them)")
    targets = names or [s.pool.name for s in service.status()]
    if not targets:
        get_console().print("No pools to take down.")
        return
    if not yes and not typer.confirm(f"Take down pool(s) {', '.join(targets)}?", default=True):
        raise typer.Exit(1)
    for pool in service.down(targets, cancel_jobs=not no_cancel):
        get_console().print(f"Pool {escape(pool)}: going down; its worker stacks are being destroyed.")


@pool_app.command("logs")
def logs(
    name: str = typer.Argument(..., help="Pool name."),
    follow: bool = typer.Option(False, "--follow/--no-follow", help="Follow the log."),
    tail: int = typer.Option(1000, "--tail", help="The last N lines (0: all)."),
) -> None:
    """A pool's log: its workers' stack operations (Pulumi output), health and scaling decisions."""

    from orchestrator.errors import UsageError

    if tail < 0:
        raise UsageError("--tail: must be 0 (all) or more")
    service = _pools("logs")
    pool = service.resolve_pool(name)
    path = service.home / "logs" / "pools" / f"{pool.name}.log"
    if not path.exists():
        get_console().print(f"Pool {escape(pool.name)} has no log yet.")
        return
    print_log_file(path, tail or None, follow)
