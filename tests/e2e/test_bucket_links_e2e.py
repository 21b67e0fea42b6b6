"""Issue 28, items 1 and 3, end to end as the attack was made: job 1 MOUNTs bucket `b` and runs `ln -s / /data/evil`
(and a link to a directory holding a 0600 root file); job 2 names a path through that link, as COPY, MOUNT and
MOUNT_CACHED. The node's bucket steps run as root and the agent grants ACLs as root: none of them may read, copy or
open to the job what the link points at. On the local store and on S3 (moto); S3 keys have no links, and the
MOUNT_CACHED uploader uploads none (issue 17), so there the attack finds nothing to follow."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.config import S3Config
from orchestrator.node.node_user import ACL_ACCESS
from orchestrator.storage import S3Store
from tests.support.e2e import Sortie, path_view_works, write

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="the attack needs the agent (and so its bucket steps) as root"),
    pytest.mark.skipif(not path_view_works(), reason="no mount namespaces here: no path view, no node users"),
]
FAST = "controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  autostop_idle_minutes: 5\n"
SECRET = "root-secret-28a1"

PLANT = """\
file_mounts:
  /data:
    name: {bucket}
    store: {store}
    mode: MOUNT
run: |
  ln -s / /data/evil && echo linked-root
  ln -s {victim} /data/evil2 && echo linked-victim
  echo planted
"""

# Job 2, one per mode, through the link to / in the middle of the path (or the one to the victim's directory); each
# prints what it could read, and MOUNT tries to append to the victim (through the mount and at its own path).
STEAL = {
    "COPY": """\
file_mounts:
  /loot: {store}://{bucket}/evil/etc/shadow
  /loot2: {store}://{bucket}/evil2/secret.txt
run: |
  echo "LOOT=$(head -c 5 /loot)"
  cat /loot2
""",
    "MOUNT": """\
file_mounts:
  /loot:
    source: {store}://{bucket}/evil{victim}
    mode: MOUNT
run: |
  cat /loot/secret.txt
  echo appended >> /loot/secret.txt && echo APPENDED
  cat {victim}/secret.txt
  echo appended >> {victim}/secret.txt && echo APPENDED
""",
    "MOUNT_CACHED": """\
file_mounts:
  /loot:
    source: {store}://{bucket}/evil{victim}
    mode: MOUNT_CACHED
run: |
  cat /loot/secret.txt
  ls -la /loot
""",
}


@pytest.fixture
def victim() -> Iterator[Path]:
    """A root directory any user may pass through (as /etc is) holding a 0600 root file."""
    path = Path(tempfile.mkdtemp(prefix="sortie-victim-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    (path / "secret.txt").write_text(f"{SECRET}\n")
    os.chmod(path / "secret.txt", 0o600)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _attack(cli: Sortie, tmp_path: Path, store: str, bucket: str, victim: Path,
            outcomes: dict[str, str] | None = None) -> dict[str, str]:
    """Run job 1 (plant the links), then job 2 in each mode; what leaked, by mode ({} when nothing did). Each
    job 2's end (its status and reason, or the launch's refusal) goes into `outcomes`."""
    outcomes = {} if outcomes is None else outcomes
    plant = cli.launch(write(tmp_path, "plant.yaml", PLANT.format(bucket=bucket, store=store, victim=victim)))
    planted = cli.wait(plant, timeout=180)
    assert planted["status"] == "SUCCEEDED", cli.logs(plant)
    assert "planted" in cli.logs(plant)
    jobs = {}
    for mode, text in STEAL.items():
        proc = cli.run("jobs", "launch", "-y", "-d", write(tmp_path, f"steal-{mode}.yaml",
                                                           text.format(store=store, bucket=bucket, victim=victim)),
                   check=False)
        jobs[mode] = proc
    leaks: dict[str, str] = {}
    for mode, proc in jobs.items():
        if proc.returncode != 0:  # refused at launch: nothing ran
            assert "Traceback" not in proc.stderr, proc.stderr
            outcomes[mode] = f"refused ({proc.returncode}): {proc.stderr.strip()}"
            continue
        job_id = int(proc.stdout.split("submitted: ID ", 1)[1].split()[0])
        job = cli.wait(job_id, timeout=240)
        out = cli.logs(job_id)
        said = f"{job['status']}: {job.get('failure_reason') or ''}\n{out}"
        outcomes[mode] = said
        if SECRET in out or "LOOT=root:" in out:  # an append to the victim shows in `_victim_touched`
            leaks[mode] = said
    return leaks


def _victim_touched(victim: Path) -> dict[str, str]:
    """What was done to the victim: its file changed, an ACL entry given on it or its directory."""
    touched = {}
    if (victim / "secret.txt").read_text() != f"{SECRET}\n":
        touched["content"] = (victim / "secret.txt").read_text()
    for path in (victim, victim / "secret.txt"):
        with contextlib.suppress(OSError):
            touched[f"ACL on {path}"] = repr(os.getxattr(path, ACL_ACCESS))
    return touched


def test_a_symlink_in_a_local_bucket_reaches_no_root_file(sortie_cli, tmp_path: Path, victim: Path) -> None:
    cli = sortie_cli(FAST)
    cli.env.pop("SORTIE_NO_RUN_USERS", None)  # the suite opts out (tests/conftest.py); the attack is on node users
    bucket = f"links-{secrets.token_hex(4)}"
    outcomes: dict[str, str] = {}
    leaks = _attack(cli, tmp_path, "local", bucket, victim, outcomes)
    leaks.update(_victim_touched(victim))
    assert not leaks, "\n\n".join(f"--- {mode} ---\n{out}" for mode, out in leaks.items())
    # Each was stopped by the resolver, not by luck: the path through the link is nothing of the bucket's.
    # COPY: the path holds no object, so (as for any empty prefix) the destination is an empty directory.
    assert "/loot2: Is a directory" in outcomes["COPY"], outcomes["COPY"]
    assert outcomes["MOUNT"].startswith("FAILED_SETUP") and "symlink" in outcomes["MOUNT"], outcomes["MOUNT"]
    assert "No such file" in outcomes["MOUNT_CACHED"], outcomes["MOUNT_CACHED"]
    stored = cli.home / "buckets" / bucket
    assert (stored / "evil").is_symlink()  # job 1's link is still there; it is simply never followed


def test_the_same_attack_on_s3_finds_no_link(sortie_cli, s3_env: S3Config, tmp_path: Path, victim: Path) -> None:
    from tests.e2e.test_node_mounts import fuse_works

    why = fuse_works()
    if why:
        pytest.skip(why)
    s3 = S3Store(s3_env)
    bucket = f"links-{secrets.token_hex(4)}"
    s3.create_bucket(bucket)
    cli = sortie_cli(FAST + f"storage:\n  s3:\n    endpoint_url: {s3_env.endpoint_url}\n    region: us-east-1\n")
    cli.env.pop("SORTIE_NO_RUN_USERS", None)
    leaks = _attack(cli, tmp_path, "s3", bucket, victim)
    leaks.update(_victim_touched(victim))
    assert not leaks, "\n\n".join(f"--- {mode} ---\n{out}" for mode, out in leaks.items())
    for key in s3.list_objects(bucket):  # and nothing of the victim's reached the bucket either
        s3.get_file(bucket, key, tmp_path / "object")
        assert SECRET not in (tmp_path / "object").read_text(errors="replace"), key
