"""Policy, where a job group runs: every task of a group on one infra, as SkyPilot places a job group (its
documentation, "Current limitations": all tasks of a job group run on the same infrastructure, the same Kubernetes
cluster or cloud zone). Sortie's unit of "one infra" is a cloud and region (a Kubernetes context is a region here),
so the tasks can reach each other on one private network; each task's zone is its own builder's choice.

- At launch: the (cloud, region) pairs where every task's plan has an option; none is a one-line refusal.
- At placement: while another task of the group has a cluster (an attempt in progress), a task goes where that one
  is; otherwise to the shared infras, the cheapest for the whole group first (the sum of each task's cheapest
  option there). A task recovering (preempted, failed) stays within the same rule: where the others run, so a task
  that cannot find capacity there backs off there, and once out of patience fails to launch, which fails the group.

Pure: plans in, decisions out (`orchestrator.controller.jobs` and `orchestrator.launch_checks` call it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from orchestrator.policy.optimizer import Plan

Infra = tuple[str, str]  # (cloud, region)
# Issue 28: a group's tasks placed at once, at most (the others wait for one of these launches to be up); a group of
# 100 tasks made 190 attempts and 90 no-capacity events within minutes, placing everything at once.
GROUP_LAUNCHES_IN_FLIGHT = 8


def group_too_big(total_nodes: int, shared: Sequence[Infra], capacity: Callable[[str, str], int | None]) -> str | None:
    """Why a group needing `total_nodes` at once never runs (every shared infra holds fewer, as far as `capacity`
    knows: None is unbounded), else None."""
    rooms = [(capacity(cloud, region), f"{cloud}/{region}") for cloud, region in shared]
    if not rooms or any(room is None or room >= total_nodes for room, _ in rooms):
        return None
    most, where = max(rooms, key=lambda item: item[0] or 0)
    return (f"job group: its tasks need {total_nodes} nodes at once, and no infra where they may all run holds that "
            f"many (at most {most} on {where}); use fewer tasks or nodes, or raise local.regions[].capacity in "
            "config.yaml")


def infras_of(plan: Plan) -> dict[Infra, float]:
    """Each (cloud, region) a plan can use, with the cheapest cost per hour of its options there."""
    found: dict[Infra, float] = {}
    for option in plan.options:
        where = (option.offer.cloud, option.offer.region)
        found[where] = min(found.get(where, option.cost_per_hour), option.cost_per_hour)
    return found


def shared_infras(plans: Sequence[Plan]) -> list[Infra]:
    """The (cloud, region) pairs where every plan has an option, cheapest for all of them together first (ties:
    the order of the first plan's options)."""
    if not plans:
        return []
    per_plan = [infras_of(plan) for plan in plans]
    common = [where for where in per_plan[0] if all(where in found for found in per_plan[1:])]
    order = {where: i for i, where in enumerate(per_plan[0])}
    return sorted(common, key=lambda where: (round(sum(found[where] for found in per_plan), 6), order[where]))


def no_shared_infra(names: Sequence[str], plans: Sequence[Plan]) -> str:
    """The one line that says why no infra serves every task of a group, naming where each task could run (its
    first three infras in its plan's order)."""
    parts = []
    for name, plan in zip(names, plans, strict=True):
        where = [f"{cloud}/{region}" for cloud, region in infras_of(plan)]
        shown = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
        parts.append(f"{name}: {shown or 'nothing'}")
    return ("job group: no one infra (cloud and region) can serve every task (" + "; ".join(parts) + "); a job "
            "group's tasks run on the same infra, as in SkyPilot: give the tasks resources that one infra has")


def group_infras(plans: Mapping[int, Plan], pinned: Sequence[Infra]) -> list[Infra]:
    """Where a task of a group may be placed now: where the group's other tasks have clusters (`pinned`, the
    (cloud, region) of their attempts in progress), else every shared infra of the tasks still to run (`plans`,
    by task index), cheapest first."""
    if pinned:
        return list(dict.fromkeys(pinned))
    return shared_infras([plans[i] for i in sorted(plans)])
