"""Services, the service layer: the one way to change or read managed jobs. The CLI, the HTTP API and the dashboard all
go through it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.auth.identity import ForbiddenError, Identity, local_identity, os_user
from orchestrator.config import load_config, sortie_home
from orchestrator.errors import SortieError, UsageError
from orchestrator.job_logs import JobLogs, line_prefix, prefixed_lines
from orchestrator.job_status import JobStatus

if TYPE_CHECKING:
    from orchestrator.launch_plan import LaunchPlan
    from orchestrator.queue_rows import QueueRow
    from orchestrator.spec import Pipeline
    from orchestrator.storage.staging import StoragePlan
    from state.models import AttemptRow, EventRow, JobRow, StackRow, TaskRow
    from state.store import StateStore


MAX_NUM_JOBS = 10_000  # jobs one `launch --num-jobs N` submits (one transaction)


class UnknownJobError(SortieError):
    """No job matches the id or name given."""


def check_num_jobs(count: int) -> None:
    """`--num-jobs N`: 1 to MAX_NUM_JOBS."""
    if not 1 <= count <= MAX_NUM_JOBS:
        raise UsageError(f"--num-jobs must be between 1 and {MAX_NUM_JOBS}, got {count}")


current_user = os_user  # the OS user: whom local mode acts for


def job_details(job: JobRow, now: float | None = None) -> str:
    """Why a job waits (`no capacity in local/region-a; next try in 40s`) or why it failed."""
    if JobStatus(job.status).terminal:
        return job.failure_reason or ""
    now = now or time.time()
    text = job.waiting_reason or ""
    if job.next_attempt_at and job.next_attempt_at > now:
        retry = f"next try in {job.next_attempt_at - now:.0f}s"
        text = f"{text}; {retry}" if text else retry
    return text


@dataclass(frozen=True)
class JobSummary:
    job: JobRow
    tasks: list[TaskRow]


@dataclass(frozen=True)
class JobPage:
    """One page of jobs matching a filter, the number matching in all, and each job's cost so far."""

    items: list[JobSummary]
    total: int
    costs: dict[int, float]


@dataclass(frozen=True)
class JobDetail:
    job: JobRow
    tasks: list[TaskRow]
    attempts: list[tuple[AttemptRow, float]]  # each with its cost
    events: list[EventRow]
    stacks: list[StackRow]
    cost: float
    details: str


@dataclass(frozen=True)
class ControllerStatus:
    running: bool
    pid: int | None
    version: str | None
    uptime: float | None
    jobs_in_progress: dict[str, int]
    stack_operations: int
    backend: str


class LogCursor:
    """Reads the complete lines added to a job's log files since the last read, prefixed. `read()` returns
    them and sets `ended` once the job had ended before the read (so nothing copied later is missed)."""

    def __init__(self, service: JobService, job: JobRow, sources: Callable[[], list[tuple[Path, str]]]) -> None:
        self.service, self.job, self.sources = service, job, sources
        self.offsets: dict[Path, int] = {}
        self.carries: dict[Path, bytes] = {}
        self.ended = False

    def position(self) -> dict[str, int]:
        """Where the next read starts, per file (relative to the home): a reader that reconnects (`jobs logs`
        over HTTP, after a server restart) resumes here, an unfinished line read again in full."""
        home = self.service.home
        return {str(p.relative_to(home)) if p.is_relative_to(home) else str(p): n - len(self.carries.get(p, b""))
                for p, n in self.offsets.items()}

    def seek(self, position: dict[str, int]) -> None:
        for path, _ in self.sources():
            key = str(path.relative_to(self.service.home)) if path.is_relative_to(self.service.home) else str(path)
            if key in position:
                self.offsets[path] = max(0, int(position[key]))

    def read(self, follow: bool = True) -> list[str]:
        row = self.service.store.job(self.job.id)
        ended = row is None or JobStatus(row.status).terminal if follow else True
        out: list[str] = []
        for path, prefix in self.sources():
            offset = self.offsets.get(path, 0)
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
            self.offsets[path] = offset + len(data)
            lines, self.carries[path] = prefixed_lines(data, prefix, self.carries.get(path, b""))
            out += lines
        if ended:
            for path, tail in self.carries.items():
                if tail:
                    out.append(tail.decode(errors="replace"))
                    self.carries[path] = b""
            self.ended = True
        return out


