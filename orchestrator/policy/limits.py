"""Policy, launch-time bounds that depend on the configuration (issue 17): `num_nodes` against `jobs.max_num_nodes` and
against what the chosen infra can hold (the local cloud's region capacities). Pure: a config and tasks in, one line
per problem out."""

from __future__ import annotations

from collections.abc import Callable, Collection

from orchestrator.config import SortieConfig
from orchestrator.spec.task import Task


def num_nodes_problems(tasks: list[Task], config: SortieConfig,
                       enabled: Callable[[], Collection[str]] | None = None) -> list[str]:
    """Why these tasks' `num_nodes` can never run here, one line each (empty: they can). `enabled`: the enabled
    clouds, asked only when a task names no cloud (a cloud's capacity is its own to refuse, at `up`)."""
    problems = []
    maximum = config.jobs.max_num_nodes
    for index, task in enumerate(tasks):
        where = f"task[{index}].num_nodes" if len(tasks) > 1 else "num_nodes"
        if task.num_nodes > maximum:
            problems.append(f"{where}: {task.num_nodes} is over jobs.max_num_nodes ({maximum}); use fewer nodes "
                            "or raise jobs.max_num_nodes in config.yaml")
            continue
        limits = [_local_capacity(c.cloud, c.region, config, enabled) for c in task.candidates()]
        if limits and all(limit is not None and limit < task.num_nodes for limit in limits):
            problems.append(f"{where}: {task.num_nodes} nodes never fit: the local cloud holds at most "
                            f"{max(lim for lim in limits if lim is not None)} at once where this task may run; use "
                            "fewer nodes, or raise local.regions[].capacity in config.yaml")
    return problems


def infra_capacity(cloud: str, region: str, config: SortieConfig) -> int | None:
    """The most nodes one infra holds at once, where Sortie knows it (a local region's capacity); None: unbounded,
    unknown (a cloud's quota is its own to refuse), or drained (capacity 0: jobs wait for it)."""
    if cloud != "local":
        return None
    found = [r.capacity for r in config.local.regions if r.name == region]
    return found[0] if found and found[0] else None


def _local_capacity(cloud: str | None, region: str | None, config: SortieConfig,
                    enabled: Callable[[], Collection[str]] | None) -> int | None:
    """The most nodes a candidate may get on the local cloud; None: unbounded (or not the local cloud's)."""
    if cloud not in (None, "local"):
        return None
    if cloud is None and (enabled is None or set(enabled()) - {"local"}):
        return None
    regions = [r for r in config.local.regions if region is None or r.name == region]
    if not regions or any(r.capacity is None for r in regions):
        return None
    if all(r.capacity == 0 for r in regions):  # every region drained (capacity 0): the job waits for capacity
        return None
    return max(r.capacity for r in regions if r.capacity is not None)
