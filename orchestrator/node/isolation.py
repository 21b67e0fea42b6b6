"""Node side, how far local-cloud jobs are kept apart on this machine (issue 17, item 8; containers: issue 28),
in words for `sortie check`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def local_isolation() -> tuple[bool, str]:
    """(whether runs are kept from the Sortie home here, one line saying what holds and what does not)."""
    from orchestrator.node.agent import probe_path_view

    with tempfile.TemporaryDirectory(prefix="sortie-probe-") as sandbox:
        works = probe_path_view(Path(sandbox)) is not None
    if works:
        hidden = ("runs get only their task's environment; the Sortie home (state DB, keys, logs) and other "
                  "nodes' sandboxes are hidden from them (mount namespaces); ")
        if os.geteuid() == 0 and os.environ.get("SORTIE_NO_RUN_USERS") != "1":
            return True, hidden + ("each node's runs, and each pool job on a worker, run as a user of their own "
                                   "(uid from 1900000000 up, an account sortie-<uid> while it lives, `sudo` refused) "
                                   "with a private /proc (hidepid): other jobs' processes and files are out of reach")
        why = "SORTIE_NO_RUN_USERS=1" if os.geteuid() == 0 else "Sortie does not run as root here"
        return True, hidden + (f"they run as your user ({why}), so processes of other jobs stay visible in /proc "
                               "(and their environment readable)")
    return False, ("NOT isolated: no mount namespaces here (or SORTIE_NO_MOUNT_NAMESPACE=1), so runs of local-cloud "
                   "jobs can read the Sortie home (state DB, secrets key) and other jobs' sandboxes; their "
                   "environment is still scrubbed. Run untrusted jobs on a cloud, or where unshare works")


def container_isolation(engine: str | None, allowed: Sequence[str] = ()) -> str:
    """One line saying what a container job (image_id: docker:...) on the local cloud can reach here; `engine`
    is the podman or docker found (None: none works), `allowed` the operator's docker.allowed_run_options."""
    if engine is None:
        return "none: no working podman or docker here, so image_id: docker:... cannot run on the local cloud"
    name = Path(engine).name
    if os.geteuid() == 0 and os.environ.get("SORTIE_NO_RUN_USERS") == "1":
        who = ("their processes are root (SORTIE_NO_RUN_USERS=1): root of this machine in every directory bound "
               "into them")
    elif os.geteuid() == 0:
        who = ("their processes run as their node's user (not root), with no capabilities and no way to gain any "
               "(no-new-privileges)")
    elif name == "docker":
        who = "their processes run as your user (docker's daemon is root: Sortie passes --user)"
    else:
        who = f"{name} runs them rootless: their root is your user"
    sees = ("they see their node's run directories (workdir, home, mounts), never the agent's logs and exit codes "
            "nor the Sortie home")
    options = ("config.docker.run_options that mount host paths or devices, add capabilities, share the host's "
               "namespaces or change the user are refused")
    if allowed:
        options += (f", except what docker.allowed_run_options allows ({', '.join(allowed)}): every task may use "
                    "those to reach past its container")
    return f"{who}; {sees}; {options}"
