"""Services, the HTTP transport (issue 23): a client of a Sortie API server's `/api/v1` with the methods of the
in-process `JobService` that the CLI calls, returning the same models, so every `sortie jobs ...` command prints
what it prints in local mode. The client home holds only the endpoint and a token (`sortie api login`)."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import ssl
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from orchestrator import __version__
from orchestrator.auth.identity import ForbiddenError, Identity, UnauthorizedError
from orchestrator.errors import SortieError, UsageError

if TYPE_CHECKING:
    from orchestrator.config import ApiConfig
    from orchestrator.launch_plan import LaunchPlan
    from orchestrator.queue_rows import QueueRow
    from orchestrator.spec import Pipeline

API_VERSION = 1
MAX_ANSWER = 256 * 1024 * 1024  # the most a JSON answer may be


class Unreachable(SortieError):
    """The server did not answer (down, restarting, or the network)."""


class ServerError(SortieError):
    """The server refused or failed a request; its one line, and the CLI's exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_endpoint(endpoint: str, insecure: bool) -> str:
    """The endpoint, checked: http(s) only; plain HTTP to a host not on loopback only with --insecure."""
    parts = urllib.parse.urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--endpoint {endpoint}: give a URL like https://sortie.example.com or http://127.0.0.1:46580")
    if parts.scheme == "http" and not loopback(parts.hostname) and not insecure:
        raise UsageError(f"--endpoint {endpoint}: plain HTTP to a host that is not loopback would send your token "
                         "in the clear; use https, or --insecure if you accept that")
    return endpoint.strip().rstrip("/")


def _job(data: dict[str, Any]) -> Any:
    return SimpleNamespace(**data)


