"""Event-driven nodes end to end (real engine, local cloud): exits, preemptions and blips seen through the watch."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import time
from pathlib import Path

import pytest

from orchestrator.infra.local_cloud import LocalCloud
from tests.support.e2e import Sortie, write

pytestmark = pytest.mark.e2e


@pytest.fixture
def cli(sortie_cli) -> Sortie:
    return sortie_cli()


def events(cli: Sortie, job_id: int) -> list:
    from state.store import StateStore

    return StateStore(cli.home).events(job_id)


def attempts(cli: Sortie, job_id: int) -> list:
    from state.store import StateStore

    return StateStore(cli.home).attempts(job_id)


def controller_log(cli: Sortie) -> str:
    return (cli.home / "logs" / "controller.log").read_text(errors="replace")


def the_node(cli: Sortie):
    nodes = LocalCloud(cli.home / "local").nodes()
    assert len(nodes) == 1, nodes
    return nodes[0]


def test_an_exit_is_recorded_within_a_second_at_the_default_poll_interval(cli: Sortie, tmp_path: Path) -> None:
    job_id = cli.launch(write(tmp_path, "exit.yaml", "run: echo started; sleep 4; echo bye; exit 3\n"))
    cli.wait_for_log(job_id, "started")
    attempt = attempts(cli, job_id)[0]
    exit_json = Path(the_node(cli).sandbox) / "runs" / f"run-{attempt.id}" / "exit.json"
    deadline = time.monotonic() + 60
    ended_at = None
    while ended_at is None:  # read it before the teardown removes the node
        assert time.monotonic() < deadline, "the run never ended"
        with contextlib.suppress(OSError, ValueError, KeyError):
            ended_at = json.loads(exit_json.read_text())["ended_at"]
        time.sleep(0.01)
    job = cli.wait(job_id)
    assert job["status"] == "FAILED"
    teardown = next(e for e in events(cli, job_id) if e.what == "teardown")
    assert teardown.at - ended_at < 1.0, f"exit recorded {teardown.at - ended_at:.2f}s after the process ended"
    assert "bye" in cli.logs(job_id)
    assert "watch mode (its agent has /watch)" in controller_log(cli)


def test_a_preempted_node_is_detected_in_seconds_at_the_defaults(cli: Sortie, tmp_path: Path) -> None:
    job_id = cli.launch(write(tmp_path, "spot.yaml", "resources:\n  use_spot: true\nrun: echo started; sleep 600\n"))
    cli.wait_for_log(job_id, "started")
    began = time.time()
    cli.run("local", "preempt", "--job", str(job_id), "--node", "0")
    deadline = time.monotonic() + 60
    detected_as = ("preempted", "recovering")  # the first event a detected preemption writes
    while not any(e.what in detected_as for e in events(cli, job_id)):
        assert time.monotonic() < deadline, "the preemption was never detected"
        time.sleep(0.1)
    detected = next(e for e in events(cli, job_id) if e.what in detected_as).at - began
    # Polling alone needs grace_misses x poll_interval = 15 s before it even asks the infra; the watch reports the
    # node lost (then the infra's refresh, an engine run whose time is the machine's, confirms it).
    lost = [line for line in controller_log(cli).splitlines() if "reported lost" in line]
    assert lost, "the watch never reported the node lost"
    lost_at = datetime.datetime.strptime(lost[0][:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert lost_at - began < 5.0, f"the watch reported the node lost {lost_at - began:.1f}s after the preemption"
    assert lost_at <= began + detected
    cli.run("jobs", "cancel", "-y", str(job_id))
    assert cli.wait(job_id, timeout=120)["status"] == "CANCELLED"


def test_a_stopped_agent_that_comes_back_within_the_confirmation_is_no_loss(cli: Sortie, tmp_path: Path) -> None:
    (cli.home / "config.yaml").write_text("controller:\n  watch_timeout_seconds: 1\n  loss_confirm_seconds: 10\n")
    job_id = cli.launch(write(tmp_path, "blip.yaml", "run: echo started; sleep 14; echo done\n"))
    cli.wait_for_log(job_id, "started")
    agent_pid = the_node(cli).pid
    os.kill(agent_pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        while "watch broke" not in controller_log(cli):
            assert time.monotonic() - stopped < 8, "the stopped agent's watch was never seen broken"
            time.sleep(0.1)
        time.sleep(max(0.0, 5.0 - (time.monotonic() - stopped)))
    finally:
        os.kill(agent_pid, signal.SIGCONT)
    job = cli.wait(job_id, timeout=120)
    assert job["status"] == "SUCCEEDED"
    assert len(attempts(cli, job_id)) == 1, "the blip cost the job its attempt"
    assert not any(e.what == "preempted" for e in events(cli, job_id))
    log = controller_log(cli)
    assert "answers its probe" in log and "reported lost" not in log
