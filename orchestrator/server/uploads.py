"""Uploads of a launch's workdir and local file mounts (issue 23): the client sends each local source as a gzipped tar
(`POST /api/v1/uploads`), the server keeps it under `<home>/api/uploads/<user>/<id>/content` and the pipeline names it
`upload:<id>`. Bounded (api.max_body_mb); a body cut off, over the bound or not a clean tar leaves nothing behind; the
archive is unpacked with tarfile's `data` filter (no absolute paths, no `..`, no links out, no devices). A pipeline
from a client may name no other local path: a server path is never a user's to read."""

from __future__ import annotations

import re
import secrets
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UsageError

if TYPE_CHECKING:
    from orchestrator.auth.identity import Identity
    from orchestrator.spec import Pipeline

UPLOAD = re.compile(r"^upload:([0-9a-f]{32})$")


def uploads_root(home: Path, user: str) -> Path:
    return home / "api" / "uploads" / user


def new_upload_dir(home: Path, user: str) -> tuple[str, Path]:
    upload_id = secrets.token_hex(16)
    return upload_id, uploads_root(home, user) / upload_id


def unpack(archive: Path, target: Path) -> None:
    """Unpack into `target` (made here, complete or not at all)."""
    partial = target.with_name(target.name + ".partial")
    try:
        partial.mkdir(parents=True, mode=0o700)
        with tarfile.open(archive, "r:gz") as tar:
            names = tar.getnames()
            if not names or any(n != "content" and not n.startswith("content/") for n in names):
                raise UsageError("upload: the archive must hold one entry named content (a file or a directory)")
            tar.extractall(partial, filter="data")
        partial.rename(target)
    except (tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise UsageError(f"upload: not a clean gzipped tar ({type(exc).__name__}); nothing was kept") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _resolve(value: str, home: Path, user: str, field: str) -> str:
    match = UPLOAD.match(value)
    if match is None:
        raise UsageError(f"{field}: {value!r} is a path on the client; through the API server a local source is "
                         "uploaded (the CLI does it), and a server path may not be named")
    path = uploads_root(home, user) / match.group(1) / "content"
    if not path.exists():
        raise UsageError(f"{field}: upload {match.group(1)} is not on the server (expired or someone else's); "
                         "launch again")
    return str(path)


def server_paths(pipeline: Pipeline, home: Path, identity: Identity) -> Pipeline:
    """The pipeline with each `upload:<id>` replaced by its path on the server; any other local path refused."""
    from orchestrator.spec.task import is_bucket_url

    if identity.local:
        return pipeline
    tasks = []
    for index, task in enumerate(pipeline.tasks):
        prefix = f"tasks[{index}]." if len(pipeline.tasks) > 1 else ""
        update: dict[str, Any] = {}
        if isinstance(task.workdir, str):
            update["workdir"] = _resolve(task.workdir, home, identity.user, f"{prefix}workdir")
        if task.file_mounts:
            update["file_mounts"] = {dest: _resolve(src, home, identity.user, f"{prefix}file_mounts.{dest}")
                                     for dest, src in task.file_mounts.items()}
        for dest, mount in task.storage_mounts.items():
            source = mount.get("source")
            if isinstance(source, str) and not is_bucket_url(source):
                raise UsageError(f"{prefix}file_mounts.{dest}.source: a local directory into a bucket is not "
                                 "uploaded through the API server yet; upload it to the bucket first")
        tasks.append(task.model_copy(update=update) if update else task)
    return pipeline.model_copy(update={"tasks": tasks})


def forget_uploads(pipeline: Pipeline, home: Path, identity: Identity) -> None:
    """After the launch (staged or refused), its uploads go: the job's storage holds its own copy."""
    root = uploads_root(home, identity.user)
    for task in pipeline.tasks:
        sources = [task.workdir] if isinstance(task.workdir, str) else []
        for source in [*sources, *task.file_mounts.values()]:
            path = Path(source)
            if path.name == "content" and path.parent.parent == root:
                shutil.rmtree(path.parent, ignore_errors=True)


UPLOAD_TTL = 3600.0  # an upload no launch used (the user said no at the prompt) goes after this


def sweep(home: Path, user: str, now: float) -> None:
    root = uploads_root(home, user)
    if not root.is_dir():
        return
    for entry in root.iterdir():
        try:
            if now - entry.stat().st_mtime > UPLOAD_TTL:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue
