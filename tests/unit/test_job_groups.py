"""Job groups (SkyPilot's `execution: parallel`) in the job reconciler, one tick at a time on the fake infra and
agents, and `jobs cancel --task` / `--graceful`: every task at once on its own stack, the barrier, the group's
variables, the auxiliary tasks' end, a task's failure, the group's verdict, and the cancels."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import UsageError
from orchestrator.service import JobService
from state.group_rules import group_verdict
from state.machine import JobStatus, Phase
from tests.support.factory import set_job, set_task
from tests.support.fake_driver import FakeStackDriver
from tests.unit.test_reconcilers import World


def task(name: str, run: str, setup: str | None = None, **resources: Any) -> dict[str, Any]:
    return {"name": name, "run": run, "setup": setup, "num_nodes": 1, "resources": [resources]}


def submit_group(world: World, *tasks: dict[str, Any], primary: list[str] | None = None,
                 delay: Any = None) -> int:
    (job_id,) = world.store.submit({"name": "grp", "is_pipeline": True, "execution": "parallel",
                                    "primary_tasks": primary, "termination_delay": delay, "tasks": list(tasks)},
                                   [{} for _ in tasks], user="u")
    return job_id


def statuses(world: World, job_id: int) -> tuple[str, list[str]]:
    job = world.store.job(job_id)
    assert job is not None
    return job.status, [t.status for t in world.store.tasks([job_id])[job_id]]


def phases(world: World, job_id: int) -> dict[int, str]:
    return {a.task_index: a.phase for a in world.store.open_attempts_of([job_id]).get(job_id, [])}


def running(world: World) -> list[str]:
    return sorted(run_id for runs in world.agents.runs.values() for run_id, r in runs.items() if r.state == "running")


@pytest.fixture
def world(sortie_home: Path) -> World:
    return World(sortie_home)


def test_every_task_of_a_group_is_placed_at_once_on_its_own_stack(world: World) -> None:
    job_id = submit_group(world, task("a", "echo a"), task("b", "echo b"))
    world.tick()
    attempts = world.store.attempts(job_id)
    assert sorted(a.stack_name for a in attempts) == [f"sortie-job-{job_id}-t0-1", f"sortie-job-{job_id}-t1-1"]
    assert statuses(world, job_id) == (JobStatus.STARTING, [JobStatus.STARTING, JobStatus.STARTING])
    world.tick(6)
    assert statuses(world, job_id) == (JobStatus.SUCCEEDED, [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED])
    assert world.driver.list_stacks() == [] and world.store.live_stacks() == []
    assert world.events(job_id).count("task-ended") == 2 and world.events(job_id)[-1] == "finished"


def test_the_barrier_holds_a_task_until_every_task_has_its_nodes(sortie_home: Path) -> None:
    world = World(sortie_home, FakeStackDriver(capacity={"region-a": 1, "region-b": 1}))
    job_id = submit_group(world, task("a", "echo a"), task("b", "echo b"))
    world.tick(5)
    # a is up and waits in SYNCING; b, kept to a's infra (region-a, full; region-b has room but is another
    # infra), backs off while the group's other task waits
    assert phases(world, job_id) == {0: Phase.SYNCING}
    assert "backoff" in world.events(job_id) and world.agents.started == []
    assert {a.region for a in world.store.attempts(job_id)} == {"region-a"}
    world.driver.capacity["region-a"] = 2
    set_job(world.store, job_id, next_attempt_at=time.time() - 1, round_started_at=time.time() + 0.01)
    time.sleep(0.02)  # a new round: the earlier refusals no longer count
    world.tick(10)
    assert statuses(world, job_id)[0] == JobStatus.SUCCEEDED
    assert sorted(run_id.split("-")[0] for _node, run_id in world.agents.started) == ["run", "run"]
    assert {(a.infra, a.region) for a in world.store.attempts(job_id)} == {("local", "region-a")}


def test_each_task_sees_the_group_name_and_the_other_tasks_addresses(sortie_home: Path) -> None:
    world = World(sortie_home, hold=lambda node, run_id, command: run_id.startswith("run-"))
    submit_group(world, task("trainer", "train"), task("rollout-server", "serve"))
    world.tick(4)
    assert len(running(world)) == 2  # both run at once
    envs = [r.env for runs in world.agents.runs.values() for r in runs.values()]
    for env in envs:
        assert env["SKYPILOT_JOBGROUP_NAME"] == "grp" and env["SORTIE_JOBGROUP_NAME"] == "grp"
        assert env["SORTIE_JOBGROUP_HOST_TRAINER"] and env["SORTIE_JOBGROUP_HOST_ROLLOUT_SERVER"]
        hosts = env["SORTIE_JOBGROUP_HOSTS"].splitlines()
        assert sorted(h.split()[1] for h in hosts) == ["rollout-server-0.grp", "trainer-0.grp"]
    assert {e["SKYPILOT_TASK_ID"].rsplit("-", 1)[1] for e in envs} == {"0", "1"}


def test_auxiliary_tasks_end_after_the_termination_delay_when_the_primaries_succeed(sortie_home: Path) -> None:
    world = World(sortie_home, hold=lambda node, run_id, command: "serve" in command)
    job_id = submit_group(world, task("trainer", "train"), task("server", "serve"), primary=["trainer"],
                          delay={"default": 30.0})
    world.tick(8)
    assert statuses(world, job_id) == (JobStatus.RUNNING, [JobStatus.SUCCEEDED, JobStatus.RUNNING])
    assert running(world)  # the server is given its 30 s
    set_task(world.store, job_id, 0, ended_at=time.time() - 31)
    world.tick(4)
    assert statuses(world, job_id) == (JobStatus.SUCCEEDED, [JobStatus.SUCCEEDED, JobStatus.CANCELLED])
    server = world.store.tasks([job_id])[job_id][1]
    assert "auxiliary task: the primary tasks succeeded (termination_delay 30s)" in (server.failure_reason or "")
    assert all(r.cancelled for runs in world.agents.runs.values() for r in runs.values() if "serve" in r.command)


def test_a_failed_primary_ends_the_auxiliaries_at_once_and_the_group_takes_its_status(sortie_home: Path) -> None:
    world = World(sortie_home, hold=lambda node, run_id, command: "serve" in command)
    job_id = submit_group(world, task("trainer", "exit 3"), task("server", "serve"), primary=["trainer"],
                          delay=600.0)
    world.tick(10)
    job = world.store.job(job_id)
    assert statuses(world, job_id) == (JobStatus.FAILED, [JobStatus.FAILED, JobStatus.CANCELLED])
    assert job is not None and job.failure_reason and job.failure_reason.startswith("task 0 (trainer): FAILED")


def test_without_primary_tasks_a_failure_lets_the_other_tasks_finish(sortie_home: Path) -> None:
    holding = {"on": True}
    world = World(sortie_home, hold=lambda node, run_id, command: "long" in command and holding["on"])
    job_id = submit_group(world, task("a", "exit 1"), task("b", "long; true"))
    world.tick(8)
    assert statuses(world, job_id) == (JobStatus.RUNNING, [JobStatus.FAILED, JobStatus.RUNNING])
    for runs in world.agents.runs.values():
        for run in runs.values():
            if run.state == "running":
                run.state, run.exit_code = "exited", 0
    world.tick(4)
    assert statuses(world, job_id) == (JobStatus.FAILED, [JobStatus.FAILED, JobStatus.SUCCEEDED])


def test_an_infeasible_task_fails_the_group_and_the_others_are_cancelled(sortie_home: Path) -> None:
    world = World(sortie_home, hold=lambda node, run_id, command: "serve" in command)
    job_id = submit_group(world, task("a", "serve"), task("b", "echo b", accelerators={"H100": 8}))
    world.tick(8)
    status, tasks = statuses(world, job_id)
    assert (status, tasks) == (JobStatus.FAILED_PRECHECKS, [JobStatus.CANCELLED, JobStatus.FAILED_PRECHECKS])
    job, (first, _second) = world.store.job(job_id), world.store.tasks([job_id])[job_id]
    assert job is not None and (job.failure_reason or "").startswith("task 1 (b): FAILED_PRECHECKS")
    assert (first.failure_reason or "").startswith("the group failed: task 1 (b): FAILED_PRECHECKS")
    assert world.driver.list_stacks() == [] and world.store.live_stacks() == []


def test_a_task_out_of_patience_for_capacity_fails_the_running_group(sortie_home: Path) -> None:
    """b never finds capacity on the group's infra (a holds it) and gives up: FAILED_NO_RESOURCE fails the group,
    and a, which was running, is cancelled (its run stopped, its cluster destroyed)."""
    world = World(sortie_home, FakeStackDriver(capacity={"region-a": 1, "region-b": 1}),
                  hold=lambda node, run_id, command: "serve" in command)
    job_id = submit_group(world, task("a", "serve"),
                          task("b", "echo b", job_recovery={"max_duration_s": 0.0}))
    world.tick(10)
    assert statuses(world, job_id) == (JobStatus.FAILED_NO_RESOURCE,
                                       [JobStatus.CANCELLED, JobStatus.FAILED_NO_RESOURCE])
    assert all(r.cancelled for runs in world.agents.runs.values() for r in runs.values() if "serve" in r.command)
    assert {a.region for a in world.store.attempts(job_id)} == {"region-a"}  # b never tried region-b
    assert world.driver.list_stacks() == []
    first = world.store.tasks([job_id])[job_id][0]
    assert (first.failure_reason or "").startswith("the group failed: task 1 (b): FAILED_NO_RESOURCE")


class UnfitForT1(FakeStackDriver):
    """Task 1's cluster asks what the infra cannot do (a load balancer that never gets an address)."""

    def up(self, stack: str, program: Any, *, cleanup_on_failure: bool = True):  # type: ignore[override]
        if "-t1-" in stack:
            from orchestrator.errors import InfraUnfitError

            raise InfraUnfitError(f"up of stack {stack} failed: Service {stack}-ports (the task's ports) got no load "
                                  "balancer address in time", stack)
        return super().up(stack, program, cleanup_on_failure=cleanup_on_failure)


