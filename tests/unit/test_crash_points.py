"""Crash between every pair of writes: for each lifecycle, the controller is killed at its 1st write, then (in a
fresh run) at its 2nd, and so on to its last; after a restart each run must end exactly as the run without a
crash did: the same statuses, attempts, stacks, runs, recoveries and restarts, and nothing left."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from state.store import StateStore
from tests.support.controller_harness import CONFIG, FakeAgents, Outcome, drive, outcome
from tests.support.fake_driver import FakeStackDriver

CRASH_POINTS_TRIED: dict[str, int] = {}


def task(name: str, run: str, setup: str | None = None, **resources: Any) -> dict[str, Any]:
    return {"name": name, "run": run, "setup": setup, "num_nodes": 1, "resources": [resources]}


@dataclass
class Lifecycle:
    store: StateStore
    driver: FakeStackDriver
    agents: FakeAgents
    job_ids: list[int]
    done: Callable[[StateStore], bool]
    between: Callable[[StateStore, FakeStackDriver], None] | None = None


def ended(job_ids: list[int]) -> Callable[[StateStore], bool]:
    def check(store: StateStore) -> bool:
        rows = [store.job(j) for j in job_ids]
        return all(r is not None and r.status in ("SUCCEEDED", "FAILED", "FAILED_SETUP", "CANCELLED",
                                                  "FAILED_CONTROLLER", "FAILED_PRECHECKS", "FAILED_NO_RESOURCE")
                   for r in rows) \
            and not store.live_stacks()
    return check


def submit(store: StateStore, *tasks: dict[str, Any], pool: str | None = None) -> list[int]:
    return store.submit({"name": "j", "is_pipeline": len(tasks) > 1, "tasks": list(tasks)}, [{} for _ in tasks],
                        user="u", pool=pool)


def held_node(agents: FakeAgents) -> tuple[str, str] | None:
    """The (stack, resource) of a node running a held run."""
    for node_id, runs in agents.runs.items():
        if any(r.state == "running" for r in runs.values()):
            for stack, resources in agents.driver.stacks.items():
                for name, resource in resources.items():
                    if resource["id"] == node_id:
                        return stack, name
    return None


_COMPILED: dict[Any, Any] = {}  # SQL compiled once for every run's database (each run has its own engine)


def open_store(home: Path) -> StateStore:
    from state.db import make_engine

    engine = make_engine(f"sqlite:///{home / 'state.db'}").execution_options(compiled_cache=_COMPILED)
    return StateStore(home, engine=engine)


def single(home: Path) -> Lifecycle:
    store, driver = open_store(home), FakeStackDriver()
    ids = submit(store, task("t", "echo hi", setup="echo setup"))
    return Lifecycle(store, driver, FakeAgents(driver), ids, ended(ids))


def failing_with_restarts(home: Path) -> Lifecycle:
    store, driver = open_store(home), FakeStackDriver()
    ids = submit(store, task("t", "exit 1", job_recovery={"max_restarts_on_errors": 2}))
    return Lifecycle(store, driver, FakeAgents(driver), ids, ended(ids))


def pipeline(home: Path) -> Lifecycle:
    store, driver = open_store(home), FakeStackDriver()
    ids = submit(store, task("a", "echo a"), task("b", "echo b", setup="echo s"), task("c", "echo c"))
    return Lifecycle(store, driver, FakeAgents(driver), ids, ended(ids))


def preemption(home: Path) -> Lifecycle:
    store, driver = open_store(home), FakeStackDriver()
    ids = submit(store, task("t", "echo train", use_spot=True))
    held: set[str] = set()

    def hold(node: str, run_id: str, command: str) -> bool:
        if run_id.startswith("run-") and not held:  # the first attempt's run keeps going until preempted
            held.add(run_id)
            return True
        return False

    agents = FakeAgents(driver, hold=hold)

    def between(_store: StateStore, drv: FakeStackDriver) -> None:
        found = held_node(agents)
        if found and not drv.preempted:
            drv.preempt(found[0], int(found[1].split("-")[1]))

    return Lifecycle(store, driver, agents, ids, ended(ids), between)


def cancel(home: Path) -> Lifecycle:
    store, driver = open_store(home), FakeStackDriver()
    ids = submit(store, task("t", "echo forever"))
    agents = FakeAgents(driver, hold=lambda node, run_id, command: run_id.startswith("run-"))
    user = open_store(home)  # the user's own process: its writes are not the controller's

    def between(_store: StateStore, _drv: FakeStackDriver) -> None:
        if held_node(agents):
            user.request_cancel(ids[0], "u")

    return Lifecycle(store, driver, agents, ids, ended(ids), between)


def pool_job(home: Path) -> Lifecycle:
    store, driver = open_store(home), FakeStackDriver()
    spec = task("p", "", setup="echo worker-setup")
    store.apply_pool("p", user="u", spec=spec, spec_hash="h1",
                     policy={"workers": 1, "min_workers": None, "max_workers": None, "idle_timeout": None,
                             "jobs_per_worker": 1},
                     plan={}, storage=None)
    ids = submit(store, task("t", "echo on-pool"), pool="p")
    user = open_store(home)

    def between(_store: StateStore, _drv: FakeStackDriver) -> None:
        job, pool = user.job(ids[0]), user.pool("p")
        if job and job.status == "SUCCEEDED" and pool and pool.status == "ACTIVE":
            user.pool_down("p", "u")

    def done(store: StateStore) -> bool:
        pool = store.pool("p")
        return pool is not None and pool.status == "TERMINATED" and not store.live_stacks()

    return Lifecycle(store, driver, FakeAgents(driver), ids, done, between)


def submit_group(store: StateStore, *tasks: dict[str, Any], primary: list[str] | None = None,
                 delay: float | None = None) -> list[int]:
    spec = {"name": "g", "is_pipeline": True, "execution": "parallel", "primary_tasks": primary,
            "termination_delay": delay, "tasks": list(tasks)}
    return store.submit(spec, [{} for _ in tasks], user="u")


def group(home: Path) -> Lifecycle:
    """A job group of two tasks, both run at once (the second with a setup), both succeed."""
    store, driver = open_store(home), FakeStackDriver()
    ids = submit_group(store, task("a", "echo a"), task("b", "echo b", setup="echo s"))
    return Lifecycle(store, driver, FakeAgents(driver), ids, ended(ids))


def group_failing(home: Path) -> Lifecycle:
    """A job group whose primary task fails (one restart spent first) while its auxiliary server runs: the server
    is ended at once, CANCELLED, and the group takes the trainer's FAILED."""
    store, driver = open_store(home), FakeStackDriver()
    ids = submit_group(store, task("trainer", "exit 1", job_recovery={"max_restarts_on_errors": 1}),
                       task("server", "serve forever"), primary=["trainer"], delay=30.0)
    agents = FakeAgents(driver, hold=lambda node, run_id, command: "serve" in command)
    return Lifecycle(store, driver, agents, ids, ended(ids))


