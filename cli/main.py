"""`sortie`: the command line. Heavy modules (pulumi, sqlalchemy) are imported inside commands,
so `sortie --help` stays fast. Errors print one line and exit non-zero; never a traceback
(set SORTIE_DEBUG=1 to see one)."""

from __future__ import annotations

import json
import os
import sys
import time

import typer

from cli.output import InstallProgress, get_console

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Sortie: managed jobs on ephemeral Pulumi stacks.")
engine_app = typer.Typer(no_args_is_help=True, help="Install and inspect the Pulumi engine.")
local_app = typer.Typer(no_args_is_help=True, help="The embedded local cloud: nodes, regions, preemption.")
stack_app = typer.Typer(no_args_is_help=True, help="Stacks Sortie owns: ls, gc (orphans), destroy, unlock.")
from cli import launch, pools, queue  # noqa: E402, F401 - each registers its `sortie jobs` commands
from cli.clouds import register as register_cloud_commands  # noqa: E402

register_cloud_commands(app)
from cli.catalog import catalog_app  # noqa: E402

app.add_typer(catalog_app, name="catalog")
from cli.jobs import controller_app, jobs_app  # noqa: E402 - after the apps it extends

app.add_typer(jobs_app, name="jobs")
app.add_typer(controller_app, name="controller")
app.add_typer(engine_app, name="engine")
app.add_typer(local_app, name="local")
app.add_typer(stack_app, name="stacks")
app.add_typer(stack_app, name="stack", hidden=True)  # the earlier name
from cli.dashboard import dashboard_app  # noqa: E402

app.add_typer(dashboard_app, name="dashboard")
from cli.api import api_app  # noqa: E402
from cli.users import users_app  # noqa: E402

app.add_typer(api_app, name="api")
app.add_typer(users_app, name="users")


@app.command("status")
def status() -> None:
    """The controller and the clusters it holds."""
    from rich.table import Table

    from orchestrator.controller_service import controller_info
    from orchestrator.service import JobService

    info = controller_info()
    console = get_console()
    if info.running:
        console.print(f"Controller: running (pid {info.pid}, version {info.version})")
    else:
        console.print("Controller: not running")
    stacks = JobService().store.live_stacks()
    if not stacks:
        console.print("Clusters: none")
        return
    table = Table("CLUSTER (STACK)", "JOB", "STATUS", "CREATED", box=None)
    for row in stacks:
        table.add_row(row.name, str(row.job_id or "-"), row.status,
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.created_at)))
    console.print(table)


@app.command("schema")
def schema() -> None:
    """Print the JSON Schema of the task YAML (for editors)."""
    import json

    from orchestrator.spec import task_json_schema

    print(json.dumps(task_json_schema(), indent=2))


@engine_app.command("install")
def engine_install(
    force: bool = typer.Option(False, "--force", help="Rebuild even if installed."),
    plugin: list[str] = typer.Option([], "--plugin", help="Also build this provider plugin (kubernetes): the "
                                     "Go module proxy's source, stamped with the installed SDK's version."),
) -> None:
    """Install the pinned Pulumi engine (build it from the Go module proxy when offline)."""
    from orchestrator.errors import UsageError
    from orchestrator.infra.engine import engine_root, install_engine
    from orchestrator.infra.provider_plugins import PLUGINS, install_plugin

    for name in plugin:
        if name not in PLUGINS:
            raise UsageError(f"--plugin {name!r}: Sortie builds only {', '.join(PLUGINS)}")
    console = get_console()
    started = time.monotonic()
    verbs = {"present": "already installed", "official": "installed from its official release (verified)",
             "built": "built from the Go module proxy"}
    with InstallProgress(console, "Pulumi engine") as progress:
        progress(f"checking {engine_root()}")
        info, how = install_engine(force=force, progress=progress)
    took = time.monotonic() - started
    console.print(f"Pulumi engine v{info.version} {verbs[how]}: {info.path} ({took:.1f}s)")
    for name in plugin:
        started = time.monotonic()
        with InstallProgress(console, f"{name} provider plugin") as progress:
            found, how = install_plugin(name, force=force, progress=progress)
        verb = verbs[how]
        console.print(f"Provider plugin {name} v{found.version} {verb}: {found.path} "
                      f"({time.monotonic() - started:.1f}s)")


