"""The state machine of Sortie's rows, in one place: every status and phase as an enum, and the table of
legal moves, each with the named transition (in `state.transitions` and `state.pool_transitions`) that makes it.

Where this sits: the services and the controller decide *what* should happen; the named transitions are the
only code that changes a status, each in one guarded transaction with its event, and every status write goes
through `state.apply.apply`, which takes its move from this table at run time (`UPDATE ... WHERE id = :id AND
status IN (:sources)`, the row count checked, a `TransitionError` when the row moved on). `docs/state-machine.md`
draws this table (`python -m state.diagram`; a test keeps it current). A crash can
then only fall between two transitions, and a restarted controller resumes from a state that makes sense.

Statuses are SkyPilot's for jobs and tasks; attempts, workers, stacks and pools are Sortie's own.
"""

from __future__ import annotations

from enum import StrEnum

from orchestrator.errors import SortieError


class JobStatus(StrEnum):
    """A managed job's status (and, with the same names, each of its tasks'), as SkyPilot names them."""

    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RECOVERING = "RECOVERING"
    CANCELLING = "CANCELLING"
    SUCCEEDED = "SUCCEEDED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    FAILED_SETUP = "FAILED_SETUP"
    FAILED_PRECHECKS = "FAILED_PRECHECKS"
    FAILED_NO_RESOURCE = "FAILED_NO_RESOURCE"
    FAILED_CONTROLLER = "FAILED_CONTROLLER"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def failed(self) -> bool:
        return self.value.startswith("FAILED")


TaskStatus = JobStatus  # a task takes its job's names (SkyPilot shows both in one column)

TERMINAL: frozenset[JobStatus] = frozenset({
    JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.FAILED_SETUP, JobStatus.FAILED_PRECHECKS,
    JobStatus.FAILED_NO_RESOURCE, JobStatus.FAILED_CONTROLLER})
ACTIVE: frozenset[JobStatus] = frozenset(s for s in JobStatus if s not in TERMINAL)


class Phase(StrEnum):
    """Where an attempt (one cluster of one task) is in its life."""

    PROVISIONING = "PROVISIONING"
    SYNCING = "SYNCING"
    SETTING_UP = "SETTING_UP"
    RUNNING = "RUNNING"
    TEARDOWN = "TEARDOWN"
    DONE = "DONE"


OPEN_PHASES: frozenset[Phase] = frozenset(p for p in Phase if p != Phase.DONE)
WORKING_PHASES: frozenset[Phase] = frozenset({Phase.PROVISIONING, Phase.SYNCING, Phase.SETTING_UP, Phase.RUNNING})


class AfterTeardown(StrEnum):
    """What follows an attempt's teardown."""

    RELAUNCH = "relaunch"  # a new attempt of the same task (recovery)
    NEXT = "next"          # the task succeeded: the pipeline's next task
    FINISH = "finish"      # the job ends with its `final_status`
    END_TASK = "end-task"  # a job group's task ends with the attempt's outcome; the group ends with its last task


class Outcome(StrEnum):
    """How an attempt ended: a failure class of the recovery policy, or the status it gave the job."""

    PREEMPTED = "PREEMPTED"
    USER_ERROR = "USER_ERROR"
    SETUP_ERROR = "SETUP_ERROR"
    NO_CAPACITY = "NO_CAPACITY"
    ERROR = "ERROR"
    RELAUNCH = "RELAUNCH"
    SUCCEEDED = "SUCCEEDED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    FAILED_SETUP = "FAILED_SETUP"
    FAILED_PRECHECKS = "FAILED_PRECHECKS"
    FAILED_NO_RESOURCE = "FAILED_NO_RESOURCE"
    FAILED_CONTROLLER = "FAILED_CONTROLLER"


class WorkerStatus(StrEnum):
    PROVISIONING = "PROVISIONING"
    SETTING_UP = "SETTING_UP"
    READY = "READY"
    DRAINING = "DRAINING"
    FAILED = "FAILED"
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"