def test_an_infra_that_cannot_serve_a_task_fails_its_launch_and_the_group(sortie_home: Path) -> None:
    world = World(sortie_home, UnfitForT1(), hold=lambda node, run_id, command: "serve" in command)
    job_id = submit_group(world, task("a", "serve"), task("b", "echo b", ports=["8080"]))
    world.tick(8)
    assert statuses(world, job_id) == (JobStatus.FAILED_PRECHECKS, [JobStatus.CANCELLED, JobStatus.FAILED_PRECHECKS])
    job = world.store.job(job_id)
    assert job is not None and "got no load balancer address" in (job.failure_reason or "")
    assert [a.number for a in world.store.attempts(job_id) if a.task_index == 1] == [1]  # no retry: it cannot help
    assert world.driver.list_stacks() == []


def test_tasks_with_no_infra_in_common_fail_the_group_before_anything_is_made(world: World) -> None:
    job_id = submit_group(world, task("a", "echo a", cloud="local", region="region-a"),
                          task("b", "echo b", cloud="local", region="region-b"))
    world.tick(4)
    status, tasks = statuses(world, job_id)
    assert status == JobStatus.FAILED_PRECHECKS and JobStatus.FAILED_PRECHECKS in tasks
    assert world.store.attempts(job_id) == [] and world.driver.list_stacks() == []
    job = world.store.job(job_id)
    assert job is not None and "no one infra (cloud and region) can serve every task" in (job.failure_reason or "")


