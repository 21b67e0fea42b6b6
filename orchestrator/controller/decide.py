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
    node_error: str | None = None  # the node cannot write its records (a full disk), in the agent's words


@dataclass(frozen=True)
class RunsVerdict:
    kind: Literal["wait", "done", "node_lost", "node_suspect"]  # suspect: a watch broke, no probe answers yet
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


# An agent's answers that say the request itself can never succeed (the task asks for something the node refuses:
# a bad env value, a destination outside the sandbox, a directory it did not place). Not 401 (a replaced node
# with a new token), 404 (a node that lost its state), 408/429 (try again), 409 (asked twice).
_RETRYABLE_4XX = frozenset({401, 404, 408, 409, 429})


def agent_refusal(error: BaseException | None, stage: Literal["sync", "setup", "run"]) -> JobStatus | None:
    """The final status when `error` is the agent refusing a request of the task for good (a 4xx), else None
    (unreachable, 5xx, a full disk: node trouble that a relaunch may cure). A refused file sync or setup is
    FAILED_SETUP; a refused run is FAILED_PRECHECKS (the task asks what no node runs)."""
    status = getattr(error, "status", None)
    if not isinstance(status, int) or not 400 <= status < 500 or status in _RETRYABLE_4XX:
        return None
    return JobStatus.FAILED_PRECHECKS if stage == "run" else JobStatus.FAILED_SETUP


def no_space_note(node_errors: Sequence[tuple[int, str | None]]) -> str | None:
    """One line for DETAILS and an event when nodes report that they cannot write (a full disk), else None."""
    found = [(rank, error) for rank, error in node_errors if error]
    if not found:
        return None
    return "; ".join(f"node {rank}: {error}" for rank, error in sorted(found))
