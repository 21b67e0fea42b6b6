"""CLI, the output side every command shares: the console, plain tables, log files, launch progress and the
job service (imported lazily, so `sortie --help` stays fast). Command modules import from here, never from each
other's helpers."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from rich.markup import escape

if TYPE_CHECKING:
    from pathlib import Path

    from orchestrator.pool_service import PoolService
    from orchestrator.service import JobService


def get_console(stderr: bool = False):
    """A Rich console (stdout, or stderr), imported only when a command prints."""
    from rich.console import Console

    # Plain text by default: names and paths are printed as they are, never read as markup.
    return Console(stderr=stderr, highlight=False, soft_wrap=True, markup=False)


def plain_table(columns: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: Rich's tables cost seconds at 10,000 rows, this costs milliseconds."""
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def job_service() -> JobService:
    """The CLI's services: in-process (local mode), or the HTTP transport when this home has logged in to an API
    server (`sortie api login`: `api.endpoint` in its config)."""
    from orchestrator.config import load_config

    config = load_config()
    if config.api.endpoint:
        from orchestrator.api_client import RemoteJobService

        return RemoteJobService(config.api)  # type: ignore[return-value]
    from orchestrator.service import JobService

    return JobService()


def pool_service() -> PoolService:
    from orchestrator.config import load_config

    config = load_config()
    if config.api.endpoint:
        from orchestrator.api_client import RemoteJobService

        return RemoteJobService(config.api)  # type: ignore[return-value]
    from orchestrator.pool_service import PoolService

    return PoolService()


def local_only(what: str) -> None:
    """A command that works on the state directly: refused in a home logged in to an API server."""
    from orchestrator.config import load_config
    from orchestrator.errors import UsageError

    if load_config().api.endpoint:
        raise UsageError(f"{what} runs on the server's home, not through the API server (this home is logged in "
                         "to one; `sortie api logout` to use a local state)")


def useful_commands(job_id: int) -> str:
    """What to do next with a launched job (the lines SkyPilot prints after a launch)."""
    return (f"Managed Job ID: {job_id}\n"
            "Useful Commands\n"
            f"├── To cancel the job:                sortie jobs cancel {job_id}\n"
            f"├── To stream job logs:               sortie jobs logs {job_id}\n"
            f"├── To stream controller logs:        sortie jobs logs --controller {job_id}\n"
            "└── To view all managed jobs:         sortie jobs queue")


class UploadProgress:
    """Progress of the uploads of a launch: a line per tenth of each large tree, and one when it is done."""

    LARGE = 8 * 1024 * 1024

    def __init__(self, console: Any) -> None:
        self.console = console
        self.shown: dict[str, int] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        from orchestrator.storage.staging import human_bytes

        tenth = 10 if total == 0 else done * 10 // total
        if self.shown.get(what, -1) >= tenth or (total < self.LARGE and tenth < 10):
            return
        self.shown[what] = tenth
        self.console.print(f"Uploading {escape(what)}: {human_bytes(done)} of {human_bytes(total)} ({tenth * 10}%)")


class InstallProgress:
    """Progress of a long install (an engine or plugin build: minutes): a spinner on a terminal; elsewhere (CI, a
    pipe) a line when the step changes and at least every `every` seconds, so a 6-minute build is never silent."""

    def __init__(self, console: Any, what: str, every: float = 15.0) -> None:
        self.console, self.what, self.every = console, what, every
        self.status: Any = None
        self.step, self.told = "", 0.0

    def __enter__(self) -> InstallProgress:
        if self.console.is_terminal:
            self.status = self.console.status(f"{self.what}: checking")
            self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)

    def __call__(self, message: str) -> None:
        import time

        if self.status is not None:
            self.status.update(f"{self.what}: {escape(message)}")
            return
        step, now = message.split(":", 1)[0], time.monotonic()
        if step != self.step or now - self.told >= self.every:
            self.step, self.told = step, now
            self.console.print(f"{self.what}: {escape(message)}", soft_wrap=True)


def job_details(job) -> str:
    """Why a job waits (`no capacity in local/region-a; next try in 40s`) or why it failed."""
    from orchestrator.service import job_details as details

    return details(job)


def print_log_file(path: Path, last: int | None, follow: bool) -> None:
    """The last `last` lines of a log file (None: all), then, with `follow`, what is appended to it."""
    import time
    from collections import deque

    with path.open(errors="replace") as fh:
        for line in deque(fh, maxlen=last):
            sys.stdout.write(line)
        sys.stdout.flush()
        while follow:
            line = fh.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.5)
