"""Where a task runs. For now the first feasible region of the local cloud; the optimizer issue makes
this cost-based across clouds."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from orchestrator.config import SortieConfig


@dataclass(frozen=True)
class Placement:
    infra: str
    region: str
    candidate_index: int


@dataclass(frozen=True)
class Infeasible:
    reason: str
    # True when some region fits but every such region had no capacity (FAILED_NO_RESOURCE, not PRECHECKS).
    no_capacity: bool = False


def place(candidates: Sequence[dict], config: SortieConfig, exclude: Collection[str] = ()) -> Placement | Infeasible:
    """The first (candidate, local region) that fits, skipping regions in `exclude`. Candidates are the
    task's resource alternatives as `Candidate.to_json()` gives them."""
    reasons: list[str] = []
    full: list[str] = []
    for index, cand in enumerate(candidates):
        cloud = cand.get("cloud") or (cand.get("infra") or "").split("/")[0] or None
        if cloud not in (None, "local"):
            reasons.append(f"infra {cand.get('infra') or cloud} is not enabled (only local is, for now)")
            continue
        wanted_region = cand.get("region")
        for region in config.local.regions:
            if wanted_region and region.name != wanted_region:
                continue
            missing = [f"{name}:{count:g}" for name, count in (cand.get("accelerators") or {}).items()
                       if region.accelerators.get(name, 0) < count]
            if missing:
                reasons.append(f"local/{region.name} has no {', '.join(missing)}")
                continue
            if region.name in exclude:
                full.append(f"local/{region.name}")
                continue
            return Placement(infra="local", region=region.name, candidate_index=index)
        if wanted_region and wanted_region not in {r.name for r in config.local.regions}:
            reasons.append(f"local has no region {wanted_region}")
    if full:
        return Infeasible("no capacity in " + ", ".join(dict.fromkeys(full)), no_capacity=True)
    return Infeasible("; ".join(dict.fromkeys(reasons)) or "no candidate resources")
