"""Policy, the optimizer: from a task's resource alternatives to every feasible (infra, region, instance), priced, in
the order a launch tries them (the first is chosen; recovery walks the rest).

Pure over its inputs: offerings come from the shipped catalogs (`orchestrator.catalog`) and the local
cloud's configured regions (`local_offerings`); which clouds are enabled comes from `orchestrator.infra.clouds`.

Matching follows SkyPilot: `cpus`/`memory` `4` means exactly 4 and `4+` at least 4; accelerators must match in
name and count on one instance; `instance_type` pins the type; `use_spot` needs a spot price; `infra`/`cloud`/
`region`/`zone` filter. A task without accelerators gets no GPU instance. `any_of` takes the cheapest of all
alternatives; `ordered` (or a list of accelerators) takes the alternatives in their order, cheapest first within
each. Local-cloud nodes are sandboxes, not VMs: cpus and memory are not checked there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import SortieConfig
from orchestrator.errors import SortieError
from orchestrator.offers import Offer as Offer  # its home is below policy and infra; importable here too
from orchestrator.policy.cloud_features import offer_supports

CATALOG_CLOUDS = ("aws", "gcp", "azure")


@dataclass(frozen=True)
class Option:
    """A feasible placement of one alternative: `num_nodes` instances of one offer."""

    offer: Offer
    candidate_index: int
    use_spot: bool
    num_nodes: int

    @property
    def price_per_node(self) -> float:
        return (self.offer.spot_price if self.use_spot else self.offer.price) or 0.0

    @property
    def cost_per_hour(self) -> float:
        return self.price_per_node * self.num_nodes

    @property
    def infra(self) -> str:
        zone = f"/{self.offer.zone}" if self.offer.zone else ""
        return f"{self.offer.cloud}/{self.offer.region}{zone}"


@dataclass(frozen=True)
class Plan:
    """Every feasible option in trial order, or why there is none."""

    options: tuple[Option, ...] = ()
    infeasible: str | None = None
    per_candidate: dict[int, Option] = field(default_factory=dict)  # the cheapest option of each alternative

    @property
    def chosen(self) -> Option | None:
        return self.options[0] if self.options else None


def _amount(text: Any) -> tuple[float, bool] | None:
    """`4` -> (4, exact); `4+` -> (4, at least)."""
    if text is None:
        return None
    raw = str(text).strip()
    at_least = raw.endswith("+")
    return float(raw.rstrip("+")), not at_least


def _fits_amount(want: tuple[float, bool] | None, have: float) -> bool:
    if want is None:
        return True
    value, exact = want
    return math.isclose(have, value) if exact else have >= value


def _cloud_of(cand: dict[str, Any]) -> str | None:
    """The candidate's cloud; None for any (`*/us-east-1` names a region of any cloud)."""
    cloud = cand.get("cloud") or (cand.get("infra") or "").split("/")[0] or None
    return None if cloud == "*" else cloud


# Names a YAML may use for what the catalogs list under another name (lowercase): the 40 GB A100 is the
# catalogs' A100, and GCP's API calls a v5e TPU slice v5litepod.
_CATALOG_ALIASES = {"a100-40gb": "a100"}


def catalog_name(accelerator: str) -> str:
    """The lowercase catalog name of an accelerator a YAML names (A100-40GB -> a100, tpu-v5e-8 ->
    tpu-v5litepod-8)."""
    name = accelerator.lower()
    if name.startswith("tpu-v5e-"):
        return "tpu-v5litepod-" + name.removeprefix("tpu-v5e-")
    return _CATALOG_ALIASES.get(name, name)


def _matches(cand: dict[str, Any], offer: Offer) -> bool:
    return _matches_hardware(cand, offer) and offer_supports(cand, offer.cloud, offer.instance_type,
                                                             offer.region) is None