def group_launch_fails(home: Path) -> Lifecycle:
    """A job group whose second task never gets capacity on the group's infra (the first holds it) and gives up:
    its FAILED_NO_RESOURCE fails the group, and the first task, up and held at the barrier, is cancelled (SkyPilot's
    rule)."""
    store, driver = open_store(home), FakeStackDriver(capacity={"region-a": 1, "region-b": 1})
    ids = submit_group(store, task("server", "serve forever"),
                       task("trainer", "train", job_recovery={"max_duration_s": 0.0}))
    agents = FakeAgents(driver, hold=lambda node, run_id, command: "serve" in command)
    return Lifecycle(store, driver, agents, ids, ended(ids))


def group_cancel_task(home: Path) -> Lifecycle:
    """`jobs cancel --task server --graceful` of a group: that task alone ends CANCELLED (its run stopped first),
    the trainer goes on and succeeds, and the group is SUCCEEDED (the server is auxiliary)."""
    store, driver = open_store(home), FakeStackDriver()
    ids = submit_group(store, task("trainer", "train"), task("server", "serve forever"), primary=["trainer"])
    agents = FakeAgents(driver, hold=lambda node, run_id, command: run_id.startswith("run-"))
    user = open_store(home)

    def between(_store: StateStore, _drv: FakeStackDriver) -> None:
        running = [r for runs in agents.runs.values() for r in runs.values() if r.state == "running"]
        if len(running) == 2:  # both run at once: the user cancels the server, then the trainer ends
            user.request_cancel(ids[0], "u", task_index=1, graceful=True)
        tasks = user.tasks(ids)[ids[0]]
        if tasks[1].status == "CANCELLED":
            for runs in agents.runs.values():
                for run in runs.values():
                    if run.state == "running":
                        run.state, run.exit_code = "exited", 0

    return Lifecycle(store, driver, agents, ids, ended(ids), between)


