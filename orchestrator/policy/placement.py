"""Policy, where a task runs: the optimizer's plan (`orchestrator.policy.optimizer`) over every enabled cloud, minus
what said "no capacity" in this round.

Order of trial: regions to avoid (EAGER_NEXT_REGION after a preemption) last, the preferred region
(FAILOVER: where it just ran) first, then the cheapest declared price, then the order of the task's
alternatives and of the configured regions. Regions that said "no capacity" in this round are
skipped: by region for on-demand nodes, by region or `region:spot` for spot ones.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.config import SortieConfig


@dataclass(frozen=True)
class Placement:
    infra: str
    region: str
    candidate_index: int
    use_spot: bool = False
    price_per_hour: float = 0.0
    instance_type: str | None = None  # a catalog instance type (None on the local cloud)
    zone: str | None = None


@dataclass(frozen=True)
class Infeasible:
    reason: str
    # True when some region fits but every such region had no capacity (FAILED_NO_RESOURCE, not PRECHECKS).
    no_capacity: bool = False


def capacity_key(region: str, use_spot: bool) -> str:
    """How a "no capacity" answer is remembered for the rest of a round."""
    return f"{region}:spot" if use_spot else region


def place(candidates: Sequence[dict[str, Any]], config: SortieConfig, exclude: Collection[str] = (),
          prefer: str | None = None, avoid: Collection[str] = (), *, ordered: bool = False, num_nodes: int = 1,
          enabled: Collection[str] | None = None,
          within: Sequence[tuple[str, str]] | None = None) -> Placement | Infeasible:
    """The first option of the optimizer's plan (candidates are `Candidate.to_json()` dicts) that is not full,
    with regions to avoid last and the preferred region first. `within` (a job group's task): only these
    (cloud, region) infras, in this order of preference (`orchestrator.policy.group_placement`)."""
    from orchestrator.policy.optimizer import plan_for

    plan = plan_for(candidates, num_nodes, config, ordered=ordered, enabled=enabled)
    if plan.chosen is None:
        return Infeasible(plan.infeasible or "no candidate resources")
    rank = {infra: i for i, infra in enumerate(within or ())}
    open_options = []
    full: list[str] = []
    for position, option in enumerate(plan.options):
        region = option.offer.region
        where = (option.offer.cloud, region)
        if within is not None and where not in rank:
            continue
        if region in exclude or capacity_key(region, option.use_spot) in exclude:
            full.append(option.infra + (" (spot)" if option.use_spot else ""))
            continue
        open_options.append(((region in avoid, bool(prefer) and region != prefer, rank.get(where, 0), position),
                             option))
    if within is not None and not open_options and not full:
        shown = ", ".join(f"{c}/{r}" for c, r in within) or "none"
        return Infeasible(f"the job group's tasks run on one infra and this task has no offer there (the group's "
                          f"infra: {shown})")
    if not open_options:
        return Infeasible("no capacity in " + ", ".join(dict.fromkeys(full)), no_capacity=True)
    best = min(open_options, key=lambda item: item[0])[1]
    local = best.offer.cloud == "local"
    return Placement(best.offer.cloud, best.offer.region, best.candidate_index, best.use_spot, best.price_per_node,
                     instance_type=None if local else best.offer.instance_type, zone=best.offer.zone)
