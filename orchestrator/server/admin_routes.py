"""`/api/v1/uploads`, `/api/v1/users` and `/api/v1/audit`: uploads for any user; users and the audit log for admins."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from orchestrator.auth.identity import ForbiddenError, Identity
from orchestrator.auth.users import Users
from orchestrator.errors import UsageError
from state.user_transitions import Audit

router = APIRouter(prefix="/api/v1")


def _admin(request: Request) -> tuple[Users, Audit]:
    me: Identity = request.state.identity
    if not me.admin:
        raise ForbiddenError(f"only an admin may manage users or read the audit log (your role: {me.role})")
    return Users(request.app.state.store, request.app.state.store.config), Audit(me.user, me.request_id)


@router.post("/uploads", tags=["jobs"])
async def upload(request: Request) -> dict[str, str]:
    """A gzipped tar holding one entry, `content` (a workdir or a file mount's source); returns its id for the
    pipeline (`upload:<id>`). Over the body limit or cut off: 413 or 400, and nothing is kept."""
    from orchestrator.server.uploads import new_upload_dir, sweep, unpack

    me: Identity = request.state.identity
    store = request.app.state.store
    limit: int = request.app.state.guard.max_body
    await run_in_threadpool(sweep, store.home, me.user, time.time())
    upload_id, target = new_upload_dir(store.home, me.user)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
    archive = Path(name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise UsageError(f"upload: over the server's limit of {limit // (1024 * 1024)} MiB "
                                     "(api.max_body_mb); nothing was kept")
                out.write(chunk)
        await run_in_threadpool(unpack, archive, target)
    except ClientDisconnect:
        raise UsageError("upload: cut off; nothing was kept") from None
    finally:
        archive.unlink(missing_ok=True)
    return {"upload": upload_id}


class UserIn(BaseModel):
    name: Annotated[str, Field(max_length=64)]
    role: Annotated[str, Field(max_length=16)] = "user"
    workspaces: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=100)] = []
    service_account: bool = False
    expires_in: Annotated[float | None, Field(gt=0, le=10 * 365 * 86400)] = None


@router.get("/users", tags=["users"])
def users_ls(request: Request) -> list[dict[str, Any]]:
    users, _ = _admin(request)
    return [u.__dict__ for u in users.list()]


@router.post("/users", tags=["users"])
def users_add(request: Request, body: UserIn) -> dict[str, str]:
    users, audit = _admin(request)
    token = users.add(body.name, role=body.role, workspaces=body.workspaces, service_account=body.service_account,
                      expires_in=body.expires_in, audit=audit)
    return {"name": body.name, "token": token}


@router.delete("/users/{name}", tags=["users"])
def users_rm(request: Request, name: Annotated[str, Field(max_length=64)]) -> dict[str, str]:
    users, audit = _admin(request)
    users.remove(name, audit)
    return {"name": name}


class RoleIn(BaseModel):
    role: Annotated[str, Field(max_length=16)]


@router.post("/users/{name}/role", tags=["users"])
def users_role(request: Request, name: Annotated[str, Field(max_length=64)], body: RoleIn) -> dict[str, str]:
    users, audit = _admin(request)
    users.set_role(name, body.role, audit)
    return {"name": name, "role": body.role}


class RotateIn(BaseModel):
    expires_in: Annotated[float | None, Field(gt=0, le=10 * 365 * 86400)] = None


@router.post("/users/{name}/token", tags=["users"])
def users_rotate(request: Request, name: Annotated[str, Field(max_length=64)], body: RotateIn) -> dict[str, str]:
    users, audit = _admin(request)
    return {"name": name, "token": users.rotate(name, audit, body.expires_in)}


@router.get("/audit", tags=["users"])
def audit(request: Request, limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> list[dict[str, Any]]:
    _admin(request)
    return [{"at": a.at, "user": a.user, "request_id": a.request_id, "action": a.action, "target": a.target,
             "workspace": a.workspace, "detail": a.detail} for a in request.app.state.store.audit_events(limit)]
