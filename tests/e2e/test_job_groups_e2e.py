"""Job groups (`execution: parallel`) end to end on the local cloud (real CLI, controller, engine and nodes): the
tasks run at once, each on its own stack, see the group's variables, and the group ends as SkyPilot's does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.e2e import Sortie, write

pytestmark = pytest.mark.e2e


@pytest.fixture
def cli(sortie_cli) -> Sortie:
    return sortie_cli("controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  grace_misses: 2\n")


def stacks_of(cli: Sortie, job_id: int) -> list[tuple[int, str]]:
    from state.store import StateStore

    return sorted((a.task_index, a.stack_name) for a in StateStore(cli.home).attempts(job_id))


def test_a_two_task_group_runs_both_at_once_and_succeeds(cli: Sortie, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # Each task notes when its run starts, waits (at most 60 s) to see the other's start, then notes its end:
    # run one after the other, neither would see the other and both would fail.
    body = """  date +%s.%N > $OUT/$ME.start
  echo "$ME in $SKYPILOT_JOBGROUP_NAME, $OTHER at $(printenv SORTIE_JOBGROUP_HOST_$(echo $OTHER | tr a-z A-Z))"
  for i in $(seq 600); do [ -f $OUT/$OTHER.start ] && break; sleep 0.1; done
  [ -f $OUT/$OTHER.start ] || exit 5
  sleep 1
  date +%s.%N > $OUT/$ME.end
"""
    yaml = write(tmp_path, "group.yaml", f"""name: duo
execution: parallel
---
name: left
envs: {{OUT: {out}, ME: left, OTHER: right}}
run: |
{body}---
name: right
envs: {{OUT: {out}, ME: right, OTHER: left}}
setup: echo right-setup
run: |
{body}""")
    job = cli.wait(cli.launch(yaml), timeout=240)
    assert job["status"] == "SUCCEEDED", job
    assert [(t["name"], t["status"]) for t in job["tasks"]] == [("left", "SUCCEEDED"), ("right", "SUCCEEDED")]
    job_id = job["id"]
    assert stacks_of(cli, job_id) == [(0, f"sortie-job-{job_id}-t0-1"), (1, f"sortie-job-{job_id}-t1-1")]
    from state.store import StateStore

    placed = {(a.infra, a.region) for a in StateStore(cli.home).attempts(job_id)}
    assert len(placed) == 1, placed  # the whole group on one infra (cloud and region), as SkyPilot places it
    t = {f.name: float(f.read_text()) for f in out.iterdir()}
    assert t["left.start"] < t["right.end"] and t["right.start"] < t["left.end"], t  # the run windows overlap
    left_log = cli.logs(job_id, "left")
    assert "left in duo, right at " in left_log and "right at \n" not in left_log  # its address is known
    assert "right in duo, left at " in cli.logs(job_id, "right")


def test_a_failing_primary_ends_the_group_and_its_auxiliary_task(cli: Sortie, tmp_path: Path) -> None:
    yaml = write(tmp_path, "fail.yaml", """name: rl
execution: parallel
primary_tasks: [trainer]
termination_delay: 5m
---
name: trainer
run: |
  echo training
  sleep 1
  exit 7
---
name: server
run: |
  echo serving
  sleep 600
""")
    job_id = cli.launch(yaml)
    job = cli.wait(job_id, timeout=240)
    assert job["status"] == "FAILED", job
    assert [(t["name"], t["status"]) for t in job["tasks"]] == [("trainer", "FAILED"), ("server", "CANCELLED")]
    assert (job["failure_reason"] or "").startswith("task 0 (trainer): FAILED")
    assert "serving" in cli.logs(job_id, "server")


def test_cancel_of_one_task_leaves_the_other_running(cli: Sortie, tmp_path: Path) -> None:
    yaml = write(tmp_path, "pair.yaml", """name: pair
execution: parallel
---
name: keep
run: echo started-keep; sleep 300
---
name: drop
run: echo started-drop; sleep 300
""")
    job_id = cli.launch(yaml)
    cli.wait_for_log(job_id, "started-keep", timeout=180)
    cli.wait_for_log(job_id, "started-drop", timeout=60)
    out = cli.run("jobs", "cancel", "-y", "--task", "drop", str(job_id)).stdout
    assert f"Task drop of job {job_id}: cancelling" in out
    deadline = time.monotonic() + 120
    while [t["status"] for t in cli.job(job_id)["tasks"]] != ["RUNNING", "CANCELLED"]:
        assert time.monotonic() < deadline, cli.job(job_id)
        time.sleep(0.5)
    assert stacks_of(cli, job_id) == [(0, f"sortie-job-{job_id}-t0-1"), (1, f"sortie-job-{job_id}-t1-1")]
    assert cli.job(job_id)["status"] == "RUNNING"  # the group goes on with its other task
    cli.run("jobs", "cancel", "-y", str(job_id))
    job = cli.wait(job_id, timeout=120)
    assert job["status"] == "CANCELLED" and [t["status"] for t in job["tasks"]] == ["CANCELLED", "CANCELLED"]


def test_graceful_cancel_lets_the_run_handle_sigterm(cli: Sortie, tmp_path: Path) -> None:
    yaml = write(tmp_path, "term.yaml", """run: |
  trap 'echo got-sigterm; exit 0' TERM
  echo started
  sleep 300 &
  wait
""")
    job_id = cli.launch(yaml)
    cli.wait_for_log(job_id, "started", timeout=180)
    out = cli.run("jobs", "cancel", "-y", "--graceful", "--graceful-timeout", "60", str(job_id)).stdout
    assert f"Job {job_id}: cancelling gracefully" in out
    job = cli.wait(job_id, timeout=120)
    assert job["status"] == "CANCELLED"
    assert "got-sigterm" in cli.logs(job_id)