class RemoteJobService:
    """The HTTP transport of the CLI's services."""

    def __init__(self, api: ApiConfig, *, timeout: float = 60.0) -> None:
        if not api.endpoint or not api.token:
            raise UsageError("no API server: run `sortie api login --endpoint URL --token TOKEN`")
        self.endpoint = check_endpoint(api.endpoint, api.insecure)
        self.token = api.token
        self.timeout = timeout
        self._identity: Identity | None = None
        self._uploaded: dict[str, str] = {}  # local source -> upload:<id>, for the plan and the launch
        cafile = os.environ.get("SORTIE_API_CA")  # a private CA's bundle (tests, self-signed servers)
        self._ssl = ssl.create_default_context(cafile=cafile) if self.endpoint.startswith("https") else None

    # --- the wire -----------------------------------------------------------------------------------------

    def _open(self, method: str, path: str, body: Any = None, *, raw: Any = None, length: int | None = None,
              timeout: float | None = None, headers: dict[str, str] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else raw
        request = urllib.request.Request(self.endpoint + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "X-Sortie-Version": __version__, "Accept": "application/json",
            **({"Content-Type": "application/json"} if body is not None else {}),
            **({"Content-Length": str(length)} if length is not None else {}), **(headers or {})})
        if data is None and method == "POST":
            request.data = b"{}"
            request.add_header("Content-Type", "application/json")
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout, context=self._ssl)
        except urllib.error.HTTPError as exc:
            raise self._refusal(exc) from None
        except urllib.error.URLError as exc:
            raise Unreachable(f"the API server at {self.endpoint} does not answer ({exc.reason}); see "
                              "`sortie api info`") from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise Unreachable(f"the API server at {self.endpoint} does not answer ({type(exc).__name__})") from None

    def _refusal(self, exc: urllib.error.HTTPError) -> SortieError:
        server = exc.headers.get("X-Sortie-Version") if exc.headers else None
        try:
            answer = json.loads(exc.read(65536) or b"{}")
        except (ValueError, OSError):
            answer = {}
        line = str(answer.get("detail") or exc.reason or f"HTTP {exc.code}").splitlines()[0]
        if exc.code == 404 and not exc.headers.get("X-Sortie-Api"):
            return ServerError(f"the server at {self.endpoint} (version {server or 'unknown'}) does not serve the "
                               f"Sortie API v{API_VERSION} of this client (version {__version__}); upgrade one")
        if exc.code == 401:
            return UnauthorizedError(line)
        if exc.code == 403:
            return ForbiddenError(line)
        if exc.code == 404:
            from orchestrator.service import UnknownJobError

            return UnknownJobError(line)
        return ServerError(line, int(answer.get("exit_code") or (2 if 400 <= exc.code < 500 else 1)))

    def call(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        if not self._identity and path != "/api/v1/info":
            self.identity  # noqa: B018 - checks the versions once, before the first verb
        items = [(k, v) for k, vs in query.items() for v in (vs if isinstance(vs, list) else [vs]) if v is not None]
        path += "?" + urllib.parse.urlencode([(k, str(v).lower() if isinstance(v, bool) else v) for k, v in items]) \
            if items else ""
        with self._open(method, path, body) as resp:
            return json.loads(resp.read(MAX_ANSWER) or b"null")

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            with self._open("GET", "/api/v1/info") as resp:
                server = resp.headers.get("X-Sortie-Version") or "unknown"
                data = json.loads(resp.read(65536))
            if data.get("api") != API_VERSION:
                raise ServerError(f"the server (version {server}, API v{data.get('api')}) and this client (version "
                                  f"{__version__}, API v{API_VERSION}) cannot talk to each other; upgrade one")
            self._identity = Identity(user=data["user"], role=data["role"], workspaces=tuple(data["workspaces"]))
            self.server_version = data["version"]
        return self._identity

    # --- uploads --------------------------------------------------------------------------------------------

    def _upload(self, source: str) -> str:
        if source in self._uploaded:
            return self._uploaded[source]
        path = Path(source)
        if not path.exists():
            raise UsageError(f"{source}: no such file or directory to upload")
        with tempfile.TemporaryFile() as archive:
            with tarfile.open(fileobj=archive, mode="w:gz") as tar:
                tar.add(path, arcname="content")
            size = archive.tell()
            archive.seek(0)
            with self._open("POST", "/api/v1/uploads", raw=archive, length=size,
                            headers={"Content-Type": "application/gzip"}, timeout=max(self.timeout, 600)) as resp:
                upload = "upload:" + json.loads(resp.read(65536))["upload"]
        self._uploaded[source] = upload
        return upload

    def _wire(self, pipeline: Pipeline) -> dict[str, Any]:
        """The pipeline as the server takes it: each local source (workdir, file mounts) uploaded and named by id."""
        tasks = []
        for task in pipeline.tasks:
            update: dict[str, Any] = {}
            if isinstance(task.workdir, str):
                update["workdir"] = self._upload(task.workdir)
            if task.file_mounts:
                update["file_mounts"] = {d: self._upload(s) for d, s in task.file_mounts.items()}
            tasks.append(task.model_copy(update=update) if update else task)
        return pipeline.model_copy(update={"tasks": tasks}).model_dump(mode="json")

    # --- the verbs the CLI calls ------------------------------------------------------------------------------

    def plan_launch(self, pipeline: Pipeline, width: int = 80, workspace: str | None = None) -> LaunchPlan:
        from orchestrator.launch_plan import LaunchPlan

        body = {"pipeline": self._wire(pipeline), "width": max(20, min(width, 1000)), "workspace": workspace}
        return LaunchPlan.from_json(self.call("POST", "/api/v1/jobs/plan", body))

    def launch(self, pipeline: Pipeline, *, progress: Callable[[str, int, int], None] | None = None,
               storage: Any = None, workspace: str | None = None, count: int = 1) -> list[int]:
        if count != 1:
            raise UsageError("through the API server, launch one job at a time")
        body = {"pipeline": self._wire(pipeline), "workspace": workspace}
        return [int(i) for i in self.call("POST", "/api/v1/jobs", body)["ids"]]

    def resolve(self, job_id: int | None = None, name: str | None = None) -> Any:
        return _job(self.call("GET", "/api/v1/jobs/resolve", id=job_id, name=name))

    def queue_rows(self, *, all_jobs: bool = False, all_users: bool = False, skip_finished: bool = False,
                   statuses: list[str] | None = None, limit: int | None = None,
                   verbose: bool = False) -> list[QueueRow]:
        from orchestrator.queue_rows import QueueRow

        rows = self.call("GET", "/api/v1/jobs/queue", all_jobs=all_jobs, all_users=all_users,
                         skip_finished=skip_finished, status=statuses or [], limit=limit, verbose=verbose)
        return [QueueRow.from_json(r) for r in rows]

    def active_ids(self, user: str | None = None) -> list[int]:
        return [int(i) for i in self.call("GET", "/api/v1/jobs/active", all_users=user is None)]

    def cancel(self, job_ids: list[int], who: str | None = None, *, task: str | None = None, graceful: bool = False,
               graceful_timeout: float | None = None) -> list[tuple[int, bool]]:
        body = {"ids": job_ids, "task": task, "graceful": graceful, "graceful_timeout": graceful_timeout}
        return [(int(i), bool(ok)) for i, ok in self.call("POST", "/api/v1/jobs/cancel", body)]

    def events(self, job_id: int) -> list[Any]:
        return [SimpleNamespace(at=e["at"], task_index=e["task"], who=e["who"], what=e["what"], why=e["why"],
                                data=e["data"]) for e in self.call("GET", f"/api/v1/jobs/{int(job_id)}/events")]

    def endpoints(self, job_id: int) -> dict[str, str]:
        return dict(self.call("GET", f"/api/v1/jobs/{int(job_id)}/endpoints"))

    def resolve_pool(self, name: str) -> Any:
        return _job(self.call("GET", f"/api/v1/pools/{urllib.parse.quote(name, safe='')}"))

    def launch_on_pool(self, pool: str, pipeline: Pipeline, num_jobs: int) -> tuple[list[int], list[str]]:
        """Only `run` goes to a pool's workers: the workdir and file mounts are not uploaded (the pool's are used)."""
        body = {"pipeline": pipeline.model_copy(update={"tasks": [t.model_copy(update={
            "workdir": None, "file_mounts": {}}) for t in pipeline.tasks]}).model_dump(mode="json"),
            "num_jobs": num_jobs}
        answer = self.call("POST", f"/api/v1/pools/{urllib.parse.quote(pool, safe='')}/launch", body)
        return [int(i) for i in answer["ids"]], [str(n) for n in answer["notes"]]

    def pool_job_ids(self, pool: str) -> list[int]:
        return [int(i) for i in self.call("GET", f"/api/v1/pools/{urllib.parse.quote(pool, safe='')}/jobs")]

    def log_lines(self, job: Any, *, follow: bool, task: int | None = None, interval: float = 0.5) -> Iterator[str]:
        return self._logs(job.id, follow=follow, task=task, controller=False)

    def controller_log_lines(self, job: Any, *, follow: bool, interval: float = 0.5) -> Iterator[str]:
        return self._logs(job.id, follow=follow, task=None, controller=True)

    def _logs(self, job_id: int, *, follow: bool, task: int | None, controller: bool,
              retry_for: float = 120.0) -> Iterator[str]:
        """The job's log lines; following, a stream cut (the server restarted) is resumed from the last cursor, for
        up to `retry_for` seconds of the server not answering."""
        cursor: dict[str, int] | None = None
        down_since: float | None = None
        while True:
            query = {"follow": follow, "controller": controller, "task": task,
                     "cursor": json.dumps(cursor) if cursor else None}
            items = [(k, str(v).lower() if isinstance(v, bool) else v) for k, v in query.items() if v is not None]
            path = f"/api/v1/jobs/{int(job_id)}/logs?" + urllib.parse.urlencode(items)
            try:
                with self._open("GET", path, timeout=3600) as resp:
                    down_since = None
                    for raw in resp:
                        chunk = json.loads(raw)
                        if chunk.get("end"):
                            return
                        yield from chunk["lines"]
                        cursor = chunk["cursor"]
            except (Unreachable, OSError, ValueError, http.client.HTTPException) as exc:
                if not follow:
                    if isinstance(exc, SortieError):
                        raise
                    raise Unreachable(f"the log stream from {self.endpoint} broke ({type(exc).__name__})") from None
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > retry_for:
                    raise SortieError(f"the API server at {self.endpoint} has not answered for {retry_for:.0f}s; "
                                      "`sortie jobs logs` again later") from None
                time.sleep(1.0)
                continue
            if not follow:
                return
            time.sleep(0.5)  # the stream ended without `end` (cut): ask again from the cursor