def test_a_recovered_task_goes_back_to_the_infra_of_the_others(sortie_home: Path) -> None:
    world = World(sortie_home, FakeStackDriver(capacity={"region-a": 3, "region-b": 3}),
                  hold=lambda node, run_id, command: run_id.startswith("run-"))
    job_id = submit_group(world, task("a", "train", use_spot=True), task("b", "serve"))
    world.tick(4)
    first = {a.task_index: a for a in world.store.open_attempts_of([job_id])[job_id]}
    assert first[0].region == first[1].region == "region-a"
    world.driver.preempt(first[0].stack_name, 0)  # EAGER_NEXT_REGION would prefer region-b
    world.tick(6)
    now = {a.task_index: a for a in world.store.open_attempts_of([job_id])[job_id]}
    assert now[0].number == 2 and now[0].region == "region-a" and now[1].id == first[1].id


def test_cancel_of_one_task_of_a_group_leaves_the_others_running(sortie_home: Path) -> None:
    world = World(sortie_home, hold=lambda node, run_id, command: run_id.startswith("run-"))
    job_id = submit_group(world, task("a", "train"), task("b", "serve"))
    world.tick(4)
    assert world.store.request_cancel(job_id, "u", task_index=1)
    assert not world.store.request_cancel(job_id, "u", task_index=5)  # no such task: nothing requested
    world.tick(3)
    assert statuses(world, job_id) == (JobStatus.RUNNING, [JobStatus.RUNNING, JobStatus.CANCELLED])
    assert world.driver.list_stacks() == [f"sortie-job-{job_id}-t0-1"]  # b's cluster is gone, a's runs on
    world.store.request_cancel(job_id, "u")  # the whole group
    world.tick(4)
    assert statuses(world, job_id) == (JobStatus.CANCELLED, [JobStatus.CANCELLED, JobStatus.CANCELLED])
    assert world.driver.list_stacks() == []


