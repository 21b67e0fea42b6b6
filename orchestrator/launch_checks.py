"""Services, what `jobs launch` checks before it submits anything, as SkyPilot's launch does: a request nothing can
serve today (no enabled cloud has the hardware, or no offer can do a feature the task asks for) is refused with the
reason and exit non-zero, plain, `--dryrun` and `--dryrun --json` alike; nothing is submitted.

Job groups (`execution: parallel`) are planned like any YAML, and also refused when no one infra (cloud and region)
can serve every task, since a group's tasks run on the same infra; the controller runs their tasks at once.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.config import SortieConfig
    from orchestrator.spec import Pipeline


def infeasible(pipeline: Pipeline, config: SortieConfig, enabled: Collection[str] | None = None) -> list[str]:
    """One line per task that no enabled cloud can serve (its unsupported features first), naming the task."""
    from orchestrator.policy.group_placement import group_too_big, no_shared_infra, shared_infras
    from orchestrator.policy.limits import infra_capacity
    from orchestrator.policy.optimizer import plan_for

    problems: list[str] = []
    plans = []
    several = len(pipeline.tasks) > 1
    for index, task in enumerate(pipeline.tasks):
        prefix = f"task[{index}] ({task.name or '-'}): " if several else ""
        unsupported = task.unsupported_features()
        problems += [f"{prefix}{line}" for line in unsupported]
        if unsupported:
            continue
        plan = plan_for([c.to_json() for c in task.candidates()], task.num_nodes, config,
                        ordered=task.resources_ordered(), enabled=enabled)
        plans.append(plan)
        if plan.infeasible:
            problems.append(f"{prefix}No feasible resources: {plan.infeasible}")
    if pipeline.is_job_group and not problems:
        # A job group runs on one infra (orchestrator/policy/group_placement.py), every task at once: each task
        # feasible alone is not enough, nor an infra that never holds all of their nodes together (issue 28).
        shared = shared_infras(plans)
        if not shared:
            problems.append(no_shared_infra([t.name or str(i) for i, t in enumerate(pipeline.tasks)], plans))
        elif (too_big := group_too_big(sum(t.num_nodes for t in pipeline.tasks), shared,
                                       lambda cloud, region: infra_capacity(cloud, region, config))):
            problems.append(too_big)
    return problems


def launch_refusals(pipeline: Pipeline, config: SortieConfig, enabled: Collection[str] | None = None) -> list[str]:
    """Why `jobs launch` must not submit this pipeline; empty when it may."""
    from orchestrator.policy.run_options import task_problems

    return task_problems(pipeline.tasks, config.docker.allowed_run_options) + infeasible(pipeline, config, enabled)


def group_infra(pipeline: Pipeline, config: SortieConfig, enabled: Collection[str] | None = None) -> str | None:
    """Where a job group would run (`cloud/region`, the cheapest infra for the whole group), for `--dryrun`; None
    for a pipeline or a group nothing can serve."""
    from orchestrator.policy.group_placement import shared_infras
    from orchestrator.policy.optimizer import plan_for

    if not pipeline.is_job_group:
        return None
    plans = [plan_for([c.to_json() for c in task.candidates()], task.num_nodes, config,
                      ordered=task.resources_ordered(), enabled=enabled) for task in pipeline.tasks]
    found = shared_infras(plans)
    return f"{found[0][0]}/{found[0][1]}" if found else None
