"""A controller on fakes, for unit tests of the reconcilers and the crash-point harness.

- `FakeAgents`: the node agents of the fake driver's nodes, in memory. A run exits at once with the code its
  command asks for (`exit N`, else 0), unless the scenario keeps it running; a node the fake driver has
  preempted (or no longer has) is unreachable. A second start of one run id is refused (409), as the real agent
  does, and every start the agent accepted is recorded: a task run twice shows there.
- `Crash`: raised at the Nth write transaction of the store (before its commit, so the write is lost), as a
  controller killed between two writes. It is a BaseException: nothing in the controller catches it.
- `drive`: ticks a controller (operations inline, so each tick is deterministic) until the scenario says it is
  over; on a crash it starts a new controller over the same state and infra, as a restart does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import event

from orchestrator.config import load_config
from orchestrator.controller.daemon import Controller
from orchestrator.infra.agent_client import AgentClient, AgentError, RunStatus
from state.store import StateStore
from tests.support.fake_driver import FakeStackDriver

_EXIT = re.compile(r"\bexit (\d+)\s*$")


class Crash(BaseException):
    """The controller died (between two writes)."""


@dataclass
class FakeRun:
    command: str
    env: dict[str, str]
    user: str | None = None  # a pool job's user key (issue 17)
    state: str = "running"
    exit_code: int | None = None
    cancelled: bool = False


@dataclass
class FakeAgents:
    driver: FakeStackDriver
    # (node_id, run_id, command) -> True to keep the run running (the scenario ends it: preempt, cancel)
    hold: Callable[[str, str, str], bool] = lambda node, run_id, command: False
    runs: dict[str, dict[str, FakeRun]] = field(default_factory=dict)
    started: list[tuple[str, str]] = field(default_factory=list)  # (node_id, run_id) of every accepted start
    removed_users: list[tuple[str, str]] = field(default_factory=list)  # (node_id, key) of each pool job's end

    def _node_alive(self, node_id: str) -> bool:
        for stack, resources in self.driver.stacks.items():
            for name, resource in resources.items():
                if resource["id"] == node_id:
                    return (stack, name) not in self.driver.preempted
        return False

    def connect(self, url: str, token: str) -> FakeAgent:
        return FakeAgent(self, url.removeprefix("fake://"))


@dataclass
class FakeAgent:
    agents: FakeAgents
    node_id: str

    def _runs(self) -> dict[str, FakeRun]:
        if not self.agents._node_alive(self.node_id):
            raise AgentError(f"agent {self.node_id} is unreachable")
        return self.agents.runs.setdefault(self.node_id, {})

    def _status(self, run_id: str, run: FakeRun) -> RunStatus:
        return RunStatus(run_id=run_id, state=run.state, exit_code=run.exit_code, pid=1, started_at=0.0,
                         ended_at=None, log_size=0)

    def health(self) -> dict[str, Any]:
        self._runs()
        return {"ok": True}

    def run(self, command: str, env: dict[str, str] | None = None, cwd: str | None = None,
            run_id: str | None = None, view: bool = True, user: str | None = None) -> str:
        runs = self._runs()
        assert run_id is not None
        if run_id in runs:
            raise AgentError(f"run {run_id} already started", 409)
        run = FakeRun(command, dict(env or {}), user)
        if not self.agents.hold(self.node_id, run_id, command):
            match = _EXIT.search(command)
            run.state, run.exit_code = "exited", int(match.group(1)) if match else 0
        runs[run_id] = run
        self.agents.started.append((self.node_id, run_id))
        return run_id

    start = AgentClient.start  # the real client's idempotent start, over this fake's `run`

    def status(self, run_id: str) -> RunStatus:
        runs = self._runs()
        if run_id not in runs:
            raise AgentError(f"no run {run_id}", 404)
        return self._status(run_id, runs[run_id])

    def log(self, run_id: str, offset: int = 0) -> tuple[bytes, int]:
        self._runs()
        return b"", offset

    def cancel(self, run_id: str) -> RunStatus:
        runs = self._runs()
        if run_id not in runs:
            raise AgentError(f"no run {run_id}", 404)
        run = runs[run_id]
        if run.state == "running":
            run.state, run.exit_code, run.cancelled = "cancelled", 143, True
        return self._status(run_id, run)

    def wait(self, run_id: str, timeout: float = 60.0, interval: float = 0.1) -> RunStatus:
        return self.status(run_id)

    def upload(self, source: str, dest: str) -> str:
        self._runs()
        return dest

    def link(self, dest: str, target: str | None) -> str:
        self._runs()
        return dest

    def remove_user(self, key: str) -> dict:
        self._runs()
        self.agents.removed_users.append((self.node_id, key))
        return {}


class WriteCounter:
    """Counts the store's write transactions; raises `Crash` at the `crash_at`-th (once)."""

    def __init__(self, store: StateStore, crash_at: int | None = None) -> None:
        self.count = 0
        self.crash_at = crash_at
        self.crashed = False
        event.listen(store._sessions, "before_commit", self._before_commit)

    def _before_commit(self, _session: Any) -> None:
        self.count += 1
        if self.crash_at is not None and self.count == self.crash_at and not self.crashed:
            self.crashed = True
            raise Crash(f"killed at write {self.count}")


