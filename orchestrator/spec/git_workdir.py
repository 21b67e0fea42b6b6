"""SkyPilot's `workdir: {url, ref}`: every node clones the repository into its workdir, at `ref`, before setup.

The clone is a few lines of shell put before the task's `setup` in its normalized form (`Task.to_json`), so it
runs wherever setup runs (each node of each attempt, after a recovery too) and needs nothing from the
controller. The node needs `git`; a private repository needs the node's own credentials (an SSH key or a
credential helper), never a token in the URL (the loader refuses one).
"""

from __future__ import annotations

import shlex
from typing import Any

MARK = "# sortie: workdir from git"


def clone_script(url: str, ref: str | None) -> str:
    """Shell that clones `url` into the current directory (which may already hold file mounts) at `ref`
    (a branch, tag or commit; default: the repository's default branch); a failure fails setup."""
    tmp = ".sortie-git-clone"
    target = shlex.quote(ref) if ref else "HEAD"
    return (f"{MARK}\n"
            f"if [ ! -e .git ]; then\n"
            f"  rm -rf {tmp} && git clone -q --no-checkout {shlex.quote(url)} {tmp} && mv {tmp}/.git . "
            f"&& rmdir {tmp} && git checkout -q -f {target} "
            "|| { echo 'sortie: cloning the git workdir failed' >&2; exit 1; }\n"
            "fi\n")


def with_clone(task: dict[str, Any]) -> dict[str, Any]:
    """The task (`Task.to_json()` shape) with the clone of its git workdir before its setup."""
    workdir = task.get("workdir")
    if not isinstance(workdir, dict) or str(task.get("setup") or "").startswith(MARK):
        return task
    script = clone_script(workdir["url"], workdir.get("ref"))
    return {**task, "setup": script + (task.get("setup") or "")}