def _matches_hardware(cand: dict[str, Any], offer: Offer) -> bool:
    cloud = _cloud_of(cand)
    if cloud and cloud != offer.cloud:
        return False
    if cand.get("region") and cand["region"] != offer.region:
        return False
    if cand.get("zone") and offer.zone and cand["zone"] != offer.zone:
        return False
    if cand.get("instance_type") and cand["instance_type"] != offer.instance_type:
        return False
    if cand.get("use_spot") and offer.spot_price is None:
        return False
    wanted = {catalog_name(k): v for k, v in (cand.get("accelerators") or {}).items()}
    have = {k.lower(): v for k, v in offer.accelerators.items()}
    if offer.cloud == "local":  # declared accelerators: enough of them will do
        return all(have.get(name, 0) >= count for name, count in wanted.items())
    if wanted != have and not (not wanted and cand.get("instance_type")):
        return False
    return _fits_amount(_amount(cand.get("cpus")), offer.vcpus) and \
        _fits_amount(_amount(cand.get("memory")), offer.memory_gib)


def optimize(candidates: Sequence[dict[str, Any]], num_nodes: int, offers: Sequence[Offer], *, ordered: bool,
             enabled: Collection[str]) -> Plan:
    """Every feasible option of the alternatives `candidates` (Candidate.to_json dicts), in trial order."""
    found: list[tuple[tuple[Any, ...], Option]] = []
    per_candidate: dict[int, Option] = {}
    for index, cand in enumerate(candidates):
        spot = bool(cand.get("use_spot"))
        for position, offer in enumerate(offers):
            if offer.cloud not in enabled or not _matches(cand, offer):
                continue
            option = Option(offer, index, spot, num_nodes)
            key = ((index,) if ordered else ()) + (option.cost_per_hour, index, position)
            found.append((key, option))
            best = per_candidate.get(index)
            if best is None or option.cost_per_hour < best.cost_per_hour:
                per_candidate[index] = option
    if found:
        found.sort(key=lambda item: item[0])
        return Plan(tuple(option for _, option in found), None, per_candidate)
    return Plan((), infeasible_reason(candidates, offers, enabled))


def infeasible_reason(candidates: Sequence[dict[str, Any]], offers: Sequence[Offer], enabled: Collection[str]) -> str:
    """Why no alternative fits, naming the nearest feasible option."""
    reasons = []
    for cand in candidates:
        reasons.append(_why_not(cand, offers, enabled))
    return "; ".join(dict.fromkeys(reasons)) or "no candidate resources"


def _why_not(cand: dict[str, Any], offers: Sequence[Offer], enabled: Collection[str]) -> str:
    cloud = _cloud_of(cand)
    if cloud and cloud not in enabled:
        return f"{cloud} is not enabled (see `sortie check`)"
    fitting = [o for o in offers if o.cloud in enabled and _matches_hardware(cand, o)]
    if fitting:  # the hardware is there; a feature of the task is what no such offer can serve
        reasons = [offer_supports(cand, o.cloud, o.instance_type, o.region) for o in fitting]
        return "; ".join(dict.fromkeys(r for r in reasons if r))
    elsewhere = [o for o in offers if _matches(cand, o) and o.cloud not in enabled]
    pool = [o for o in offers if (not cloud or o.cloud == cloud) and o.cloud in enabled]
    for name, count in (cand.get("accelerators") or {}).items():
        carriers = [o for o in pool if any(k.lower() == catalog_name(name) for k in o.accelerators)]
        if not carriers:
            known = sorted({k for o in pool for k in o.accelerators})
            where = f" ({', '.join(sorted({o.cloud for o in elsewhere}))} has it, not enabled)" if elsewhere else ""
            return f"no instance has {name}{where}; accelerators here: {', '.join(known) or 'none'}"
        most = max(carriers, key=lambda o: _count(o, name))
        if _count(most, name) < count:
            where = f"local/{most.region}" if most.cloud == "local" else most.cloud
            return (f"no instance with {count:g} {name}; the most on one instance is {_count(most, name):g}: "
                    f"{most.instance_type} ({where})")
        if cand.get("use_spot") and not any(o.spot_price is not None for o in carriers):
            return f"no spot offer of {name}; try use_spot: false"
    if cand.get("instance_type") and not any(o.instance_type == cand["instance_type"] for o in pool):
        return f"instance type {cand['instance_type']} is not in the catalogs of the enabled clouds"
    if cand.get("region") and not any(o.region == cand["region"] for o in pool):
        regions = sorted({o.region for o in pool})
        return f"no region {cand['region']}{f' in {cloud}' if cloud else ''}; regions: {', '.join(regions[:12])}"
    want_cpus = _amount(cand.get("cpus"))
    if want_cpus:
        sized = [o for o in pool if o.cloud != "local"]
        if sized and not any(_fits_amount(want_cpus, o.vcpus) for o in sized):
            biggest = max(sized, key=lambda o: o.vcpus)
            return f"no instance with {cand['cpus']} vCPUs; the most is {biggest.vcpus:g}: {biggest.instance_type}"
    if elsewhere:
        return f"only {', '.join(sorted({o.cloud for o in elsewhere}))} offers this, and it is not enabled"
    return "no instance in the enabled clouds matches " + ", ".join(
        f"{k}={v}" for k, v in cand.items() if v and k in ("cpus", "memory", "accelerators", "instance_type", "region"))


