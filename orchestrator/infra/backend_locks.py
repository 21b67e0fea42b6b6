"""Infra, empty lock directories of the Pulumi file backend (issue 17, Low): each stack operation leaves
`.pulumi/locks/<org>/<project>/<stack>/` behind when its lock file goes; they are pruned after operations."""

from __future__ import annotations

import os
import time
from pathlib import Path

SETTLE_SECONDS = 60.0  # a directory younger than this may be one an operation is about to put its lock in


def prune_empty_lock_dirs(backend_dir: Path, settle: float = SETTLE_SECONDS) -> int:
    """Remove the empty directories under `<backend_dir>/.pulumi/locks` (deepest first, never `locks` itself)
    untouched for `settle` seconds. Returns how many went."""
    locks = backend_dir / ".pulumi" / "locks"
    if not locks.is_dir():
        return 0
    removed: set[Path] = set()
    now = time.time()
    for dirpath, dirs, files in sorted(os.walk(locks), key=lambda w: -w[0].count(os.sep)):
        path = Path(dirpath)
        if path == locks or files:
            continue
        emptied_by_us = bool(dirs) and all(path / d in removed for d in dirs)  # its mtime is ours, not a locker's
        try:
            if (emptied_by_us or now - path.stat().st_mtime >= settle) and not any(path.iterdir()):
                path.rmdir()
                removed.add(path)
        except OSError:  # filled or removed meanwhile
            continue
    return len(removed)
