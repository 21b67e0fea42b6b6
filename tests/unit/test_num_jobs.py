"""`jobs launch --num-jobs N` without a pool (issue 26): N jobs in one submit, each on its own fresh cluster, each told
SKYPILOT_JOB_RANK 0..N-1 and SKYPILOT_NUM_JOBS N; bad counts are refused with one line and nothing submitted."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.service import MAX_NUM_JOBS
from state.machine import JobStatus
from tests.unit import test_cli_jobs
from tests.unit.test_cli_jobs import job_count, run_cli
from tests.unit.test_reconcilers import World

no_controller = test_cli_jobs.no_controller  # the fixture: submitting starts no daemon
pytestmark = pytest.mark.usefixtures("no_controller")


def test_num_jobs_submits_ranked_jobs_each_on_its_own_cluster(sortie_home: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["jobs", "launch", "-y", "--num-jobs", "3", "echo $SKYPILOT_JOB_RANK"], monkeypatch, capsys)
    assert code == 0 and "Submitted 3 managed jobs" in out and "each on its own cluster" in out
    world = World(sortie_home)
    jobs = sorted(world.store.list_jobs(), key=lambda j: j.id)
    assert [(j.job_rank, j.num_jobs, j.pool) for j in jobs] == [(0, 3, None), (1, 3, None), (2, 3, None)]
    world.tick(8)
    assert {world.store.job(j.id).status for j in jobs} == {JobStatus.SUCCEEDED}  # type: ignore[union-attr]
    stacks = {a.stack_name for j in jobs for a in world.store.attempts(j.id)}
    assert len(stacks) == 3  # one fresh cluster per job
    envs = [r.env for runs in world.agents.runs.values() for run_id, r in runs.items() if run_id.startswith("run-")]
    assert sorted(e["SKYPILOT_JOB_RANK"] for e in envs) == ["0", "1", "2"]
    assert {e["SKYPILOT_NUM_JOBS"] for e in envs} == {"3"} and {e["SORTIE_NUM_JOBS"] for e in envs} == {"3"}


def test_a_single_job_has_no_rank(sortie_home: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, _ = run_cli(["jobs", "launch", "-y", "-d", "echo hi"], monkeypatch, capsys)
    assert code == 0
    world = World(sortie_home)
    world.tick(8)
    envs = [r.env for runs in world.agents.runs.values() for r in runs.values()]
    assert envs and not any("SKYPILOT_JOB_RANK" in e for e in envs)


@pytest.mark.parametrize("count", ["0", "-2", str(MAX_NUM_JOBS + 1)])
def test_a_count_out_of_bounds_is_refused_and_submits_nothing(count: str, sortie_home: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_cli(["jobs", "launch", "-y", "--num-jobs", count, "echo hi"], monkeypatch, capsys)
    assert code == 2 and f"--num-jobs must be between 1 and {MAX_NUM_JOBS}, got {count}" in err
    assert "Traceback" not in err and job_count(sortie_home) == 0


def test_a_job_group_is_launched_one_at_a_time(sortie_home: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "group.yaml"
    path.write_text("name: grp\nexecution: parallel\n---\nname: a\nrun: echo a\n---\nname: b\nrun: echo b\n")
    code, _out, err = run_cli(["jobs", "launch", "-y", "--num-jobs", "2", str(path)], monkeypatch, capsys)
    assert code == 2 and "--num-jobs: a job group" in err and job_count(sortie_home) == 0
