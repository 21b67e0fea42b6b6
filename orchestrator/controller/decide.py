"""Pure decisions of the reconcilers: observations in, verdicts out. No I/O, so the state machine is
tested from recorded observation histories."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from orchestrator.job_status import JobStatus


@dataclass(frozen=True)
class NodeRun:
    """One node's answer to a poll about one run."""

    rank: int
    state: Literal["running", "exited", "cancelled", "missing", "unreachable"]
    exit_code: int | None = None


@dataclass(frozen=True)
class RunsVerdict:
    kind: Literal["wait", "done", "node_lost"]
    exit_codes: tuple[int, ...] = ()
    lost_ranks: tuple[int, ...] = ()


def judge_runs(nodes: Sequence[NodeRun], missed_polls: int, grace_misses: int) -> RunsVerdict:
    """Decide from one poll of every node. A node that misses fewer than `grace_misses` polls in a row
    is not lost (a slow agent must not kill a healthy job)."""
    unreachable = tuple(n.rank for n in nodes if n.state == "unreachable")
    if unreachable:
        if missed_polls + 1 >= grace_misses:
            return RunsVerdict("node_lost", lost_ranks=unreachable)
        return RunsVerdict("wait")
    if nodes and all(n.state in ("exited", "cancelled") for n in nodes):
        codes = tuple(n.exit_code if n.exit_code is not None else 1 for n in sorted(nodes, key=lambda n: n.rank))
        return RunsVerdict("done", exit_codes=codes)
    return RunsVerdict("wait")


def setup_outcome(exit_codes: Sequence[int]) -> JobStatus | None:
    """None: setup succeeded on every node; else FAILED_SETUP."""
    return JobStatus.FAILED_SETUP if any(exit_codes) else None


def run_outcome(exit_codes: Sequence[int]) -> JobStatus:
    return JobStatus.SUCCEEDED if not any(exit_codes) else JobStatus.FAILED


def first_failure(exit_codes: Sequence[int]) -> str:
    failed = [(rank, code) for rank, code in enumerate(exit_codes) if code]
    return ", ".join(f"rank {rank} exited with {code}" for rank, code in failed)
