"""The controller's lock (issue 17, item 5): it cannot be removed from under a live holder, it names its holder
by pid and start time, and `controller stop` returns only once the process has exited."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.controller import lock
from orchestrator.controller.daemon import controller_info, stop_controller

HOLDER = """
import signal, sys, time
from pathlib import Path
from orchestrator.controller import lock
lock.acquire(Path(sys.argv[1]), "test")
def stopping(*_):
    time.sleep(float(sys.argv[2]))  # in-flight work finishing after SIGTERM, lock still held
    sys.exit(0)
signal.signal(signal.SIGTERM, stopping)
print("held", flush=True)
time.sleep(120)
"""


def _hold(directory: Path, drain_seconds: float = 0.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), str(drain_seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _try_acquire(directory: Path) -> subprocess.CompletedProcess[str]:
    code = ("import sys\nfrom pathlib import Path\nfrom orchestrator.controller import lock\n"
            "try:\n    lock.acquire(Path(sys.argv[1]), 't')\nexcept lock.LockHeld as e:\n    print(e); sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, timeout=30)


def test_a_deleted_lock_file_does_not_let_a_second_controller_in(tmp_path: Path) -> None:
    directory = tmp_path / "controller"
    first = _hold(directory)
    try:
        (directory / lock.LOCK_NAME).unlink()  # `rm <home>/controller/controller.lock`
        second = _try_acquire(directory)
        assert second.returncode == 3 and f"pid {first.pid}" in second.stdout
        found = lock.holder(directory)
        assert found is not None and found.pid == first.pid
    finally:
        first.kill()
        first.wait()
    assert lock.holder(directory) is None
    assert _try_acquire(directory).returncode == 0  # a dead holder's record counts for nothing


def test_a_record_is_trusted_only_for_a_live_process_with_its_start_time(tmp_path: Path) -> None:
    directory = tmp_path / "controller"
    directory.mkdir()
    me = os.getpid()
    (directory / lock.RECORD_NAME).write_text(json.dumps({"pid": me, "proc_start": 1, "started_at": 1.0}))
    assert lock.holder(directory) is None  # the pid lives, but it is another process than the recorded one
    assert lock.alive(me, lock.process_start_time(me)) and not lock.alive(me, 1)


def test_stop_returns_only_once_the_controller_process_has_exited(sortie_home: Path) -> None:
    proc = _hold(sortie_home / "controller", drain_seconds=2.0)
    info = controller_info(sortie_home)
    assert info.running and info.pid == proc.pid
    started = time.monotonic()
    stopped = stop_controller(sortie_home, timeout=30)
    assert stopped.pid == proc.pid
    assert proc.poll() is not None, "stop returned while the controller process still ran"
    assert time.monotonic() - started >= 1.5  # it waited for the drain, not for the lock alone
    assert not controller_info(sortie_home).running


def test_stop_times_out_with_one_line_while_the_process_runs(sortie_home: Path) -> None:
    proc = _hold(sortie_home / "controller", drain_seconds=30.0)
    try:
        with pytest.raises(Exception, match="did not exit within 1s"):
            stop_controller(sortie_home, timeout=1)
        assert controller_info(sortie_home).running
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_of_many_starting_at_once_while_status_probes_exactly_one_holds(tmp_path: Path) -> None:
    directory = tmp_path / "controller"
    code = ("import sys, time\nfrom pathlib import Path\nfrom orchestrator.controller import lock\n"
            "try:\n    lock.acquire(Path(sys.argv[1]), 't')\nexcept lock.LockHeld:\n    sys.exit(3)\n"
            "print('held', flush=True)\ntime.sleep(5)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:  # `controller status` probing the lock all the while
        lock.holder(directory)
    holders = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=30)
        holders += out.strip() == "held"
        assert proc.returncode in (0, 3)
    assert holders == 1
