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
