"""The reconciler over the in-memory fake driver: the stacks janitor never forgets a stack."""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator.config import load_config
from orchestrator.controller.reconciler import Reconciler
from orchestrator.fake_driver import FakeStackDriver
from orchestrator.job_status import Phase
from stacks.spec import ClusterSpec, StackProgram
from state.store import StateStore


def test_janitor_destroys_a_stack_whose_attempt_is_over(sortie_home: Path) -> None:
    store = StateStore(sortie_home)
    (job_id,) = store.submit({"name": "j", "tasks": [{"name": "t", "run": "true", "num_nodes": 1,
                                                      "resources": [{}]}]}, [{}], user="u")
    job = store.job(job_id)
    attempt = store.create_attempt(job, stack_name="sortie-job-1-t0-1", infra="local", region="region-a",
                                   num_nodes=1, use_spot=False)
    store.update_attempt(attempt.id, phase=Phase.DONE)
    store.update_job(job_id, status="FAILED", ended_at=time.time())
    store.set_stack("sortie-job-1-t0-1", "FAILED", "cleanup failed too")
    driver = FakeStackDriver()
    driver.up("sortie-job-1-t0-1", StackProgram("cluster", ClusterSpec(name="c", token="t")))
    reconciler = Reconciler(store, driver, load_config(sortie_home), sortie_home)
    deadline = time.monotonic() + 10
    while store.live_stacks():
        reconciler._last_janitor = 0.0  # every tick, for the test
        reconciler.tick()
        assert time.monotonic() < deadline, "the janitor did not destroy the stack"
        time.sleep(0.05)
    assert driver.list_stacks() == []
    assert ("destroy", "sortie-job-1-t0-1") in driver.operations


def test_janitor_leaves_the_stacks_of_attempts_in_progress_alone(sortie_home: Path) -> None:
    store = StateStore(sortie_home)
    (job_id,) = store.submit({"name": "j", "tasks": [{"name": "t", "run": "true", "num_nodes": 1,
                                                      "resources": [{}]}]}, [{}], user="u")
    store.create_attempt(store.job(job_id), stack_name="sortie-job-1-t0-1", infra="local", region="region-a",
                         num_nodes=1, use_spot=False)
    driver = FakeStackDriver()
    reconciler = Reconciler(store, driver, load_config(sortie_home), sortie_home)
    reconciler._janitor()  # the attempt was placed after any earlier snapshot: still never reaped
    time.sleep(0.2)
    assert ("destroy", "sortie-job-1-t0-1") not in driver.operations


def test_a_policy_violation_is_failed_prechecks_naming_the_policy(sortie_home: Path) -> None:
    from orchestrator._stack_worker import policy_violation
    from orchestrator.errors import PolicyViolationError

    engine_output = ("Policy Violations:\n    [mandatory]  team-policies v1.2.0  no-spot-in-prod (node-0: "
                     "pulumi-python:dynamic:Resource)\n    Spot nodes are not allowed in this project.\n"
                     "error: update failed\n")
    violation = policy_violation(engine_output)
    assert violation == ("team-policies v1.2.0 no-spot-in-prod (node-0: pulumi-python:dynamic:Resource): "
                         "Spot nodes are not allowed in this project.")
    assert policy_violation("error: update failed\n") is None

    class PolicyDriver(FakeStackDriver):
        def up(self, stack: str, program: StackProgram, *, cleanup_on_failure: bool = True):  # type: ignore[override]
            raise PolicyViolationError(f"policy violation: {violation}", stack)

    store = StateStore(sortie_home)
    (job_id,) = store.submit({"name": "j", "tasks": [{"name": "t", "run": "true", "num_nodes": 1,
                                                      "resources": [{}]}]}, [{}], user="u")
    reconciler = Reconciler(store, PolicyDriver(), load_config(sortie_home), sortie_home)
    deadline = time.monotonic() + 10
    while store.job(job_id).status not in ("FAILED_PRECHECKS", "FAILED_CONTROLLER"):
        reconciler.tick()
        assert time.monotonic() < deadline, store.job(job_id).status
        time.sleep(0.05)
    job = store.job(job_id)
    assert job.status == "FAILED_PRECHECKS" and "no-spot-in-prod" in (job.failure_reason or "")
