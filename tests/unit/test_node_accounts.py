"""Issue 17: run users get /etc/passwd and /etc/group entries for their lifetime (node_accounts.py), a `sudo` that
refuses in one line, and a pool job's user of its own on its worker (node_user.RunUser.job_user / remove_job).
`own_etc` (tests/conftest.py) points the account files at a directory of the test's."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from orchestrator.node import node_accounts, node_user
from orchestrator.node.node_user import RunUser, in_range

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown and the node's user need root")
UID = 1_900_000_321


def lines(etc: Path, name: str) -> list[str]:
    return (etc / name).read_text().splitlines()


def test_an_account_is_added_and_removed_with_its_group(own_etc: Path, tmp_path: Path) -> None:
    (own_etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nsortie-web:x:1500:1500::/srv:/bin/sh\n")
    home = tmp_path / "home"
    home.mkdir()
    assert node_accounts.add_account(UID, UID, home, in_range) == f"sortie-{UID}"
    assert f"sortie-{UID}:x:{UID}:{UID}:Sortie run user:{home}:/bin/bash" in lines(own_etc, "passwd")
    assert f"sortie-{UID}:x:{UID}:" in lines(own_etc, "group")
    node_accounts.add_account(UID, UID, home, in_range)  # again (an agent restart): still one entry
    assert sum(line.startswith(f"sortie-{UID}:") for line in lines(own_etc, "passwd")) == 1
    node_accounts.remove_account(UID, in_range)
    assert not any(str(UID) in line for line in lines(own_etc, "passwd") + lines(own_etc, "group"))
    assert "sortie-web:x:1500:1500::/srv:/bin/sh" in lines(own_etc, "passwd")  # not ours: never touched


def test_an_entry_whose_home_is_gone_is_dropped_when_another_is_added(own_etc: Path, tmp_path: Path) -> None:
    gone, live = tmp_path / "gone", tmp_path / "live"
    gone.mkdir()
    live.mkdir()
    node_accounts.add_account(UID, UID, gone, in_range)
    gone.rmdir()  # an agent killed without its cleanup, its sandbox removed
    node_accounts.add_account(UID + 1, UID + 1, live, in_range)
    passwd = "\n".join(lines(own_etc, "passwd"))
    assert f"sortie-{UID}:" not in passwd and f"sortie-{UID + 1}:" in passwd
    assert f"sortie-{UID}:" not in "\n".join(lines(own_etc, "group"))


def test_the_sudo_shim_refuses_in_one_line(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the shim is made root's")
    shim = node_accounts.install_sudo_shim(tmp_path / "bin")
    proc = subprocess.run([str(shim), "apt-get", "install", "-y", "jq"], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "refused on Sortie's local cloud" in proc.stderr
    assert "SORTIE_NO_RUN_USERS=1" in proc.stderr
    assert stat.S_IMODE(shim.stat().st_mode) == 0o755 and shim.stat().st_uid == 0


@root_only
def test_a_pool_job_gets_a_user_of_its_own_removed_with_its_files(own_etc: Path, tmp_path: Path) -> None:
    sandbox = tmp_path / "nodes" / "worker-1"
    sandbox.mkdir(parents=True)
    node = node_user.prepare_sandbox(sandbox, "worker-1")
    users = RunUser(sandbox, node)
    assert f"sortie-{node.uid}:x:{node.uid}:{node.gid}:Sortie run user:{sandbox / 'home'}:/bin/bash" \
        in lines(own_etc, "passwd")
    job = users.job_user("job-7")
    other = users.job_user("job-8")
    assert in_range(job.uid) and len({job.uid, other.uid, node.uid}) == 3
    assert job.gid == other.gid == node.gid  # the worker's group: to pass through its sandbox (0710)
    assert users.job_user("job-7") == job  # a second run of the same job
    home = sandbox / "users" / "job-7" / "home"
    st = home.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (job.uid, 0o700)
    for name in ("workdir", "home", "mounts"):  # the worker's: the jobs read, never write
        assert stat.S_IMODE((sandbox / name).stat().st_mode) == 0o750
    env: dict[str, str] = {"PATH": "/usr/bin:/bin", "HOME": str(sandbox / "home")}
    args = users.run_env(env, {}, True, "job-7")
    assert args == [f"--uid={job.uid}", f"--gid={node.gid}", "--umask=077"]
    assert env["HOME"] == str(home) and env["SORTIE_WORKER_HOME"] == str(sandbox / "home")
    assert env["TMPDIR"] == str(sandbox / "users" / "job-7" / "tmp")
    assert env["USER"] == f"sortie-{job.uid}" and env["PATH"].startswith(f"{sandbox / 'bin'}:")
    leftover = Path("/dev/shm") / f"sortie-test-{os.getpid()}"
    leftover.write_text("left by job 7\n")
    os.chown(leftover, job.uid, job.gid)
    done = users.remove_job("job-7")
    assert done["uid"] == job.uid and done["removed"] == 1
    assert not leftover.exists() and not (sandbox / "users" / "job-7").exists()
    passwd = "\n".join(lines(own_etc, "passwd"))
    assert f"sortie-{job.uid}:" not in passwd and f"sortie-{other.uid}:" in passwd
    assert users.remove_job("job-7") == {"killed": 0, "removed": 0}
    with pytest.raises(ValueError, match=r"user: '\.\./x' must match"):
        users.job_user("../x")
    users.kill()  # the node goes: every account of it removed
    assert not any("Sortie run user" in line for line in lines(own_etc, "passwd"))
