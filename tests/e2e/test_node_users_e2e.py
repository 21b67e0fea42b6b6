"""Issue 17: on the local cloud, as root, each node's runs run as a user of their own with a private /proc
(hidepid): job B cannot read job A's /proc/<pid>/environ, A's sandbox files nor signal A's processes, and A
still SUCCEEDS."""

from __future__ import annotations

import json
import os
import re
import time
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
  for i in $(seq 1800); do [ -e released ] && break; sleep 0.1; done
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
        (sandbox / "workdir" / "released").touch()  # the victim waits for this, not for a fixed time
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


ACCOUNT = """\
run: |
  echo "whoami=$(whoami)"
  python3 -c 'import os, pwd; e = pwd.getpwuid(os.getuid()); print(f"pw={e.pw_name} pwhome={e.pw_dir}")'
  echo "HOME=$HOME"
  stat -c 'home-mode=%a home-owner=%u' "$HOME"
  echo mine > "$HOME/private.txt" && echo home-writable
  t=/tmp/sortie-umask-$$.txt; echo shared > $t && stat -c 'tmp-mode=%a' $t && rm $t
  echo "uid=$(id -u)"
  sudo apt-get install -y jq
  echo "sudo-exit=$?"
"""


def test_a_node_user_has_an_account_a_private_home_and_a_sudo_that_says_no(sortie: Sortie, tmp_path: Path) -> None:
    """Part 3 of the rest of issue 17: getpwuid works, `whoami` names the user, $HOME is its own (0700), its files
    in /tmp are closed to others (umask 027), `sudo` refuses in one line; the account is gone with the node."""
    job_id = sortie.launch(write(tmp_path, "account.yaml", ACCOUNT))
    job = sortie.wait(job_id, timeout=180)
    out = sortie.logs(job_id)
    assert job["status"] == "SUCCEEDED", out
    uid = int(re.search(r"\buid=(\d+)$", out, re.M).group(1))  # type: ignore[union-attr]
    name = f"sortie-{uid}"
    assert in_range(uid)
    assert f"whoami={name}" in out and f"pw={name} " in out, out
    home = re.search(r"\bHOME=(\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    assert f"pwhome={home}" in out and home.endswith("/home")
    assert f"home-mode=700 home-owner={uid}" in out and "home-writable" in out
    assert "tmp-mode=640" in out, out  # umask 027: what it leaves in the machine's /tmp is closed to other jobs
    assert "sudo: refused on Sortie's local cloud" in out and "sudo-exit=1" in out, out
    deadline = time.monotonic() + 90
    while f"{name}:" in Path("/etc/passwd").read_text():  # the node goes with the job: its account with it
        assert time.monotonic() < deadline, f"{name} is still in /etc/passwd"
        time.sleep(0.5)
    assert f"{name}:" not in Path("/etc/group").read_text()
    setup = sortie.launch(write(tmp_path, "sudo-setup.yaml", "setup: sudo apt-get install -y jq\nrun: echo ran\n"))
    failed = sortie.wait(setup, timeout=180)
    setup_out = sortie.logs(setup)
    assert failed["status"] == "FAILED_SETUP", setup_out  # a SkyPilot habit: said in one line, never run as root
    assert "sudo: refused on Sortie's local cloud" in setup_out and "ran" not in setup_out.split(), setup_out


POOL = """\
pool:
  workers: 1
  jobs_per_worker: 2
resources:
  cpus: 1+
setup: |
  echo from-setup > setup-made.txt
run: echo ignored
"""

POOL_A = """\
secrets:
  A_SECRET: pool-secret-8d21
run: |
  echo "a-uid=$(id -u) a-user=$(whoami)"
  echo a-home-secret > "$HOME/a.txt"
  echo a-scratch-secret > "$SORTIE_JOB_DIR/a.txt"
  echo a-tmp-secret > {tmp_file}
  echo "a-read: $(cat setup-made.txt)"
  echo x > cwd-write.txt 2>/dev/null && echo A-WROTE-CWD
  echo "a-pid=$$"
  echo a-ready
  for i in $(seq 1800); do [ -e {tmp_file}.released ] && break; sleep 0.1; done
  echo a-done
"""

POOL_B = r"""
echo "b-uid=$(id -u)"
echo "b-read: $(cat setup-made.txt)"
A_HOME=$SORTIE_NODE_SANDBOX/users/job-$A_JOB/home
cat $A_HOME/a.txt 2>/dev/null && echo LEAK-HOME
ls $A_HOME 2>/dev/null | grep -q . && echo LEAK-HOME-LIST
cat $A_HOME/.sortie-jobs/$A_JOB/a.txt 2>/dev/null && echo LEAK-SCRATCH
cat $SORTIE_NODE_SANDBOX/home/a.txt 2>/dev/null && echo LEAK-WORKER-HOME
cat $SORTIE_NODE_SANDBOX/home/.sortie-jobs/$A_JOB/a.txt 2>/dev/null && echo LEAK-WORKER-SCRATCH
cat $TMP_FILE 2>/dev/null && echo LEAK-TMP
cat /proc/$A_PID/environ 2>/dev/null | tr '\0' '\n' | grep -q A_SECRET && echo LEAK-ENVIRON
ls /proc | grep -qx "$A_PID" && echo LEAK-LISTED
kill -0 $A_PID 2>/dev/null && echo LEAK-SIGNAL
env | grep -q pool-secret && echo LEAK-ENV
echo probe-done
"""

POOL_C = r"""
echo "c-uid=$(id -u)"
ls $SORTIE_NODE_SANDBOX/users/job-$A_JOB 2>/dev/null && echo LEFT-DIR
test -e $TMP_FILE && echo LEFT-TMP
getent passwd $A_UID && echo LEFT-ACCOUNT
echo check-done
"""


def _pool_job(sortie: Sortie, tmp_path: Path, name: str, text: str) -> int:
    out = sortie.run("jobs", "launch", "-y", "-d", "-p", "iso", write(tmp_path, name, text)).stdout
    return int(re.search(r"ID (\d+)", out).group(1))  # type: ignore[union-attr]


def test_jobs_on_one_pool_worker_are_users_of_their_own(sortie: Sortie, tmp_path: Path) -> None:
    """Part 2 of the rest of issue 17: job B, beside job A on the same worker, reads neither A's home, scratch
    directory, /tmp files nor environment, nor signals it; job C, after A, finds nothing A left (its directory, its
    /tmp file, its account); all three read the pool's setup, and none writes the worker's workdir."""
    tmp_file = f"/tmp/sortie-pool-a-{os.getpid()}.txt"
    sortie.run("jobs", "pool", "apply", "-y", "-p", "iso", write(tmp_path, "pool.yaml", POOL))
    deadline = time.monotonic() + 180
    while json.loads(sortie.run("jobs", "pool", "status", "iso", "--json").stdout)[0]["ready"] != 1:
        assert time.monotonic() < deadline, "the pool's worker never got READY"
        time.sleep(0.5)
    try:
        a = _pool_job(sortie, tmp_path, "a.yaml", POOL_A.format(tmp_file=tmp_file))
        sortie.wait_for_log(a, "a-ready", timeout=60)
        a_out = sortie.logs(a)
        a_uid = int(re.search(r"a-uid=(\d+)", a_out).group(1))  # type: ignore[union-attr]
        a_pid = re.search(r"a-pid=(\d+)", a_out).group(1)  # type: ignore[union-attr]
        b = _pool_job(sortie, tmp_path, "b.yaml", f"envs:\n  A_JOB: '{a}'\n  A_PID: '{a_pid}'\n  TMP_FILE: {tmp_file}\n"
                      "run: |\n" + "".join(f"  {line}\n" for line in POOL_B.strip().splitlines()))
        b_job = sortie.wait(b, timeout=180)
        b_out = sortie.logs(b)
        assert b_job["status"] == "SUCCEEDED" and "probe-done" in b_out, b_out
        assert not [line for line in b_out.splitlines() if "LEAK-" in line or "secret" in line], b_out
        assert "b-read: from-setup" in b_out
        assert f"a-user=sortie-{a_uid}" in a_out, a_out  # an account of its own while it runs
        assert os.stat(tmp_file).st_uid == a_uid and os.stat(tmp_file).st_mode & 0o077 == 0  # umask 077
        b_uid = int(re.search(r"b-uid=(\d+)", b_out).group(1))  # type: ignore[union-attr]
        Path(f"{tmp_file}.released").touch()  # job A waits for this (B has probed it), not for a fixed time
        a_job = sortie.wait(a, timeout=180)
        a_out = sortie.logs(a)
        assert a_job["status"] == "SUCCEEDED" and "a-done" in a_out, a_out
        assert "a-read: from-setup" in a_out and "A-WROTE-CWD" not in a_out
        deadline = time.monotonic() + 60
        while os.path.exists(tmp_file) or f"sortie-{a_uid}:" in Path("/etc/passwd").read_text():
            assert time.monotonic() < deadline, "job A's user and files were not removed at its end"
            time.sleep(0.5)
        c = _pool_job(sortie, tmp_path, "c.yaml", f"envs:\n  A_JOB: '{a}'\n  A_UID: '{a_uid}'\n  TMP_FILE: {tmp_file}\n"
                      "run: |\n" + "".join(f"  {line}\n" for line in POOL_C.strip().splitlines()))
        c_job = sortie.wait(c, timeout=180)
        c_out = sortie.logs(c)
        assert c_job["status"] == "SUCCEEDED" and "check-done" in c_out, c_out
        assert "LEFT-" not in c_out, c_out
        c_uid = int(re.search(r"c-uid=(\d+)", c_out).group(1))  # type: ignore[union-attr]
        assert len({a_uid, b_uid, c_uid}) == 3 and all(in_range(u) for u in (a_uid, b_uid, c_uid))
    finally:
        sortie.run("jobs", "pool", "down", "-y", "iso", check=False)
        deadline = time.monotonic() + 120
        while json.loads(sortie.run("jobs", "pool", "status", "--json").stdout):
            assert time.monotonic() < deadline, "the pool never went down"
            time.sleep(0.5)
        for path in (tmp_file, f"{tmp_file}.released"):
            if os.path.exists(path):
                os.unlink(path)
