"""Job groups' rules (SkyPilot's `execution: parallel`), pure: which spec is a group, its primary tasks, which task
failed to launch (that fails the group), and the group's final status. The transitions (`state.transitions`) apply
them inside their transactions; the job reconciler reads them to decide what to stop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from state.machine import JobStatus


def is_group(spec: dict[str, Any]) -> bool:
    """A job group (SkyPilot's `execution: parallel`): every task at once, each on its own cluster."""
    return spec.get("execution") == "parallel"


def primary_indexes(spec: dict[str, Any]) -> list[int]:
    """The tasks whose end ends a job group (`primary_tasks`; all of them when unset)."""
    names = spec.get("primary_tasks") or []
    found = [i for i, t in enumerate(spec["tasks"]) if t.get("name") in names]
    return found or list(range(len(spec["tasks"])))


# A task that ends with one of these could not be launched (infeasible, refused by policy, no capacity until its
# patience ran out, at its first launch or a relaunch): SkyPilot fails the whole job group then.
LAUNCH_FAILURES = frozenset({JobStatus.FAILED_PRECHECKS, JobStatus.FAILED_NO_RESOURCE})


def launch_failure(spec: dict[str, Any], statuses: Sequence[tuple[str, str | None]]) -> tuple[int, str] | None:
    """(index, why) of the first task of a group that failed to launch, which fails the group; None if none."""
    for index, (status, reason) in enumerate(statuses):
        if status in LAUNCH_FAILURES:
            name = spec["tasks"][index].get("name") or str(index)
            return index, f"task {index} ({name}): {status}" + (f": {reason}" if reason else "")
    return None


def group_verdict(spec: dict[str, Any], statuses: Sequence[tuple[str, str | None]],
                  cancelled: bool) -> tuple[JobStatus, str | None]:
    """A job group's final status from its tasks' (status, failure_reason), in task order: SUCCEEDED when every
    primary task succeeded (auxiliary tasks, ended by the group, do not count); else, when a task (primary or not)
    failed to launch, its status and reason (the group failed with it, as in SkyPilot); else the status of the first
    primary task that failed, with its reason; else (a primary cancelled) CANCELLED. A cancel of the whole group:
    CANCELLED."""
    if cancelled:
        return JobStatus.CANCELLED, "cancelled by the user"
    primary = [(i, *statuses[i]) for i in primary_indexes(spec)]
    if all(status == JobStatus.SUCCEEDED for _, status, _ in primary):
        return JobStatus.SUCCEEDED, None
    failed = launch_failure(spec, statuses)
    if failed is not None:
        return JobStatus(statuses[failed[0]][0]), failed[1]
    names = [t.get("name") or str(i) for i, t in enumerate(spec["tasks"])]
    for index, status, reason in primary:
        if JobStatus(status).failed:
            return JobStatus(status), f"task {index} ({names[index]}): {status}" + (f": {reason}" if reason else "")
    index, status, _ = next(p for p in primary if p[1] != JobStatus.SUCCEEDED)
    return JobStatus.CANCELLED, f"task {index} ({names[index]}) was cancelled"