def graceful_cancel(home: Path) -> Lifecycle:
    """`jobs cancel --graceful` of a running job: its run is stopped (SIGTERM) before the teardown."""
    store, driver = open_store(home), FakeStackDriver()
    ids = submit(store, task("t", "echo forever"))
    agents = FakeAgents(driver, hold=lambda node, run_id, command: run_id.startswith("run-"))
    user = open_store(home)

    def between(_store: StateStore, _drv: FakeStackDriver) -> None:
        if held_node(agents):
            user.request_cancel(ids[0], "u", graceful=True, graceful_timeout=600)

    return Lifecycle(store, driver, agents, ids, ended(ids), between)


LIFECYCLES = {"single": single, "failing-with-restarts": failing_with_restarts, "pipeline": pipeline,
              "preemption": preemption, "cancel": cancel, "pool-job": pool_job, "group": group,
              "group-failing": group_failing, "group-cancel-task": group_cancel_task,
              "group-launch-fails": group_launch_fails, "graceful-cancel": graceful_cancel}
EXPECTED = {"single": "SUCCEEDED", "failing-with-restarts": "FAILED", "pipeline": "SUCCEEDED",
            "preemption": "SUCCEEDED", "cancel": "CANCELLED", "pool-job": "SUCCEEDED", "group": "SUCCEEDED",
            "group-failing": "FAILED", "group-cancel-task": "SUCCEEDED", "group-launch-fails": "FAILED_NO_RESOURCE",
            "graceful-cancel": "CANCELLED"}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with its state database migrated once for the module; each run starts from a copy of it (a copy is
    a few milliseconds, a migration a second or more)."""
    home = tmp_path_factory.mktemp("crash-template")
    (home / "config.yaml").write_text(CONFIG)
    StateStore(home).engine.dispose()
    return home


@pytest.fixture(autouse=True)
def _template_here(template: Path, tmp_path: Path) -> None:
    (tmp_path / "template").symlink_to(template, target_is_directory=True)


def play(tmp_path: Path, name: str, crash_at: int | None, *, leases: bool = False) -> Outcome:
    """One run of a lifecycle in a home copied from the template `tmp_path / "template"` (this module's, linked by
    the fixture above; made here for a caller from another module)."""
    template = tmp_path / "template"
    if not template.exists():
        template.mkdir()
        (template / "config.yaml").write_text(CONFIG)
        StateStore(template).engine.dispose()
    home = tmp_path / f"{name}-{crash_at}{'-leases' if leases else ''}"
    shutil.copytree(template, home)
    life = LIFECYCLES[name](home)
    counter = drive(home, life.store, life.driver, life.agents, life.done, crash_at=crash_at, between=life.between,
                    leases=leases)
    if crash_at is not None:
        assert counter.crashed, f"write {crash_at} never came"
    return outcome(life.store, life.driver, life.agents, life.job_ids, counter.count)


@pytest.mark.parametrize("name", list(LIFECYCLES))
def test_a_crash_at_every_write_ends_as_without_a_crash(tmp_path: Path, name: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SORTIE_HOME", str(tmp_path))
    baseline = play(tmp_path, name, None)
    assert set(baseline.statuses.values()) == {EXPECTED[name]}, baseline
    assert baseline.leftovers == []
    for n in range(1, baseline.writes + 1):
        crashed = play(tmp_path, name, n)
        for field in ("statuses", "task_statuses", "attempts", "recoveries", "restarts", "stacks_up",
                      "runs_started", "leftovers"):
            assert getattr(crashed, field) == getattr(baseline, field), (
                f"{name}, crash at write {n} of {baseline.writes}: {field} {getattr(crashed, field)} != "
                f"{getattr(baseline, field)}")
    CRASH_POINTS_TRIED[name] = baseline.writes
    print(f"\n{name}: {baseline.writes} crash points tried, each ended as without a crash")


# A job lease; a pool lease with its job; a job group's transitions (each task's, the group's end, a task's cancel,
# a launch failure that fails the group) under the lease.
@pytest.mark.parametrize("name", ["pipeline", "pool-job", "group-failing", "group-cancel-task", "group-launch-fails"])
def test_a_replica_crashed_at_every_write_ends_as_without_a_crash(tmp_path: Path, name: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14: the same with the controller as a replica: its claims and lease renewals are writes too, every
    transition is guarded by its leases, and the restarted replica (same id) carries on with what it held."""
    monkeypatch.setenv("SORTIE_HOME", str(tmp_path))
    baseline = play(tmp_path, name, None, leases=True)
    assert set(baseline.statuses.values()) == {EXPECTED[name]}, baseline
    plain = play(tmp_path, name, None)
    assert baseline.writes > plain.writes  # the claims: more crash points than without leases
    for n in range(1, baseline.writes + 1):
        crashed = play(tmp_path, name, n, leases=True)
        for field in ("statuses", "task_statuses", "attempts", "recoveries", "restarts", "stacks_up",
                      "runs_started", "leftovers"):
            assert getattr(crashed, field) == getattr(baseline, field), (
                f"{name} (replica), crash at write {n} of {baseline.writes}: {field} {getattr(crashed, field)} != "
                f"{getattr(baseline, field)}")
    print(f"\n{name} (replica): {baseline.writes} crash points tried, each ended as without a crash")


