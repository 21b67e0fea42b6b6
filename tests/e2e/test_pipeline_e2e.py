"""Pipelines: tasks one after another, each on its own stack; failures, cancels and recovery per task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.e2e import Sortie, write

pytestmark = pytest.mark.e2e


@pytest.fixture
def cli(sortie_cli) -> Sortie:
    return sortie_cli("controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  grace_misses: 2\n")


def stacks_of(cli: Sortie, job_id: int) -> list[tuple[int, str]]:
    from state.store import StateStore

    return [(a.task_index, a.stack_name) for a in StateStore(cli.home).attempts(job_id)]


def test_train_then_eval_each_on_its_own_stack(cli: Sortie, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    yaml = write(tmp_path, "pipe.yaml", f"""name: pipe
---
name: train
num_nodes: 2
envs:
  OUT: {shared}
run: |
  [ "$SKYPILOT_NODE_RANK" = 0 ] && echo model-v1 > $OUT/model.txt
  echo "train id=$SKYPILOT_TASK_ID"
---
name: eval
envs:
  OUT: {shared}
run: |
  echo "eval read $(cat $OUT/model.txt) id=$SKYPILOT_TASK_ID"
""")
    job = cli.wait(cli.launch(yaml), timeout=120)
    assert job["status"] == "SUCCEEDED"
    assert [(t["task"], t["name"], t["status"]) for t in job["tasks"]] == [(0, "train", "SUCCEEDED"),
                                                                           (1, "eval", "SUCCEEDED")]
    job_id = job["id"]
    assert stacks_of(cli, job_id) == [(0, f"sortie-job-{job_id}-t0-1"), (1, f"sortie-job-{job_id}-t1-1")]
    eval_log = cli.logs(job_id, "eval")
    assert "eval read model-v1" in eval_log and "train id=" not in eval_log
    assert f"_pipe_eval_{job_id}-1" in eval_log
    assert f"_pipe_train_{job_id}-0" in cli.logs(job_id, "0")
    queue = cli.run("jobs", "queue").stdout
    assert "↳ train" in queue and "↳ eval" in queue and "2x[CPU:1+]" in queue


def test_a_failing_task_fails_the_pipeline_and_cancels_the_rest(cli: Sortie, tmp_path: Path) -> None:
    marker = tmp_path / "second-ran"
    yaml = write(tmp_path, "fail.yaml", f"name: broken\n---\nname: first\nrun: exit 9\n---\n"
                 f"name: second\nrun: touch {marker}\n")
    job = cli.wait(cli.launch(yaml), timeout=120)
    assert job["status"] == "FAILED"
    assert [t["status"] for t in job["tasks"]] == ["FAILED", "CANCELLED"]
    assert not marker.exists()
    assert [t for t, _ in stacks_of(cli, job["id"])] == [0]


def test_cancel_stops_the_running_task_and_skips_the_rest(cli: Sortie, tmp_path: Path) -> None:
    yaml = write(tmp_path, "long.yaml", "name: long\n---\nname: a\nrun: echo started; sleep 300\n---\n"
                 "name: b\nrun: echo never\n")
    job_id = cli.launch(yaml)
    cli.wait_for_log(job_id, "started")
    cli.run("jobs", "cancel", "-y", str(job_id))
    job = cli.wait(job_id)
    assert job["status"] == "CANCELLED"
    assert [t["status"] for t in job["tasks"]] == ["CANCELLED", "CANCELLED"]


def test_a_preempted_task_recovers_without_rerunning_finished_tasks(cli: Sortie, tmp_path: Path) -> None:
    counter = tmp_path / "prep-runs"
    first = tmp_path / "first-train"  # the first attempt runs long enough to be preempted, on a loaded machine too
    yaml = write(tmp_path, "rec.yaml", f"name: rec\n---\nname: prep\nrun: echo x >> {counter}\n---\n"
                 "name: train\nresources:\n  use_spot: true\n"
                 f"run: if [ -e {first} ]; then echo trained; else touch {first}; echo started; sleep 120; fi\n")
    job_id = cli.launch(yaml)
    cli.wait_for_log(job_id, "started")
    cli.run("local", "preempt", "--job", str(job_id))
    job = cli.wait(job_id, timeout=120)
    assert job["status"] == "SUCCEEDED"
    assert counter.read_text().count("x") == 1, "a finished task ran again"
    assert [t["recoveries"] for t in job["tasks"]] == [0, 1]
    assert [t for t, _ in stacks_of(cli, job_id)] == [0, 1, 1]
    events = json.loads(cli.run("jobs", "events", str(job_id), "--json").stdout)
    assert any(e["what"] == "task-done" for e in events)