def _count(offer: Offer, name: str) -> float:
    return next((v for k, v in offer.accelerators.items() if k.lower() == catalog_name(name)), 0.0)


# --- where offers come from ---------------------------------------------------------------------------------------

def local_offers(config: SortieConfig) -> list[Offer]:
    """The local cloud's regions as offers: a sandbox per node, declared accelerators and prices."""
    # Every region offers spot: a region without spot capacity (`spot_capacity: 0`) says so when a node is
    # created, as a cloud does, and recovery moves on (to another region, or to on-demand).
    return [Offer("local", "sandbox", 0.0, 0.0, dict(region.accelerators), region.name, None, region.price(False),
                  region.price(True)) for region in config.local.regions]


@functools.lru_cache(maxsize=8)
def _catalog_offers(clouds: tuple[str, ...]) -> tuple[Offer, ...]:
    from orchestrator.catalog import all_offerings

    return tuple(Offer(o.cloud, o.instance_type, o.vcpus, o.memory_gib,
                  {o.accelerator_name: o.accelerator_count} if o.accelerator_name else {}, o.region, o.zone or None,
                  o.price, o.spot_price)
            for o in all_offerings([c for c in clouds if c != "local"]))


def catalog_offers(clouds: Collection[str]) -> list[Offer]:
    """The shipped (or updated) catalogs of `clouds`, as offers."""
    return list(_catalog_offers(tuple(sorted(clouds))))


def plan_for(candidates: Sequence[dict[str, Any]], num_nodes: int, config: SortieConfig, *, ordered: bool,
             enabled: Collection[str] | None = None) -> Plan:
    """The plan over every enabled cloud (default: what `sortie check` says is enabled)."""
    if enabled is None:
        from orchestrator.infra.clouds import enabled_clouds

        enabled = enabled_clouds(config)
    # Every catalog, enabled or not: the disabled ones only serve the message when nothing fits.
    offers = local_offers(config) + catalog_offers(CATALOG_CLOUDS)
    kube_error = None
    if "kubernetes" in enabled:
        # A Kubernetes cluster's offers are its nodes, read from its API server (orchestrator/infra/kube_capacity.py).
        from orchestrator.infra.kube_capacity import kubernetes_offers

        try:
            offers += kubernetes_offers(config)
        except SortieError as exc:
            kube_error = str(exc)
    plan = optimize(candidates, num_nodes, offers, ordered=ordered, enabled=enabled)
    if kube_error and plan.chosen is None:
        return Plan(infeasible=f"{plan.infeasible or 'no candidate resources'}; {kube_error}")
    return plan
