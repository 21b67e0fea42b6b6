"""Services, where a job's logs live, and how they are read back.

The controller copies every node's output into the Sortie home as it grows, so logs outlive the
cluster: `logs/jobs/<job>/task-<t>/a<attempt>-<setup|run>-rank<r>.log` (raw bytes, append-only; a
file's size is how much was copied, which survives a controller restart). The controller's own
per-job log is `logs/jobs/<job>/controller.log`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

_RUN_FILE = re.compile(r"^a(\d+)-(setup|run)-rank(\d+)\.log$")


@dataclass(frozen=True)
class LogFile:
    task_index: int
    attempt: int
    kind: str  # setup | run
    rank: int
    path: Path

    @property
    def order(self) -> tuple[int, int, int, int]:
        return (self.task_index, self.attempt, 0 if self.kind == "setup" else 1, self.rank)


class JobLogs:
    def __init__(self, home: Path, root: str | None = None) -> None:
        """`root`: `controller.logs_dir` (replicas on several machines share one), else `<home>/logs/jobs`."""
        self.root = Path(root).expanduser().resolve() if root else home / "logs" / "jobs"

    def job_dir(self, job_id: int) -> Path:
        return self.root / str(job_id)

    def run_log(self, job_id: int, task_index: int, attempt: int, kind: str, rank: int) -> Path:
        return self.job_dir(job_id) / f"task-{task_index}" / f"a{attempt}-{kind}-rank{rank}.log"

    def controller_log(self, job_id: int) -> Path:
        return self.job_dir(job_id) / "controller.log"

    def note(self, job_id: int, line: str) -> None:
        path = self.controller_log(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line.rstrip()}\n")

    def append(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as fh:
            fh.write(data)

    def files(self, job_id: int, task_index: int | None = None) -> list[LogFile]:
        found = []
        for task_dir in sorted(self.job_dir(job_id).glob("task-*")):
            index = int(task_dir.name.split("-", 1)[1])
            if task_index is not None and index != task_index:
                continue
            for path in task_dir.iterdir():
                match = _RUN_FILE.match(path.name)
                if match:
                    found.append(LogFile(index, int(match[1]), match[2], int(match[3]), path))
        return sorted(found, key=lambda f: f.order)


def line_prefix(kind: str, task_name: str | None, rank: int, num_nodes: int, ip: str | None = None) -> str:
    """SkyPilot's prefixes: `(setup pid=...)`, `(name, pid=...)`; on several nodes `(head, rank=0, ...)`,
    `(worker1, rank=1, ..., ip=...)`. Sortie has no pid to show for a copied log, so it leaves it out."""
    if num_nodes <= 1:
        return "(setup) " if kind == "setup" else f"({task_name or 'task'}) "
    who = "head" if rank == 0 else f"worker{rank}"
    where = f", ip={ip}" if ip and rank else ""
    return f"({'setup ' if kind == 'setup' else ''}{who}, rank={rank}{where}) "


def prefixed_lines(data: bytes, prefix: str, carry: bytes = b"") -> tuple[list[str], bytes]:
    """Complete lines of `carry + data`, each prefixed, and the incomplete tail to carry over."""
    buf = carry + data
    *lines, tail = buf.split(b"\n")
    return [prefix + line.decode(errors="replace") for line in lines], tail
