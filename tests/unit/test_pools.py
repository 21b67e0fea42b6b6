"""Pools, the pure parts: worker hashes, apply plans, autoscaling targets and the reconciler's decisions."""

from __future__ import annotations

import pytest

from orchestrator.policy.pools import PoolPolicy, WorkerView, decide_pool, plan_apply, worker_hash
from orchestrator.policy.run_env import pool_job_env
from orchestrator.spec import SpecError, load_yaml_text

SPEC = {"setup": "pip install x", "resources": [{"cpus": "1+"}], "num_nodes": 1, "envs": {}, "pool": {"workers": 3}}


def workers(*specs: tuple[str, str, int], hash_: str = "h1") -> list[WorkerView]:
    return [WorkerView(i + 1, i + 1, f"s-w{i + 1}", h or hash_, status, jobs)
            for i, (status, h, jobs) in enumerate(specs)]


def test_worker_hash_ignores_count_and_run_but_not_setup() -> None:
    base = worker_hash(SPEC)
    assert worker_hash({**SPEC, "pool": {"workers": 10}, "run": "echo"}) == base
    assert worker_hash({**SPEC, "setup": "pip install y"}) != base
    assert worker_hash({**SPEC, "resources": [{"cpus": "2+"}]}) != base
    pod_labels = {"kubernetes": {"pod_config": {"metadata": {"labels": {"tier": "b"}}}}}
    assert worker_hash({**SPEC, "config": pod_labels}) != base  # a pod's labels: the provider decides how
    assert worker_hash({**SPEC, "workdir": "/w"}) != worker_hash({**SPEC, "workdir": "/w"})  # always recreated


def test_plans_create_scale_recreate_and_unchanged() -> None:
    three = PoolPolicy(3)
    assert plan_apply("p", None, None, None, [], SPEC, "h1", three).mode == "create"
    live = workers(("READY", "", 0), ("READY", "", 1), ("READY", "", 0))
    assert plan_apply("p", SPEC, "h1", three, live, SPEC, "h1", three).mode == "unchanged"
    up = plan_apply("p", SPEC, "h1", three, live, SPEC, "h1", PoolPolicy(5))
    assert (up.mode, up.create, up.remove, len(up.keep)) == ("in-place", 2, (), 3)
    down = plan_apply("p", SPEC, "h1", three, live, SPEC, "h1", PoolPolicy(1))
    assert down.mode == "in-place" and down.remove == ("s-w3", "s-w1")  # idle ones first, newest first
    new = {**SPEC, "setup": "pip install y"}
    again = plan_apply("p", SPEC, "h1", three, live, new, "h2", three)
    assert again.mode == "recreate" and again.changed == ("setup",) and again.create == 3 and len(again.remove) == 3


def test_scaling_never_destroys_a_busy_worker() -> None:
    live = workers(("READY", "", 1), ("READY", "", 0), ("READY", "", 1))
    actions = decide_pool(PoolPolicy(1), "h1", live, demand_jobs=2, idle_for=None)
    assert actions.create == 0
    assert actions.destroy == (2,) and actions.drain == (3,)  # the idle one goes now; a busy one drains


def test_rolling_recreate_keeps_a_ready_worker_while_jobs_wait() -> None:
    old = workers(("READY", "old", 0), ("READY", "old", 1))
    first = decide_pool(PoolPolicy(2), "h1", old, demand_jobs=3, idle_for=None)
    assert first.create == 2 and first.drain == () and first.destroy == ()  # nothing old goes before new is READY
    mixed = [*old, WorkerView(3, 3, "s-w3", "h1", "READY", 0), WorkerView(4, 4, "s-w4", "h1", "SETTING_UP", 0)]
    second = decide_pool(PoolPolicy(2), "h1", mixed, demand_jobs=3, idle_for=None)
    assert second.create == 0 and second.destroy == (1,) and second.drain == ()  # one READY new lets one old go
    done = [WorkerView(2, 2, "s-w2", "old", "DRAINING", 0), *mixed[2:]]
    assert decide_pool(PoolPolicy(2), "h1", done, demand_jobs=0, idle_for=None).destroy == (2,)


def test_autoscaling_up_with_demand_and_to_zero_after_idle_timeout() -> None:
    policy = PoolPolicy(0, min_workers=0, max_workers=2, idle_timeout=30)
    assert policy.target(0, demand_jobs=5, idle_for=None) == 2
    assert policy.target(0, demand_jobs=1, idle_for=None) == 1
    assert policy.target(2, demand_jobs=0, idle_for=10) == 2      # not idle long enough
    assert policy.target(2, demand_jobs=0, idle_for=31) == 0      # scale to zero
    actions = decide_pool(policy, "h1", workers(("READY", "", 0), ("READY", "", 0)), demand_jobs=0, idle_for=31)
    assert set(actions.destroy) == {1, 2}
    assert "autoscaling 0..2" in policy.describe() and "30s" in policy.describe()


def test_down_destroys_every_live_worker() -> None:
    live = workers(("READY", "", 1), ("PROVISIONING", "", 0), ("FAILED", "", 0), ("TERMINATING", "", 0))
    assert decide_pool(PoolPolicy(3), "h1", live, 1, None, down=True).destroy == (1, 2, 3)


def test_pool_job_env_splits_accelerators_between_jobs_of_a_worker() -> None:
    env = pool_job_env(job_rank=4, num_jobs=10, slot=1, jobs_per_worker=2, accelerators={"H100": 8})
    assert env["SKYPILOT_JOB_RANK"] == "4" and env["SKYPILOT_NUM_JOBS"] == "10"
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and env["SKYPILOT_NUM_GPUS_PER_NODE"] == "4"
    assert "CUDA_VISIBLE_DEVICES" not in pool_job_env(job_rank=0, num_jobs=1, slot=0, jobs_per_worker=1,
                                                      accelerators={"H100": 8})


@pytest.mark.parametrize(("text", "expected"), [
    ("pool:\n  workers: -1\n", "pool.workers: must be >= 0"),
    ("pool: {}\n", "pool: give workers: N (or min_workers/max_workers)"),
    ("pool: {min_workers: 3, max_workers: 2}\n", "pool: min_workers (3) is above max_workers (2)"),
    ("pool: {workers: 1, jobs_per_worker: 0}\n", "pool.jobs_per_worker: must be >= 1"),
])
def test_bad_pool_sections(text: str, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        load_yaml_text(text)
    assert expected in str(info.value)
