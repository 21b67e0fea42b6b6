"""Where a task runs. For now the regions of the local cloud; the optimizer issue makes this
cost-based across clouds.

Order of trial: regions to avoid (EAGER_NEXT_REGION after a preemption) last, the preferred region
(FAILOVER: where it just ran) first, then the cheapest declared price, then the order of the task's
alternatives and of the configured regions. Regions that said "no capacity" in this round are
skipped: by region for on-demand nodes, by region or `region:spot` for spot ones.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from orchestrator.config import SortieConfig


@dataclass(frozen=True)
class Placement:
    infra: str
    region: str
    candidate_index: int
    use_spot: bool = False
    price_per_hour: float = 0.0


@dataclass(frozen=True)
class Infeasible:
    reason: str
    # True when some region fits but every such region had no capacity (FAILED_NO_RESOURCE, not PRECHECKS).
    no_capacity: bool = False


def capacity_key(region: str, use_spot: bool) -> str:
    """How a "no capacity" answer is remembered for the rest of a round."""
    return f"{region}:spot" if use_spot else region


def place(candidates: Sequence[dict], config: SortieConfig, exclude: Collection[str] = (),
          prefer: str | None = None, avoid: Collection[str] = ()) -> Placement | Infeasible:
    """The best (candidate, local region) that fits. Candidates are `Candidate.to_json()` dicts."""
    reasons: list[str] = []
    full: list[str] = []
    feasible: list[tuple[tuple, Placement]] = []
    region_order = {r.name: i for i, r in enumerate(config.local.regions)}
    for index, cand in enumerate(candidates):
        cloud = cand.get("cloud") or (cand.get("infra") or "").split("/")[0] or None
        if cloud not in (None, "local"):
            reasons.append(f"infra {cand.get('infra') or cloud} is not enabled (only local is, for now)")
            continue
        wanted_region = cand.get("region")
        if wanted_region and wanted_region not in region_order:
            reasons.append(f"local has no region {wanted_region}")
            continue
        spot = bool(cand.get("use_spot"))
        for region in config.local.regions:
            if wanted_region and region.name != wanted_region:
                continue
            missing = [f"{name}:{count:g}" for name, count in (cand.get("accelerators") or {}).items()
                       if region.accelerators.get(name, 0) < count]
            if missing:
                reasons.append(f"local/{region.name} has no {', '.join(missing)}")
                continue
            if region.name in exclude or capacity_key(region.name, spot) in exclude:
                full.append(f"local/{region.name}" + (" (spot)" if spot else ""))
                continue
            price = region.price(spot)
            order = (region.name in avoid, bool(prefer) and region.name != prefer, price, index,
                     region_order[region.name])
            feasible.append((order, Placement("local", region.name, index, spot, price)))
    if feasible:
        return min(feasible, key=lambda item: item[0])[1]
    if full:
        return Infeasible("no capacity in " + ", ".join(dict.fromkeys(full)), no_capacity=True)
    return Infeasible("; ".join(dict.fromkeys(reasons)) or "no candidate resources")
