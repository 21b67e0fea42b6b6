"""The optimizer against the shipped catalogs: cheapest choice, any_of, ordered, infra filters, spot, messages."""

from __future__ import annotations

import pytest

from orchestrator.config import LocalCloudConfig, LocalRegion, SortieConfig
from orchestrator.policy.optimizer import catalog_offers, local_offers, optimize, plan_for
from orchestrator.spec import load_yaml_text

CLOUDS = ("local", "aws", "gcp", "azure")
CONFIG = SortieConfig(local=LocalCloudConfig(regions=[LocalRegion(name="region-a", price_per_hour=5.0)]))


def plan(yaml: str, enabled: tuple[str, ...] = CLOUDS):
    task = load_yaml_text(yaml).tasks[0]
    return plan_for([c.to_json() for c in task.candidates()], task.num_nodes, CONFIG,
                    ordered=task.resources_ordered(), enabled=enabled)


def test_cheapest_instance_with_the_accelerator_wins_and_all_nodes_are_priced() -> None:
    result = plan("num_nodes: 2\nresources:\n  accelerators: H100:8\nrun: x\n")
    chosen = result.chosen
    assert chosen is not None and chosen.offer.accelerators == {"H100": 8.0}
    assert chosen.cost_per_hour == pytest.approx(2 * chosen.offer.price)
    assert all(o.cost_per_hour >= chosen.cost_per_hour for o in result.options)
    assert {o.offer.cloud for o in result.options} >= {"aws", "gcp", "azure"}
    assert len({(o.offer.cloud, o.offer.region) for o in result.options}) > 3  # the failover order recovery walks


def test_cpus_and_memory_exact_and_at_least() -> None:
    exact = plan("resources:\n  infra: aws\n  cpus: 8\n  memory: 32\nrun: x\n").options
    assert exact and all(o.offer.vcpus == 8 and o.offer.memory_gib == 32 for o in exact)
    more = plan("resources:\n  infra: aws\n  cpus: 8+\nrun: x\n").options
    assert more and all(o.offer.vcpus >= 8 for o in more) and not any(o.offer.accelerators for o in more)


def test_spot_uses_spot_prices_and_is_cheaper() -> None:
    on_demand = plan("resources:\n  infra: gcp\n  accelerators: A100:8\nrun: x\n").chosen
    spot = plan("resources:\n  infra: gcp\n  accelerators: A100:8\n  use_spot: true\nrun: x\n").chosen
    assert on_demand and spot and spot.use_spot
    assert spot.cost_per_hour == pytest.approx(spot.offer.spot_price or 0)
    assert spot.cost_per_hour < on_demand.cost_per_hour


def test_infra_filters_cloud_region_and_instance_type() -> None:
    only = plan("resources:\n  infra: azure/eastus\n  accelerators: A100:8\nrun: x\n").options
    assert only and {(o.offer.cloud, o.offer.region) for o in only} == {("azure", "eastus")}
    pinned = plan("resources:\n  instance_type: g5.xlarge\nrun: x\n").options
    assert pinned and {o.offer.instance_type for o in pinned} == {"g5.xlarge"}


def test_any_of_takes_the_cheapest_and_ordered_keeps_the_order() -> None:
    any_of = plan("resources:\n  any_of:\n    - accelerators: H100:8\n    - accelerators: T4:1\nrun: x\n")
    assert any_of.chosen and any_of.chosen.offer.accelerators == {"T4": 1.0} and any_of.chosen.candidate_index == 1
    ordered = plan("resources:\n  ordered:\n    - accelerators: H100:8\n    - accelerators: T4:1\nrun: x\n")
    assert ordered.chosen and ordered.chosen.candidate_index == 0
    indexes = [o.candidate_index for o in ordered.options]
    assert indexes == sorted(indexes)  # every H100 option before any T4 one


def test_local_cloud_is_one_of_the_clouds_and_wins_when_cheaper() -> None:
    free = SortieConfig()
    task = load_yaml_text("run: x\n").tasks[0]
    result = plan_for([c.to_json() for c in task.candidates()], 1, free, ordered=False, enabled=CLOUDS)
    assert result.chosen and result.chosen.offer.cloud == "local"


def test_infeasible_requests_name_the_nearest_option() -> None:
    many = plan("resources:\n  accelerators: H100:16\nrun: x\n")
    assert many.chosen is None and many.infeasible is not None
    assert many.infeasible.startswith("no instance with 16 H100; the most on one instance is 8: ")
    unknown = plan("resources:\n  accelerators: Z900:1\nrun: x\n").infeasible or ""
    assert unknown.startswith("no instance has Z900; accelerators here: ") and "H100" in unknown
    disabled = plan("resources:\n  accelerators: H100:8\nrun: x\n", enabled=("local",)).infeasible or ""
    assert "not enabled" in disabled and "aws" in disabled
    big = plan("resources:\n  infra: aws\n  cpus: 1000\nrun: x\n").infeasible or ""
    assert big.startswith("no instance with 1000 vCPUs; the most is ")
    assert "not enabled" in (plan("resources:\n  infra: aws\nrun: x\n", enabled=("local",)).infeasible or "")


def test_optimize_is_pure_over_its_offers() -> None:
    offers = local_offers(CONFIG) + catalog_offers(["aws"])
    task = load_yaml_text("resources:\n  accelerators: A10G:1\nrun: x\n").tasks[0]
    first = optimize([c.to_json() for c in task.candidates()], 1, offers, ordered=False, enabled=("aws",))
    again = optimize([c.to_json() for c in task.candidates()], 1, offers, ordered=False, enabled=("aws",))
    assert first == again and first.chosen and first.chosen.offer.instance_type.startswith("g5.")