def test_graceful_cancel_stops_the_run_before_the_teardown(sortie_home: Path) -> None:
    world = World(sortie_home, hold=lambda node, run_id, command: run_id.startswith("run-"))
    job_id = world.submit("sleep forever")
    world.tick(4)
    run = next(r for runs in world.agents.runs.values() for r in runs.values())
    assert run.state == "running"
    world.store.request_cancel(job_id, "u", graceful=True, graceful_timeout=60)
    world.tick()
    assert run.cancelled and run.exit_code == 143  # SIGTERM reached the run while its node was still there
    world.tick(3)
    assert world.store.job(job_id).status == JobStatus.CANCELLED and world.driver.list_stacks() == []


def test_a_graceful_cancel_past_its_timeout_tears_down_without_waiting(sortie_home: Path) -> None:
    world = World(sortie_home, hold=lambda node, run_id, command: run_id.startswith("run-"))
    job_id = world.submit("sleep forever")
    world.tick(4)
    world.store.request_cancel(job_id, "u", graceful=True, graceful_timeout=0)
    world.tick(3)
    run = next(r for runs in world.agents.runs.values() for r in runs.values())
    assert not run.cancelled and world.store.job(job_id).status == JobStatus.CANCELLED


def test_group_verdict() -> None:
    spec = {"tasks": [{"name": "a"}, {"name": "b"}, {"name": "c"}], "primary_tasks": ["a", "b"]}
    ok, failed, cancelled = ("SUCCEEDED", None), ("FAILED_SETUP", "setup failed"), ("CANCELLED", None)
    assert group_verdict(spec, [ok, ok, cancelled], False) == (JobStatus.SUCCEEDED, None)
    assert group_verdict(spec, [ok, failed, ok], False) == (
        JobStatus.FAILED_SETUP, "task 1 (b): FAILED_SETUP: setup failed")
    assert group_verdict(spec, [cancelled, ok, ok], False) == (JobStatus.CANCELLED, "task 0 (a) was cancelled")
    assert group_verdict(spec, [ok, ok, ok], True)[0] == JobStatus.CANCELLED
    assert group_verdict({"tasks": spec["tasks"]}, [ok, ok, failed], False)[0] == JobStatus.FAILED_SETUP
    no_room = ("FAILED_NO_RESOURCE", "no capacity")
    # a task that failed to launch fails the group, even an auxiliary one, before a primary's own failure
    assert group_verdict(spec, [failed, cancelled, no_room], False) == (
        JobStatus.FAILED_NO_RESOURCE, "task 2 (c): FAILED_NO_RESOURCE: no capacity")
    assert group_verdict(spec, [ok, ok, no_room], False) == (JobStatus.SUCCEEDED, None)  # primaries were done


