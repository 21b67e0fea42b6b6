"""Empty lock directories of the file backend are pruned (issue 17, Low)."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.infra.backend_locks import prune_empty_lock_dirs


def test_empty_lock_dirs_go_and_held_locks_stay(tmp_path: Path) -> None:
    locks = tmp_path / ".pulumi" / "locks" / "organization" / "sortie"
    empty = [locks / f"sortie-job-{i}-t0-1" for i in range(5)]
    for path in empty:
        path.mkdir(parents=True)
    held = locks / "sortie-job-9-t0-1"
    held.mkdir()
    (held / "1234.json").write_text("{}")
    fresh = locks / "sortie-job-10-t0-1"
    for path in [*empty, held, locks, locks.parent]:
        os.utime(path, (0, 0))
    fresh.mkdir()  # made just now: an operation may be about to lock it
    assert prune_empty_lock_dirs(tmp_path) == 5
    assert held.exists() and fresh.exists() and not any(p.exists() for p in empty)
    (held / "1234.json").unlink()
    os.utime(held, (0, 0))
    fresh.rmdir()
    os.utime(locks, (0, 0))
    os.utime(locks.parent, (0, 0))
    assert prune_empty_lock_dirs(tmp_path) == 3  # held, then its project and org directories
    assert (tmp_path / ".pulumi" / "locks").is_dir()
