"""The reconcilers one tick at a time, dstack-style: rows in a phase, one `tick()` over the fake driver and fake
agents, then the rows and events it must leave. Every phase of a job, task, attempt, worker and pool."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import NoCapacityError, PolicyViolationError, StackOperationError
from stacks.spec import ClusterSpec, StackProgram
from state.machine import JobStatus, Phase, StackStatus, WorkerStatus
from state.models import AttemptRow, StackRow
from state.store import StateStore
from tests.support.controller_harness import CONFIG, FakeAgents, make_controller
from tests.support.factory import place, set_attempt, set_job, set_stack
from tests.support.fake_driver import FakeStackDriver


class World:
    """A home with a store, the fake infra and agents, and a controller over them."""

    def __init__(self, home: Path, driver: FakeStackDriver | None = None, **agent_kw: Any) -> None:
        (home / "config.yaml").write_text(CONFIG)
        self.home = home
        self.store = StateStore(home)
        self.driver = driver or FakeStackDriver()
        self.agents = FakeAgents(self.driver, **agent_kw)
        self.controller = make_controller(self.store, self.driver, self.agents, home)

    def submit(self, *runs: str, setup: str | None = None, pool: str | None = None, **resources: Any) -> int:
        tasks = [{"name": f"t{i}", "run": run, "setup": setup, "num_nodes": 1, "resources": [resources]}
                 for i, run in enumerate(runs)]
        (job_id,) = self.store.submit({"name": "j", "is_pipeline": len(tasks) > 1, "tasks": tasks},
                                      [{} for _ in tasks], user="u", pool=pool)
        return job_id

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.controller.tick()

    def attempt(self, job_id: int) -> AttemptRow:
        return self.store.attempts(job_id)[-1]

    def events(self, job_id: int) -> list[str]:
        return [e.what for e in self.store.events(job_id)]

    def stack(self, name: str) -> StackRow:
        with self.store.session() as session:
            row = session.get(StackRow, name)
            assert row is not None
            return row

    def until(self, job_id: int, phase: Phase) -> AttemptRow:
        for _ in range(20):
            attempts = self.store.attempts(job_id)
            if attempts and attempts[-1].phase == phase:
                return attempts[-1]
            self.tick()
        raise AssertionError(f"job {job_id} never reached {phase}")


@pytest.fixture
def world(sortie_home: Path) -> World:
    return World(sortie_home)


# --- jobs: PENDING -> placed ---------------------------------------------------------------------------------

def test_pending_job_is_placed_with_its_stack_and_token(world: World) -> None:
    job_id = world.submit("echo hi")
    world.tick()
    attempt = world.attempt(job_id)
    assert (attempt.phase, attempt.number, attempt.stack_name) == (Phase.PROVISIONING, 1, f"sortie-job-{job_id}-t0-1")
    assert world.store.box.open(attempt.token_enc)  # the cluster token is there from the first write
    assert world.stack(attempt.stack_name).status == StackStatus.CREATING
    assert world.store.job(job_id).status == JobStatus.STARTING and world.events(job_id)[-1] == "placed"


def test_infeasible_job_fails_prechecks_without_an_attempt(world: World) -> None:
    job_id = world.submit("echo hi", accelerators={"H100": 8})
    world.tick()
    job = world.store.job(job_id)
    assert job.status == JobStatus.FAILED_PRECHECKS and world.store.attempts(job_id) == []
    assert world.events(job_id)[-1] == "finished"


def test_cancel_before_placement_ends_the_job_cancelled(world: World) -> None:
    job_id = world.submit("echo hi")
    world.store.request_cancel(job_id, "u")
    world.tick()
    assert world.store.job(job_id).status == JobStatus.CANCELLED and world.store.attempts(job_id) == []


# --- PROVISIONING ----------------------------------------------------------------------------------------------

def test_provisioning_records_the_nodes_and_the_stack_up(world: World) -> None:
    job_id = world.submit("echo hi")
    world.tick(2)
    attempt = world.attempt(job_id)
    assert attempt.phase == Phase.SYNCING and [n["rank"] for n in attempt.nodes] == [0]
    assert world.stack(attempt.stack_name).status == StackStatus.UP
    assert world.events(job_id)[-1] == "provisioned"


class FailingUp(FakeStackDriver):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def up(self, stack: str, program: StackProgram, *, cleanup_on_failure: bool = True):  # type: ignore[override]
        raise self.error


def test_no_capacity_ends_the_attempt_and_places_elsewhere(sortie_home: Path) -> None:
    world = World(sortie_home, FailingUp(NoCapacityError("up failed: [no-capacity] full", "s")))
    job_id = world.submit("echo hi")
    world.tick(2)
    first = world.store.attempts(job_id)[0]
    assert (first.phase, first.outcome) == (Phase.DONE, "NO_CAPACITY")
    assert world.stack(first.stack_name).status == StackStatus.DESTROYED
    world.tick()
    second = world.attempt(job_id)
    assert second.number == 2 and second.region != first.region  # the next region of this round


def test_a_policy_violation_is_failed_prechecks_naming_the_policy(sortie_home: Path) -> None:
    world = World(sortie_home, FailingUp(PolicyViolationError("policy violation: no-spot-in-prod", "s")))
    job_id = world.submit("echo hi")
    world.tick(2)
    job = world.store.job(job_id)
    assert job.status == JobStatus.FAILED_PRECHECKS and "no-spot-in-prod" in (job.failure_reason or "")


def test_an_up_error_backs_off_and_a_failed_cleanup_leaves_the_stack_to_the_janitor(sortie_home: Path) -> None:
    world = World(sortie_home, FailingUp(StackOperationError("up failed: boom", "s", cleanup_failed=True)))
    job_id = world.submit("echo hi")
    world.tick(2)
    job, attempt = world.store.job(job_id), world.attempt(job_id)
    assert (job.controller_failures, attempt.outcome) == (1, "ERROR") and job.next_attempt_at > time.time()
    # the stack was left FAILED by the end of the attempt; the janitor of the same tick destroyed it
    assert world.stack(attempt.stack_name).status == StackStatus.DESTROYED
    assert ("destroy", attempt.stack_name) in world.driver.operations


# --- SYNCING, SETTING_UP, RUNNING -------------------------------------------------------------------------------

def test_syncing_goes_to_setting_up_and_the_job_runs(world: World) -> None:
    job_id = world.submit("echo hi", setup="echo s")
    world.until(job_id, Phase.SYNCING)
    world.tick()
    assert world.attempt(job_id).phase == Phase.SETTING_UP
    assert world.store.job(job_id).status == JobStatus.RUNNING
    assert world.store.tasks([job_id])[job_id][0].status == JobStatus.RUNNING


def test_syncing_without_setup_goes_straight_to_running(world: World) -> None:
    job_id = world.submit("echo hi")
    world.until(job_id, Phase.SYNCING)
    world.tick()
    assert world.attempt(job_id).phase == Phase.RUNNING
    assert world.store.tasks([job_id])[job_id][0].run_started_at is not None


def test_setup_success_runs_and_failure_is_failed_setup(world: World) -> None:
    good = world.submit("echo hi", setup="echo ok")
    bad = world.submit("echo hi", setup="exit 4")
    world.until(bad, Phase.SETTING_UP)
    world.tick()
    assert world.attempt(good).phase == Phase.RUNNING
    attempt = world.attempt(bad)
    assert (attempt.phase, attempt.outcome, attempt.exit_codes) == (Phase.TEARDOWN, "SETUP_ERROR", [4])
    assert world.store.job(bad).final_status == JobStatus.FAILED_SETUP


def test_run_success_tears_down_to_succeeded(world: World) -> None:
    job_id = world.submit("echo hi")
    world.until(job_id, Phase.RUNNING)
    world.tick()
    attempt = world.attempt(job_id)
    assert (attempt.phase, attempt.after_teardown, attempt.exit_codes) == (Phase.TEARDOWN, "finish", [0])
    assert world.stack(attempt.stack_name).status == StackStatus.DESTROYING
    world.tick()
    job = world.store.job(job_id)
    assert job.status == JobStatus.SUCCEEDED and world.attempt(job_id).phase == Phase.DONE
    assert world.stack(attempt.stack_name).status == StackStatus.DESTROYED
    assert world.events(job_id)[-2:] == ["destroyed", "finished"]


def test_run_failure_with_restarts_left_relaunches_and_counts_the_restart_once(world: World) -> None:
    job_id = world.submit("exit 1", job_recovery={"max_restarts_on_errors": 1})
    world.until(job_id, Phase.RUNNING)
    world.tick()
    attempt, job = world.attempt(job_id), world.store.job(job_id)
    assert (attempt.after_teardown, attempt.outcome, job.status) == ("relaunch", "USER_ERROR", JobStatus.RECOVERING)
    assert world.store.tasks([job_id])[job_id][0].restarts_on_errors == 1
    world.tick()
    task = world.store.tasks([job_id])[job_id][0]
    assert (task.status, task.recoveries, task.restarts_on_errors) == (JobStatus.RECOVERING, 1, 1)
    world.tick()
    assert world.attempt(job_id).number == 2


def test_a_lost_node_is_confirmed_by_refresh_and_relaunched(sortie_home: Path) -> None:
    world = World(sortie_home, hold=lambda node, run_id, command: run_id.startswith("run-"))
    job_id = world.submit("echo hi", use_spot=True)
    attempt = world.until(job_id, Phase.RUNNING)
    world.tick()  # the run starts and keeps running
    world.driver.preempt(attempt.stack_name, 0)
    world.tick()  # unreachable (grace 1): refresh says gone, and the teardown to relaunch begins
    attempt = world.attempt(job_id)
    assert (attempt.phase, attempt.outcome, attempt.after_teardown) == (Phase.TEARDOWN, "PREEMPTED", "relaunch")
    assert ("refresh", attempt.stack_name) in world.driver.operations and "recovering" in world.events(job_id)


def test_cancel_while_running_tears_down_to_cancelled(sortie_home: Path) -> None:
    world = World(sortie_home, hold=lambda node, run_id, command: True)
    job_id = world.submit("sleep 100")
    world.until(job_id, Phase.RUNNING)
    world.store.request_cancel(job_id, "u")
    world.tick()
    assert world.store.job(job_id).status == JobStatus.CANCELLING
    world.tick()
    assert world.store.job(job_id).status == JobStatus.CANCELLED and world.driver.list_stacks() == []


def test_a_pipeline_task_done_starts_the_next_task(world: World) -> None:
    job_id = world.submit("echo a", "echo b")
    world.until(job_id, Phase.TEARDOWN)
    world.tick()
    job = world.store.job(job_id)
    assert (job.current_task, job.status) == (1, JobStatus.STARTING)
    assert [t.status for t in world.store.tasks([job_id])[job_id]] == [JobStatus.SUCCEEDED, JobStatus.PENDING]
    assert "task-done" in world.events(job_id)


# --- pools and workers --------------------------------------------------------------------------------------

def apply(world: World, workers: int = 1, setup: str = "echo s") -> None:
    world.store.apply_pool("p", user="u", spec={"name": "p", "run": "", "setup": setup, "num_nodes": 1,
                                                "resources": [{}]},
                           spec_hash="h1", policy={"workers": workers, "min_workers": None, "max_workers": None,
                                                   "idle_timeout": None, "jobs_per_worker": 1},
                           plan={}, storage=None)


def worker_statuses(world: World) -> list[str]:
    return [w.status for w in world.store.workers("p", live_only=False)]


def test_a_worker_goes_provisioning_setting_up_ready(world: World) -> None:
    apply(world)
    world.tick()
    assert worker_statuses(world) == [WorkerStatus.PROVISIONING]
    world.tick()
    assert worker_statuses(world) == [WorkerStatus.SETTING_UP]
    world.tick()
    assert worker_statuses(world) == [WorkerStatus.READY]
    assert [e.what for e in world.store.pool_events("p")] == ["applied", "creating", "provisioned", "ready"]


def test_a_worker_whose_setup_fails_is_replaced(world: World) -> None:
    apply(world, setup="exit 2")
    world.tick(3)  # setup fails; the same pass sees a FAILED worker and destroys it
    assert worker_statuses(world) == [WorkerStatus.TERMINATING]
    assert [e.what for e in world.store.pool_events("p")][-2:] == ["failed", "terminating"]
    world.tick()
    assert worker_statuses(world)[0] == WorkerStatus.TERMINATED


def test_a_pool_job_runs_on_a_ready_worker_and_releases_it(world: World) -> None:
    apply(world)
    job_id = world.submit("echo on-pool", pool="p")
    world.tick(3)  # the worker is READY in this tick's pool pass, and the job pass places the job on it
    attempt = world.attempt(job_id)
    assert (attempt.phase, attempt.slot, world.store.job(job_id).status) == (Phase.RUNNING, 0, JobStatus.RUNNING)
    world.tick(3)
    assert world.store.job(job_id).status == JobStatus.SUCCEEDED
    assert worker_statuses(world) == [WorkerStatus.READY] and world.store.job(job_id).worker_id is None
    # issue 17: the job's run was its own user's on the worker, removed at its end
    (run,) = [r for runs in world.agents.runs.values() for rid, r in runs.items() if rid == f"run-{attempt.id}"]
    assert run.user == f"job-{job_id}"
    assert [key for _node, key in world.agents.removed_users] == [f"job-{job_id}"]


def test_a_pool_down_destroys_its_workers_and_terminates(world: World) -> None:
    apply(world)
    world.tick(3)
    world.store.pool_down("p", "u")
    world.tick(3)
    assert world.store.pool("p").status == "TERMINATED" and world.driver.list_stacks() == []
    assert worker_statuses(world) == [WorkerStatus.TERMINATED]


# --- the janitors ---------------------------------------------------------------------------------------------

def test_janitor_destroys_a_stack_whose_attempt_is_over(world: World) -> None:
    job_id = world.submit("echo hi")
    attempt = place(world.store, job_id, "sortie-job-1-t0-1")
    set_attempt(world.store, attempt.id, phase=Phase.DONE)
    set_job(world.store, job_id, status="FAILED", ended_at=time.time())
    set_stack(world.store, "sortie-job-1-t0-1", status="FAILED", last_error="cleanup failed too")
    world.driver.up("sortie-job-1-t0-1", StackProgram("cluster", ClusterSpec(name="c", token="t")))
    world.controller.stack_janitor.tick()
    assert world.driver.list_stacks() == [] and world.store.live_stacks() == []


def test_janitor_leaves_the_stacks_of_attempts_in_progress_alone(world: World) -> None:
    job_id = world.submit("echo hi")
    place(world.store, job_id, "sortie-job-1-t0-1")
    world.controller.stack_janitor.tick()
    assert ("destroy", "sortie-job-1-t0-1") not in world.driver.operations


def test_a_suspect_node_has_its_refresh_started_early_and_dropped_when_it_answers(sortie_home: Path,
                                                                                  monkeypatch) -> None:
    """Issue 15: a broken watch whose first probe fails starts the infra's refresh at once, and nothing is
    decided from it; when the node answers again the result is dropped, and a later loss asks the infra anew."""
    from orchestrator.controller.node_events import WatchSignal

    world = World(sortie_home, hold=lambda node, run_id, command: run_id.startswith("run-"))
    job_id = world.submit("sleep 100", use_spot=True)
    attempt = world.until(job_id, Phase.RUNNING)
    world.tick()  # the run starts and keeps running
    ctx = world.controller.ctx
    signal = {"now": WatchSignal(False, (), False, suspect_ranks=(0,))}
    monkeypatch.setattr(ctx, "watch", lambda *a, **k: signal["now"])
    refreshes = lambda: world.driver.operations.count(("refresh", attempt.stack_name))  # noqa: E731

    world.tick()
    assert refreshes() == 1  # asked at once, on the suspicion
    world.tick()
    assert refreshes() == 1  # once per suspicion
    assert world.attempt(job_id).phase == Phase.RUNNING and "preempted" not in world.events(job_id)

    signal["now"] = WatchSignal(True, (), True)  # the node answers: a poll comes back, the suspicion is over
    world.tick()
    assert world.attempt(job_id).phase == Phase.RUNNING
    assert not ctx.stack_ops.busy(("refresh", attempt.stack_name))  # the early result was handed to nobody

    world.driver.preempt(attempt.stack_name, 0)
    signal["now"] = WatchSignal(False, (0,), False)  # now lost: the infra is asked again, and says gone
    world.tick()
    assert refreshes() == 2
    attempt = world.attempt(job_id)
    assert (attempt.phase, attempt.outcome) == (Phase.TEARDOWN, "PREEMPTED")


def test_a_committed_transition_is_counted_and_a_read_or_a_refused_one_is_not(world: World) -> None:
    """The ticker's extra pass after a pass that moved something rests on this count."""
    from state.machine import TransitionError

    before = world.store.transitions_committed
    job_id = world.submit("echo hi")
    world.store.job(job_id)
    world.store.events(job_id)
    after_submit = world.store.transitions_committed
    world.tick()  # placed: one transition with its event
    assert world.store.transitions_committed > after_submit >= before
    placed = world.store.transitions_committed
    world.store.job(job_id)
    with pytest.raises(TransitionError):  # still PROVISIONING: refused, rolled back
        world.store.attempt_running(world.attempt(job_id).id, Phase.RUNNING, "synced", "nothing to sync")
    assert world.store.transitions_committed == placed
