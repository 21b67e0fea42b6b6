"""Shared base, free space where Sortie writes (issue 17): a launch into a full `<home>` is refused with one line, and
`controller status` says when the home is full (the controller goes on driving what it can)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from orchestrator.errors import SortieError

MIN_FREE_BYTES = 64 * 1024 * 1024  # below this the home counts as full (the state DB, logs and stack state grow)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def home_space_problem(home: Path, need: int = MIN_FREE_BYTES) -> str | None:
    """One line when `home` has less than `need` bytes free, else None (also when it cannot be checked)."""
    try:
        free = free_bytes(home)
    except OSError:
        return None
    if free >= need:
        return None
    return (f"the Sortie home {home} is full ({free / (1024 * 1024):.1f} MiB free, at least "
            f"{need / (1024 * 1024):.0f} MiB needed); free some space there")


def check_home_space(home: Path) -> None:
    """Refuse (SortieError, one line) to start new work in a full home."""
    problem = home_space_problem(home)
    if problem is not None:
        raise SortieError(f"launch refused: {problem}")


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` (an OSError, or a database error wrapping one) means a full disk."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(getattr(exc, "orig", exc)).lower()
    return "disk is full" in text or "no space left" in text
