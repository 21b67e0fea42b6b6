"""What the end-to-end tests share: the real CLI against one Sortie home."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SORTIE = [sys.executable, "-m", "cli.main"]
ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"SUCCEEDED", "CANCELLED", "FAILED", "FAILED_SETUP", "FAILED_PRECHECKS", "FAILED_NO_RESOURCE",
            "FAILED_CONTROLLER"}


class Sortie:
    """The CLI against one Sortie home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "SORTIE_HOME": str(home), "COLUMNS": "200"}

    def run(self, *args: str, check: bool = True, timeout: float = 120,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*SORTIE, *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, input=input_text)
        if check and proc.returncode != 0:
            raise AssertionError(f"sortie {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def launch(self, *args: str) -> int:
        out = self.run("jobs", "launch", "-y", "-d", *args).stdout
        match = re.search(r"submitted: ID (\d+)", out)
        assert match, out
        return int(match.group(1))

    def job(self, job_id: int) -> dict:
        rows = json.loads(self.run("jobs", "queue", "-a", "--json").stdout)
        return next(r for r in rows if r["id"] == job_id)

    def wait(self, job_id: int, statuses: set[str] | None = None, timeout: float = 90) -> dict:
        statuses = statuses or TERMINAL
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout}s"
            time.sleep(0.3)

    def logs(self, job_id: int, *extra: str) -> str:
        return self.run("jobs", "logs", "--no-follow", str(job_id), *extra).stdout

    def wait_for_log(self, job_id: int, text: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.logs(job_id).count(text) < count:
            assert time.monotonic() < deadline, f"{text!r} x{count} never appeared:\n{self.logs(job_id)}"
            time.sleep(0.2)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def path_view_works() -> bool:
    """Whether local-cloud runs here see absolute upload and mount paths at those paths (mount namespaces)."""
    import tempfile

    from orchestrator.node.agent import probe_path_view

    with tempfile.TemporaryDirectory() as sandbox:
        return probe_path_view(Path(sandbox)) is not None


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a refused CLI command (non-zero exit, no traceback)."""
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr + out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]
