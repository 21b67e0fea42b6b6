"""Conditions a node reports without failing (issue 17): an agent that cannot write its records (a full disk)
says so in each run status; the job's DETAILS and events say so too, in one transaction, once per change."""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.controller.decide import NodeRun, no_space_note
from state.models import JobRow
from state.store import StateStore

NODE_ERROR_PREFIX = "node cannot write its records: "
DISK_FULL_REASON = "the node's disk is full"


def node_disk_full(details: str | None) -> bool:
    """Whether a job's DETAILS (set by `report_node_errors`) say that a node's disk is full."""
    return bool(details and details.startswith(NODE_ERROR_PREFIX) and "no space" in details)


def report_node_errors(store: StateStore, job: JobRow, nodes: Sequence[NodeRun]) -> bool:
    """Set (or clear) the job's DETAILS from what its nodes report, with an event in the same transaction.
    Guarded by the DETAILS it expects, so a repeated report writes nothing. True when something was written."""
    note = no_space_note([(n.rank, n.node_error) for n in nodes])
    current = job.waiting_reason or ""
    if note is None and any(n.state == "unreachable" for n in nodes):
        return False  # issue 28: a node that said its disk was full and went silent has not freed it

    if note is not None:
        wanted: str | None = NODE_ERROR_PREFIX + note
        what = "node-disk-full" if "no space" in note else "node-write-error"
    elif current.startswith(NODE_ERROR_PREFIX):
        wanted, what = None, "node-writes-again"
    else:
        return False
    if wanted == current:
        return False
    done = store.report_node_condition(job.id, job.current_task, expected=job.waiting_reason, wanted=wanted,
                                       what=what, why=wanted or "the nodes write their records again")
    if done:
        job.waiting_reason = wanted
    return done
