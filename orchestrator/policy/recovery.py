"""Policy, the recovery policy: a failure class and the attempt history in, the next step out. Pure.

SkyPilot's job_recovery is expressed here: the FAILOVER and EAGER_NEXT_REGION strategies,
`max_restarts_on_errors` and `recover_on_exit_codes`; Sortie adds `max_duration` (a time budget for
waiting on capacity) and `backoff` (initial, max).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from orchestrator.job_status import JobStatus

EAGER_NEXT_REGION = "EAGER_NEXT_REGION"
FAILOVER = "FAILOVER"
DEFAULT_BACKOFF_INITIAL = 30.0
DEFAULT_BACKOFF_MAX = 600.0


class Failure(StrEnum):
    PREEMPTED = "PREEMPTED"          # a node was reclaimed or died (the infra says it is gone)
    USER_ERROR = "USER_ERROR"        # `run` exited non-zero
    SETUP_ERROR = "SETUP_ERROR"      # `setup` exited non-zero
    NO_CAPACITY = "NO_CAPACITY"      # every feasible region said no capacity in this round
    PRECHECK = "PRECHECK"            # infeasible resources, config or credential error


@dataclass(frozen=True)
class RecoveryRules:
    strategy: str = EAGER_NEXT_REGION
    max_restarts_on_errors: int = 0
    recover_on_exit_codes: tuple[int, ...] = ()
    max_duration_s: float | None = None
    backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL
    backoff_max_s: float = DEFAULT_BACKOFF_MAX

    @classmethod
    def from_task(cls, task: dict[str, Any], use_spot: bool) -> RecoveryRules:
        """The rules of a task as stored (its first candidate's job_recovery; the loader refuses candidates
        whose job_recovery differ). The default strategy is EAGER_NEXT_REGION for every job, spot or on demand,
        as in SkyPilot; `use_spot` no longer changes it and is kept for callers."""
        candidates = task.get("resources") or [{}]
        recovery = candidates[0].get("job_recovery") or {}
        del use_spot
        return cls(
            strategy=(recovery.get("strategy") or EAGER_NEXT_REGION).upper(),
            max_restarts_on_errors=int(recovery.get("max_restarts_on_errors") or 0),
            recover_on_exit_codes=tuple(recovery.get("recover_on_exit_codes") or ()),
            max_duration_s=recovery.get("max_duration_s"),
            backoff_initial_s=float(recovery.get("backoff_initial_s") or DEFAULT_BACKOFF_INITIAL),
            backoff_max_s=float(recovery.get("backoff_max_s") or DEFAULT_BACKOFF_MAX),
        )


@dataclass(frozen=True)
class History:
    """What the policy needs to know of the task's past."""

    restarts_on_errors: int = 0          # restarts spent from max_restarts_on_errors
    last_region: str | None = None       # where the failed attempt ran
    backoff_rounds: int = 0              # capacity rounds already waited out
    waiting_since: float | None = None   # start of the current wait for capacity


@dataclass(frozen=True)
class Decision:
    action: Literal["relaunch", "backoff", "give_up"]
    reason: str
    status: JobStatus | None = None                   # give_up: the final status
    prefer_region: str | None = None                  # relaunch: try this region first (FAILOVER)
    avoid_regions: frozenset[str] = field(default_factory=frozenset)  # relaunch: not these (EAGER)
    spends_restart: bool = False                      # relaunch: uses one of max_restarts_on_errors
    delay_s: float = 0.0                              # backoff: wait this long, then a new round


def backoff_delay(rules: RecoveryRules, rounds: int, rand: Callable[[], float]) -> float:
    """Exponential from `backoff_initial_s`, capped at `backoff_max_s`, with full jitter in its upper half."""
    base = min(rules.backoff_initial_s * (2 ** rounds), rules.backoff_max_s)
    return float(base * (0.5 + 0.5 * rand()))


def decide(failure: Failure, rules: RecoveryRules, history: History, now: float, *,
           exit_codes: Sequence[int] = (), reason: str = "",
           rand: Callable[[], float] = random.random) -> Decision:
    """The next step after a failure."""
    if failure == Failure.PRECHECK:
        return Decision("give_up", reason or "infeasible", status=JobStatus.FAILED_PRECHECKS)
    if failure == Failure.PREEMPTED:
        where = history.last_region
        if rules.strategy == EAGER_NEXT_REGION and where:
            return Decision("relaunch", f"{reason or 'preempted'}; relaunching away from {where}",
                            avoid_regions=frozenset({where}))
        return Decision("relaunch", f"{reason or 'preempted'}; relaunching" + (f", {where} first" if where else ""),
                        prefer_region=where)
    if failure in (Failure.USER_ERROR, Failure.SETUP_ERROR):
        final = JobStatus.FAILED if failure == Failure.USER_ERROR else JobStatus.FAILED_SETUP
        recoverable = [c for c in exit_codes if c in rules.recover_on_exit_codes]
        if recoverable:
            return Decision("relaunch", f"exit code {recoverable[0]} is in recover_on_exit_codes; restarting",
                            prefer_region=history.last_region)
        if history.restarts_on_errors < rules.max_restarts_on_errors:
            n = history.restarts_on_errors + 1
            return Decision("relaunch", f"{reason}; restart {n} of {rules.max_restarts_on_errors}",
                            prefer_region=history.last_region, spends_restart=True)
        budget = f" after {rules.max_restarts_on_errors} restart(s)" if rules.max_restarts_on_errors else ""
        return Decision("give_up", f"{reason}{budget}", status=final)
    # NO_CAPACITY: every feasible (candidate, region) refused in this round.
    delay = backoff_delay(rules, history.backoff_rounds, rand)
    since = history.waiting_since if history.waiting_since is not None else now
    if rules.max_duration_s is not None and (now - since) + delay > rules.max_duration_s:
        return Decision("give_up", f"{reason or 'no capacity'}; gave up after {now - since:.0f}s "
                        f"(max_duration {rules.max_duration_s:.0f}s)", status=JobStatus.FAILED_NO_RESOURCE)
    return Decision("backoff", f"{reason or 'no capacity'}; next try in {delay:.0f}s", delay_s=delay)
