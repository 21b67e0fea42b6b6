"""A full disk (issue 17, item 3): on a node, no exit code is lost and the run never reads "running" for
ever; in the Sortie home, launches are refused with one line and `controller status` says so. Both on a small
tmpfs; where this machine cannot mount one, the tests skip saying why."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.controller.decide import NodeRun
from orchestrator.controller.node_reports import NODE_ERROR_PREFIX, report_node_errors
from state.store import StateStore
from tests.support.e2e import Sortie


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[callable]:
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root here (the ENOSPC tests run as root in CI)")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs on this machine: {done.stderr.strip() or done.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        for _ in range(50):
            if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode == 0:
                break
            time.sleep(0.1)


def _fill(where: Path) -> Path:
    """Fill the file system under `where` to the last byte; the file to remove to free it again."""
    fill = where / "fill"
    with fill.open("wb") as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    with contextlib.suppress(OSError):
        for i in range(10_000):  # the last blocks and inodes too
            (where / f"fill-{i}").write_bytes(b"x" * 512)
    return fill


def test_a_full_node_disk_keeps_the_exit_code_and_writes_it_when_space_returns(start_agent, small_tmpfs) -> None:
    disk = small_tmpfs("2m")
    agent = start_agent(sandbox=disk / "sandbox")
    client = agent.client()
    run_id = client.run("while [ ! -e go ]; do sleep 0.05; done; exit 7")
    (agent.sandbox / "workdir" / "go").parent.mkdir(parents=True, exist_ok=True)
    fill = _fill(disk)
    (agent.sandbox / "workdir" / "go").symlink_to("/")  # a symlink needs no data block on tmpfs
    status = client.wait(run_id, timeout=20)
    assert (status.state, status.exit_code) == ("exited", 7)  # served from memory: exit.json could not be written
    assert not (agent.sandbox / "runs" / run_id / "exit.json").exists()
    assert status.node_error and "no space left on the node" in status.node_error
    assert "no space" in client.health().get("node_error", "")
    with pytest.raises(Exception) as err:  # a new run on a full disk: 507, not a half-made run
        client.run("true", run_id="after-full")
    assert getattr(err.value, "status", None) == 507 and "no space" in str(err.value)
    fill.unlink()
    for extra in disk.glob("fill-*"):
        extra.unlink()
    deadline = time.monotonic() + 15
    while not (agent.sandbox / "runs" / run_id / "exit.json").exists():
        assert time.monotonic() < deadline, "the waiter did not write the exit code once space returned"
        time.sleep(0.1)
    assert client.status(run_id).node_error is None and client.status(run_id).exit_code == 7
    assert client.wait(client.run("true", run_id="after-full"), timeout=20).exit_code == 0


def test_a_full_home_refuses_launches_in_one_line_and_status_says_so(small_tmpfs, tmp_path: Path) -> None:
    home = small_tmpfs("80m")
    sortie = Sortie(home)
    filler = home / "filler"
    with filler.open("wb") as fh:
        fh.write(b"\0" * (40 * 1024 * 1024))  # leaves under 64 MiB free
    done = sortie.run("jobs", "launch", "-y", "-d", "echo hi", check=False)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "launch refused" in lines[0] and "is full" in lines[0] and str(home) in lines[0]
    assert not (home / "state.db").exists() or "echo hi" not in sortie.run("jobs", "queue", check=False).stdout
    status = sortie.run("controller", "status").stdout
    assert "disk:" in status and "new launches are refused" in status
    filler.unlink()
    assert "disk:" not in sortie.run("controller", "status").stdout


def test_node_errors_go_to_details_and_one_event_per_change(sortie_home: Path) -> None:
    store = StateStore(sortie_home)
    (job_id,) = store.submit({"name": "j", "tasks": [{"name": "t", "run": "true", "num_nodes": 2,
                                                      "resources": [{}]}]}, [{}], user="u")
    full = [NodeRun(0, "exited", 0, None), NodeRun(1, "running", None, "no space left on the node (/sb)")]
    assert report_node_errors(store, store.job(job_id), full)
    assert not report_node_errors(store, store.job(job_id), full)  # the same report again writes nothing
    job = store.job(job_id)
    assert job.waiting_reason == NODE_ERROR_PREFIX + "node 1: no space left on the node (/sb)"
    assert [e.what for e in store.events(job_id)].count("node-disk-full") == 1
    assert report_node_errors(store, job, [NodeRun(0, "exited", 0), NodeRun(1, "exited", 0)])
    assert store.job(job_id).waiting_reason is None
    assert [e.what for e in store.events(job_id)][-1] == "node-writes-again"


def test_an_agent_on_a_full_disk_keeps_answering_and_says_disk_full(start_agent, small_tmpfs) -> None:
    """Issue 28: the agent's request log is on the node's disk; once it was full, every request failed (the log line
    could not be written), and the controller took the node for lost. Now requests are answered, and /health, a
    run's status and the watch say the disk is full."""
    disk = small_tmpfs("2m")
    agent = start_agent(sandbox=disk / "sandbox", log=disk / "agent.log")
    client = agent.client()
    run_id = client.run("sleep 60")
    seq = client.watch(0, timeout=0)["seq"]
    fill = _fill(disk)
    for _ in range(20):  # every request answers, though none of their log lines can be written
        assert client.health()["status"] == "ok"
    assert "no space" in client.health().get("node_error", "")
    assert "no space" in (client.status(run_id).node_error or "")
    deadline = time.monotonic() + 15
    said: list[dict] = []
    while not said:
        assert time.monotonic() < deadline, "the watch never said the disk is full"
        answer = client.watch(seq, timeout=2)
        seq = answer["seq"]
        said = [e for e in answer["events"] if e["kind"] == "node" and "no space" in (e.get("node_error") or "")]
    fill.unlink()
    for extra in disk.glob("fill-*"):
        extra.unlink()
    assert "node_error" not in client.health()
    client.cancel(run_id)