@engine_app.command("status")
def engine_status() -> None:
    """Print the engine's path, version and the backend Sortie uses."""
    from orchestrator.config import load_config, sortie_home
    from orchestrator.errors import EngineError
    from orchestrator.infra.engine import PINNED_VERSION, backend_url, engine_root, find_engine
    from orchestrator.infra.provider_plugins import PLUGINS, find_plugin, sdk_version

    home = sortie_home()
    config = load_config(home)
    info = find_engine()
    console = get_console()
    console.print(f"engine:   {info.path if info else 'not installed (expected at ' + str(engine_root()) + ')'}")
    console.print(f"version:  {'v' + info.version if info else '-'} (pinned v{PINNED_VERSION})")
    console.print(f"backend:  {backend_url(config, home)}")
    console.print(f"secrets:  {config.pulumi.secrets_provider}")
    console.print(f"home:     {home}")
    for name in PLUGINS:
        wanted = sdk_version(name)
        found = find_plugin(name)
        where = (str(found.path) if found else "not built: run `sortie engine install --plugin " + name + "`"
                 ) if wanted else f"SDK not installed (pip install 'sortie[{name}]')"
        console.print(f"plugin:   {name} {'v' + wanted if wanted else '-'}: {where}")
    if info is None:
        raise EngineError("the Pulumi engine is not installed; run `sortie engine install`")


@local_app.command("nodes")
def local_nodes(cluster: str = typer.Argument(None, help="Only the nodes of this cluster.")) -> None:
    """List the local cloud's nodes."""
    from rich.table import Table

    from orchestrator.config import load_config, sortie_home
    from orchestrator.infra.local_cloud import LocalCloud

    cloud = LocalCloud(load_config(sortie_home()).local.root_dir(sortie_home()))
    table = Table("NODE", "CLUSTER", "RANK", "REGION", "STATUS", "ADDRESS", box=None)
    for node in cloud.nodes(cluster):
        status = "PREEMPTED" if node.preempted else ("UP" if cloud.alive(node.node_id) else "DEAD")
        table.add_row(node.node_id, node.cluster, str(node.rank), f"local/{node.region}", status, node.url)
    get_console().print(table)


@local_app.command("regions")
def local_regions() -> None:
    """List the local cloud's regions with their capacity and declared accelerators."""
    from rich.table import Table

    from orchestrator.config import load_config, sortie_home
    from orchestrator.infra.local_cloud import LocalCloud

    home = sortie_home()
    cloud = LocalCloud(load_config(home).local.root_dir(home))
    table = Table("REGION", "NODES IN USE", "CAPACITY", "ACCELERATORS", box=None)
    for region in load_config(home).local.regions:
        accs = ", ".join(f"{k}:{v}" for k, v in region.accelerators.items()) or "-"
        cap = "unlimited" if region.capacity is None else str(region.capacity)
        table.add_row(f"local/{region.name}", str(cloud.in_use(region.name)), cap, accs)
    get_console().print(table)


@local_app.command("preempt")
def local_preempt(
    cluster: str = typer.Argument(None, help="Cluster (stack) name, as `sortie local nodes` shows."),
    job: int = typer.Option(None, "--job", help="Preempt the current cluster of this managed job instead."),
    node: int = typer.Option(None, "--node", help="Rank of the one node to preempt; default: every node."),
    notice: str = typer.Option(None, "--notice",
                               help="Warn first, as clouds do (e.g. 30s, 2m): the node's agent tells the job and "
                                    "the controller, and the node goes at the deadline."),
) -> None:
    """Preempt nodes on purpose, as a cloud reclaims spot VMs: their processes die at once, or after --notice."""
    from orchestrator.config import load_config, sortie_home
    from orchestrator.errors import UsageError
    from orchestrator.infra.local_cloud import LocalCloud

    if (cluster is None) == (job is None):
        raise UsageError("give a cluster name or --job ID (one of them)")
    seconds = _notice_seconds(notice)
    if job is not None:
        from orchestrator.service import JobService

        service = JobService()
        service.resolve(job)
        attempt = service.store.open_attempts([job]).get(job)
        if attempt is None or not attempt.nodes:
            raise UsageError(f"managed job {job} has no cluster up right now; see `sortie jobs queue`")
        cluster = attempt.stack_name
    cloud = LocalCloud(load_config(sortie_home()).local.root_dir(sortie_home()))
    for n in cloud.preempt_cluster(cluster, node, notice=seconds):
        get_console().print(f"notice given to {n.node_id} (rank {n.rank}, local/{n.region}): preempted in "
                            f"{seconds:g}s" if seconds else f"preempted {n.node_id} (rank {n.rank}, local/{n.region})")