CONFIG = ("controller:\n  poll_interval_seconds: 0.001\n  grace_misses: 1\n  controller_error_retries: 2\n"
          "local:\n  regions:\n    - {name: region-a}\n    - {name: region-b}\n")


@dataclass
class Outcome:
    """What a lifecycle came to: compared between a run without a crash and one with."""

    statuses: dict[int, str]
    task_statuses: dict[int, list[str]]
    attempts: dict[int, int]
    recoveries: dict[int, list[int]]
    restarts: dict[int, list[int]]
    stacks_up: list[str]
    runs_started: list[str]
    leftovers: list[str]
    writes: int = 0


REPLICA = "replica-t"


def replica_store(store: StateStore, home: Path) -> StateStore:
    """The controller's own store on the same database, its transitions guarded by the replica's leases (issue 14);
    the scenario's hand (submit, cancel, pool apply) keeps writing through `store`, as the CLI does."""
    mine = StateStore(home, engine=store.engine)
    mine.lease_owner = REPLICA
    return mine


def make_controller(store: StateStore, driver: FakeStackDriver, agents: FakeAgents, home: Path) -> Controller:
    from state.leases import Leases

    config = load_config(home)
    leases = (Leases(store, REPLICA, config.controller.lease_seconds, config.controller.max_jobs_per_replica)
              if store.lease_owner == REPLICA else None)  # a restart: the same replica id, a new process
    controller = Controller(store, driver, config, home, inline=True, connect=agents.connect,  # type: ignore[arg-type]
                            leases=leases)
    controller.stack_janitor.period = 0.0
    controller.storage_janitor.period = 0.0
    return controller


def drive(home: Path, store: StateStore, driver: FakeStackDriver, agents: FakeAgents,
          done: Callable[[StateStore], bool], *, crash_at: int | None = None,
          between: Callable[[StateStore, FakeStackDriver], None] | None = None, max_ticks: int = 200,
          leases: bool = False) -> WriteCounter:
    """Tick until `done`; a `Crash` restarts the controller. `between` runs after every tick (the scenario's
    hand: preempt a node, cancel the job). `leases`: the controller is a replica that claims, renews and is guarded
    by its leases, and every write it makes (claims and renewals included) is a crash point."""
    if leases:
        store = replica_store(store, home)
    counter = WriteCounter(store, crash_at)
    controller = make_controller(store, driver, agents, home)
    for _ in range(max_ticks):
        try:
            controller.tick()
        except Crash:
            controller = make_controller(store, driver, agents, home)  # a restart: nothing in memory survives
        if between is not None:
            between(store, driver)
        if done(store):
            return counter
    raise AssertionError(f"the lifecycle did not end in {max_ticks} ticks (crash at {crash_at})")


def outcome(store: StateStore, driver: FakeStackDriver, agents: FakeAgents, job_ids: list[int],
            writes: int) -> Outcome:
    jobs = {j: store.job(j) for j in job_ids}
    tasks = store.tasks(job_ids)
    return Outcome(
        statuses={j: row.status for j, row in jobs.items() if row},
        task_statuses={j: [t.status for t in ts] for j, ts in tasks.items()},
        attempts={j: len(store.attempts(j)) for j in job_ids},
        recoveries={j: [t.recoveries for t in ts] for j, ts in tasks.items()},
        restarts={j: [t.restarts_on_errors for t in ts] for j, ts in tasks.items()},
        stacks_up=sorted({stack for op, stack in driver.operations if op == "up"}),
        runs_started=sorted(run_id for _node, run_id in agents.started),
        leftovers=[*driver.list_stacks(), *[s.name for s in store.live_stacks()]],
        writes=writes,
    )
