"""A stack operation outlives the controller that started it, and the next controller adopts it instead of
starting it over (real engine, real worker processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.infra.detached_ops import process_start
from stacks.spec import ClusterSpec, StackProgram

pytestmark = pytest.mark.e2e

STARTER = """
import sys, time
from pathlib import Path
from orchestrator.infra.pulumi_driver import PulumiStackDriver
from stacks.spec import ClusterSpec, StackProgram
home = Path(sys.argv[1])
spec = ClusterSpec(name=sys.argv[2], token="t0k3n-for-the-test", num_nodes=2, local_root=str(home / "local"))
PulumiStackDriver(home, fork_server=sys.argv[3] == "fork").up(sys.argv[2], StackProgram("cluster", spec))
"""


@pytest.mark.parametrize("fork", [False, True], ids=["fresh-python", "fork-server"])
def test_a_killed_controller_leaves_its_up_running_and_the_next_adopts_it(make_driver, sortie_home: Path, fork: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Also with issue 26's fork server: its forks are in sessions of their own, and outlive it and the controller."""
    driver = make_driver(fork_server=fork)
    stack = "sortie-job-9-t0-1"
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(sortie_home), stack, "fork" if fork else "-"],
                               env={**os.environ, "SORTIE_HOME": str(sortie_home)}, start_new_session=True)
    op_file = sortie_home / "ops" / stack / "op.json"
    deadline = time.monotonic() + 60
    while not op_file.exists():
        assert time.monotonic() < deadline and starter.poll() is None, "the worker never started"
        time.sleep(0.05)
    record = json.loads(op_file.read_text())
    os.kill(starter.pid, signal.SIGKILL)  # the controller dies; its `up` goes on
    starter.wait()
    assert process_start(record["pid"]) == record["start"], "the worker died with the controller"

    spawned: list[list[str]] = []
    real_popen = subprocess.Popen

    def watch_popen(args, *a, **kw):  # type: ignore[no-untyped-def]
        if any("_stack_worker" in str(x) for x in args):
            spawned.append(list(args))
        return real_popen(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", watch_popen)
    if fork:
        real_spawn = driver.operations.spawner

        def watch_spawn(folder: Path) -> tuple[int, int]:
            spawned.append([str(folder)])
            return real_spawn(folder)

        driver.operations.spawner = watch_spawn
    program = StackProgram("cluster", ClusterSpec(name=stack, token="t0k3n-for-the-test", num_nodes=2,
                                                  local_root=str(sortie_home / "local")))
    result = driver.up(stack, program)  # the restarted controller asks again: it waits for the same worker
    assert spawned == [], "a second worker was started instead of adopting the first"
    assert len(result.outputs["nodes"]) == 2
    assert process_start(record["pid"]) is None and not op_file.parent.exists()
    driver.destroy(stack)
    assert spawned, "a new operation of another kind runs its own worker"
    driver.close()
    assert driver.forks is None or not driver.forks.socket_path.parent.exists(), "the fork server left its socket"
