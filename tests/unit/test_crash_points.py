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

from orchestrator.infra.fake_driver import FakeStackDriver
from state.store import StateStore
from tests.support.controller_harness import CONFIG, FakeAgents, Outcome, drive, outcome

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
                                                  "FAILED_CONTROLLER", "FAILED_PRECHECKS") for r in rows) \
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


LIFECYCLES = {"single": single, "failing-with-restarts": failing_with_restarts, "pipeline": pipeline,
              "preemption": preemption, "cancel": cancel, "pool-job": pool_job}
EXPECTED = {"single": "SUCCEEDED", "failing-with-restarts": "FAILED", "pipeline": "SUCCEEDED",
            "preemption": "SUCCEEDED", "cancel": "CANCELLED", "pool-job": "SUCCEEDED"}


def play(tmp_path: Path, name: str, crash_at: int | None, *, leases: bool = False) -> Outcome:
    template = tmp_path / "template"
    if not template.exists():  # the schema is made once, then copied: each run starts from an empty state
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


@pytest.mark.parametrize("name", ["pipeline", "pool-job"])  # a job lease; a pool lease with its job
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