def _notice_seconds(notice: str | None) -> float:
    """`--notice` in seconds (0: none); a refusal naming the option for anything but a duration up to an hour."""
    from orchestrator.errors import UsageError
    from orchestrator.spec.values import parse_duration

    if notice is None:
        return 0.0
    try:
        seconds = parse_duration(notice)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--notice: {exc}; give a duration such as 30s or 2m") from None
    if not 0 < seconds <= 3600:
        raise UsageError(f"--notice: {notice!r} is not between 1s and 1h; give a duration such as 30s or 2m")
    return seconds


def _owners() -> dict[str, str]:
    """Each stack Sortie's state knows, with what it is for: `job 7 (task 0, attempt 2)` or `pool gpus worker 3`."""
    from orchestrator.service import JobService

    store = JobService().store
    owners = {w.stack_name: f"pool {w.pool} worker {w.number} ({w.status})" for w in store.workers(live_only=False)}
    for row in store.live_stacks():
        owners.setdefault(row.name, f"job {row.job_id}" if row.job_id else row.kind)
    return owners


@stack_app.command("ls")
def stack_ls(as_json: bool = typer.Option(False, "--json", help="JSON, for scripts.")) -> None:
    """The stacks in Sortie's backend (its project), each with the job or pool worker it belongs to."""
    from orchestrator.infra.pulumi_driver import PulumiStackDriver

    names = PulumiStackDriver().list_stacks()
    owners = _owners()
    if as_json:
        print(json.dumps([{"stack": n, "owner": owners.get(n)} for n in names], indent=2))
        return
    from cli.output import plain_table

    get_console().print(plain_table(["STACK", "OWNER"], [[n, owners.get(n, "none (orphan?)")] for n in names]))


@stack_app.command("gc")
def stack_gc(
    yes: bool = typer.Option(False, "-y", "--yes", help="Destroy without asking."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list the orphans."),
) -> None:
    """Destroy orphans: stacks in Sortie's backend with no job attempt in progress and no live pool worker.
    Lists them first; asks before destroying."""
    from orchestrator.infra.pulumi_driver import PulumiStackDriver
    from orchestrator.service import JobService

    driver = PulumiStackDriver()
    store = JobService().store
    in_use = store.open_stack_names()
    orphans = [n for n in driver.list_stacks() if n not in in_use]
    if not orphans:
        get_console().print("No orphan stacks.")
        return
    get_console().print("Orphan stacks (no job attempt in progress, no live pool worker):")
    for name in orphans:
        get_console().print(f"  {name}")
    if dry_run or (not yes and not typer.confirm(f"Destroy {len(orphans)} stack(s)?", default=False)):
        get_console().print("Nothing destroyed.")
        return
    for name in orphans:
        driver.destroy(name)
        store.stack_destroyed(name, missing_ok=True)
        get_console().print(f"destroyed {name}")


@stack_app.command("destroy")
def stack_destroy(names: list[str] = typer.Argument(..., help="Stack names.")) -> None:
    """Destroy stacks and remove them from the backend."""
    from orchestrator.infra.pulumi_driver import PulumiStackDriver

    driver = PulumiStackDriver()
    for name in names:
        driver.destroy(name)
        get_console().print(f"destroyed {name}")


@stack_app.command("unlock")
def stack_unlock() -> None:
    """Cancel locks left by stack operations that crashed (run only when none is running)."""
    from orchestrator.infra.pulumi_driver import PulumiStackDriver

    cancelled = PulumiStackDriver().cancel_stale_locks()
    get_console().print(f"cancelled stale locks of: {', '.join(cancelled)}" if cancelled else "no stale locks")


def _db_error_line(exc: Exception) -> str:
    from orchestrator.controller_service import state_db_error_line

    return state_db_error_line(exc)


def main() -> None:
    """Entry point: run the app; turn errors into one line and an exit code."""
    from orchestrator.errors import SortieError

    os.umask(0o077)  # issue 17: what Sortie writes (state DB, logs, keys, sandboxes) is its user's alone
    try:
        app()  # usage errors and --help exit here, with click's own messages and codes
    except SortieError as exc:
        from rich.markup import escape

        get_console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}", markup=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("SORTIE_DEBUG"):
            raise
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(exc, SQLAlchemyError):  # one line, never the SQL and its parameters
            get_console(stderr=True).print(f"error: {_db_error_line(exc)}", markup=False, highlight=False)
            sys.exit(1)
        get_console(stderr=True).print(f"error: unexpected {type(exc).__name__}: {exc} "
                                    "(set SORTIE_DEBUG=1 for the traceback)")
        sys.exit(1)

if __name__ == "__main__":
    main()
