"""Services, what `jobs launch` checks before it submits anything, as SkyPilot's launch does: a request nothing can
serve today (no enabled cloud has the hardware, or no offer can do a feature the task asks for) is refused with the
reason and exit non-zero, plain, `--dryrun` and `--dryrun --json` alike; nothing is submitted.

Job groups (`execution: parallel`) are planned like any YAML, but launching them waits for the controller to
run several tasks at once (`JOB_GROUPS_NOT_SUPPORTED`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from orchestrator.spec.documents import JOB_GROUPS_NOT_SUPPORTED

if TYPE_CHECKING:
    from orchestrator.config import SortieConfig
    from orchestrator.spec import Pipeline


def infeasible(pipeline: Pipeline, config: SortieConfig, enabled: Collection[str] | None = None) -> list[str]:
    """One line per task that no enabled cloud can serve (its unsupported features first), naming the task."""
    from orchestrator.policy.optimizer import plan_for

    problems: list[str] = []
    several = len(pipeline.tasks) > 1
    for index, task in enumerate(pipeline.tasks):
        prefix = f"task[{index}] ({task.name or '-'}): " if several else ""
        unsupported = task.unsupported_features()
        problems += [f"{prefix}{line}" for line in unsupported]
        if unsupported:
            continue
        plan = plan_for([c.to_json() for c in task.candidates()], task.num_nodes, config,
                        ordered=task.resources_ordered(), enabled=enabled)
        if plan.infeasible:
            problems.append(f"{prefix}No feasible resources: {plan.infeasible}")
    return problems


def launch_refusals(pipeline: Pipeline, config: SortieConfig, enabled: Collection[str] | None = None) -> list[str]:
    """Why `jobs launch` must not submit this pipeline; empty when it may."""
    problems = infeasible(pipeline, config, enabled)
    if pipeline.is_job_group:
        problems.append(JOB_GROUPS_NOT_SUPPORTED)
    return problems
