"""Issue 17: on the local cloud, as root, each node's runs run as a user of their own with a private /proc
(hidepid): job B cannot read job A's /proc/<pid>/environ, A's sandbox files nor signal A's processes, and A
still SUCCEEDS."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from orchestrator.node.node_user import in_range
from tests.support.e2e import Sortie, path_view_works, write

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="node users need the agent to run as root (runs keep your user)"),
    pytest.mark.skipif(not path_view_works(), reason="no mount namespaces here: no path view, no node users"),
]

VICTIM = """\
secrets:
  A_SECRET: victim-secret-4d1e
run: |
  echo mine > a-file.txt
  echo "uid=$(id -u)"
  echo ready
  sleep 25
  cat a-file.txt
  echo victim-done
"""

PROBE = r"""
echo "uid=$(id -u)"
cat /proc/$A_PID/environ 2>&1 | tr '\0' '\n' | grep -q A_SECRET && echo LEAK-ENVIRON
ls /proc | grep -qx "$A_PID" && echo LEAK-LISTED
ps -eo pid= 2>/dev/null | tr -d ' ' | grep -qx "$A_PID" && echo LEAK-PS
ls /proc/$A_PID/cwd/ 2>/dev/null | grep -q a-file && echo LEAK-CWD
cat /proc/$A_PID/root$A_SANDBOX/workdir/a-file.txt 2>/dev/null && echo LEAK-ROOT
cat $A_SANDBOX/workdir/a-file.txt 2>/dev/null && echo LEAK-FILE
ls $A_SANDBOX/ 2>/dev/null | grep -q . && echo LEAK-SANDBOX
echo > $A_SANDBOX/workdir/a-file.txt 2>/dev/null && echo LEAK-WRITE
kill -0 $A_PID 2>/dev/null && echo LEAK-SIGNAL
kill -TERM $A_PID 2>/dev/null && echo LEAK-KILL
kill -KILL -- -$A_PID 2>/dev/null && echo LEAK-KILLPG
echo "kill says: $(kill -0 $A_PID 2>&1)"
echo probe-done
"""


@pytest.fixture
def sortie(sortie_cli) -> Sortie:
    cli = sortie_cli("controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  autostop_idle_minutes: 5\n")
    cli.env.pop("SORTIE_NO_RUN_USERS", None)  # the suite opts out (tests/conftest.py); here, the default
    return cli


def _victim_run(home: Path) -> tuple[Path, int]:
    """The victim's sandbox and the pid of its run (the test runs as root and reads the agent's records)."""
    for sandbox in (home / "local" / "nodes").iterdir():
        for meta in sandbox.glob("runs/*/meta.json"):
            record = json.loads(meta.read_text())
            if "victim-done" in record["command"]:
                return sandbox, int(record["pid"])
    raise AssertionError("the victim's run was not found")


def test_another_job_cannot_read_or_signal_a_jobs_processes_or_files(sortie: Sortie, tmp_path: Path) -> None:
    victim = sortie.launch(write(tmp_path, "victim.yaml", VICTIM))
    try:
        sortie.wait_for_log(victim, "ready", timeout=120)
        sandbox, pid = _victim_run(sortie.home)
        assert (sandbox / "workdir" / "a-file.txt").read_text() == "mine\n"
        attacker = sortie.launch(write(tmp_path, "attacker.yaml", "envs:\n"
                                       f"  A_PID: '{pid}'\n  A_SANDBOX: {sandbox}\n"
                                       "run: |\n" + "".join(f"  {line}\n" for line in PROBE.strip().splitlines())))
        job = sortie.wait(attacker, timeout=180)
        out = sortie.logs(attacker)
        assert job["status"] == "SUCCEEDED", out
        assert "probe-done" in out, out
        leaks = [line for line in out.splitlines() if "LEAK-" in line or "victim-secret" in line]
        assert not leaks, out
        assert "Operation not permitted" in out, out  # kill -0 reached the process and was refused: no lucky miss
        owner = (sandbox / "workdir").stat()
        assert in_range(owner.st_uid) and owner.st_mode & 0o777 == 0o700
        done = sortie.wait(victim, timeout=180)
    finally:
        if sortie.job(victim)["status"] not in ("SUCCEEDED", "FAILED", "CANCELLED"):
            sortie.run("jobs", "cancel", "-y", str(victim), check=False)
            sortie.wait(victim, timeout=180)
    victim_out = sortie.logs(victim)
    assert done["status"] == "SUCCEEDED", victim_out  # untouched: its file and its process survived
    assert "mine" in victim_out and "victim-done" in victim_out
    uids = set(re.findall(r"uid=(\d+)", out)) | set(re.findall(r"uid=(\d+)", victim_out))
    assert len(uids) == 2 and all(in_range(int(u)) for u in uids), uids  # two users, both from the range


CACHED_LEAK = """\
file_mounts:
  /out:
    name: {bucket}
    mode: MOUNT_CACHED
run: |
  echo mine > /out/mine.txt
  ln -s {secret} /out/leak-file
  ln -s {secret_dir} /out/leak-dir
  ln -s /etc/shadow /out/leak-shadow
  mkdir -p /out/sub && ln -s {secret_dir} /out/sub/deep
  sleep 8
  echo linked-done
"""


def test_mount_cached_uploads_no_symlink_target(sortie: Sortie, tmp_path: Path) -> None:
    """Part 1 of the rest of issue 17: the MOUNT_CACHED uploader (root, beside the run) uploads the run's own files,
    never what a symlink it placed points at (a root-only file, another directory, /etc/shadow)."""
    secret_dir = tmp_path / "victim"
    secret_dir.mkdir()
    (secret_dir / "secret.txt").write_text("root-secret-5b7e\n")
    os.chmod(secret_dir / "secret.txt", 0o600)
    bucket = f"cached-links-{os.getpid()}"
    job_id = sortie.launch(write(tmp_path, "cached.yaml", CACHED_LEAK.format(
        bucket=bucket, secret=secret_dir / "secret.txt", secret_dir=secret_dir)))
    job = sortie.wait(job_id, timeout=180)
    out = sortie.logs(job_id)
    assert job["status"] == "SUCCEEDED", out
    assert "linked-done" in out
    stored = sortie.home / "buckets" / bucket
    names = sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*") if not p.is_dir())
    assert names == ["mine.txt"], names
    assert (stored / "mine.txt").read_text() == "mine\n"