class JobService:
    """`identity`: whom the service acts for; by default the OS user in local mode, who may do everything. The API
    server makes one per request with the authenticated user (`orchestrator.auth`)."""

    def __init__(self, home: Path | None = None, identity: Identity | None = None,
                 store: StateStore | None = None) -> None:
        self.identity = identity or local_identity()
        self.home = store.home if store is not None else (home or sortie_home())
        self.config = store.config if store is not None else load_config(self.home)
        self._store: StateStore | None = store  # the API server shares one store among its requests
        self.logs = JobLogs(self.home, self.config.controller.logs_dir)

    @property
    def store(self) -> StateStore:
        if self._store is None:
            from state.store import StateStore

            self._store = StateStore(self.home, self.config)
        return self._store

    # --- verbs ------------------------------------------------------------------------------------------

    def plan_storage(self, pipeline: Pipeline) -> StoragePlan:
        """What a launch of `pipeline` would upload and create, checked (sizes, stores, buckets named by URL
        existing); writes nothing."""
        from orchestrator.infra.clouds import enabled_clouds
        from orchestrator.policy.limits import num_nodes_problems
        from orchestrator.policy.run_options import task_problems
        from orchestrator.storage.staging import prepare
        from orchestrator.storage.stores import StorageError

        problems = [p for task in pipeline.tasks for p in task.unsupported_features()]
        problems += task_problems(pipeline.tasks, self.config.docker.allowed_run_options)
        problems += num_nodes_problems(pipeline.tasks, self.config, lambda: enabled_clouds(self.config))
        if problems:
            raise UsageError("; ".join(problems))
        try:
            return prepare(pipeline, self.config, self.home)
        except StorageError as exc:  # issue 28: a request refused before anything is written is a refusal (exit 2)
            raise UsageError(str(exc)) from None

    def plan_launch(self, pipeline: Pipeline, width: int = 80, workspace: str | None = None) -> LaunchPlan:
        """What `jobs launch` shows and checks before it submits: the considered resources (as text `width`
        columns wide), the refusals, a job group's infra, the files and buckets. Writes nothing."""
        from orchestrator.infra.clouds import enabled_clouds
        from orchestrator.launch_checks import group_infra, launch_refusals
        from orchestrator.launch_plan import LaunchPlan, considered_tables, infra_refusals, render

        enabled = enabled_clouds(self.config)  # once: the checks and the tables share it
        refusals = launch_refusals(pipeline, self.config, enabled)
        if not self.identity.local:
            chosen = self.identity.workspace_for(workspace, self.config)
            ws = self.config.workspaces.get(chosen or "")
            refusals += infra_refusals(pipeline, ws.allowed_infra if ws else None, chosen)
        tables = [render(item, width) for item in considered_tables(pipeline, self.config, enabled)
                  if not isinstance(item, str)]  # the reasons come once, in the refusals
        if refusals:
            return LaunchPlan(tables, refusals, None, [])
        shared = group_infra(pipeline, self.config, enabled)
        try:
            storage = self.plan_storage(pipeline)
        except SortieError as exc:  # shown after the tables, as before the plan moved here
            return LaunchPlan(tables, [], shared, [], storage_error=(str(exc), exc.exit_code))
        return LaunchPlan(tables, [], shared, storage.describe(), storage)

    def launch(self, pipeline: Pipeline, *, count: int = 1, start_controller: bool = True,
               progress: Callable[[str, int, int], None] | None = None,
               storage: StoragePlan | None = None, workspace: str | None = None) -> list[int]:
        """Submit a pipeline (one transaction for `count` copies), stage its files, and make sure the
        controller runs. Everything that can be checked is checked before anything is written: a bad
        store, a missing bucket or an upload over the limit submits nothing. `storage`: the plan from
        `plan_storage`, when the caller already made it."""
        from orchestrator.disk import check_home_space

        check_home_space(self.home)  # issue 17: a full home refuses launches with one line
        chosen = self.identity.workspace_for(workspace, self.config)
        if chosen is not None:
            from orchestrator.launch_plan import infra_refusals

            ws = self.config.workspaces.get(chosen)
            refused = infra_refusals(pipeline, ws.allowed_infra if ws else None, chosen)
            if refused:
                raise UsageError("; ".join(refused))
        plan = storage if storage is not None else self.plan_storage(pipeline)
        check_num_jobs(count)
        if not plan.empty and count != 1:
            raise UsageError("--num-jobs: a job with a workdir, file mounts or buckets is launched one at a time")
        if pipeline.is_job_group and count != 1:
            raise UsageError("--num-jobs: a job group (execution: parallel) is launched one at a time")
        if start_controller:
            from orchestrator.controller_service import check_controller

            check_controller(self.config)
        spec = {**pipeline.to_json(), "is_pipeline": pipeline.is_pipeline}
        ids = self.store.submit(spec, [dict(t.secrets) for t in pipeline.tasks], user=self.identity.user,
                                name=pipeline.name, count=count, staging=not plan.empty,
                                task_resources=[t.resources_str() for t in pipeline.tasks], workspace=chosen,
                                ranked=count > 1)
        self.audit("launch", f"job {ids[0]}" if count == 1 else f"jobs {ids[0]}-{ids[-1]}", chosen)
        if not plan.empty:
            self._stage(plan, ids[0], progress)
        if start_controller:
            from orchestrator.controller_service import ensure_controller

            ensure_controller(self.home)
        return ids

    def _stage(self, plan: StoragePlan, job_id: int, progress: Callable[[str, int, int], None] | None) -> None:
        """Upload the job's files and create its buckets. On any failure the job is FAILED_PRECHECKS and what
        was made is removed here, or else by the controller's storage reconciler."""
        from functools import partial

        from orchestrator.storage.staging import clean, named_buckets, stage
        from state.bucket_refs import add_refs, release_refs

        add_refs(self.store, job_id, named_buckets(plan))  # issue 17: before any bucket is made or used
        release = partial(release_refs, self.store, job_id)
        last_beat = [time.monotonic()]

        def beat(what: str, done: int, total: int) -> None:
            if time.monotonic() - last_beat[0] > 5:
                last_beat[0] = time.monotonic()
                self.store.staging_heartbeat(job_id)
            if progress:
                progress(what, done, total)

        recorded: dict[str, Any] = {}

        def record(storage: dict[str, Any]) -> None:
            recorded.update(storage)
            self.store.record_storage(job_id, storage)

        try:
            storage = stage(plan, job_id, self.config, self.home, record=record, progress=beat)
        except BaseException as exc:
            why = f"staging the job's files failed: {exc}" if isinstance(exc, SortieError) else (
                f"staging the job's files failed: {type(exc).__name__}: {exc}")
            self.store.fail_staging(job_id, why)
            try:
                self.store.storage_cleaned(job_id, clean(recorded, self.config, self.home, release))
            except Exception:  # the controller's storage reconciler retries
                from orchestrator.controller_service import ensure_controller

                ensure_controller(self.home)
            raise
        self.store.finish_staging(job_id, storage)  # False: cancelled meanwhile, and the storage janitor cleans up

    def audit(self, action: str, target: str, workspace: str | None = None, detail: str | None = None) -> None:
        """Behind the API server, an audit event naming the user and the request (local mode keeps none)."""
        if not self.identity.local:
            from state.user_transitions import Audit

            self.store.record_audit(Audit(self.identity.user, self.identity.request_id, workspace), action, target,
                                    detail)

    def readable(self, job: JobRow) -> JobRow:
        """A job whose logs and events the identity may read (its own, or any for an admin); 403 otherwise."""
        if not self.identity.owns(job):
            raise ForbiddenError(f"job {job.id} is {job.user}'s: only its owner or an admin may do that")
        return job

    def resolve(self, job_id: int | None = None, name: str | None = None) -> JobRow:
        """One job by id or by name; a name shared by several jobs is an error listing their ids. A job the identity
        may not see (another workspace's) is not found, as one that does not exist."""
        if job_id is not None:
            job = self.store.job(job_id)
            if job is None or not self.identity.can_see(job):
                raise UnknownJobError(f"no managed job with id {job_id}; see `sortie jobs queue -a`")
            return job
        if name is not None:
            jobs = [j for j in self.store.jobs_by_name(name) if self.identity.can_see(j)]
            if not jobs:
                raise UnknownJobError(f"no managed job named {name!r}; see `sortie jobs queue -a`")
            if len(jobs) > 1:
                ids = ", ".join(str(j.id) for j in jobs)
                raise UsageError(f"several managed jobs are named {name!r} (ids {ids}); give an id instead")
            return jobs[0]
        latest = self.store.list_jobs(limit=1, workspaces=self.identity.visible_workspaces())
        if not latest:
            raise UnknownJobError("there are no managed jobs yet; launch one with `sortie jobs launch`")
        return latest[0]

    def cancel(self, job_ids: list[int], who: str | None = None, *, task: str | None = None, graceful: bool = False,
               graceful_timeout: float | None = None) -> list[tuple[int, bool]]:
        """Request cancellation; (id, True) where it was requested, (id, False) where the job (or the task) had
        ended. `task` (an index or a name): in a job group, that task alone ends CANCELLED and the group goes on;
        in a pipeline, only its running task may be named (its later tasks depend on it), which cancels the
        pipeline as a plain cancel does. `graceful`: SIGTERM to the runs and their MOUNT_CACHED writes uploaded
        before the teardown, for `graceful_timeout` seconds at most (None: no limit)."""
        jobs = [self.readable(self.resolve(job_id)) for job_id in job_ids]
        targets = [(job.id, self.task_to_cancel(job, task) if task is not None else None) for job in jobs]
        results = []
        for job_id, index in targets:
            if index is False:
                results.append((job_id, False))
                continue
            results.append((job_id, self.store.request_cancel(
                job_id, who or self.identity.user, task_index=None if index is None else int(index), graceful=graceful,
                graceful_timeout=graceful_timeout)))
        for job_id, ok in results:
            if ok:
                self.audit("cancel", f"job {job_id}", next(j.workspace for j in jobs if j.id == job_id))
        if any(ok for _, ok in results):
            from orchestrator.controller_service import ensure_controller

            ensure_controller(self.home)
        return results

    @staticmethod
    def task_index(job: Any, task: str) -> int:
        """A task of the job by index or name; a one-line error naming its tasks otherwise."""
        names = [t.get("name") for t in job.spec["tasks"]]
        if task.isdigit() and int(task) < len(names):
            return int(task)
        if task in names:
            return names.index(task)
        known = ", ".join(f"{i} ({n})" if n else str(i) for i, n in enumerate(names))
        raise UsageError(f"job {job.id} has no task {task!r} (tasks: {known})")

    def task_to_cancel(self, job: Any, task: str) -> int | bool | None:
        """What `jobs cancel --task` cancels: a job group's task (its index); None for the whole job (a single task,
        or a pipeline's running task); False when that task already ended."""
        index = self.task_index(job, task)
        if job.spec.get("execution") == "parallel":
            return index
        if JobStatus(job.status).terminal or index < job.current_task:
            return False
        if index > job.current_task:
            raise UsageError(f"task {index} of job {job.id} has not started; a pipeline's tasks depend on the ones "
                             f"before, so cancel its running task {job.current_task} (or the job)")
        return None

    def active_ids(self, user: str | None = None) -> list[int]:
        return [j.id for j in self.store.list_jobs(active_only=True, user=user,
                                                   workspaces=self.identity.visible_workspaces())]

    def queue(self, *, all_jobs: bool = False, all_users: bool = False, skip_finished: bool = False,
              statuses: list[str] | None = None, limit: int | None = None) -> list[JobSummary]:
        """Newest first. By default: the current user's jobs in progress, and those finished in the last day."""
        jobs = self.store.list_jobs(statuses=statuses, user=None if all_users else self.identity.user,
                                    active_only=skip_finished, workspaces=self.identity.visible_workspaces())
        if not all_jobs and not statuses:
            recent = time.time() - 86400
            jobs = [j for j in jobs if not JobStatus(j.status).terminal or (j.ended_at or 0) >= recent]
        if limit:
            jobs = jobs[:limit]
        tasks = self.store.tasks([j.id for j in jobs])
        return [JobSummary(j, tasks[j.id]) for j in jobs]

    def queue_rows(self, *, all_jobs: bool = False, all_users: bool = False, skip_finished: bool = False,
                   statuses: list[str] | None = None, limit: int | None = None,
                   verbose: bool = False) -> list[QueueRow]:
        """`jobs queue`'s rows (the model both transports return)."""
        from orchestrator.queue_rows import queue_rows

        return queue_rows(self, all_jobs=all_jobs, all_users=all_users, skip_finished=skip_finished,
                          statuses=statuses, limit=limit, verbose=verbose)

    def endpoints(self, job_id: int) -> dict[str, str]:
        """The endpoints of a running job's ports (port -> address)."""
        from orchestrator.queue_rows import placement

        job = self.resolve(job_id)
        return dict(placement(self, [job.id], {job.id: job.spec})[job.id]["endpoints"])

    def events(self, job_id: int) -> list[Any]:
        self.readable(self.resolve(job_id))
        return self.store.events(job_id)

    # --- logs -------------------------------------------------------------------------------------------

    def log_cursor(self, job: JobRow, *, task: int | None = None, controller: bool = False) -> LogCursor:
        """A cursor over a job's logs (or its controller log), for readers that poll (the dashboard)."""
        self.readable(job)
        if controller:
            path = self.logs.controller_log(job.id)
            return LogCursor(self, job, lambda: [(path, "")] if path.exists() else [])
        tasks = job.spec["tasks"]

        def sources() -> list[tuple[Path, str]]:
            found = []
            for file in self.logs.files(job.id, task):
                spec = tasks[file.task_index] if file.task_index < len(tasks) else {}
                found.append((file.path, line_prefix(file.kind, spec.get("name") or job.name, file.rank,
                                                     int(spec.get("num_nodes", 1)))))
            return found

        return LogCursor(self, job, sources)

    def log_lines(self, job: JobRow, *, follow: bool, task: int | None = None,
                  interval: float = 0.5) -> Iterator[str]:
        """Lines of a job's logs, prefixed like SkyPilot's; with `follow`, until the job has ended and
        every byte the controller copied has been shown."""
        return self._follow(self.log_cursor(job, task=task), follow, interval)

    def controller_log_lines(self, job: JobRow, *, follow: bool, interval: float = 0.5) -> Iterator[str]:
        return self._follow(self.log_cursor(job, controller=True), follow, interval)

    @staticmethod
    def _follow(cursor: LogCursor, follow: bool, interval: float) -> Iterator[str]:
        """Complete lines of growing files; with `follow`, until the job ended, then any unfinished last lines."""
        while True:
            yield from cursor.read(follow)
            if cursor.ended:
                return
            time.sleep(interval)

    # --- reads for the dashboard (and scripts) ------------------------------------------------------------

    def page(self, *, statuses: list[str] | None = None, user: str | None = None, name: str | None = None,
             pool: str | None = None, search: str | None = None, offset: int = 0, limit: int = 50) -> JobPage:
        """Newest first, every user's jobs; filters combine; `total` counts every job matching them."""
        jobs, total = self.store.page_jobs(statuses=statuses, user=user, name=name, pool=pool, search=search,
                                           offset=offset, limit=limit)
        ids = [j.id for j in jobs]
        tasks = self.store.tasks(ids)
        return JobPage([JobSummary(j, tasks[j.id]) for j in jobs], total, self.store.costs(ids))

    def detail(self, job_id: int) -> JobDetail:
        job = self.resolve(job_id)
        now = time.time()
        attempts = [(a, self.store.attempt_cost(a, now)) for a in self.store.attempts(job_id)]
        return JobDetail(job, self.store.tasks([job_id])[job_id], attempts, self.store.events(job_id),
                         self.store.job_stacks(job_id), sum(c for _, c in attempts), job_details(job, now))

    def controller_status(self) -> ControllerStatus:
        from orchestrator.controller_service import controller_info
        from orchestrator.infra.engine import backend_url
        from state.db import safe_url

        info = controller_info(self.home)
        counts = {s: n for s, n in self.store.count_by_status().items() if not JobStatus(s).terminal}
        return ControllerStatus(info.running, info.pid, info.version, info.uptime if info.running else None,
                                counts, self.store.stacks_busy(), safe_url(backend_url(self.config, self.home)))
