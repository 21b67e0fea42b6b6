"""Where a job group runs (`orchestrator.policy.group_placement`): every task on one infra (cloud and region), as
SkyPilot places a group; the decision is pure, and `jobs launch` refuses a group no one infra can serve."""

from __future__ import annotations

import textwrap
from pathlib import Path

from orchestrator.config import LocalCloudConfig, LocalRegion, SortieConfig
from orchestrator.launch_checks import group_infra, launch_refusals
from orchestrator.policy.group_placement import group_infras, infras_of, no_shared_infra, shared_infras
from orchestrator.policy.optimizer import Offer, Option, Plan
from orchestrator.policy.placement import Infeasible, Placement, place
from orchestrator.spec import load_entrypoint

CONFIG = SortieConfig(local=LocalCloudConfig(regions=[LocalRegion(name="region-a"), LocalRegion(name="region-b")]))


def offer(cloud: str, region: str, price: float, instance_type: str = "x") -> Offer:
    return Offer(cloud, instance_type, 8, 32, {}, region, None, price, None)


def plan(*offers: Offer) -> Plan:
    return Plan(tuple(Option(o, 0, False, 1) for o in offers))


def test_shared_infras_are_those_every_task_can_use_cheapest_for_the_group_first() -> None:
    trainer = plan(offer("gcp", "us-central1", 10), offer("aws", "us-east-1", 12), offer("aws", "us-west-2", 11))
    server = plan(offer("aws", "us-east-1", 1), offer("aws", "us-west-2", 3), offer("azure", "eastus", 0.5))
    # gcp/us-central1 is the trainer's cheapest, but the server has no offer there; us-east-1 costs 13 in all,
    # us-west-2 14
    assert shared_infras([trainer, server]) == [("aws", "us-east-1"), ("aws", "us-west-2")]
    assert shared_infras([trainer]) == [("gcp", "us-central1"), ("aws", "us-west-2"), ("aws", "us-east-1")]
    assert shared_infras([trainer, plan(offer("azure", "eastus", 1))]) == []
    assert shared_infras([]) == []


def test_a_region_is_priced_by_its_cheapest_option_per_task() -> None:
    two = plan(offer("aws", "us-east-1", 5, "big"), offer("aws", "us-east-1", 2, "small"))
    assert infras_of(two) == {("aws", "us-east-1"): 2}


def test_the_others_clusters_pin_where_a_task_goes() -> None:
    plans = {0: plan(offer("aws", "us-east-1", 1)), 1: plan(offer("aws", "us-east-1", 1))}
    assert group_infras(plans, [("aws", "us-west-2"), ("aws", "us-west-2")]) == [("aws", "us-west-2")]
    assert group_infras(plans, []) == [("aws", "us-east-1")]


def test_the_refusal_names_each_tasks_clouds_in_one_line() -> None:
    line = no_shared_infra(["trainer", "server"], [plan(offer("gcp", "us-central1", 1)),
                                                   plan(offer("aws", "us-east-1", 1), offer("azure", "eastus", 1))])
    assert "\n" not in line
    assert "(trainer: gcp/us-central1; server: aws/us-east-1, azure/eastus)" in line and "same infra" in line
    many = plan(*(offer("aws", f"r{i}", 1) for i in range(5)))
    assert "(trainer: aws/r0, aws/r1, aws/r2 and 2 more)" in no_shared_infra(["trainer"], [many])


def test_place_keeps_within_the_group_infra_in_its_order() -> None:
    cand = [{"cloud": "local"}]
    chosen = place(cand, CONFIG, within=[("local", "region-b")], enabled=["local"])
    assert isinstance(chosen, Placement) and chosen.region == "region-b"
    both = place(cand, CONFIG, within=[("local", "region-b"), ("local", "region-a")], enabled=["local"])
    assert isinstance(both, Placement) and both.region == "region-b"
    full = place(cand, CONFIG, exclude={"region-b"}, within=[("local", "region-b")], enabled=["local"])
    assert isinstance(full, Infeasible) and full.no_capacity  # back off there, never elsewhere
    elsewhere = place(cand, CONFIG, within=[("aws", "us-east-1")], enabled=["local"])
    assert isinstance(elsewhere, Infeasible) and not elsewhere.no_capacity
    assert "the group's infra: aws/us-east-1" in elsewhere.reason


def _group(tmp_path: Path, a: str, b: str) -> Path:
    path = tmp_path / "group.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: grp
        execution: parallel
        ---
        name: trainer
        resources: {{infra: {a}}}
        run: train
        ---
        name: server
        resources: {{infra: {b}}}
        run: serve
        """))
    return path


def test_launch_refuses_a_group_no_one_infra_can_serve(tmp_path: Path) -> None:
    refused = launch_refusals(load_entrypoint(str(_group(tmp_path, "local/region-a", "local/region-b"))), CONFIG,
                              enabled=["local"])
    assert len(refused) == 1 and refused[0].startswith("job group: no one infra (cloud and region)")
    assert "(trainer: local/region-a; server: local/region-b)" in refused[0]
    together = load_entrypoint(str(_group(tmp_path, "local", "local/region-b")))
    assert launch_refusals(together, CONFIG, enabled=["local"]) == []
    assert group_infra(together, CONFIG, enabled=["local"]) == "local/region-b"  # what --dryrun says