def test_cancel_task_of_a_pipeline_names_its_running_task(world: World) -> None:
    job_id = world.submit("echo a", "echo b")
    service = JobService(world.home)
    job = world.store.job(job_id)
    assert service.task_to_cancel(job, "t0") is None  # its running task: the pipeline is cancelled
    with pytest.raises(UsageError, match="task 1 of job 1 has not started"):
        service.task_to_cancel(job, "1")
    set_job(world.store, job_id, current_task=1)
    assert service.task_to_cancel(world.store.job(job_id), "0") is False  # already done: nothing to cancel
    group_id = submit_group(world, task("a", "x"), task("b", "y"))
    assert service.task_to_cancel(world.store.job(group_id), "b") == 1


def test_a_preempted_task_recovers_alone_while_the_other_runs_on(sortie_home: Path) -> None:
    world = World(sortie_home, hold=lambda node, run_id, command: run_id.startswith("run-"))
    job_id = submit_group(world, task("a", "train", use_spot=True), task("b", "serve"))
    world.tick(4)
    first = {a.task_index: a for a in world.store.open_attempts_of([job_id])[job_id]}
    world.driver.preempt(first[0].stack_name, 0)
    world.tick(6)
    now = {a.task_index: a for a in world.store.open_attempts_of([job_id])[job_id]}
    assert now[1].id == first[1].id and now[1].phase == Phase.RUNNING  # b never stopped
    assert now[0].number == 2 and now[0].phase == Phase.RUNNING
    assert [t.recoveries for t in world.store.tasks([job_id])[job_id]] == [1, 0]
    assert "preempted" in world.events(job_id) and statuses(world, job_id)[0] == JobStatus.RUNNING
    for runs in world.agents.runs.values():
        for run in runs.values():
            run.state, run.exit_code = "exited", 0
    world.tick(4)
    assert statuses(world, job_id) == (JobStatus.SUCCEEDED, [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED])


def test_a_group_places_a_bounded_number_of_tasks_at_once(sortie_home: Path) -> None:
    """Issue 28: every task of a 100-task group was placed at once (190 attempts, 90 no-capacity events in
    minutes). At most GROUP_LAUNCHES_IN_FLIGHT launches are in flight; the rest follow as those are up."""
    from orchestrator.policy.group_placement import GROUP_LAUNCHES_IN_FLIGHT

    world = World(sortie_home, FakeStackDriver(capacity={"region-a": 100, "region-b": 100}))
    job_id = submit_group(world, *(task(f"t{i}", "echo hi") for i in range(GROUP_LAUNCHES_IN_FLIGHT + 5)))
    world.tick()
    assert len(world.store.attempts(job_id)) == GROUP_LAUNCHES_IN_FLIGHT
    for _ in range(20):
        world.tick()
        launching = [p for p in phases(world, job_id).values() if p == Phase.PROVISIONING]
        assert len(launching) <= GROUP_LAUNCHES_IN_FLIGHT
    world.tick(10)
    assert statuses(world, job_id)[0] == JobStatus.SUCCEEDED
    assert len(world.store.attempts(job_id)) == GROUP_LAUNCHES_IN_FLIGHT + 5
