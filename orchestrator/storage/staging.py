"""What a launch puts in object storage before the controller sees the job, and how it is cleaned up.

`prepare` reads a pipeline and decides, without writing anything: the local trees to upload (workdir and
local `file_mounts`, each once, sized after `.gitignore`/`.skyignore` and held to `jobs.max_upload_mb`), the
buckets the tasks mount (checked to exist when the YAML names an existing one), and where uploads go: the
intermediate bucket (`jobs.bucket`, else a temporary local-store bucket per launch) or, with
`jobs.force_disable_cloud_bucket`, the controller (the two-hop path: nodes get the files from the controller).

`stage` does the writes for one job id and returns the job's storage record: per task the steps that put
files on a node (`NodeStep`), and what to remove when the job ends (`cleanup`). The cleanup part is saved
before anything is uploaded, so a launch killed halfway still has everything it made removed.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from orchestrator.config import SortieConfig
from orchestrator.spec import Pipeline
from orchestrator.storage.stores import (
    BucketURL,
    LocalStore,
    StorageError,
    Store,
    UploadTooLarge,
    open_store,
    parse_bucket_url,
    store_kind,
)
from orchestrator.storage.trees import scan_tree, upload_tree

StepKind = Literal["copy", "mount", "cached", "push"]
DEFAULT_STORE = "local"
TWO_HOP_BUCKET = "uploads"  # <home>/jobs/<id>/uploads: the controller's copy of a two-hop job's files


@dataclass(frozen=True)
class NodeStep:
    """One thing to put on every node of a task, in order: `copy` a bucket path to `dest`, `mount` a bucket
    at `dest` (reads and writes go through), `cached` (MOUNT_CACHED: local writes uploaded in the background
    and before the task ends), or `push` a controller directory to `dest` (two-hop)."""

    dest: str
    kind: StepKind
    url: str | None = None
    path: str | None = None
    where: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in {"dest": self.dest, "kind": self.kind, "url": self.url, "path": self.path,
                                  "where": self.where}.items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeStep:
        return cls(dest=data["dest"], kind=data["kind"], url=data.get("url"), path=data.get("path"),
                   where=data.get("where", ""))


@dataclass(frozen=True)
class LocalTree:
    """A local file or directory that goes to the nodes through the intermediate bucket (or the controller)."""

    source: Path
    what: str          # the YAML path, for messages: "workdir", "file_mounts./data"
    folder: str        # under job-<id>/: "workdir", "local-file-mounts/0", "tmp-files/1"
    files: int
    bytes: int


@dataclass(frozen=True)
class BucketMount:
    """A bucket a task mounts: a bare URL (copied), or a storage object."""

    what: str
    dest: str
    url: BucketURL
    mode: str
    create: bool       # a storage object by name: made when missing (and then deleted at the end unless persistent)
    persistent: bool
    sources: tuple[Path, ...] = ()


@dataclass
class StoragePlan:
    trees: list[LocalTree] = field(default_factory=list)
    tasks: list[list[tuple[str, int | BucketMount]]] = field(default_factory=list)  # (dest, tree index | mount)
    intermediate: BucketURL | None = None     # None: two-hop through the controller
    temporary: bool = False

    @property
    def empty(self) -> bool:
        return not any(self.tasks)

    def describe(self) -> list[str]:
        """Lines for the launch summary."""
        where = (f"{self.intermediate}{' (temporary)' if self.temporary else ''}" if self.intermediate
                 else "the controller (two-hop)")
        lines = [f"{t.what}: {t.source} ({t.files} files, {human_bytes(t.bytes)}) -> {where}" for t in self.trees]
        for steps in self.tasks:
            lines += [f"{m.what}: {m.mode} {m.url}" + (" (created if missing)" if m.create else "")
                      for _, m in steps if isinstance(m, BucketMount)]
        return lines


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


# --- prepare: decide and check, write nothing ---------------------------------------------------------------

def _bucket_mount(what: str, dest: str, raw: dict[str, Any]) -> BucketMount:
    source = raw.get("source")
    mode = (raw.get("mode") or "MOUNT").upper()
    persistent = raw.get("persistent")
    name = raw.get("name")
    if isinstance(source, str) and "://" in source:
        url = parse_bucket_url(source)
        if raw.get("store") and store_kind(raw["store"]) != url.store:
            raise StorageError(f"{what}: store {raw['store']} does not match the source {source}")
        if name and name != url.bucket:
            raise StorageError(f"{what}: name {name!r} and source {source} name different buckets; give one")
        return BucketMount(what, dest, url, mode, create=False, persistent=True)
    kind = store_kind(raw["store"]) if raw.get("store") else DEFAULT_STORE
    if not name:
        raise StorageError(f"{what}: the bucket name is empty (an unset ${{VAR}} in name:?); give a name")
    url = parse_bucket_url(f"{kind}://{name}")
    sources = tuple(Path(s) for s in ([source] if isinstance(source, str) else (source or [])))
    return BucketMount(what, dest, url, mode, create=True, persistent=persistent is not False, sources=sources)


def _limit_bytes(config: SortieConfig) -> int:
    return int(config.jobs.max_upload_mb * 1024 * 1024)


def _tree(source: str, what: str, folder: str, limit: int) -> LocalTree:
    path = Path(source)
    if not path.exists():
        raise StorageError(f"{what}: local path {source} does not exist")
    try:
        found = scan_tree(path)
    except StorageError as exc:  # issue 17: name the field (and its line) that points there
        raise StorageError(f"{what}: {exc}") from None
    size = sum(item[2] for item in found)
    if size > limit:
        raise UploadTooLarge(f"{what} {source} is {human_bytes(size)} after .gitignore/.skyignore, over the "
                             f"{human_bytes(limit)} limit (jobs.max_upload_mb); add a .skyignore or raise the limit")
    return LocalTree(path, what, folder, len(found), size)


def intermediate_bucket(config: SortieConfig) -> tuple[BucketURL | None, bool]:
    """Where uploads go: (bucket URL with its prefix, temporary?); (None, False) for two-hop."""
    if config.jobs.force_disable_cloud_bucket:
        return None, False
    if config.jobs.bucket:
        return parse_bucket_url(config.jobs.bucket), False
    return BucketURL(DEFAULT_STORE, f"sortie-tmp-{secrets.token_hex(5)}"), True


def prepare(pipeline: Pipeline, config: SortieConfig, home: Path) -> StoragePlan:
    """Decide what a launch stages, and check it: sizes, stores, buckets named by URL existing."""
    plan = StoragePlan()
    limit = _limit_bytes(config)
    by_source: dict[tuple[str, bool], int] = {}

    def tree_index(source: str, what: str, kind: str) -> int:
        key = (source, kind == "workdir")
        if key not in by_source:
            count = sum(1 for t in plan.trees if not t.folder.startswith("workdir"))
            if kind == "workdir":
                workdirs = sum(1 for t in plan.trees if t.folder.startswith("workdir"))
                folder = "workdir" if workdirs == 0 else f"workdir-{workdirs}"
            else:
                folder = f"{'local-file-mounts' if Path(source).is_dir() else 'tmp-files'}/{count}"
            plan.trees.append(_tree(source, what, folder, limit))
            by_source[key] = len(plan.trees) - 1
        return by_source[key]

    stores: dict[str, Store] = {}
    for index, task in enumerate(pipeline.tasks):
        prefix = f"tasks[{index}]." if len(pipeline.tasks) > 1 else ""
        steps: list[tuple[str, int | BucketMount]] = []
        if isinstance(task.workdir, str):  # a git workdir ({url, ref}) is cloned by the node: nothing to upload
            steps.append((".", tree_index(task.workdir, pipeline.where(f"{prefix}workdir"), "workdir")))
        for dest, source in task.file_mounts.items():
            steps.append((dest, tree_index(source, pipeline.where(f"{prefix}file_mounts.{dest}"), "mount")))
        for dest, raw in task.storage_mounts.items():
            mount = _bucket_mount(f"{prefix}file_mounts.{dest}", dest, raw)
            for path in mount.sources:  # issue 28: checked as any upload is (a file or a directory, sized)
                _tree(str(path), mount.what, "", limit)
            if not mount.create:
                store = stores.setdefault(mount.url.store, open_store(mount.url.store, config.storage, home))
                if not store.bucket_exists(mount.url.bucket):
                    raise StorageError(f"{mount.what}: bucket {mount.url.bucket} does not exist in the "
                                       f"{mount.url.store} store; create it, or mount a storage object with "
                                       "name: to have Sortie create it")
            steps.append((dest, mount))
        plan.tasks.append(steps)
    if plan.trees:
        plan.intermediate, plan.temporary = intermediate_bucket(config)
    return plan


# --- stage: the writes, for one job ---------------------------------------------------------------------------

Progress = Callable[[str, int, int], None]


def two_hop_store(home: Path, job_id: int | str) -> LocalStore:
    return LocalStore(home / "jobs" / str(job_id))


def stage(plan: StoragePlan, job_id: int | str, config: SortieConfig, home: Path, *,
          record: Callable[[dict[str, Any]], None], progress: Progress | None = None) -> dict[str, Any]:
    """Upload and create what `plan` says for job `job_id` (a pool's apply passes `pool-<name>-<hash>`).
    `record` is called with the cleanup record before each write that needs cleaning up, so an interrupted
    stage is still cleaned. Returns the storage record."""
    cleanup: dict[str, list[str]] = {"prefixes": [], "buckets": [], "dirs": []}

    def note(kind: str, value: str) -> None:
        cleanup[kind].append(value)
        record({"staged": False, "cleanup": cleanup})

    store_cache: dict[str, Store] = {}

    def store_of(url: BucketURL) -> Store:
        if url.store not in store_cache:
            store_cache[url.store] = open_store(url.store, config.storage, home)
        return store_cache[url.store]

    tree_steps: list[NodeStep] = []
    if plan.trees and plan.intermediate is not None:
        base = plan.intermediate.join(f"job-{job_id}")
        store = store_of(base)
        if plan.temporary:
            note("buckets", str(BucketURL(base.store, base.bucket)))
            store.create_bucket(base.bucket)
        else:
            note("prefixes", str(base))
            if not store.bucket_exists(base.bucket):
                raise StorageError(f"jobs.bucket: bucket {base.bucket} does not exist in the {base.store} store; "
                                   "create it or remove jobs.bucket to use a temporary one")
        for tree in plan.trees:
            url = base.join(tree.folder)
            upload_tree(store, tree.source, url, what=tree.what,
                        progress=_tree_progress(progress, tree.what))
            tree_steps.append(NodeStep(".", "copy", url=str(url.join(tree.source.name) if tree.source.is_file()
                                                             else url)))
    elif plan.trees:
        local = two_hop_store(home, job_id)
        note("dirs", str(local.root))
        local.create_bucket(TWO_HOP_BUCKET)
        for tree in plan.trees:
            url = BucketURL("local", TWO_HOP_BUCKET, tree.folder)
            upload_tree(local, tree.source, url, what=tree.what,
                        progress=_tree_progress(progress, tree.what))
            folder = local.local_dir(TWO_HOP_BUCKET, tree.folder)
            assert folder is not None
            tree_steps.append(NodeStep(".", "push", path=str(folder / tree.source.name if tree.source.is_file()
                                                              else folder)))

    created: set[str] = set()
    tasks: list[list[dict[str, Any]]] = []
    for steps in plan.tasks:
        out: list[dict[str, Any]] = []
        for dest, item in steps:
            if isinstance(item, int):
                step = tree_steps[item]
                out.append(NodeStep(dest, step.kind, url=step.url, path=step.path,
                                    where=plan.trees[item].what).to_json())
                continue
            if item.create:
                _make_bucket(item, store_of(item.url), created, note)
                for source in item.sources:
                    target = item.url.join(source.name) if len(item.sources) > 1 else item.url
                    upload_tree(store_of(item.url), source, target, what=item.what,
                                progress=_tree_progress(progress, item.what))
            kind: StepKind = {"COPY": "copy", "MOUNT": "mount", "MOUNT_CACHED": "cached"}[item.mode]  # type: ignore
            out.append(NodeStep(dest, kind, url=str(item.url), where=item.what).to_json())
        tasks.append(out)
    return {"staged": True, "tasks": tasks, "cleanup": cleanup}


def _make_bucket(mount: BucketMount, store: Store, created: set[str],
                 note: Callable[[str, str], None]) -> None:
    key = str(BucketURL(mount.url.store, mount.url.bucket))
    if key in created or store.bucket_exists(mount.url.bucket):
        return
    if not mount.persistent:
        note("buckets", key)
    store.create_bucket(mount.url.bucket)
    created.add(key)


# --- cleanup: when the job has ended ------------------------------------------------------------------------------

def named_buckets(plan: StoragePlan) -> dict[str, bool]:
    """The buckets a plan mounts by name: what a job references in the state while it lives (`state.bucket_refs`),
    each `-> False`: the duty to delete one comes only from the job that made it (its cleanup record), so a bucket
    that existed before is never deleted, `persistent: false` or not."""
    found: dict[str, bool] = {}
    for steps in plan.tasks:
        for _dest, item in steps:
            if not isinstance(item, int) and item.create:
                found[str(BucketURL(item.url.store, item.url.bucket))] = False
    return found


def clean(storage: dict[str, Any], config: SortieConfig, home: Path,
          release: Callable[[list[str], Callable[[str], object]], list[str]] | None = None) -> list[str]:
    """Remove what a job's staging recorded: job prefixes in the intermediate bucket, temporary and
    non-persistent buckets Sortie created, two-hop directories. Idempotent. Returns what was removed.
    `release` (the job's `state.bucket_refs.release_refs`) says which of its buckets no other live job mounts:
    only those are deleted, by `release` itself under the buckets' locks (its second argument)."""
    cleanup = storage.get("cleanup") or {}
    removed: list[str] = []

    def delete_bucket(text: str) -> None:
        url = parse_bucket_url(text)
        open_store(url.store, config.storage, home).delete_bucket(url.bucket)

    if release is not None:  # deletes them itself, under the buckets' locks (issue 17: no window)
        removed += release(list(cleanup.get("buckets", [])), delete_bucket)
        cleanup = {**cleanup, "buckets": []}
    for text in cleanup.get("prefixes", []):
        url = parse_bucket_url(text)
        store = open_store(url.store, config.storage, home)
        if store.bucket_exists(url.bucket):
            store.delete_prefix(url.bucket, url.prefix)
        removed.append(text)
    for text in cleanup.get("buckets", []):
        delete_bucket(text)
        removed.append(text)
    for text in cleanup.get("dirs", []):
        shutil.rmtree(text, ignore_errors=True)
        removed.append(text)
    return removed


def _tree_progress(progress: Callable[[str, int, int], None] | None,
                   what: str) -> Callable[[int, int], None] | None:
    """One upload's progress, told as `progress(what, done, total)`."""
    if progress is None:
        return None
    return lambda done, total: progress(what, done, total)
