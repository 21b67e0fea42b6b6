"""Recovery end to end: preemptions, user errors, no capacity, spot fallback, cost; real engine."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orchestrator.infra.local_cloud import LocalCloud
from tests.support.e2e import Sortie, write

pytestmark = pytest.mark.e2e
FAST = "controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  grace_misses: 2\n"


@pytest.fixture
def cli(sortie_cli) -> Sortie:
    return sortie_cli()


def configure(cli: Sortie, regions: str = "") -> None:
    (cli.home / "config.yaml").write_text(FAST + (regions or "local:\n  regions:\n    - {name: region-a}\n"
                                                            "    - {name: region-b}\n"))


def attempts(cli: Sortie, job_id: int) -> list:
    from state.store import StateStore

    return StateStore(cli.home).attempts(job_id)


def test_preempted_spot_job_recovers_in_another_region(cli: Sortie, tmp_path: Path) -> None:
    configure(cli)
    first = tmp_path / "first-attempt"  # the first attempt runs long enough to be preempted, on a loaded machine too
    yaml = write(tmp_path, "spot.yaml", "name: spot\nresources:\n  use_spot: true\n"
                 f"run: if [ -e {first} ]; then echo done; else touch {first}; echo started; sleep 120; fi\n")
    job_id = cli.launch(yaml)
    cli.wait_for_log(job_id, "started")
    cli.run("local", "preempt", "--job", str(job_id), "--node", "0")
    job = cli.wait(job_id)
    assert job["status"] == "SUCCEEDED"
    assert job["tasks"][0]["recoveries"] == 1
    tries = attempts(cli, job_id)
    assert [(a.region, a.outcome) for a in tries] == [("region-a", "PREEMPTED"), ("region-b", "SUCCEEDED")]
    assert LocalCloud(cli.home / "local").nodes() == []
    events = [e["what"] for e in json.loads(cli.run("jobs", "events", str(job_id), "--json").stdout)]
    assert events.index("preempted") < events.index("recovering") < len(events) - 1
    assert events.count("placed") == 2 and events[-1] == "finished"


def test_restarts_on_errors_until_it_succeeds_or_the_budget_is_spent(cli: Sortie, tmp_path: Path) -> None:
    configure(cli)
    counter = tmp_path / "counter"
    flaky = write(tmp_path, "flaky.yaml", "resources:\n  job_recovery:\n    max_restarts_on_errors: 2\n"
                  f"envs:\n  C: {counter}\n"
                  "run: n=$(cat $C 2>/dev/null || echo 0); echo $((n+1)) > $C; echo try $n; [ $n -ge 2 ]\n")
    job = cli.wait(cli.launch(flaky), timeout=120)
    assert job["status"] == "SUCCEEDED"
    assert len(attempts(cli, job["id"])) == 3 and counter.read_text().strip() == "3"
    always = write(tmp_path, "always.yaml", "resources:\n  job_recovery:\n    max_restarts_on_errors: 2\n"
                   "run: exit 7\n")
    job = cli.wait(cli.launch(always), timeout=120)
    assert job["status"] == "FAILED" and "after 2 restart(s)" in job["failure_reason"]
    assert [a.outcome for a in attempts(cli, job["id"])] == ["USER_ERROR"] * 3


def test_recover_on_exit_codes_does_not_spend_the_budget(cli: Sortie, tmp_path: Path) -> None:
    configure(cli)
    marker = tmp_path / "seen"
    yaml = write(tmp_path, "codes.yaml", "resources:\n  job_recovery:\n    recover_on_exit_codes: [42]\n"
                 f"envs:\n  M: {marker}\nrun: if [ -e $M ]; then exit 0; fi; touch $M; exit 42\n")
    job = cli.wait(cli.launch(yaml), timeout=120)
    assert job["status"] == "SUCCEEDED"
    assert len(attempts(cli, job["id"])) == 2
    from state.store import StateStore

    assert StateStore(cli.home).tasks([job["id"]])[job["id"]][0].restarts_on_errors == 0


def test_full_region_is_skipped(cli: Sortie) -> None:
    configure(cli, "local:\n  regions:\n    - {name: region-a, capacity: 0}\n    - {name: region-b}\n")
    job = cli.wait(cli.launch("echo hi"))
    assert job["status"] == "SUCCEEDED"
    assert [(a.region, a.outcome) for a in attempts(cli, job["id"])] == [("region-a", "NO_CAPACITY"),
                                                                        ("region-b", "SUCCEEDED")]


def test_no_capacity_anywhere_backs_off_then_starts_when_capacity_frees(cli: Sortie, tmp_path: Path) -> None:
    configure(cli, "local:\n  regions:\n    - {name: region-a, capacity: 1}\n    - {name: region-b, capacity: 1}\n")
    cloud = LocalCloud(cli.home / "local")
    squatters = [cloud.launch(f"squat-{r}", "squat", 0, r, "tok", capacity=1) for r in ("region-a", "region-b")]
    try:
        yaml = write(tmp_path, "wait.yaml", "resources:\n  job_recovery:\n    backoff: {initial: 1s, max: 2s}\n"
                     "run: echo finally\n")
        job_id = cli.launch(yaml)
        deadline = time.monotonic() + 60
        while True:  # the queue says why it waits, and when it tries next
            queue = cli.run("jobs", "queue").stdout
            if "no capacity in local/region-a, local/region-b; next try in" in queue:
                break
            assert time.monotonic() < deadline, queue
            time.sleep(0.2)
        assert cli.job(job_id)["status"] == "STARTING"
    finally:
        for node in squatters:
            cloud.terminate(node.node_id)
    job = cli.wait(job_id, timeout=90)
    assert job["status"] == "SUCCEEDED"
    events = [e["what"] for e in json.loads(cli.run("jobs", "events", str(job_id), "--json").stdout)]
    assert events.count("backoff") >= 1


def test_max_duration_ends_the_wait_as_failed_no_resource(cli: Sortie, tmp_path: Path) -> None:
    configure(cli, "local:\n  regions:\n    - {name: region-a, capacity: 0}\n")
    yaml = write(tmp_path, "budget.yaml", "resources:\n  job_recovery:\n    max_duration: 4s\n"
                 "    backoff: {initial: 1s, max: 1s}\nrun: echo never\n")
    started = time.monotonic()
    job = cli.wait(cli.launch(yaml), timeout=90)
    assert job["status"] == "FAILED_NO_RESOURCE"
    assert "max_duration 4s" in job["failure_reason"]
    assert time.monotonic() - started < 60


def test_spot_without_capacity_falls_back_to_on_demand(cli: Sortie, tmp_path: Path) -> None:
    configure(cli, "local:\n  regions:\n    - {name: region-a, spot_capacity: 0}\n")
    yaml = write(tmp_path, "anyof.yaml", "resources:\n  any_of:\n    - use_spot: true\n    - use_spot: false\n"
                 "run: echo ran\n")
    job = cli.wait(cli.launch(yaml))
    assert job["status"] == "SUCCEEDED"
    assert [(a.use_spot, a.outcome) for a in attempts(cli, job["id"])] == [(True, "NO_CAPACITY"),
                                                                          (False, "SUCCEEDED")]


def test_cost_is_price_times_nodes_times_duration(cli: Sortie, tmp_path: Path) -> None:
    configure(cli, "local:\n  regions:\n    - {name: region-a, price_per_hour: 36.0}\n")
    yaml = write(tmp_path, "cost.yaml", "num_nodes: 2\nrun: sleep 1\n")
    job = cli.wait(cli.launch(yaml))
    expected = sum(36.0 * a.num_nodes * (a.ended_at - a.started_at) / 3600 for a in attempts(cli, job["id"]))
    assert expected > 0 and job["cost"] == pytest.approx(expected, rel=1e-3)
    assert "COST ($)" in cli.run("jobs", "queue", "--cost").stdout
    events = json.loads(cli.run("jobs", "events", str(job["id"]), "--json").stdout)
    assert events[-1]["data"]["cost"] == pytest.approx(expected, rel=1e-3)


def test_a_policy_pack_violation_is_failed_prechecks_naming_the_policy(sortie_cli, tmp_path: Path) -> None:
    """A real Python policy pack (pulumi-policy) run by the engine on `up`: no spot nodes allowed."""
    pack = Path(__file__).parents[1] / "support" / "fixtures" / "policy_pack"
    cli = sortie_cli(FAST + f"pulumi:\n  policy_packs: [{pack}]\n")
    spot = cli.wait(cli.launch(write(tmp_path, "spot.yaml", "resources:\n  use_spot: true\nrun: echo hi\n")))
    assert spot["status"] == "FAILED_PRECHECKS", spot
    assert "no-spot-nodes" in spot["failure_reason"] and "Spot nodes are not allowed" in spot["failure_reason"]
    assert len(attempts(cli, spot["id"])) == 1  # not retried
    fine = cli.wait(cli.launch("echo on-demand-is-fine"))
    assert fine["status"] == "SUCCEEDED"
    assert LocalCloud(cli.home / "local").nodes() == []
