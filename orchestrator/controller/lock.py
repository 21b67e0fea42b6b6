"""The controller's single-instance lock (issue 17, item 5).

An exclusive `flock` on `<home>/controller/controller.lock`, held open for the life of the process (never closed
before it exits, so in-flight work still holds it), and `controller.json` beside it naming the holder by pid
*and* process start time. A lock file deleted from under a live holder is not enough to start a second daemon:
the record still names a live process, and `acquire` refuses. The record is written (atomically) before the
lock counts as announced: `holder()` reports a pid only when that pid is alive with the recorded start time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

LOCK_NAME = "controller.lock"
RECORD_NAME = "controller.json"
_HELD: list[IO[str]] = []  # the open lock files of this process: never closed before it exits


def process_start_time(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22); None if it is gone (or a
    zombie: it has exited, only its parent has not collected it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        fields = stat[stat.rindex(")") + 2:].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (ValueError, IndexError):
        return None


def alive(pid: int | None, start_time: int | None) -> bool:
    """Whether `pid` runs and is the same process as when `start_time` was recorded (pids are reused)."""
    if not pid or start_time is None:
        return False
    return process_start_time(pid) == start_time


@dataclass(frozen=True)
class Holder:
    pid: int
    started_at: float
    version: str | None
    proc_start: int


def read_record(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / RECORD_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def holder(directory: Path) -> Holder | None:
    """The live controller of this directory, or None. Live means: its record names a running process with
    the recorded start time, and either the lock is held or the lock file was removed from under it."""
    data = read_record(directory)
    pid, proc_start = data.get("pid"), data.get("proc_start")
    recorded = alive(pid, proc_start) and pid != os.getpid()
    locked = _locked_by_other(directory / LOCK_NAME)
    if recorded and (locked or not _same_file_as_record(directory, data)):
        return Holder(int(pid or 0), data.get("started_at") or 0.0, data.get("version"), int(proc_start or 0))
    if locked:  # held, but its record is not written yet (or stale): running, pid unknown
        return Holder(0, 0.0, None, 0)
    return None


def _locked_by_other(path: Path) -> bool:
    if not path.exists():
        return False
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def _same_file_as_record(directory: Path, data: dict[str, Any]) -> bool:
    """Whether the lock file now on disk is the one the record's holder locked (same inode)."""
    try:
        return os.stat(directory / LOCK_NAME).st_ino == data.get("lock_inode")
    except OSError:
        return False


class LockHeld(Exception):
    """Another live controller holds this home."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"another controller (pid {pid}) runs for this home")
        self.pid = pid


def acquire(directory: Path, version: str, started_at: float | None = None, patience: float = 2.0) -> Holder:
    """Take the lock for this process and write the record; LockHeld when a live controller has it (even one
    whose lock file was deleted). The lock stays held until the process exits. A lock busy for less than
    `patience` seconds is tried again (`holder()` probes it for an instant)."""
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(directory, 0o700)
    deadline = time.monotonic() + patience
    while True:
        fh = (directory / LOCK_NAME).open("a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise LockHeld(read_record(directory).get("pid") or 0) from None
        try:
            same = os.fstat(fh.fileno()).st_ino == os.stat(directory / LOCK_NAME).st_ino
        except OSError:
            same = False
        if same:
            break
        fh.close()  # the file was replaced or removed while we opened it: take the one there now
    data = read_record(directory)
    other = data.get("pid")
    if other != os.getpid() and alive(other, data.get("proc_start")) and data.get("lock_inode") != \
            os.fstat(fh.fileno()).st_ino:
        fh.close()  # a live controller whose lock file was deleted from under it: it still runs
        raise LockHeld(int(other or 0))
    _HELD.append(fh)
    me = Holder(os.getpid(), started_at or time.time(), version, process_start_time(os.getpid()) or 0)
    record = {"pid": me.pid, "started_at": me.started_at, "version": version, "proc_start": me.proc_start,
              "lock_inode": os.fstat(fh.fileno()).st_ino}
    tmp = directory / f".{RECORD_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    os.chmod(tmp, 0o600)
    os.replace(tmp, directory / RECORD_NAME)
    return me


def mark_ready(directory: Path) -> None:
    """Say in this process's record that its start-up checks passed (whoever started it stops waiting)."""
    data = read_record(directory)
    if data.get("pid") != os.getpid():
        return
    tmp = directory / f".{RECORD_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**data, "ready": True}))
    os.chmod(tmp, 0o600)
    os.replace(tmp, directory / RECORD_NAME)


def release_record(directory: Path) -> None:
    """Remove the record if it is this process's (at the very end; the lock itself goes with the process)."""
    if read_record(directory).get("pid") == os.getpid():
        (directory / RECORD_NAME).unlink(missing_ok=True)


def wait_for_exit(pid: int, proc_start: int, timeout: float) -> bool:
    """Wait until the process `pid` (started at `proc_start`) has exited; False on timeout."""
    deadline = time.monotonic() + timeout
    while alive(pid, proc_start):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
