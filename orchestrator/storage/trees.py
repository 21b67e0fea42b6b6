"""Trees of files to and from buckets: scan (with `.skyignore`/`.gitignore`), upload, download, and the
write-back cache behind MOUNT_CACHED mounts."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from orchestrator.node.nofollow import Reader, open_dir, open_file, regular_files
from orchestrator.storage.ignore import IgnoreRules
from orchestrator.storage.stores import BucketURL, StorageError, Store, UploadTooLarge

WORKERS = 8  # files in flight at once; big files are also split into parts by the store


@dataclass(frozen=True)
class TreeStats:
    """How much a tree operation moved."""

    files: int
    bytes: int


def format_size(size: float) -> str:
    """A byte count for people: "512 B", "3.2 MiB", "1.0 GiB"."""
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


def scan_tree(src: Path, *, use_ignore_files: bool = True) -> list[tuple[str, Path, int]]:
    """(posix key, path, size) of every regular file under `src`, sorted by key; `src` itself (key: its name)
    when it is a file. Skips what `.skyignore` (or, without a top-level one, the `.gitignore` files) exclude.
    Symlinks are followed, into directories too, except those that loop back to a directory being walked."""
    src = Path(src).expanduser()
    try:
        top = src.stat()
    except FileNotFoundError:
        raise StorageError(f"{src} does not exist; fix the path") from None
    except OSError as exc:
        raise StorageError(f"cannot read {src}: {exc.strerror}") from None
    if stat.S_ISREG(top.st_mode):
        return [(src.name, src, top.st_size)]
    if not stat.S_ISDIR(top.st_mode):
        raise StorageError(f"{src} is neither a file nor a directory; point at a file or a directory")
    rules = IgnoreRules.for_tree(src, enabled=use_ignore_files)
    found: list[tuple[str, Path, int]] = []
    # (directory, its posix path under src, (dev, inode) of it and its ancestors)
    pending: list[tuple[Path, str, frozenset[tuple[int, int]]]] = [(src, "", frozenset({(top.st_dev, top.st_ino)}))]
    while pending:
        directory, rel_dir, ancestors = pending.pop()
        rules.enter(rel_dir, directory)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise StorageError(f"cannot read {directory}: {exc.strerror}; fix its permissions or ignore it") from None
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                info = os.stat(entry.path)  # follows symlinks
            except OSError:
                continue  # a broken symlink
            if stat.S_ISDIR(info.st_mode):
                ident = (info.st_dev, info.st_ino)
                if ident not in ancestors and not rules.excluded(rel, is_dir=True):
                    pending.append((Path(entry.path), rel, ancestors | {ident}))
            elif stat.S_ISREG(info.st_mode) and not rules.excluded(rel, is_dir=False):
                found.append((rel, Path(entry.path), info.st_size))
    found.sort(key=lambda item: item[0])
    return found


def _run_all(tasks: Iterable[tuple[Callable[[], None], int]], total: int,
             progress: Callable[[int, int], None] | None) -> TreeStats:
    """Run (call, size) tasks on a few threads; report progress as each completes; the first error cancels
    what has not started and is raised."""
    files = done = 0
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="sortie-transfer") as pool:
        futures: dict[Future[None], int] = {pool.submit(call): size for call, size in tasks}
        try:
            for future in as_completed(futures):
                future.result()
                files += 1
                done += futures[future]
                if progress is not None:
                    progress(done, total)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return TreeStats(files, done)


def upload_tree(store: Store, src: Path, dest: BucketURL, *, use_ignore_files: bool = True,
                max_bytes: int | None = None, progress: Callable[[int, int], None] | None = None,
                what: str = "upload") -> TreeStats:
    """Upload a directory's files to `dest.prefix/<key>` (a single file to `dest.prefix/<its name>`).
    Over `max_bytes` after the ignore files, raise UploadTooLarge before uploading anything. `what` names
    the upload in that message (e.g. "workdir"); `progress(bytes_done, bytes_total)` runs as files complete."""
    files = scan_tree(src, use_ignore_files=use_ignore_files)
    total = sum(size for _key, _path, size in files)
    if max_bytes is not None and total > max_bytes:
        after = " after .gitignore/.skyignore" if use_ignore_files else ""
        raise UploadTooLarge(f"{what} {src} is {format_size(total)}{after}, over the {format_size(max_bytes)} "
                             "limit (jobs.max_upload_mb); add a .skyignore or raise the limit")

    def put(key: str, path: Path) -> Callable[[], None]:
        return lambda: store.put_file(dest.bucket, dest.join(key).prefix, path)

    return _run_all(((put(key, path), size) for key, path, size in files), total, progress)


def _target(dest: Path, rel: str, key: str) -> Path:
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise StorageError(f"object key {key!r} does not name a file inside {dest}; rename or remove the object")
    return dest.joinpath(*parts)


def _download_dir(store: Store, src: BucketURL, objects: dict[str, int], dest: Path,
                  after: Callable[[str, Path], None] | None = None) -> TreeStats:
    """Download `objects` (listed under src.prefix) into dest/<key relative to the prefix>."""
    dest.mkdir(parents=True, exist_ok=True)
    start = len(src.prefix) + 1 if src.prefix else 0
    tasks: list[tuple[Callable[[], None], int]] = []
    for key, size in objects.items():
        if key == src.prefix or key.endswith("/"):  # the prefix itself, or a "directory marker"
            continue
        rel = key[start:]
        target = _target(dest, rel, key)

        def get(key: str = key, target: Path = target, rel: str = rel) -> None:
            try:
                store.get_file(src.bucket, key, target)
            except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
                raise StorageError(f"cannot write {target} for {src.join(rel)}: {exc.strerror}; a file and a "
                                   "directory of the same name collide") from None
            if after is not None:
                after(rel, target)

        tasks.append((get, size))
    return _run_all(tasks, sum(size for _get, size in tasks), None)


def download_tree(store: Store, src: BucketURL, dest: Path) -> TreeStats:
    """Download every object under `src` into dest/<key relative to src.prefix>. When src.prefix names exactly
    one object (not a "directory"), it is written at `dest` itself. Nothing there: an empty `dest` directory."""
    objects = store.list_objects(src.bucket, src.prefix)
    if src.prefix and list(objects) == [src.prefix]:
        store.get_file(src.bucket, src.prefix, dest)
        return TreeStats(1, objects[src.prefix])
    return _download_dir(store, src, objects, dest)


def scan_links_not_followed(root: Path, anchor: Path | None = None) -> dict[str, tuple[int, int]]:
    """{posix key: (mtime_ns, size)} of the regular files under the directory `root`, symlinks neither followed
    nor listed (a link, to a file or a directory, is nothing here), nor another filesystem entered."""
    try:
        top = open_dir(root, "", anchor)
    except OSError:
        return {}
    try:
        return {key: (st.st_mtime_ns, st.st_size) for key, st in regular_files(top)}
    finally:
        os.close(top)


class CachedSync:
    """A local directory that caches a bucket path (MOUNT_CACHED): `pull` fills it, `push` writes back the
    files new or changed since (by mtime and size).

    Symlinks in the directory are uploaded as nothing, and never followed (issue 17: the uploader may be root
    beside an unprivileged run): the scan lists regular files only, and each is opened again at upload time one
    directory at a time without following a link (from `anchor` down, when given: a node's sandbox), inside
    `reader` when given (the run user's filesystem identity, so a hard link to a file only root may read is
    refused too). What cannot be opened so is skipped, and tried again at the next push.

    Like a write-back cache, deletions are NOT propagated: a file removed locally stays in the bucket, and
    one removed from the bucket stays local until the directory is cleared. A file being written during a
    push is uploaded as it is then and again at the next push (its recorded state is taken before upload).
    With `state_file`, what was synced is remembered across processes.
    """

    def __init__(self, store: Store, url: BucketURL, local_dir: Path, state_file: Path | None = None,
                 anchor: Path | None = None, reader: Reader | None = None) -> None:
        self.store = store
        self.url = url
        self.local_dir = Path(local_dir)
        self.state_file = state_file
        self.anchor = anchor
        self.reader = reader or contextlib.nullcontext
        self._lock = threading.Lock()
        self._synced: dict[str, tuple[int, int]] = self._load()

    def _load(self) -> dict[str, tuple[int, int]]:
        if self.state_file is None or not self.state_file.exists():
            return {}
        try:
            data = json.loads(self.state_file.read_text())
            if data.get("url") != str(self.url):
                return {}
            return {key: (int(mtime), int(size)) for key, (mtime, size) in data["files"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # an unreadable state only costs re-uploads

    def _save(self) -> None:
        if self.state_file is None:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}.tmp")
        files = {key: list(value) for key, value in sorted(self._synced.items())}
        tmp.write_text(json.dumps({"url": str(self.url), "files": files}))
        os.replace(tmp, self.state_file)

    def _changed(self) -> tuple[set[str], list[tuple[str, Path, tuple[int, int]]]]:
        """The keys present locally, and (key, path, (mtime_ns, size)) of those new or changed since synced."""
        found = scan_links_not_followed(self.local_dir, self.anchor)
        changed = [(key, self.local_dir / key, sig) for key, sig in found.items() if self._synced.get(key) != sig]
        return set(found), changed

    def pull(self) -> TreeStats:
        """Download the bucket path's current contents; remember each file's (mtime_ns, size)."""
        with self._lock:
            objects = self.store.list_objects(self.url.bucket, self.url.prefix)
            pulled: dict[str, tuple[int, int]] = {}
            record_lock = threading.Lock()

            def record(rel: str, path: Path) -> None:
                info = path.stat()
                with record_lock:
                    pulled[rel] = (info.st_mtime_ns, info.st_size)

            stats = _download_dir(self.store, self.url, objects, self.local_dir, after=record)
            self._synced.update(pulled)
            self._save()
            return stats

    def pending(self) -> list[str]:
        """The keys `push` would upload now."""
        with self._lock:
            return [key for key, _path, _sig in self._changed()[1]]

    def push(self) -> TreeStats:
        """Upload the files new or changed since the last pull or push (deletions are not propagated)."""
        with self._lock:
            present, changed = self._changed()
            synced_lock = threading.Lock()
            sent: list[int] = []

            def put(key: str, path: Path, signature: tuple[int, int]) -> Callable[[], None]:
                def call() -> None:
                    try:
                        fd = open_file(self.local_dir, key, self.anchor, self.reader)
                    except OSError:
                        return  # a link, swapped in since the scan, or not the run's to read: nothing uploaded
                    try:
                        info = os.fstat(fd)
                        self.store.put_file(self.url.bucket, self.url.join(key).prefix, Path(f"/proc/self/fd/{fd}"))
                    finally:
                        os.close(fd)
                    with synced_lock:
                        self._synced[key] = (info.st_mtime_ns, info.st_size)
                        sent.append(info.st_size)
                return call

            try:
                _run_all(((put(key, path, sig), sig[1]) for key, path, sig in changed),
                         sum(sig[1] for _key, _path, sig in changed), None)
            finally:
                # Forget files gone locally, so one made again under the same name is uploaded.
                self._synced = {key: sig for key, sig in self._synced.items() if key in present}
                self._save()
            return TreeStats(len(sent), sum(sent))
