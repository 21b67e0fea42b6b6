"""The service layer: the one way to change or read managed jobs. The CLI, the HTTP API and the
dashboard all go through it."""

from __future__ import annotations

import getpass
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import load_config, sortie_home
from orchestrator.errors import SortieError, UsageError
from orchestrator.job_logs import JobLogs, line_prefix, prefixed_lines
from orchestrator.job_status import JobStatus

if TYPE_CHECKING:
    from orchestrator.spec import Pipeline
    from orchestrator.storage.staging import StoragePlan
    from state.models import JobRow, TaskRow
    from state.store import StateStore


class UnknownJobError(SortieError):
    """No job matches the id or name given."""


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@dataclass(frozen=True)
class JobSummary:
    job: JobRow
    tasks: list[TaskRow]


class JobService:
    def __init__(self, home: Path | None = None) -> None:
        self.home = home or sortie_home()
        self.config = load_config(self.home)
        self._store: StateStore | None = None
        self.logs = JobLogs(self.home)

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
        from orchestrator.storage.staging import prepare

        problems = [p for task in pipeline.tasks for p in task.unsupported_features()]
        if problems:
            raise UsageError("; ".join(problems))
        return prepare(pipeline, self.config, self.home)

    def launch(self, pipeline: Pipeline, *, count: int = 1, start_controller: bool = True,
               progress: Callable[[str, int, int], None] | None = None,
               storage: StoragePlan | None = None) -> list[int]:
        """Submit a pipeline (one transaction for `count` copies), stage its files, and make sure the
        controller runs. Everything that can be checked is checked before anything is written: a bad
        store, a missing bucket or an upload over the limit submits nothing. `storage`: the plan from
        `plan_storage`, when the caller already made it."""
        plan = storage if storage is not None else self.plan_storage(pipeline)
        if not plan.empty and count != 1:
            raise UsageError("a job with a workdir, file mounts or buckets is launched one at a time")
        spec = {**pipeline.to_json(), "is_pipeline": pipeline.is_pipeline}
        ids = self.store.submit(spec, [dict(t.secrets) for t in pipeline.tasks], user=current_user(),
                                name=pipeline.name, count=count, staging=not plan.empty,
                                task_resources=[t.resources_str() for t in pipeline.tasks])
        if not plan.empty:
            self._stage(plan, ids[0], progress)
        if start_controller:
            from orchestrator.controller.daemon import ensure_controller

            ensure_controller(self.home)
        return ids

    def _stage(self, plan: StoragePlan, job_id: int, progress: Callable[[str, int, int], None] | None) -> None:
        """Upload the job's files and create its buckets. On any failure the job is FAILED_PRECHECKS and what
        was made is removed here, or else by the controller's storage reconciler."""
        from orchestrator.storage.staging import clean, stage

        last_beat = [time.monotonic()]

        def beat(what: str, done: int, total: int) -> None:
            if time.monotonic() - last_beat[0] > 5:
                last_beat[0] = time.monotonic()
                self.store.update_job(job_id, staging_heartbeat=time.time())
            if progress:
                progress(what, done, total)

        recorded: dict[str, Any] = {}

        def record(storage: dict[str, Any]) -> None:
            recorded.update(storage)
            self.store.update_job(job_id, storage=storage)

        try:
            storage = stage(plan, job_id, self.config, self.home, record=record, progress=beat)
        except BaseException as exc:
            why = f"staging the job's files failed: {exc}" if isinstance(exc, SortieError) else (
                f"staging the job's files failed: {type(exc).__name__}: {exc}")
            self.store.fail_staging(job_id, why)
            try:
                clean(recorded, self.config, self.home)
                self.store.update_job(job_id, storage_cleaned_at=time.time())
            except Exception:  # the controller's storage reconciler retries
                from orchestrator.controller.daemon import ensure_controller

                ensure_controller(self.home)
            raise
        if not self.store.finish_staging(job_id, storage):  # cancelled meanwhile: the reconciler cleans up
            self.store.update_job(job_id, storage=storage, staging_heartbeat=None)

    def resolve(self, job_id: int | None = None, name: str | None = None) -> JobRow:
        """One job by id or by name; a name shared by several jobs is an error listing their ids."""
        if job_id is not None:
            job = self.store.job(job_id)
            if job is None:
                raise UnknownJobError(f"no managed job with id {job_id}; see `sortie jobs queue -a`")
            return job
        if name is not None:
            jobs = self.store.jobs_by_name(name)
            if not jobs:
                raise UnknownJobError(f"no managed job named {name!r}; see `sortie jobs queue -a`")
            if len(jobs) > 1:
                ids = ", ".join(str(j.id) for j in jobs)
                raise UsageError(f"several managed jobs are named {name!r} (ids {ids}); give an id instead")
            return jobs[0]
        latest = self.store.list_jobs(limit=1)
        if not latest:
            raise UnknownJobError("there are no managed jobs yet; launch one with `sortie jobs launch`")
        return latest[0]

    def cancel(self, job_ids: list[int], who: str | None = None) -> list[tuple[int, bool]]:
        """Request cancellation; (id, True) where it was requested, (id, False) where the job had ended."""
        for job_id in job_ids:
            self.resolve(job_id)
        results = [(job_id, self.store.request_cancel(job_id, who or current_user())) for job_id in job_ids]
        if any(ok for _, ok in results):
            from orchestrator.controller.daemon import ensure_controller

            ensure_controller(self.home)
        return results

    def active_ids(self, user: str | None = None) -> list[int]:
        return [j.id for j in self.store.list_jobs(active_only=True, user=user)]

    def queue(self, *, all_jobs: bool = False, all_users: bool = False, skip_finished: bool = False,
              statuses: list[str] | None = None, limit: int | None = None) -> list[JobSummary]:
        """Newest first. By default: the current user's jobs in progress, and those finished in the last day."""
        jobs = self.store.list_jobs(statuses=statuses, user=None if all_users else current_user(),
                                    active_only=skip_finished)
        if not all_jobs and not statuses:
            recent = time.time() - 86400
            jobs = [j for j in jobs if not JobStatus(j.status).terminal or (j.ended_at or 0) >= recent]
        if limit:
            jobs = jobs[:limit]
        tasks = self.store.tasks([j.id for j in jobs])
        return [JobSummary(j, tasks[j.id]) for j in jobs]

    def events(self, job_id: int) -> list[Any]:
        self.resolve(job_id)
        return self.store.events(job_id)

    # --- logs -------------------------------------------------------------------------------------------

    def log_lines(self, job: JobRow, *, follow: bool, task: int | None = None,
                  interval: float = 0.5) -> Iterator[str]:
        """Lines of a job's logs, prefixed like SkyPilot's; with `follow`, until the job has ended and
        every byte the controller copied has been shown."""
        tasks = job.spec["tasks"]

        def sources() -> list[tuple[Path, str]]:
            found = []
            for file in self.logs.files(job.id, task):
                spec = tasks[file.task_index] if file.task_index < len(tasks) else {}
                found.append((file.path, line_prefix(file.kind, spec.get("name") or job.name, file.rank,
                                                     int(spec.get("num_nodes", 1)))))
            return found

        return self._follow(job, sources, follow, interval)

    def controller_log_lines(self, job: JobRow, *, follow: bool, interval: float = 0.5) -> Iterator[str]:
        path = self.logs.controller_log(job.id)
        return self._follow(job, lambda: [(path, "")] if path.exists() else [], follow, interval)

    def _follow(self, job: JobRow, sources: Callable[[], list[tuple[Path, str]]], follow: bool,
                interval: float) -> Iterator[str]:
        """Complete lines of growing files, prefixed; with `follow`, until the job ended (read before the
        files, so the last pass holds everything copied before the end), then any unfinished last lines."""
        offsets: dict[Path, int] = {}
        carries: dict[Path, bytes] = {}
        while True:
            ended = JobStatus(self.store.job(job.id).status).terminal if follow else True  # type: ignore[union-attr]
            for path, prefix in sources():
                offset = offsets.get(path, 0)
                with path.open("rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
                offsets[path] = offset + len(data)
                lines, carries[path] = prefixed_lines(data, prefix, carries.get(path, b""))
                yield from lines
            if ended:
                for path, tail in carries.items():
                    if tail:
                        yield tail.decode(errors="replace")
                        carries[path] = b""
                return
            time.sleep(interval)