def test_the_lifecycles_cover_what_they_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scenarios do what their names say: a restart spent, three tasks, a recovery, a cancelled run."""
    monkeypatch.setenv("SORTIE_HOME", str(tmp_path))
    failing = play(tmp_path, "failing-with-restarts", None)
    assert list(failing.attempts.values()) == [3] and list(failing.restarts.values()) == [[2]]
    piped = play(tmp_path, "pipeline", None)
    assert list(piped.task_statuses.values()) == [["SUCCEEDED"] * 3] and len(piped.stacks_up) == 3
    preempted = play(tmp_path, "preemption", None)
    assert list(preempted.recoveries.values()) == [[1]] and len(preempted.stacks_up) == 2
    cancelled = play(tmp_path, "cancel", None)
    assert list(cancelled.attempts.values()) == [1]
    grouped = play(tmp_path, "group", None)
    assert list(grouped.task_statuses.values()) == [["SUCCEEDED"] * 2] and len(grouped.stacks_up) == 2
    failing = play(tmp_path, "group-failing", None)
    assert list(failing.task_statuses.values()) == [["FAILED", "CANCELLED"]]
    assert list(failing.restarts.values()) == [[1, 0]] and list(failing.attempts.values()) == [3]
    launch_failed = play(tmp_path, "group-launch-fails", None)
    assert list(launch_failed.task_statuses.values()) == [["CANCELLED", "FAILED_NO_RESOURCE"]]
    # the trainer's one `up` found no capacity; the server, held at the barrier, never ran; nothing is left
    assert len(launch_failed.stacks_up) == 2 and launch_failed.runs_started == [] and launch_failed.leftovers == []
    one_cancelled = play(tmp_path, "group-cancel-task", None)
    assert list(one_cancelled.task_statuses.values()) == [["SUCCEEDED", "CANCELLED"]]
    graceful = play(tmp_path, "graceful-cancel", None)
    assert list(graceful.attempts.values()) == [1]
