"""Managed jobs end to end: the real CLI, the controller daemon, the engine and local-cloud nodes."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator.infra.local_cloud import LocalCloud
from tests.support.agents import leftovers
from tests.support.e2e import TERMINAL, Sortie, write  # noqa: F401 - TERMINAL is re-exported

pytestmark = pytest.mark.e2e
@pytest.fixture
def sortie(sortie_cli) -> Sortie:
    return sortie_cli("controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  autostop_idle_minutes: 5\n")


def test_a_job_succeeds_and_its_cluster_is_gone(sortie: Sortie, tmp_path: Path) -> None:
    yaml = write(tmp_path, "hello.yaml", "name: hello\nenvs:\n  GREETING: hi\nsetup: echo setting up\n"
                 "run: echo \"$GREETING rank=$SKYPILOT_NODE_RANK id=$SKYPILOT_JOB_ID\"\n")
    out = sortie.run("jobs", "launch", "-y", "-n", "myjob", yaml, timeout=180).stdout
    job_id = int(re.search(r"submitted: ID (\d+)", out).group(1))
    assert f"hi rank=0 id={job_id}" in out
    assert "(setup) setting up" in out
    assert f"Managed job finished: {job_id} (status: SUCCEEDED)" in out
    assert f"sortie jobs cancel {job_id}" in out
    job = sortie.job(job_id)
    assert job["status"] == "SUCCEEDED" and job["name"] == "myjob"
    assert job["tasks"][0]["exit_codes"] == [0]
    assert LocalCloud(sortie.home / "local").nodes() == []
    assert "(myjob) hi rank=0" in sortie.logs(job_id)  # logs outlive the cluster
    controller_log = sortie.logs(job_id, "--controller")
    assert "[placed]" in controller_log and "Resources:" in controller_log  # placement and engine output
    assert "SUCCEEDED" in sortie.run("jobs", "queue").stdout


def test_failing_run_is_failed_with_its_exit_code(sortie: Sortie) -> None:
    job_id = sortie.launch("echo before; exit 3")
    job = sortie.wait(job_id)
    assert job["status"] == "FAILED"
    assert job["tasks"][0]["exit_codes"] == [3]
    assert "exited with 3" in job["failure_reason"]
    assert "before" in sortie.logs(job_id)


def test_failing_setup_is_failed_setup(sortie: Sortie, tmp_path: Path) -> None:
    yaml = write(tmp_path, "s.yaml", "setup: echo broken; exit 5\nrun: echo never\n")
    job = sortie.wait(sortie.launch(yaml))
    assert job["status"] == "FAILED_SETUP"
    assert "never" not in sortie.logs(job["id"])


def test_two_nodes_see_their_ranks_and_ips(sortie: Sortie, tmp_path: Path) -> None:
    yaml = write(tmp_path, "mn.yaml", "name: mn\nnum_nodes: 2\nrun: |\n"
                 "  echo \"rank=$SKYPILOT_NODE_RANK n=$SKYPILOT_NUM_NODES ips=$(echo $SKYPILOT_NODE_IPS)\"\n")
    job = sortie.wait(sortie.launch(yaml))
    assert job["status"] == "SUCCEEDED"
    logs = sortie.logs(job["id"])
    assert "(head, rank=0) rank=0 n=2 ips=127.0.0.1 127.0.0.1" in logs
    assert "(worker1, rank=1) rank=1 n=2 ips=127.0.0.1 127.0.0.1" in logs


def test_workdir_is_synced_to_every_node(sortie: Sortie, tmp_path: Path) -> None:
    work = tmp_path / "proj"
    work.mkdir()
    (work / "data.txt").write_text("payload-42\n")
    job = sortie.wait(sortie.launch("--workdir", str(work), "cat data.txt"))
    assert job["status"] == "SUCCEEDED"
    assert "payload-42" in sortie.logs(job["id"])


def test_cancel_while_starting(sortie: Sortie) -> None:
    job_id = sortie.launch("sleep 300")
    sortie.wait(job_id, {"STARTING", "PENDING"}, timeout=30)
    sortie.run("jobs", "cancel", "-y", str(job_id))
    assert sortie.wait(job_id)["status"] == "CANCELLED"


def test_cancel_while_running_kills_everything(sortie: Sortie) -> None:
    job_id = sortie.launch("echo started; sleep 300")
    sortie.wait_for_log(job_id, "started")
    assert sortie.job(job_id)["status"] == "RUNNING"
    sortie.run("jobs", "cancel", "-y", str(job_id))
    job = sortie.wait(job_id)
    assert job["status"] == "CANCELLED"
    events = json.loads(sortie.run("jobs", "events", str(job_id), "--json").stdout)
    assert [e["what"] for e in events][-3:] == ["teardown", "destroyed", "finished"]


def test_controller_sigkill_while_running_loses_nothing(sortie: Sortie) -> None:
    job_id = sortie.launch("echo started; sleep 4; echo finished")
    sortie.wait_for_log(job_id, "started")
    pid = json.loads((sortie.home / "controller" / "controller.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    assert "not running" in sortie.run("controller", "status").stdout
    sortie.run("controller", "start")
    job = sortie.wait(job_id)
    assert job["status"] == "SUCCEEDED"
    assert "finished" in sortie.logs(job_id)
    from state.store import StateStore

    attempts = StateStore(sortie.home).attempts(job_id)
    assert len(attempts) == 1, "a restarted controller made a second stack"


def test_twenty_parallel_launches_give_twenty_jobs(sortie: Sortie) -> None:
    with ThreadPoolExecutor(max_workers=20) as pool:
        ids = list(pool.map(lambda i: sortie.launch("-n", f"par-{i}", "sleep 60"), range(20)))
    assert len(set(ids)) == 20
    sortie.run("jobs", "cancel", "-y", "-a")
    for job_id in ids:
        assert sortie.wait(job_id, timeout=180)["status"] == "CANCELLED"


def test_an_accelerator_no_enabled_cloud_has_is_refused_before_submitting(sortie: Sortie) -> None:
    proc = sortie.run("jobs", "launch", "-y", "-d", "--gpus", "H100:8", "nvidia-smi", check=False)
    assert proc.returncode == 2 and "No feasible resources" in proc.stderr and "H100" in proc.stderr
    assert "submitted" not in proc.stdout and json.loads(sortie.run("jobs", "queue", "-a", "--json").stdout) == []


def test_unknown_job_and_ambiguous_name_are_clear_errors(sortie: Sortie) -> None:
    proc = sortie.run("jobs", "logs", "424242", check=False)
    assert proc.returncode == 1 and "no managed job with id 424242" in proc.stderr
    assert "Traceback" not in proc.stderr
    first = sortie.launch("-n", "twin", "true")
    second = sortie.launch("-n", "twin", "true")
    proc = sortie.run("jobs", "logs", "-n", "twin", check=False)
    assert proc.returncode != 0 and f"ids {second}, {first}" in proc.stderr
    for job_id in (first, second):
        sortie.wait(job_id)


def test_leftover_check_helper_sees_nothing_after_jobs(sortie: Sortie) -> None:
    job = sortie.wait(sortie.launch("true"))
    assert job["status"] == "SUCCEEDED"
    from orchestrator.infra.pulumi_driver import PulumiStackDriver

    assert leftovers(PulumiStackDriver(sortie.home), sortie.home) == []


def test_a_job_runs_with_its_state_in_postgresql(sortie_home: Path, engine, make_driver,
                                                 tmp_path: Path) -> None:
    from tests.support.pg import fresh_database

    with fresh_database() as url:
        (sortie_home / "config.yaml").write_text(
            f"state:\n  url: {url}\ncontroller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n")
        cli = Sortie(sortie_home)
        try:
            job = cli.wait(cli.launch("-n", "on-pg", "echo from-postgres"))
            assert job["status"] == "SUCCEEDED"
            assert "from-postgres" in cli.logs(job["id"])
            assert not (sortie_home / "state.db").exists(), "the state went to SQLite, not PostgreSQL"
            from sqlalchemy import create_engine, text

            with create_engine(url).connect() as conn:
                assert conn.execute(text("SELECT status FROM jobs WHERE id = :i"), {"i": job["id"]}).scalar() \
                    == "SUCCEEDED"
        finally:
            cli.run("controller", "stop", check=False)
        make_driver()  # leak check for this home at teardown


def test_controller_stops_itself_when_idle_and_status_shows_it(sortie: Sortie) -> None:
    (sortie.home / "config.yaml").write_text(
        "controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  autostop_idle_minutes: 0.03\n")
    job_id = sortie.launch("sleep 1")
    status = sortie.run("status").stdout
    assert "Controller: running" in status
    assert sortie.wait(job_id)["status"] == "SUCCEEDED"
    deadline = time.monotonic() + 30
    while "not running" not in sortie.run("controller", "status").stdout:
        assert time.monotonic() < deadline, "the idle controller did not stop itself"
        time.sleep(0.5)
    assert "Clusters: none" in sortie.run("status").stdout
