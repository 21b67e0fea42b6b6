"""The one path that writes a status: `apply` moves existing rows, `create` adds new ones. The table of legal moves
(`state.machine.TRANSITIONS`) is the guard itself, checked at run time, not a comment beside the code.

`apply(session, transition, table, where, to=...)` is `UPDATE <table> SET <status>=to, ... WHERE where AND <status>
IN (expected)` in the caller's transaction, where *expected* is every status from which the table lets
`transition` move a row of `table` to `to` (narrowed to `expect` when the caller knows more). A row anywhere else is
not touched, and with `rows=ONE` (the default) that raises `TransitionError`, so nothing of the transaction commits.
A move the table never allows from any expected status raises `IllegalMove` before anything is written. Without `to`
the status stays where it is and `expect` only guards the other values. The lease (`job_lease`: a job's; `lease`: a
named one, a pool's or a janitor's) is checked in the same transaction, once per session.

A test (`tests/unit/test_status_writes.py`) fails if any other module writes a status column. Adding a transition:
its moves in `state.machine.TRANSITIONS`, then its method (`state.transitions` or `state.pool_transitions`) opens
one transaction and calls `apply`/`create` and `event`/`pool_event`; `python -m state.diagram > docs/state-machine.md`
regenerates the diagram (`docs/state-machine.md` says the same, step by step).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, update

from state.leases import hold, hold_job
from state.machine import TRANSITIONS, TransitionError, legal
from state.models import AttemptRow, Base, JobRow, PoolRow, StackRow, TaskRow, WorkerRow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

# The machine's table names, their models and status columns.
MODELS: dict[str, type[Base]] = {"job": JobRow, "task": TaskRow, "attempt": AttemptRow, "stack": StackRow,
                                 "worker": WorkerRow, "pool": PoolRow}
STATUS_COLUMNS: dict[type[Base], str] = {AttemptRow: "phase", JobRow: "status", TaskRow: "status",
                                         StackRow: "status", WorkerRow: "status", PoolRow: "status"}
_HELD = "sortie.leases-held"  # in `Session.info`: the leases this transaction already checked


class Rows(Enum):
    ONE = "one"  # exactly one row moves, else TransitionError
    ANY = "any"  # any number (a batch, or a row that may already be where it should be)


ONE, ANY = Rows.ONE, Rows.ANY


class IllegalMove(TransitionError):
    """The code asked for a move the table of legal moves does not have: a bug, refused before any write."""


def sources(transition: str, table: str, to: str) -> set[str]:
    """The statuses from which `transition` may move a row of `table` to `to`, staying put included (`legal`)."""
    return {before for (t, before, after) in TRANSITIONS[transition]
            if t == table and after == to and before is not None} | {to}


def guard_leases(session: Session, *, job_lease: int | None = None, lease: str | None = None) -> None:
    """Check the job's lease (`job_lease`) and the named `lease` in this transaction, each once per session
    (`state.leases.hold_job` / `hold`: a replica that lost it raises `LeaseLost`; the CLI holds none)."""
    held: set[Any] = session.info.setdefault(_HELD, set())
    if job_lease is not None and ("job", job_lease) not in held:
        hold_job(session, job_lease)
        held.add(("job", job_lease))
    if lease is not None and ("lease", lease) not in held:
        hold(session, lease)
        held.add(("lease", lease))


def apply(session: Session, transition: str, table: str, where: Sequence[Any], *, to: str | None = None,
          expect: Iterable[str] | None = None, rows: Rows = ONE, what: str = "", job_lease: int | None = None,
          lease: str | None = None, **values: Any) -> int:
    """Move the rows of `table` that match `where` to `to` along `transition`'s entry of the table (with `values`
    written too), in the caller's transaction. Returns the rows moved. See the module's docstring."""
    if transition not in TRANSITIONS:
        raise IllegalMove(f"{transition}: not a transition of state.machine.TRANSITIONS")
    model = MODELS[table]
    column_name = STATUS_COLUMNS[model]
    if column_name in values:
        raise IllegalMove(f"{transition}: the {table}'s {column_name} is `to`, not one of the values")
    allowed: set[str] | None = None
    if to is not None:
        allowed = sources(transition, table, str(to))
        if expect is not None:
            allowed &= {str(s) for s in expect}
        if not allowed:
            raise IllegalMove(f"{transition}: no legal move of a {table} to {to} from {sorted(map(str, expect or []))}")
        values[column_name] = to
    elif expect is not None:
        allowed = {str(s) for s in expect}
    guard_leases(session, job_lease=job_lease, lease=lease)
    conditions = list(where)
    if allowed is not None:
        conditions.append(getattr(model, column_name).in_(sorted(allowed)))
    moved = cast("CursorResult[Any]", session.execute(update(model).where(*conditions).values(**values))).rowcount
    if rows is ONE and moved != 1:
        raise TransitionError(f"{what or transition}: the {table} is not in an expected state")
    return int(moved)


def create(session: Session, transition: str, row: Base, *, merge: bool = False) -> None:
    """Add a new row (`merge`: or replace the one with its key) with its first status, if the table lets
    `transition` create a row of its table in that status."""
    model = type(row)
    table = next(name for name, m in MODELS.items() if m is model)
    status = str(getattr(row, STATUS_COLUMNS[model]))
    if not legal(transition, table, None, status):
        raise IllegalMove(f"{transition}: a new {table} may not start as {status}")
    if merge:
        session.merge(row)
    else:
        session.add(row)
