"""`sortie jobs ...` as SkyPilot users type it (issue 16): refusals before anything is submitted, job groups,
warnings, `-h`, queue/logs/cancel/endpoints flags, pool apply names and --workers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from state.store import StateStore
from tests.unit.test_cli_jobs import job_count, no_controller, run_cli  # noqa: F401 - no_controller is a fixture

GROUP = ("name: rl\nexecution: parallel\nprimary_tasks: [trainer]\n---\nname: trainer\nrun: echo t\n---\n"
         "name: rollout\nrun: echo r\n")


@pytest.mark.parametrize("flags", [["-y", "-d"], ["--dryrun"], ["--dryrun", "--json"]])
def test_an_infeasible_request_exits_non_zero_and_submits_nothing(
        flags: list[str], sortie_home: Path, no_controller: None, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["jobs", "launch", *flags, "--gpus", "H100:64", "echo hi"], monkeypatch, capsys)
    assert code == 2 and "No feasible resources" in err and "Traceback" not in err
    assert "{" not in out  # no JSON plan for a refused task
    assert job_count(sortie_home) == 0


def test_a_job_group_is_planned_by_dryrun_and_launched_as_one_job(
        sortie_home: Path, tmp_path: Path, no_controller: None, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "group.yaml"
    path.write_text(GROUP)
    code, out, _ = run_cli(["jobs", "launch", "--dryrun", "--json", str(path)], monkeypatch, capsys)
    assert code == 0
    plan = json.loads(out)
    assert plan["execution"] == "parallel" and plan["primary_tasks"] == ["trainer"] and len(plan["tasks"]) == 2
    code, out, _ = run_cli(["jobs", "launch", "--dryrun", str(path)], monkeypatch, capsys)
    assert code == 0 and "job group" in out and "not supported yet" not in out
    assert job_count(sortie_home) == 0
    code, out, _ = run_cli(["jobs", "launch", "-y", "-d", str(path)], monkeypatch, capsys)
    assert code == 0 and "submitted: ID 1" in out and job_count(sortie_home) == 1
    code, _, err = run_cli(["jobs", "launch", "-y", "-d", "-p", "gpus", str(path)], monkeypatch, capsys)
    assert code == 2 and "a job group (execution: parallel) runs each task on its own cluster" in err


def test_service_sections_warn_and_the_job_launches(
        sortie_home: Path, tmp_path: Path, no_controller: None, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("service: {readiness_probe: /}\nrun: echo serving\n")
    code, out, err = run_cli(["jobs", "launch", "-y", "-d", str(path)], monkeypatch, capsys)
    assert code == 0 and "submitted: ID 1" in out
    assert "Warning: service: ignored" in err


def test_duplicate_keys_exit_2(sortie_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("run: a\nrun: b\n")
    code, _, err = run_cli(["jobs", "launch", "--dryrun", str(path)], monkeypatch, capsys)
    assert code == 2 and 'key "run" appears twice in one mapping (lines 1 and 2)' in err


def test_h_is_help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["jobs", "launch", "-h"], monkeypatch, capsys)
    assert code == 0 and "--disk-tier" in out and "--git-url" in out and "--instance-type" in out


def test_queue_takes_comma_lists_json_and_shows_requested_and_pool(
        sortie_home: Path, no_controller: None, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(3):
        assert run_cli(["jobs", "launch", "-y", "-d", "--cpus", "1+", "echo hi"], monkeypatch, capsys)[0] == 0
    code, out, _ = run_cli(["jobs", "queue", "-s", "PENDING,FAILED", "-o", "json"], monkeypatch, capsys)
    assert code == 0
    rows = json.loads(out)
    assert [r["id"] for r in rows] == [3, 2, 1] and all(r["pool"] is None for r in rows)
    assert rows[0]["tasks"][0]["resources"] == "1x[CPU:1+]" and "endpoints" not in rows[0]
    code, out, _ = run_cli(["jobs", "queue", "-v", "-o", "json"], monkeypatch, capsys)
    assert json.loads(out)[0]["endpoints"] == {} and json.loads(out)[0]["infra"] is None
    code, out, _ = run_cli(["jobs", "queue", "-s", "FAILED,FAILED_SETUP", "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out) == []
    code, out, _ = run_cli(["jobs", "queue", "-v", "-l", "2"], monkeypatch, capsys)
    header = out.splitlines()[1]
    assert all(col in header for col in ("REQUESTED", "POOL", "INFRA", "WORKER_CLUSTER", "STARTED", "ENDPOINTS"))
    assert len(out.splitlines()) == 4  # summary, header and 2 jobs
    code, _, err = run_cli(["jobs", "queue", "-s", "PENDING,NOPE"], monkeypatch, capsys)
    assert code == 2 and "--status NOPE" in err


def test_queue_shows_at_most_50_jobs_unless_all(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import cli.queue as queue_cli

    asked: list[int | None] = []

    class Service:
        def queue_rows(self, **kwargs: object) -> list[object]:
            asked.append(kwargs["limit"])  # type: ignore[arg-type]
            return []

    monkeypatch.setattr(queue_cli, "job_service", Service)
    run_cli(["jobs", "queue"], monkeypatch, capsys)
    run_cli(["jobs", "queue", "-a"], monkeypatch, capsys)
    run_cli(["jobs", "queue", "-a", "-l", "7"], monkeypatch, capsys)
    assert asked == [50, None, 7]


def test_logs_take_a_task_after_a_name_and_tail_defaults_to_1000(
        sortie_home: Path, tmp_path: Path, no_controller: None, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pipe.yaml"
    path.write_text("name: pipe\n---\nname: prep\nrun: echo a\n---\nname: train\nrun: echo b\n")
    assert run_cli(["jobs", "launch", "-y", "-d", str(path)], monkeypatch, capsys)[0] == 0
    from orchestrator.service import JobService

    job = JobService().resolve(1)
    lines = [f"line {i}" for i in range(1500)]
    monkeypatch.setattr(JobService, "log_lines", lambda self, job, follow=False, task=None: iter(
        [f"task={task} {line}" for line in lines]))
    code, out, err = run_cli(["jobs", "logs", "--no-follow", "-n", "pipe", "train"], monkeypatch, capsys)
    assert code == 0, err
    shown = out.splitlines()
    assert len(shown) == 1000 and shown[0] == "task=1 line 500" and shown[-1] == "task=1 line 1499"
    code, out, _ = run_cli(["jobs", "logs", "--no-follow", "--tail", "0", str(job.id), "prep"], monkeypatch, capsys)
    assert len(out.splitlines()) == 1500 and out.startswith("task=0 line 0")
    code, _, err = run_cli(["jobs", "logs", "--no-follow", "-n", "pipe", "nope"], monkeypatch, capsys)
    assert code == 2 and "no task 'nope' (tasks: 0 (prep), 1 (train))" in err


def test_cancel_flags(sortie_home: Path, no_controller: None, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                      capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["jobs", "launch", "-y", "-d", "echo hi"], monkeypatch, capsys)[0] == 0
    code, _, err = run_cli(["jobs", "cancel", "-y", "--task", "trainer", "1"], monkeypatch, capsys)
    assert code == 2 and "job 1 has no task 'trainer' (tasks: 0 (sky-cmd))" in err
    code, _, err = run_cli(["jobs", "cancel", "-y", "--graceful-timeout", "5", "1"], monkeypatch, capsys)
    assert code == 2 and "--graceful-timeout: only with --graceful" in err
    code, _, err = run_cli(["jobs", "cancel", "-y", "--task", "0", "-u"], monkeypatch, capsys)
    assert code == 2 and "--task: give one job" in err
    code, out, _ = run_cli(["jobs", "cancel", "-y", "--graceful", "--graceful-timeout", "30", "1"], monkeypatch,
                           capsys)
    assert code == 0 and "Job 1: cancelling gracefully" in out
    job = StateStore(sortie_home).job(1)
    assert job is not None and job.cancel_requested and job.graceful_cancel
    assert job.graceful_deadline is not None and job.graceful_deadline > time.time() + 20
    code, out, _ = run_cli(["jobs", "cancel", "-y", "-u"], monkeypatch, capsys)
    assert code == 0 and "Job 1: cancelling" in out


def test_endpoints_of_a_job_without_a_cluster(sortie_home: Path, no_controller: None,  # noqa: F811
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["jobs", "launch", "-y", "-d", "--ports", "8080", "echo hi"], monkeypatch, capsys)[0] == 0
    code, out, _ = run_cli(["jobs", "endpoints", "1"], monkeypatch, capsys)
    assert code == 0 and "no endpoints" in out
    code, _, err = run_cli(["jobs", "endpoints", "1", "8080"], monkeypatch, capsys)
    assert code == 2 and "no endpoint on port 8080" in err


def test_endpoints_of_a_job_on_kubernetes_are_its_services(sortie_home: Path, no_controller: None,  # noqa: F811
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A job whose head pod's Service gave node ports: `jobs endpoints` and `jobs queue -v` show the Service's
    addresses (what the cluster program exported and the controller stored with the nodes), not the pod IP."""
    assert run_cli(["jobs", "launch", "-y", "-d", "--ports", "8080", "--ports", "9000", "echo hi"], monkeypatch,
                   capsys)[0] == 0
    store = StateStore(sortie_home)
    attempt = store.place_attempt(1, 0, name_for=lambda n: f"sortie-job-1-{n}", infra="kubernetes", region="ctx",
                                  num_nodes=1, use_spot=False, instance_type="4CPU--8GB", price_per_hour=0.0,
                                  token_enc=store.box.seal("t"), why="test")
    store.attempt_provisioned(attempt.id, [{"rank": 0, "node_id": "pod-0", "ip": "10.244.0.5", "url": "x",
                                            "region": "ctx", "endpoints": {"8080": "192.168.0.3:30000",
                                                                           "9000": "192.168.0.3:30001"}}], "up")
    code, out, _ = run_cli(["jobs", "endpoints", "1", "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out) == {"8080": "192.168.0.3:30000", "9000": "192.168.0.3:30001"}
    code, out, _ = run_cli(["jobs", "endpoints", "1", "9000"], monkeypatch, capsys)
    assert code == 0 and "192.168.0.3:30001" in out and "30000" not in out
    code, out, _ = run_cli(["jobs", "queue", "-v", "-o", "json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)[0]["endpoints"] == {"8080": "192.168.0.3:30000",
                                                             "9000": "192.168.0.3:30001"}


def test_pool_apply_names_and_workers(tmp_path: Path) -> None:
    from cli.pools import _load_pool_yaml, generated_pool_name
    from orchestrator.errors import UsageError

    path = tmp_path / "pool.yaml"
    path.write_text("name: gpus\npool: {workers: 2, max_workers: 5}\nresources: {cpus: 2}\n")
    pipeline = _load_pool_yaml(str(path), 4)
    assert pipeline.tasks[0].pool.workers == 4 and pipeline.tasks[0].pool.max_workers == 5
    assert generated_pool_name(pipeline, set()) == "gpus"
    other = generated_pool_name(pipeline, {"gpus"})
    assert other.startswith("sortie-pool-") and len(other) == len("sortie-pool-") + 4
    with pytest.raises(UsageError, match="above the pool's max_workers"):
        _load_pool_yaml(str(path), 6)


def test_dryrun_json_carries_every_accepted_resource_field(
        sortie_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import orchestrator.launch_checks as checks

    monkeypatch.setattr(checks, "launch_refusals", lambda pipeline, config, enabled=None: [])  # no cloud here
    path = tmp_path / "t.yaml"
    path.write_text("resources:\n  accelerators: tpu-v5e-8\n"
                    "  accelerator_args: {runtime_version: v2-alpha-tpuv5-lite}\n  ports: [8080]\n"
                    "  image_id: projects/me/global/images/x\n  disk_tier: high\n"
                    "  network_tier: best\n  labels: {team: ml}\nrun: x\n")
    code, out, err = run_cli(["jobs", "launch", "--dryrun", "--json", str(path)], monkeypatch, capsys)
    assert code == 0, err
    (candidate,) = json.loads(out)["tasks"][0]["resources"]
    assert {k: candidate[k] for k in ("ports", "image_id", "disk_tier", "network_tier", "labels",
                                      "accelerator_args")} == {
        "ports": ["8080"], "image_id": "projects/me/global/images/x", "disk_tier": "high", "network_tier": "best",
        "labels": {"team": "ml"}, "accelerator_args": {"runtime_version": "v2-alpha-tpuv5-lite"}}


@pytest.mark.parametrize("flags", [["-y", "-d"], ["--dryrun"], ["--dryrun", "--json"]])
def test_a_group_no_infra_can_hold_at_once_is_refused(
        flags: list[str], sortie_home: Path, tmp_path: Path, no_controller: None,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 28: 100 tasks x 16 nodes launched with exit 0 where each region holds 16 nodes; the group could never
    run, and made 190 attempts trying. Each task fits alone; all of them together fit nowhere."""
    (sortie_home / "config.yaml").write_text("local:\n  regions:\n    - {name: region-a, capacity: 16}\n"
                                             "    - {name: region-b, capacity: 16}\n")
    docs = "".join(f"---\nname: t{i}\nnum_nodes: 16\nrun: echo {i}\n" for i in range(100))
    path = tmp_path / "group.yaml"
    path.write_text("name: big\nexecution: parallel\n" + docs)
    code, out, err = run_cli(["jobs", "launch", *flags, str(path)], monkeypatch, capsys)
    assert code == 2, (code, err)
    assert "need 1600 nodes at once" in err and "at most 16 on local/region-" in err and "Traceback" not in err
    assert "{" not in out and job_count(sortie_home) == 0
    two = "name: small\nexecution: parallel\n" + "".join(f"---\nname: t{i}\nnum_nodes: 8\nrun: x\n" for i in range(2))
    path.write_text(two)
    assert run_cli(["jobs", "launch", "--dryrun", str(path)], monkeypatch, capsys)[0] == 0  # 16 fit together