LIVE_WORKER: frozenset[WorkerStatus] = frozenset(s for s in WorkerStatus if s != WorkerStatus.TERMINATED)


class StackStatus(StrEnum):
    CREATING = "CREATING"
    UP = "UP"
    DESTROYING = "DESTROYING"
    DESTROYED = "DESTROYED"
    FAILED = "FAILED"  # an operation failed (a destroy is retried until it succeeds)


class StackKind(StrEnum):
    CLUSTER = "cluster"
    POOL_WORKER = "pool-worker"
    CONTROLLER = "controller"


class PoolStatus(StrEnum):
    ACTIVE = "ACTIVE"
    DOWN = "DOWN"  # its workers are being destroyed
    TERMINATED = "TERMINATED"


class TransitionError(SortieError):
    """A row was not in a state the transition expects (another writer moved it, or the caller's view is
    stale). The controller logs it and re-reads; it never writes over it."""


_J, _P, _W, _S, _O = JobStatus, Phase, WorkerStatus, StackStatus, PoolStatus
_ACTIVE = tuple(sorted(ACTIVE))
_TERMINAL = tuple(sorted(TERMINAL))
Move = tuple[str, str | None, str]  # (table, from, to); `from` None is a new row


def _moves(table: str, sources: tuple[str | None, ...] | str | None, targets: tuple[str, ...] | str) -> set[Move]:
    sources = sources if isinstance(sources, tuple) else (sources,)
    targets = targets if isinstance(targets, tuple) else (targets,)
    return {(table, s, t) for s in sources for t in targets}


