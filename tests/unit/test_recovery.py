"""The recovery policy as pure functions, replayed against recorded event histories (tests/support/golden/recovery)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.job_status import JobStatus
from orchestrator.policy.recovery import (
    EAGER_NEXT_REGION,
    FAILOVER,
    Decision,
    Failure,
    History,
    RecoveryRules,
    backoff_delay,
    decide,
)

GOLDEN = sorted((Path(__file__).parents[1] / "support" / "golden" / "recovery").glob("*.json"))


def replay(case: dict) -> list[tuple[dict, Decision]]:
    """Feed a history's failures to the policy, carrying what the controller carries between them."""
    task = {"resources": [{"use_spot": case.get("use_spot", True), "job_recovery": case["rules"]}]}
    rules = RecoveryRules.from_task(task, case.get("use_spot", True))
    history = History()
    seen = []
    for event in case["events"]:
        if event.get("placed"):
            history = History(restarts_on_errors=history.restarts_on_errors)
            continue
        history = History(history.restarts_on_errors, event.get("region"), history.backoff_rounds,
                          history.waiting_since)
        decision = decide(Failure(event["failure"]), rules, history, float(event["at"]),
                          exit_codes=event.get("exit_codes", []), reason="why", rand=lambda: 0.5)
        seen.append((event, decision))
        if decision.spends_restart:
            history = History(history.restarts_on_errors + 1, history.last_region, history.backoff_rounds,
                              history.waiting_since)
        if decision.action == "backoff":
            since = history.waiting_since if history.waiting_since is not None else float(event["at"])
            history = History(history.restarts_on_errors, history.last_region, history.backoff_rounds + 1, since)
    return seen


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_recorded_histories(path: Path) -> None:
    case = json.loads(path.read_text())
    for event, decision in replay(case):
        expect = event["expect"]
        got = {"action": decision.action, "status": decision.status.value if decision.status else None,
               "prefer_region": decision.prefer_region, "avoid_regions": sorted(decision.avoid_regions),
               "spends_restart": decision.spends_restart, "delay_s": decision.delay_s}
        assert {k: got[k] for k in expect} == expect, f"{path.name} at t={event['at']}: {decision.reason}"


def test_golden_files_exist() -> None:
    assert len(GOLDEN) >= 3


def test_default_strategy_is_eager_next_region_for_every_job() -> None:
    assert RecoveryRules.from_task({"resources": [{}]}, use_spot=True).strategy == EAGER_NEXT_REGION
    assert RecoveryRules.from_task({"resources": [{}]}, use_spot=False).strategy == EAGER_NEXT_REGION
    explicit = {"resources": [{"job_recovery": {"strategy": "failover"}}]}
    assert RecoveryRules.from_task(explicit, use_spot=True).strategy == FAILOVER


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rules = RecoveryRules(backoff_initial_s=10, backoff_max_s=60)
    assert [backoff_delay(rules, n, lambda: 1.0) for n in range(5)] == [10, 20, 40, 60, 60]
    assert backoff_delay(rules, 0, lambda: 0.0) == 5
    assert all(5 <= backoff_delay(rules, 0, __import__("random").random) <= 10 for _ in range(100))


def test_prechecks_never_retry_and_exhausted_budget_names_it() -> None:
    rules = RecoveryRules(max_restarts_on_errors=2)
    assert decide(Failure.PRECHECK, rules, History(), 0).status == JobStatus.FAILED_PRECHECKS
    spent = decide(Failure.USER_ERROR, rules, History(restarts_on_errors=2), 0, exit_codes=[1], reason="run failed")
    assert (spent.action, spent.status) == ("give_up", JobStatus.FAILED)
    assert "after 2 restart(s)" in spent.reason


def test_no_capacity_waits_indefinitely_without_a_budget() -> None:
    decision = decide(Failure.NO_CAPACITY, RecoveryRules(), History(backoff_rounds=50, waiting_since=0),
                      10**7, rand=lambda: 0.0)
    assert decision.action == "backoff" and decision.delay_s == 300