def test_a_node_lost_after_its_disk_filled_fails_the_job_instead_of_relaunching(
        sortie_home: Path, start_agent, small_tmpfs, tmp_path: Path) -> None:
    """Issue 28: a relaunch would fill the next node's disk the same way. A node that said its disk was full, then
    stopped answering, ends the job FAILED "the node's disk is full" (no `max_restarts_on_errors` asked for)."""
    from orchestrator.config import load_config
    from orchestrator.controller.daemon import Controller
    from orchestrator.infra.stack_driver import UpResult
    from orchestrator.job_status import JobStatus
    from stacks.spec import StackProgram
    from tests.support.fake_driver import FakeStackDriver

    disk = small_tmpfs("2m")
    started: list = []

    class AgentDriver(FakeStackDriver):
        def up(self, stack: str, program: StackProgram, *, cleanup_on_failure: bool = True) -> UpResult:
            result = super().up(stack, program, cleanup_on_failure=cleanup_on_failure)
            agent = start_agent(sandbox=disk / f"node-{len(started)}", token=program.spec.token,
                                log=disk / f"agent-{len(started)}.log")
            started.append(agent)
            for node in result.outputs.get("nodes") or []:
                node["url"] = agent.url
            return result

    (sortie_home / "config.yaml").write_text("controller:\n  poll_interval_seconds: 0.2\n  grace_misses: 2\n")
    store = StateStore(sortie_home)
    fill = "head -c 8M /dev/zero > fill 2>/dev/null; sleep 600"
    (job_id,) = store.submit({"name": "j", "tasks": [{"name": "t", "run": fill, "num_nodes": 1,
                                                      "resources": [{}]}]}, [{}], user="u")
    driver = AgentDriver()
    controller = Controller(store, driver, load_config(sortie_home), sortie_home)
    try:
        deadline = time.monotonic() + 90
        killed = False
        while not JobStatus(store.job(job_id).status).terminal:
            controller.tick()
            job = store.job(job_id)
            if not killed and "no space" in (job.waiting_reason or ""):
                started[0].proc.kill()  # the node said its disk is full; now it is gone
                started[0].proc.wait()
                killed = True
            assert time.monotonic() < deadline, (job.status, job.waiting_reason)
            time.sleep(0.05)
    finally:
        controller.shutdown()
        from tests.conftest import _sandbox_processes

        for pid in _sandbox_processes(str(disk / "node-0")):  # the run of the agent killed above
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    job = store.job(job_id)
    assert killed and job.status == JobStatus.FAILED, (job.status, job.failure_reason)
    assert "the node's disk is full" in (job.failure_reason or ""), job.failure_reason
    assert [op for op, _ in driver.operations if op == "up"] == ["up"]  # never relaunched
    assert not [e for e in store.events(job_id) if e.what in ("preempted", "recovering")]
