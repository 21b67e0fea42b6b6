"""The JSON API under /api: what the pages show, for scripts too. Every read and change goes through
JobService / PoolService, as the CLI's do."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from orchestrator.dashboard import views
from orchestrator.job_status import JobStatus
from orchestrator.pool_service import PoolService, UnknownPoolError
from orchestrator.service import UnknownJobError

router = APIRouter(prefix="/api")
StatusName = StrEnum("StatusName", {s.value: s.value for s in JobStatus})  # type: ignore[misc]
JobId = Annotated[int, Path(ge=1, le=2**53, description="The job's id.")]
MAX_PAGE = 500
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such job, pool or stack."}}


def service_of(request: Request) -> PoolService:
    """The dashboard's own server: its one service. Folded into the API server (issue 23): a service acting for the
    request's identity, on the server's one state store."""
    identity = getattr(request.state, "identity", None)
    if identity is not None:
        return PoolService(identity=identity, store=request.app.state.store)
    return request.app.state.service


def job_page(service: PoolService, *, status: list[str], user: str | None, name: str | None, pool: str | None,
             q: str | None, offset: int, limit: int) -> views.JobsPageOut:
    page = service.page(statuses=status or None, user=user or None, name=name or None, pool=pool or None,
                        search=(q or "").strip() or None, offset=offset, limit=limit)
    return views.page_out(page, offset, limit)


def job_detail(service: PoolService, job_id: int) -> views.JobDetailOut:
    try:
        return views.detail_out(service.detail(job_id))
    except UnknownJobError as exc:
        raise HTTPException(404, str(exc)) from None


def pool_detail(service: PoolService, name: str) -> views.PoolOut:
    try:
        return views.pool_out(service.status(name)[0])
    except UnknownPoolError as exc:
        raise HTTPException(404, str(exc)) from None


@router.get("/health", tags=["meta"])
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/csrf", tags=["meta"])
def csrf(request: Request) -> dict[str, str]:
    """The token a browser-style POST sends in `X-CSRF-Token` (not needed with a bearer token)."""
    return {"csrf_token": request.app.state.guard.csrf}


@router.get("/status", tags=["controller"])
def status(request: Request) -> views.StatusOut:
    """Version, controller uptime, jobs in progress per status, stack operations under way, Pulumi backend."""
    return views.status_out(service_of(request).controller_status())


@router.get("/jobs", tags=["jobs"])
def list_jobs(request: Request,
              status: Annotated[list[StatusName], Query(description="Only these statuses (repeatable).")] = [],  # noqa: B006
              user: Annotated[str | None, Query(max_length=255)] = None,
              name: Annotated[str | None, Query(max_length=255, description="Exact job name.")] = None,
              pool: Annotated[str | None, Query(max_length=63)] = None,
              q: Annotated[str | None, Query(max_length=255, description="An id, or part of a name or user.")] = None,
              offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
              limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50) -> views.JobsPageOut:
    """Jobs of every user, newest first, one page at a time; `total` counts all jobs matching the filters."""
    return job_page(service_of(request), status=[s.value for s in status], user=user, name=name, pool=pool, q=q,
                    offset=offset, limit=limit)


@router.get("/jobs/{job_id}", tags=["jobs"], responses=NOT_FOUND)
def get_job(request: Request, job_id: JobId) -> views.JobDetailOut:
    """A job: its tasks, attempts (where, how they ended, cost), events, waiting reason and stacks."""
    return job_detail(service_of(request), job_id)


@router.post("/jobs/{job_id}/cancel", tags=["jobs"], responses=NOT_FOUND)
def cancel_job(request: Request, job_id: JobId) -> views.CancelOut:
    """Request the job's cancellation (CANCELLING, then CANCELLED); `requested` is false if it had ended."""
    try:
        ((_, requested),) = service_of(request).cancel([job_id], who="dashboard")
    except UnknownJobError as exc:
        raise HTTPException(404, str(exc)) from None
    return views.CancelOut(id=job_id, requested=requested)


@router.get("/jobs/{job_id}/logs", tags=["jobs"], responses=NOT_FOUND)
def job_logs(request: Request, job_id: JobId, controller: bool = False,
             tail: Annotated[int, Query(ge=1, le=100_000)] = 1000) -> views.LogOut:
    """The last `tail` lines written so far (the job's, or with `controller` its controller log)."""
    service = service_of(request)
    try:
        job = service.resolve(job_id)
    except UnknownJobError as exc:
        raise HTTPException(404, str(exc)) from None
    cursor = service.log_cursor(job, controller=controller)
    lines = cursor.read(follow=False)
    return views.LogOut(lines=lines[-tail:], ended=JobStatus(service.resolve(job_id).status).terminal)


@router.get("/jobs/{job_id}/logs/stream", tags=["jobs"], responses={
    **NOT_FOUND, 200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."}})
async def stream_logs(request: Request, job_id: JobId, controller: bool = False) -> StreamingResponse:
    """Server-sent events: `data:` a JSON list of new lines as they are written; `event: end` once the job has
    ended and every line was sent."""
    service = service_of(request)
    try:
        job = await run_in_threadpool(service.resolve, job_id)
    except UnknownJobError as exc:
        raise HTTPException(404, str(exc)) from None
    cursor = service.log_cursor(job, controller=controller)

    async def events() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        while True:
            lines = await run_in_threadpool(cursor.read)
            if lines:
                yield f"data: {json.dumps(lines)}\n\n"
            if cursor.ended:
                yield "event: end\ndata: {}\n\n"
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.4)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/users", tags=["jobs"])
def users(request: Request) -> list[str]:
    """Users with jobs (for the user filter)."""
    return service_of(request).store.job_users()


@router.get("/pools", tags=["pools"])
def pools(request: Request) -> list[views.PoolOut]:
    return [views.pool_out(s) for s in service_of(request).status()]


@router.get("/pools/{name}", tags=["pools"], responses=NOT_FOUND)
def pool(request: Request, name: Annotated[str, Path(max_length=63)]) -> views.PoolOut:
    """A pool: spec summary, autoscaling policy, workers (and their jobs), its latest jobs, the last apply's plan."""
    return pool_detail(service_of(request), name)


@router.get("/stacks/{name}", tags=["stacks"], responses=NOT_FOUND)
def stack(request: Request, name: Annotated[str, Path(max_length=255)]) -> views.StackOut:
    row = service_of(request).store.stack(name)
    if row is None:
        raise HTTPException(404, f"no stack named {name!r}")
    return views.stack_out(row)
