"""`/api/v1`: the CLI's verbs over HTTP. Each route makes the service for the request's identity (sharing the server's
one state store) and returns what the in-process service returns, as JSON; the service applies the rules (another
workspace's job: 404; another user's: 403; a user's `pool apply`: 403)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from orchestrator import __version__
from orchestrator.auth.identity import Identity
from orchestrator.pool_service import PoolService
from orchestrator.server import API_VERSION

router = APIRouter(prefix="/api/v1")
Name = Annotated[str, Field(max_length=255)]


def service(request: Request) -> PoolService:
    identity: Identity = request.state.identity
    return PoolService(identity=identity, store=request.app.state.store)


def job_json(job: Any) -> dict[str, Any]:
    """A job as the CLI needs it; `spec` has its secret values redacted (they are only in `secrets_enc`)."""
    return {"id": job.id, "name": job.name, "user": job.user, "workspace": job.workspace, "status": job.status,
            "spec": job.spec, "current_task": job.current_task, "failure_reason": job.failure_reason,
            "is_pipeline": bool(job.is_pipeline), "pool": job.pool, "submitted_at": job.submitted_at,
            "ended_at": job.ended_at}


@router.get("/health", tags=["meta"])
def health() -> dict[str, Any]:
    return {"status": "ok", "version": __version__, "api": API_VERSION}


@router.get("/info", tags=["meta"])
def info(request: Request) -> dict[str, Any]:
    """The server's version and who the token is: user, role, workspaces."""
    me: Identity = request.state.identity
    return {"version": __version__, "api": API_VERSION, "user": me.user, "role": me.role,
            "workspaces": list(me.workspaces)}


class PipelineIn(BaseModel):
    pipeline: dict[str, Any]
    workspace: Annotated[str | None, Field(max_length=64)] = None
    width: Annotated[int, Field(ge=20, le=1000)] = 80


def _pipeline(body: PipelineIn, request: Request) -> Any:
    from orchestrator.server.uploads import server_paths
    from orchestrator.spec import Pipeline

    pipeline = Pipeline.model_validate(body.pipeline)
    return server_paths(pipeline, request.app.state.store.home, request.state.identity)


@router.post("/jobs/plan", tags=["jobs"])
def plan(request: Request, body: PipelineIn) -> dict[str, Any]:
    """What `jobs launch` shows before it submits, and its refusals; writes nothing."""
    return service(request).plan_launch(_pipeline(body, request), body.width, body.workspace).to_json()


@router.post("/jobs", tags=["jobs"])
def launch(request: Request, body: PipelineIn) -> dict[str, Any]:
    """Submit a job (its workdir and file mounts uploaded first, `POST /uploads`); returns its id."""
    from orchestrator.server.uploads import forget_uploads

    pipeline = _pipeline(body, request)
    try:
        svc = service(request)
        ids = svc.launch(pipeline, workspace=body.workspace, start_controller=svc.config.api.start_controller)
    finally:
        forget_uploads(pipeline, request.app.state.store.home, request.state.identity)
    return {"ids": ids}


@router.get("/jobs/queue", tags=["jobs"])
def queue(request: Request, all_jobs: bool = False, all_users: bool = False, skip_finished: bool = False,
          status: Annotated[list[str], Query(max_length=32)] = [],  # noqa: B006
          limit: Annotated[int | None, Query(ge=1, le=1_000_000)] = None, verbose: bool = False) -> list[dict]:
    rows = service(request).queue_rows(all_jobs=all_jobs, all_users=all_users, skip_finished=skip_finished,
                                       statuses=status or None, limit=limit, verbose=verbose)
    return [r.to_json() for r in rows]


@router.get("/jobs/resolve", tags=["jobs"])
def resolve(request: Request, id: Annotated[int | None, Query(ge=1, le=2**53)] = None,
            name: Annotated[str | None, Query(max_length=255)] = None) -> dict[str, Any]:
    return job_json(service(request).resolve(id, name))


@router.get("/jobs/active", tags=["jobs"])
def active(request: Request, all_users: bool = False) -> list[int]:
    svc = service(request)
    return svc.active_ids(None if all_users else svc.identity.user)


class CancelIn(BaseModel):
    ids: Annotated[list[int], Field(max_length=10_000)]
    task: Annotated[str | None, Field(max_length=255)] = None
    graceful: bool = False
    graceful_timeout: Annotated[float | None, Field(ge=0)] = None


