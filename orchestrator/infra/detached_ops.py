"""Infra, stack operations that outlive the controller that started them.

Where this sits: under `PulumiStackDriver`, which runs each `up`, `destroy`, `refresh` or `remove` through
`DetachedOperations.run`. The worker (`python -m orchestrator.infra._stack_worker`) runs in a session of its own, so a
SIGKILL of the controller leaves it running; its request, identity and result live in `<ops>/<stack>/`:

    op.json        {"op": "up", "pid": 1234, "start": <the pid's start time in clock ticks>}
    request.pickle what to do (the worker reads it on stdin)
    result.pickle  ("ok", value) or ("error", exception), written by the worker at its end
    worker.log     the worker's own stderr (engine output goes to the stack's log)

A controller asking for an operation on a stack first looks there: the same operation still running is adopted
(waited for: its stack lock is alive, so nothing cancels it as stale); the same operation finished while no
controller was up hands over its result; a different operation still running is waited out first (it holds the
stack's lock). The pid is checked together with its start time, so a recycled pid is never taken for the worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.errors import StackOperationError

DETACHED_OPS = frozenset({"up", "destroy", "refresh", "remove"})
POLL_SECONDS = 0.1


def process_start(pid: int) -> int | None:
    """The start time of a live process (clock ticks since boot), None when there is none (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


Spawner = Callable[[Path], tuple[int, int]]  # the operation's folder -> the worker's (pid, start time)


class DetachedOperations:
    def __init__(self, root: Path, spawner: Spawner | None = None) -> None:
        self.root = root
        self.spawner = spawner  # a fork server (issue 26); without one, or when it fails, a fresh Python

    def _dir(self, stack: str) -> Path:
        return self.root / stack

    def _recorded(self, folder: Path) -> dict[str, Any] | None:
        try:
            return json.loads((folder / "op.json").read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(record: dict[str, Any]) -> bool:
        return process_start(int(record["pid"])) == record.get("start")

    def run(self, request: Any, env: dict[str, str], timeout: float | None, log_path: str) -> Any:
        """Run (or adopt) the operation and return its value; its error is raised."""
        folder = self._dir(request.stack)
        record = self._recorded(folder)
        deadline = None if timeout is None else time.monotonic() + timeout
        if record is not None and self._alive(record):
            self._wait(record, deadline, request, log_path)
            if record["op"] == request.op:
                return self._result(folder, request, log_path, adopted=True)
        elif record is not None and record["op"] == request.op and (folder / "result.pickle").exists():
            return self._result(folder, request, log_path, adopted=True)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "request.pickle").write_bytes(pickle.dumps(request))
        forked = self._fork(folder)
        if forked is not None:
            record = {"op": request.op, "pid": forked[0], "start": forked[1]}
            self._record(folder, record)
            try:
                self._wait(record, deadline, request, log_path)
            except StackOperationError:
                self._kill(forked[0])
                shutil.rmtree(folder, ignore_errors=True)
                raise StackOperationError(f"{request.op} of stack {request.stack} took longer than {timeout:.0f}s",
                                          request.stack, log_path) from None
            return self._result(folder, request, log_path, adopted=False, returncode=None)
        with (folder / "request.pickle").open("rb") as stdin, (folder / "worker.log").open("ab") as errors:
            proc = subprocess.Popen([sys.executable, "-m", "orchestrator.infra._stack_worker",
                                     str(folder / "result.pickle")],
                                    stdin=stdin, stdout=subprocess.DEVNULL, stderr=errors, env=env,
                                    start_new_session=True, close_fds=True)
        record = {"op": request.op, "pid": proc.pid, "start": process_start(proc.pid)}
        self._record(folder, record)
        try:
            proc.wait(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            self._kill(proc.pid)
            proc.wait()
            shutil.rmtree(folder, ignore_errors=True)
            raise StackOperationError(f"{request.op} of stack {request.stack} took longer than {timeout:.0f}s",
                                      request.stack, log_path) from None
        return self._result(folder, request, log_path, adopted=False, returncode=proc.returncode)

    def _fork(self, folder: Path) -> tuple[int, int] | None:
        if self.spawner is None:
            return None
        try:
            return self.spawner(folder)
        except OSError:  # no fork server: a fresh Python, as without one
            return None

    @staticmethod
    def _record(folder: Path, record: dict[str, Any]) -> None:
        tmp = folder / "op.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, folder / "op.json")

    def _wait(self, record: dict[str, Any], deadline: float | None, request: Any, log_path: str) -> None:
        """Until the worker (not this process's child) is gone: woken by its pidfd where there is one."""
        try:
            pidfd: int | None = os.pidfd_open(int(record["pid"]))
        except (AttributeError, OSError):
            pidfd = None
        try:
            while self._alive(record):
                if deadline is not None and time.monotonic() > deadline:
                    raise StackOperationError(f"{record['op']} of stack {request.stack} (pid {record['pid']}, left by "
                                              "an earlier controller) is still running", request.stack, log_path)
                if pidfd is not None:
                    select.select([pidfd], [], [], 1.0 if deadline is None else
                                  max(min(deadline - time.monotonic(), 1.0), 0.0))
                else:
                    time.sleep(POLL_SECONDS)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _result(self, folder: Path, request: Any, log_path: str, *, adopted: bool,
                returncode: int | None = None) -> Any:
        path = folder / "result.pickle"
        if not path.exists():
            tail = ((folder / "worker.log").read_text(errors="replace").strip().splitlines()[-1:]
                    if (folder / "worker.log").exists() else []) or ["no output"]
            shutil.rmtree(folder, ignore_errors=True)
            how = "an adopted worker" if adopted else f"worker process died with exit code {returncode}"
            raise StackOperationError(f"{request.op} of stack {request.stack}: {how}: {tail[0]}", request.stack,
                                      log_path)
        status, value = pickle.loads(path.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)
        if status == "error":
            raise value
        return value

    @staticmethod
    def _kill(pid: int) -> None:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)

    def running(self) -> list[tuple[str, dict[str, Any]]]:
        """Operations whose worker is alive now: (stack, record)."""
        found = []
        for folder in sorted(self.root.iterdir()) if self.root.exists() else []:
            record = self._recorded(folder)
            if record is not None and self._alive(record):
                found.append((folder.name, record))
        return found
