"""Paths resolved inside a root without following a symlink (issue 28): the one resolver of every bucket path
(the local store's objects and directories, MOUNT_CACHED's cached directory) and of every link target the node
agent accepts. Standard library only: the local-cloud agent imports it when a link names a target; the cloud
agent's zipapp leaves it out (a cloud node has no local-store directory to link to, and refuses a target).

The root itself is trusted (opened as named: the store's root, a node's sandbox); from there down each component
is opened with `openat(O_NOFOLLOW)`, one at a time, so a symlink anywhere below the root (in the middle of a path,
or swapped in for a directory between a check and a use) fails the call with ELOOP or ENOTDIR instead of leading
out. `.`, `..` and empty components are refused before anything is opened.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

Reader = Callable[[], contextlib.AbstractContextManager[object]]  # an identity to read a file as
NO_FOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split_key(key: str) -> list[str]:
    """The components of a posix path below a root ("" is the root itself); OSError(ENOENT) for `.` or `..`."""
    parts = [p for p in key.split("/") if p]
    for part in parts:
        if part in (".", ".."):
            raise OSError(errno.ENOENT, f"{key!r}: {part!r} is no name of an entry")
    return parts


def walk_down(fd: int, parts: list[str], create: int | None = None) -> int:
    """Open each directory of `parts` below the directory `fd` without following a symlink (ELOOP or ENOTDIR for
    one); with `create` (a mode), make those missing. Closes `fd`, returns the last one's descriptor."""
    try:
        for part in parts:
            if part in ("", ".", ".."):
                raise OSError(errno.ENOENT, f"{part!r} is no name of an entry")
            if create is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, create, dir_fd=fd)
            nxt = os.open(part, NO_FOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def parts_below(path: Path | str, root: Path | str) -> list[str] | None:
    """The components of the absolute `path` below `root`, compared as written (no link resolved, `..` refused);
    None when `path` is not `root` or under it."""
    text, top = os.path.normpath(str(path)), os.path.normpath(str(root))
    if ".." in str(path).split("/") or not text.startswith("/"):
        return None
    if text == top:
        return []
    if not text.startswith(top.rstrip("/") + "/"):
        return None
    return text[len(top.rstrip("/")) + 1:].split("/")


def open_dir(root: Path | str, rel: str | list[str] = "", anchor: Path | str | None = None,
             create: int | None = None) -> int:
    """A descriptor of the directory `root/rel`, nothing below `root` followed. With `anchor` (a directory the
    caller trusts, such as a node's sandbox) above `root`, nothing below the anchor is followed either."""
    parts = split_key(rel) if isinstance(rel, str) else list(rel)
    above = parts_below(root, anchor) if anchor is not None else None
    if anchor is not None and above is not None:
        return walk_down(os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), above + parts, create)
    if create is not None:
        Path(root).mkdir(parents=True, exist_ok=True)
    return walk_down(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), parts, create)


@contextlib.contextmanager
def opened_dir(root: Path | str, rel: str | list[str] = "", anchor: Path | str | None = None,
               create: int | None = None) -> Iterator[int]:
    """`open_dir` as a context that closes the descriptor."""
    fd = open_dir(root, rel, anchor, create)
    try:
        yield fd
    finally:
        os.close(fd)


def open_file(root: Path | str, key: str, anchor: Path | str | None = None,
              reader: Reader = contextlib.nullcontext) -> int:
    """A read descriptor of the regular file `root/key`, no symlink followed below `root` (nor below `anchor`):
    OSError for a link, a directory swapped for one, or anything but a regular file (opened non-blocking, so a
    FIFO swapped in never hangs the caller). The file itself is opened inside `reader` (an identity to read as:
    the directories above it are passed as the caller)."""
    *dirs, name = split_key(key) or [""]
    if not name:
        raise OSError(errno.EISDIR, f"{key!r} names no file")
    fd = open_dir(root, dirs, anchor)
    try:
        with reader():
            file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise OSError(errno.EISDIR, f"{key} is not a regular file")
    return file_fd


def readable_as(fd: int, reader: Reader) -> bool:
    """Whether the file open at `fd` may be opened by the identity `reader` (its permissions checked again,
    through /proc/self/fd: a hard link is the file it links to, whatever directory holds it)."""
    try:
        with reader():
            again = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(again)
    return True


def lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    """The entry `name` of the directory `dirfd`, not followed; None when it is not there."""
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def regular_files(top: int) -> Iterator[tuple[str, os.stat_result]]:
    """(posix key, lstat) of each regular file below the directory `top` (not closed), symlinks neither followed
    nor listed (a link, to a file or a directory, is nothing here), nor another filesystem entered."""
    device = os.fstat(top).st_dev
    for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
        rel = dirpath[2:] if dirpath.startswith("./") else ""
        keep = []
        for name in dirnames:
            st = _quiet_lstat(dirfd, name)
            if st is not None and stat.S_ISDIR(st.st_mode) and st.st_dev == device:
                keep.append(name)
        dirnames[:] = sorted(keep)
        for name in sorted(filenames):
            st = _quiet_lstat(dirfd, name)
            if st is not None and stat.S_ISREG(st.st_mode):
                yield (f"{rel}/{name}" if rel else name), st


def _quiet_lstat(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except OSError:
        return None


def open_under(target: str, roots: Iterable[Path | str]) -> int:
    """A descriptor of the directory `target`: an absolute path without `..`, one of `roots` or under one
    (compared as written, or with the root's own links resolved: a root is trusted), reached through no symlink
    below that root. PermissionError when it is under no root; OSError for a link or a missing directory."""
    candidates = {os.path.normpath(str(r)) for r in roots} | {os.path.realpath(r) for r in roots}
    for root in sorted(candidates, key=len, reverse=True):
        parts = parts_below(target, root)
        if parts is not None:
            return open_dir(root, parts)
    raise PermissionError(errno.EACCES, f"{target} is inside none of the roots {sorted(map(str, roots))}")
