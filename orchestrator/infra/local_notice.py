"""Infra, the local cloud's preemption notices: `sortie local preempt --notice 30s` warns the node's agent (the
deadline in `<sandbox>/cloud-notice.json`, as a cloud's metadata says it), then takes the node back at the
deadline in a detached process of its own, so the command returns at once.

    python -m orchestrator.infra.local_notice ROOT NODE_ID CREATED_AT DEADLINE

The process preempts the node only if it is still the same node (its `created_at`) and not deleted meanwhile (the
controller tears a noticed node down before its deadline, usually); either way it exits after the deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import SortieError
from orchestrator.node.agent_files import write_json_atomic
from orchestrator.node.notices import LOCAL_NOTICE

if TYPE_CHECKING:
    from orchestrator.infra.local_cloud import LocalNode


def notify(root: Path, node: LocalNode, deadline: float) -> int:
    """Write the notice where the node's agent looks, and start the process that preempts at `deadline`;
    returns its pid."""
    write_json_atomic(Path(node.sandbox) / LOCAL_NOTICE, {"deadline": deadline})
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.infra.local_notice", str(root), node.node_id, repr(node.created_at),
         repr(deadline)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        close_fds=True, env={k: v for k, v in os.environ.items() if not k.startswith("SORTIE_AGENT")},
    )
    return proc.pid


def preempt_at(root: Path, node_id: str, created_at: float, deadline: float) -> bool:
    """Wait for the deadline, then preempt the node if it is still there; True if it was preempted."""
    from orchestrator.infra.local_cloud import LocalCloud

    cloud = LocalCloud(root)
    while time.time() < deadline:
        node = cloud.get(node_id)
        if node is None or node.created_at != created_at or node.preempted:
            return False
        time.sleep(min(0.2, max(deadline - time.time(), 0.0)))
    node = cloud.get(node_id)
    if node is None or node.created_at != created_at or node.preempted:
        return False
    try:
        cloud.preempt(node_id)
    except SortieError:  # deleted meanwhile
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    root, node_id, created_at, deadline = (argv or sys.argv[1:])[:4]
    preempt_at(Path(root), node_id, float(created_at), float(deadline))


if __name__ == "__main__":
    main()