# The legal moves, per named transition. tests/unit/test_machine.py runs every transition and checks that it
# only moves rows along its own entry.
TRANSITIONS: dict[str, frozenset[Move]] = {name: frozenset(moves) for name, moves in {
    "submit": _moves("job", None, _J.PENDING) | _moves("task", None, _J.PENDING),
    # the first task takes the job's status, the later ones are CANCELLED
    "fail_staging": (_moves("job", _J.PENDING, _J.FAILED_PRECHECKS)
                     | _moves("task", _J.PENDING, (_J.FAILED_PRECHECKS, _J.CANCELLED))),
    "request_cancel": set(),  # a flag, not a status: the controller acts on it
    "finish_staging": set(),
    "storage_cleaned": set(),  # a time, guarded by a terminal status
    "controller_error": set(),  # a count and a back-off time, not a status
    "report_node_condition": set(),  # a node's condition in the job's DETAILS
    "place_attempt": (_moves("job", (_J.PENDING, _J.STARTING), _J.STARTING)
                      | _moves("job", _J.RECOVERING, _J.RECOVERING)
                      | _moves("task", (_J.PENDING, _J.STARTING, _J.RECOVERING), (_J.STARTING, _J.RECOVERING))
                      | _moves("attempt", None, _P.PROVISIONING) | _moves("stack", None, _S.CREATING)),
    "assign_worker": (_moves("job", (_J.PENDING, _J.RECOVERING), _J.RUNNING)
                      | _moves("task", (_J.PENDING, _J.STARTING, _J.RECOVERING), _J.RUNNING)
                      | _moves("attempt", None, _P.RUNNING)),
    "wait_for_capacity": _moves("job", (_J.PENDING, _J.STARTING), _J.STARTING),
    "mark_cancelling": _moves("job", (_J.PENDING, _J.STARTING, _J.RECOVERING, _J.RUNNING), _J.CANCELLING),
    "attempt_provisioned": _moves("attempt", _P.PROVISIONING, _P.SYNCING) | _moves("stack", _S.CREATING, _S.UP),
    "attempt_running": (_moves("attempt", _P.SYNCING, (_P.SETTING_UP, _P.RUNNING))
                        | _moves("attempt", _P.SETTING_UP, _P.RUNNING)
                        | _moves("job", (_J.STARTING, _J.RECOVERING), _J.RUNNING)
                        | _moves("task", (_J.STARTING, _J.RECOVERING), _J.RUNNING)),
    "begin_teardown": (_moves("attempt", tuple(sorted(WORKING_PHASES)), _P.TEARDOWN)
                       | _moves("job", (_J.STARTING, _J.RUNNING, _J.RECOVERING), _J.RECOVERING)
                       | _moves("job", _ACTIVE, _J.CANCELLING)
                       | _moves("stack", (_S.CREATING, _S.UP, _S.FAILED), _S.DESTROYING)),
    "end_attempt": (_moves("attempt", (_P.TEARDOWN, _P.PROVISIONING), _P.DONE)
                    | _moves("stack", (_S.CREATING, _S.DESTROYING, _S.FAILED), (_S.DESTROYED, _S.FAILED))
                    | _moves("task", (_J.STARTING, _J.RUNNING, _J.RECOVERING), _J.RECOVERING)
                    | _moves("job", (_J.RUNNING, _J.STARTING, _J.RECOVERING), _J.STARTING)  # the next task
                    | _moves("task", _ACTIVE, _TERMINAL) | _moves("job", _ACTIVE, _TERMINAL)),
    "finish_job": _moves("job", _ACTIVE, _TERMINAL) | _moves("task", _ACTIVE, _TERMINAL),
    # a job group's task that has no attempt in progress ends (infeasible, out of patience, cancelled, an
    # auxiliary task whose primary tasks are done); the group ends with its last task
    "end_task": _moves("task", _ACTIVE, _TERMINAL) | _moves("job", _ACTIVE, _TERMINAL),
    "stack_failed": _moves("stack", (_S.CREATING, _S.UP, _S.DESTROYING, _S.FAILED), _S.FAILED),
    "stack_destroyed": _moves("stack", (_S.CREATING, _S.UP, _S.DESTROYING, _S.FAILED), _S.DESTROYED),
    "record_stack": _moves("stack", (None, _S.DESTROYED, _S.FAILED), _S.CREATING),
    "stack_up": _moves("stack", _S.CREATING, _S.UP),
    # pools and their workers (and the workers' stacks)
    # a new spec for a pool, or a pool again after it terminated (not while it goes down)
    "apply_pool": _moves("pool", (None, _O.ACTIVE, _O.TERMINATED), _O.ACTIVE),
    "pool_down": _moves("pool", _O.ACTIVE, _O.DOWN),
    "pool_terminated": _moves("pool", _O.DOWN, _O.TERMINATED),
    "create_worker": _moves("worker", None, _W.PROVISIONING) | _moves("stack", None, _S.CREATING),
    "worker_provisioned": _moves("worker", _W.PROVISIONING, _W.SETTING_UP) | _moves("stack", _S.CREATING, _S.UP),
    "worker_ready": _moves("worker", _W.SETTING_UP, _W.READY),
    "drain_worker": _moves("worker", _W.READY, _W.DRAINING),
    "fail_worker": (_moves("worker", (_W.PROVISIONING, _W.SETTING_UP, _W.READY, _W.DRAINING), _W.FAILED)
                    | _moves("worker", _W.PROVISIONING, _W.TERMINATED)
                    | _moves("stack", _S.CREATING, (_S.DESTROYED, _S.FAILED))),
    "terminate_worker": (_moves("worker", (_W.PROVISIONING, _W.SETTING_UP, _W.READY, _W.DRAINING, _W.FAILED),
                                _W.TERMINATING)
                         | _moves("stack", (_S.CREATING, _S.UP, _S.FAILED), _S.DESTROYING)),
    "worker_terminated": (_moves("worker", _W.TERMINATING, _W.TERMINATED)
                          | _moves("stack", (_S.DESTROYING, _S.FAILED), _S.DESTROYED)),
}.items()}


def legal(transition: str, table: str, before: str | None, after: str) -> bool:
    """Whether `transition` may move a row of `table` from `before` to `after` (staying put is always legal)."""
    return (before is not None and before == after) or (table, before, after) in TRANSITIONS[transition]
