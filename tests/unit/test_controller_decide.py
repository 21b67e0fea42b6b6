"""Pure parts of the controller: run verdicts, placement, the run environment."""

from __future__ import annotations

from orchestrator.config import LocalCloudConfig, LocalRegion, SortieConfig
from orchestrator.controller.decide import NodeRun, first_failure, judge_runs, run_outcome, setup_outcome
from orchestrator.job_status import JobStatus
from orchestrator.policy.placement import Infeasible, Placement, place
from orchestrator.policy.run_env import node_env, task_id


def cand(**kw: object) -> dict:
    base = {"infra": None, "cloud": None, "region": None, "accelerators": {}, "use_spot": False}
    return {**base, **kw}


def test_judge_runs_waits_until_every_node_ended() -> None:
    running = [NodeRun(0, "exited", 0), NodeRun(1, "running")]
    assert judge_runs(running, 0, 3).kind == "wait"
    done = judge_runs([NodeRun(1, "exited", 3), NodeRun(0, "exited", 0)], 0, 3)
    assert (done.kind, done.exit_codes) == ("done", (0, 3))
    cancelled = judge_runs([NodeRun(0, "cancelled", None)], 0, 3)
    assert cancelled.exit_codes == (1,)


def test_a_missed_poll_is_not_a_lost_node_until_the_grace_is_spent() -> None:
    history = [NodeRun(0, "running"), NodeRun(1, "unreachable")]
    assert judge_runs(history, missed_polls=0, grace_misses=3).kind == "wait"
    assert judge_runs(history, missed_polls=1, grace_misses=3).kind == "wait"
    lost = judge_runs(history, missed_polls=2, grace_misses=3)
    assert (lost.kind, lost.lost_ranks) == ("node_lost", (1,))


def test_outcomes() -> None:
    assert setup_outcome([0, 0]) is None
    assert setup_outcome([0, 2]) == JobStatus.FAILED_SETUP
    assert run_outcome([0, 0]) == JobStatus.SUCCEEDED
    assert run_outcome([0, 1]) == JobStatus.FAILED
    assert first_failure([0, 3, 0, 9]) == "rank 1 exited with 3, rank 3 exited with 9"


CONFIG = SortieConfig(local=LocalCloudConfig(regions=[
    LocalRegion(name="region-a"), LocalRegion(name="region-b", accelerators={"H100": 8})]))


def test_place_first_feasible_local_region() -> None:
    assert place([cand()], CONFIG) == Placement("local", "region-a", 0)
    assert place([cand(infra="local/region-b", cloud="local", region="region-b")], CONFIG) == Placement(
        "local", "region-b", 0)
    assert place([cand(accelerators={"H100": 4.0})], CONFIG) == Placement("local", "region-b", 0)


def test_place_skips_full_regions_and_then_says_no_capacity() -> None:
    assert place([cand()], CONFIG, exclude={"region-a"}) == Placement("local", "region-b", 0)
    full = place([cand()], CONFIG, exclude={"region-a", "region-b"})
    assert isinstance(full, Infeasible) and full.no_capacity
    assert "local/region-a" in full.reason and "local/region-b" in full.reason


def test_place_infeasible_names_the_reason() -> None:
    gpu = place([cand(accelerators={"A100": 1.0})], CONFIG, enabled=("local",))
    assert isinstance(gpu, Infeasible) and not gpu.no_capacity
    assert gpu.reason == "no instance has A100 (gcp has it, not enabled); accelerators here: H100"
    many = place([cand(accelerators={"H100": 16.0})], CONFIG, enabled=("local",))
    assert isinstance(many, Infeasible)
    assert many.reason == "no instance with 16 H100; the most on one instance is 8: sandbox (local/region-b)"
    aws = place([cand(infra="aws", cloud="aws")], CONFIG, enabled=("local",))
    assert isinstance(aws, Infeasible) and "aws" in aws.reason and "not enabled" in aws.reason
    region = place([cand(cloud="local", region="region-zz")], CONFIG, enabled=("local",))
    assert isinstance(region, Infeasible) and "region-zz" in region.reason


def test_place_falls_through_alternatives_in_order() -> None:
    cands = [cand(infra="aws", cloud="aws"), cand(accelerators={"H100": 8.0})]
    assert place(cands, CONFIG, enabled=("local",)) == Placement("local", "region-b", 1)


def test_task_id_has_skypilots_shape() -> None:
    assert task_id(1795609122.5, "train", 42, 1) == "sky-managed-2026-11-25-12-18-42-500000_train_42-1"
    # SkyPilot's documented pipeline example: sky-managed-2022-10-06-05-17-09-750781_pipeline_eval_8-1
    assert task_id(1795609122.5, "pipeline", 8, 1, "eval", is_pipeline=True) == \
        "sky-managed-2026-11-25-12-18-42-500000_pipeline_eval_8-1"


def test_node_env_has_skypilot_variables_and_twins() -> None:
    env = node_env(envs={"A": "1"}, secrets={"TOKEN": "s"}, job_id=7, job_name="j", task_index=0,
                   submitted_at=0.0, rank=1, ips=["10.0.0.1", "10.0.0.2"], accelerators={"H100": 8.0})
    assert env["A"] == "1" and env["TOKEN"] == "s"
    assert env["SKYPILOT_NODE_RANK"] == env["SORTIE_NODE_RANK"] == "1"
    assert env["SKYPILOT_NODE_IPS"] == "10.0.0.1\n10.0.0.2"
    assert env["SKYPILOT_NUM_NODES"] == "2"
    assert env["SKYPILOT_NUM_GPUS_PER_NODE"] == "8"
    assert env["SKYPILOT_JOB_ID"] == "7"
    assert env["SKYPILOT_TASK_ID"].endswith("_j_7-0")
    assert node_env(envs={}, secrets={}, job_id=1, job_name=None, task_index=0, submitted_at=0.0, rank=0,
                    ips=["x"], accelerators={})["SKYPILOT_NUM_GPUS_PER_NODE"] == "0"
