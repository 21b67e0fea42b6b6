"""Preemption notices (issue 24, section 6): a node's agent warned that its cloud takes the node back soon, so the
job reconciler starts the recovery now rather than when the node is gone.

The agent has already written the notice file and sent SIGTERM to the job's run (`orchestrator.node.notices`). Here,
for an attempt syncing, setting up or running: the notice is told in the job's events (once per controller), the
noticed node's run is given until a few seconds before the deadline to end (a job that checkpoints on SIGTERM does
it now), then the graceful-stop path of `jobs cancel --graceful` runs (the other nodes' runs stopped, the last log
lines copied, MOUNT_CACHED writes uploaded), and the attempt fails as PREEMPTED through the recovery policy: one
guarded transition (`begin_teardown`) with its events, as a lost node's does. Nothing new is written on the way:
a restarted controller sees the notice again (the agent's journal keeps it) and goes on from there.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Any

from orchestrator.controller.runs import run_id
from state.machine import Phase
from state.models import AttemptRow, JobRow

if TYPE_CHECKING:
    from orchestrator.controller.jobs import JobReconciler

NOTICE_PHASES = (Phase.SYNCING, Phase.SETTING_UP, Phase.RUNNING)
STOP_MARGIN = 6.0  # seconds before the deadline the graceful stop begins (the agent's cancel grace is 5 s)


def noticed(reconciler: JobReconciler, job: JobRow, attempt: AttemptRow) -> bool:
    """True when a node of the attempt gave a notice: the reconciler's step is this (wait, stop, or recover)."""
    if job.pool or attempt.phase not in NOTICE_PHASES:
        return False  # a pool job's worker is the pool's: its loss is handled as a worker's
    found = reconciler.ctx.notice(attempt.nodes)
    if found is None:
        return False
    node, notice = found
    deadline = float(notice.get("deadline") or time.time())
    when = dt.datetime.fromtimestamp(deadline, dt.UTC).strftime("%H:%M:%S UTC")
    why = f"preemption notice ({notice.get('source')}) for node {node['rank']}: the node goes at {when}"
    if attempt.id not in reconciler.noticed:
        reconciler.noticed.add(attempt.id)
        reconciler.store.add_event(job.id, "preemption-notice", why, task_index=attempt.task_index)
        reconciler.say(job, "preemption-notice", why + "; the job got SIGTERM, recovery starts now")
    if attempt.phase in (Phase.SETTING_UP, Phase.RUNNING) and not _stopped(reconciler, job, attempt, node, deadline):
        return True
    reconciler.noticed.discard(attempt.id)
    reconciler._node_trouble(job, attempt, why)
    return True


def _stopped(reconciler: JobReconciler, job: JobRow, attempt: AttemptRow, node: dict[str, Any],
             deadline: float) -> bool:
    """The noticed node's run ended (or the deadline is near), then the graceful stop is done; False meanwhile."""
    kind = "setup" if attempt.phase == Phase.SETTING_UP else "run"
    key = ("notice", attempt.id)
    if not reconciler.ctx.agent_ops.busy(key) and not reconciler.ctx.run_ended(node, run_id(kind, attempt)) \
            and time.time() < deadline - STOP_MARGIN:
        return False
    result = reconciler.ctx.agent_ops.ensure(key, reconciler._stop_runs, job, attempt)
    if result is None:
        return False
    reconciler.say(job, "stopped", f"task {attempt.task_index}: runs stopped before the preemption" +
                   (", MOUNT_CACHED writes uploaded" if result.ok and result.value else "") +
                   (f"; {result.error}" if not result.ok else ""))
    return True
