"""Infra, the stack driver: the one interface through which Sortie creates and destroys infrastructure.

Two implementations: `PulumiStackDriver` (the Automation API, each operation in its own worker
process) and `FakeStackDriver` (in memory, for unit tests of the layers above).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from stacks.spec import StackProgram

ChangeOp = Literal["create", "update", "replace", "delete", "same"]
T = TypeVar("T")


@dataclass(frozen=True)
class ResourceChange:
    """What a preview says will happen to one resource, with the input keys that cause it."""

    urn: str
    type: str
    name: str
    op: ChangeOp
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preview:
    stack: str
    changes: tuple[ResourceChange, ...]

    def counts(self) -> dict[str, int]:
        return dict(Counter(c.op for c in self.changes if c.op != "same"))

    def by_op(self, op: ChangeOp) -> list[ResourceChange]:
        return [c for c in self.changes if c.op == op]

    @property
    def has_changes(self) -> bool:
        return any(c.op != "same" for c in self.changes)


@dataclass(frozen=True)
class ResourceState:
    """One resource in a stack's state; secret outputs are left out."""

    urn: str
    type: str
    name: str
    id: str
    outputs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RefreshResult:
    """After asking the infra: the resources still there, and those it no longer has."""

    stack: str
    alive: tuple[ResourceState, ...]
    gone: tuple[ResourceState, ...]


@dataclass(frozen=True)
class UpResult:
    """A stack's outputs after `up`. Secret values are included (the caller needs the token);
    `secret_keys` names them, so nothing prints them."""

    stack: str
    outputs: Mapping[str, Any]
    secret_keys: frozenset[str] = frozenset()

    def public_outputs(self) -> dict[str, Any]:
        return {k: ("[secret]" if k in self.secret_keys else v) for k, v in self.outputs.items()}


class StackDriver(Protocol):
    """Create, inspect and destroy stacks. Every method blocks until the operation is done; call
    from several threads for concurrency (implementations bound it)."""

    def up(self, stack: str, program: StackProgram, *, cleanup_on_failure: bool = True) -> UpResult:
        """Create or update the stack. On failure, unless told otherwise, whatever the failed
        update created is destroyed and the stack removed before the error is raised."""
        ...

    def preview(self, stack: str, program: StackProgram) -> Preview:
        """What `up` would do, per resource; changes nothing and takes no lock."""
        ...

    def refresh(self, stack: str) -> RefreshResult:
        """Ask the infra what still exists; resources it no longer has leave the state."""
        ...

    def destroy(self, stack: str, *, remove: bool = True) -> None:
        """Delete every resource of the stack and, by default, the stack itself. A stack that does
        not exist is already destroyed."""
        ...

    def remove(self, stack: str) -> None:
        """Remove an empty stack from the backend."""
        ...

    def list_stacks(self) -> list[str]:
        """Names of the stacks in the backend for Sortie's project."""
        ...

    def log_path(self, stack: str) -> Path | None:
        """Where the engine's output for the stack goes (None where there is no engine)."""
        ...


def copy_engine_output(driver: StackDriver, stack: str, fn: Callable[[], T], sink: Callable[[bytes], None]) -> T:
    """Run one stack operation and hand the engine output it wrote to `sink` (a job's or a pool's log)."""
    log_path = driver.log_path(stack)
    start = log_path.stat().st_size if log_path and log_path.exists() else 0
    try:
        return fn()
    finally:
        if log_path and log_path.exists():
            with log_path.open("rb") as fh:
                fh.seek(start)
                sink(fh.read())


def stack_name(prefix: str, kind: str, owner_id: int | str, attempt: int) -> str:
    """Deterministic stack names, so a restarted controller finds every stack it made:
    `<prefix>-<kind>-<owner id>-<attempt>`: a job's cluster is `sortie-job-42-t0-1` (job 42, task 0, attempt 1).
    Pool workers are named by their pool (`sortie-pool-gpu-w3`, `state.pool_transitions.create_worker`)."""
    return f"{prefix}-{kind}-{owner_id}-{attempt}"