@router.post("/jobs/cancel", tags=["jobs"])
def cancel(request: Request, body: CancelIn) -> list[tuple[int, bool]]:
    return service(request).cancel(body.ids, task=body.task, graceful=body.graceful,
                                   graceful_timeout=body.graceful_timeout)


@router.get("/jobs/{job_id}/events", tags=["jobs"])
def events(request: Request, job_id: int) -> list[dict[str, Any]]:
    return [{"at": e.at, "task": e.task_index, "who": e.who, "what": e.what, "why": e.why, "data": e.data}
            for e in service(request).events(job_id)]


@router.get("/jobs/{job_id}/endpoints", tags=["jobs"])
def endpoints(request: Request, job_id: int) -> dict[str, str]:
    return service(request).endpoints(job_id)


@router.get("/jobs/{job_id}/logs", tags=["jobs"])
async def logs(request: Request, job_id: int, follow: bool = False, controller: bool = False,
               task: Annotated[int | None, Query(ge=0, le=10_000)] = None,
               cursor: Annotated[str | None, Query(max_length=65_536)] = None) -> StreamingResponse:
    """Newline-delimited JSON: `{"lines": [...], "cursor": {...}}` as lines are written, then `{"end": true}`.
    A client that lost the stream asks again with the last `cursor` and misses nothing."""
    svc = service(request)
    job = await run_in_threadpool(svc.resolve, job_id)
    reader = await run_in_threadpool(svc.log_cursor, job, task=task, controller=controller)
    if cursor:
        position = json.loads(cursor)
        await run_in_threadpool(reader.seek, {str(k): int(v) for k, v in position.items()})

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            lines = await run_in_threadpool(reader.read, follow)
            if lines or reader.ended:
                yield (json.dumps({"lines": lines, "cursor": reader.position()}) + "\n").encode()
            if reader.ended:
                yield b'{"end": true}\n'
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.3)

    return StreamingResponse(chunks(), media_type="application/x-ndjson")


# --- pools -------------------------------------------------------------------------------------------------


@router.get("/pools/{name}/jobs", tags=["pools"])
def pool_jobs(request: Request, name: Annotated[str, Field(max_length=63)]) -> list[int]:
    return service(request).pool_job_ids(name)


@router.get("/pools/{name}", tags=["pools"])
def pool(request: Request, name: Annotated[str, Field(max_length=63)]) -> dict[str, Any]:
    row = service(request).resolve_pool(name)
    return {"name": row.name, "status": row.status, "workspace": row.workspace, "workers": row.workers}


class PoolLaunchIn(BaseModel):
    pipeline: dict[str, Any]
    num_jobs: Annotated[int, Field(ge=1, le=10_000)] = 1


@router.post("/pools/{name}/launch", tags=["pools"])
def pool_launch(request: Request, name: Annotated[str, Field(max_length=63)], body: PoolLaunchIn) -> dict[str, Any]:
    """Jobs on a pool's workers (only `run` executes there; setup, workdir and file mounts are the pool's)."""
    from orchestrator.spec import Pipeline

    ids, notes = service(request).launch_on_pool(name, Pipeline.model_validate(body.pipeline), body.num_jobs)
    return {"ids": ids, "notes": notes}


class PoolApplyIn(BaseModel):
    pipeline: dict[str, Any]


@router.post("/pools/{name}/apply", tags=["pools"])
def pool_apply(request: Request, name: Annotated[str, Field(max_length=63)], body: PoolApplyIn) -> dict[str, Any]:
    """Admins only: apply a pool YAML (its plan made and applied at once)."""
    from orchestrator.infra.pulumi_driver import PulumiStackDriver
    from orchestrator.spec import Pipeline

    svc = service(request)
    svc.admin_only("pool apply")
    pipeline = Pipeline.model_validate(body.pipeline)
    driver = PulumiStackDriver(svc.home, svc.config)
    plan, new_hash = svc.plan(name, pipeline, driver)
    svc.apply(name, pipeline, plan, new_hash, driver=driver if plan.mode == "update" else None)
    return {"pool": name, "plan": plan.to_json()}


class NamesIn(BaseModel):
    names: Annotated[list[Annotated[str, Field(max_length=63)]], Field(max_length=1000)]
    cancel_jobs: bool = True


@router.post("/pools/down", tags=["pools"])
def pool_down(request: Request, body: NamesIn) -> list[str]:
    return service(request).down(body.names, cancel_jobs=body.cancel_jobs)
