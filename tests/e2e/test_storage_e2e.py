"""Buckets, file mounts and the intermediate bucket end to end: real CLI, controller, engine and local-cloud
nodes; S3 through moto's real server on loopback."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import pytest

from orchestrator.config import S3Config
from orchestrator.storage import S3Store
from tests.support.e2e import Sortie, path_view_works, write

# Tasks here read and write absolute paths (/checkpoint, /data): local-cloud nodes need mount namespaces for that.
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not path_view_works(), reason="no mount namespaces here")]
FAST = "controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  grace_misses: 2\n"

TRAIN = """\
name: train
file_mounts:
  /checkpoint:
    name: {bucket}
    mode: {mode}
    persistent: {persistent}
run: |
  step=$(cat /checkpoint/step 2>/dev/null || echo 0)
  echo "resuming from step $step"
  # The first attempt is slow (it is preempted midway, on a loaded machine too); the resumed one is quick.
  pause=0.3; [ -e {marker} ] || {{ touch {marker}; pause=4; }}
  while [ "$step" -lt 8 ]; do
    step=$((step + 1))
    echo "$step" > /checkpoint/step.tmp && mv /checkpoint/step.tmp /checkpoint/step
    echo "step $step"
    sleep $pause
  done
  echo "trained to step $step"
"""


@pytest.fixture
def cli(sortie_cli) -> Sortie:
    return sortie_cli(FAST)


def bucket_name(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(4)}"


def wait_storage_cleaned(cli: Sortie, job_id: int, timeout: float = 30) -> None:
    import time

    from state.store import StateStore

    deadline = time.monotonic() + timeout
    while (StateStore(cli.home).job(job_id).storage_cleaned_at) is None:
        assert time.monotonic() < deadline, "the job's storage was never cleaned"
        time.sleep(0.2)


def resume_points(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"resuming from step (\d+)", log)]


@pytest.mark.parametrize("mode", ["MOUNT", "MOUNT_CACHED"])
def test_preempted_training_resumes_from_its_checkpoint(cli: Sortie, tmp_path: Path, mode: str) -> None:
    bucket = bucket_name("ckpt")
    yaml = write(tmp_path, "train.yaml", TRAIN.format(bucket=bucket, mode=mode, persistent="true",
                                                      marker=tmp_path / "first-attempt"))
    job_id = cli.launch(yaml)
    cli.wait_for_log(job_id, "step 3\n", timeout=90)
    cli.run("local", "preempt", "--job", str(job_id))
    job = cli.wait(job_id, timeout=150)
    assert job["status"] == "SUCCEEDED", cli.logs(job_id, "--controller")
    assert job["tasks"][0]["recoveries"] == 1
    log = cli.logs(job_id)
    points = resume_points(log)
    assert points[0] == 0 and len(points) == 2 and points[1] >= 3, log
    # The work after the resume continued from the checkpoint: every step ran once, none from zero again.
    assert [int(n) for n in re.findall(r"^.*step (\d+)$", log, re.M)].count(1) == 1
    assert "trained to step 8" in log
    assert (cli.home / "buckets" / bucket / "step").read_text().strip() == "8"  # persistent: kept


def test_non_persistent_bucket_is_deleted_and_an_existing_one_is_kept(cli: Sortie, tmp_path: Path) -> None:
    made, existing = bucket_name("tmp"), bucket_name("keep")
    (cli.home / "buckets" / existing).mkdir(parents=True)
    (cli.home / "buckets" / existing / "input.txt").write_text("from-before\n")
    yaml = write(tmp_path, "b.yaml", f"""\
file_mounts:
  /scratch:
    name: {made}
    persistent: false
  /in:
    name: {existing}
    persistent: false
  /copied: local://{existing}/input.txt
run: |
  echo hi > /scratch/out.txt
  echo "read $(cat /in/input.txt) and $(cat /copied)"
""")
    job_id = cli.launch(yaml)
    job = cli.wait(job_id, timeout=90)
    assert job["status"] == "SUCCEEDED", cli.logs(job_id, "--controller")
    assert "read from-before and from-before" in cli.logs(job_id)
    wait_storage_cleaned(cli, job_id)
    assert not (cli.home / "buckets" / made).exists()          # created by Sortie, persistent: false
    assert (cli.home / "buckets" / existing / "input.txt").exists()  # it existed before: never deleted


def test_pipeline_passes_a_file_through_a_shared_bucket(cli: Sortie, tmp_path: Path) -> None:
    bucket = bucket_name("shared")
    yaml = write(tmp_path, "pipe.yaml", f"""\
name: pipe
---
name: train
file_mounts:
  /shared: {{name: {bucket}, persistent: false}}
run: echo model-v2 > /shared/model.txt
---
name: eval
file_mounts:
  /shared: {{name: {bucket}, persistent: false}}
run: echo "eval read $(cat /shared/model.txt)"
""")
    job = cli.wait(cli.launch(yaml), timeout=120)
    assert job["status"] == "SUCCEEDED"
    assert "eval read model-v2" in cli.logs(job["id"], "eval")
    wait_storage_cleaned(cli, job["id"])
    assert not (cli.home / "buckets" / bucket).exists()


def _project(tmp_path: Path) -> Path:
    work = tmp_path / "proj"
    (work / "src").mkdir(parents=True)
    (work / "src" / "main.txt").write_text("main-code\n")
    (work / "debug.log").write_text("noise\n")
    (work / ".gitignore").write_text("*.log\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.txt").write_text("dataset\n")
    (tmp_path / "one.cfg").write_text("cfg-1\n")
    return work


LIST = """\
workdir: {work}
file_mounts:
  /data: {data}
  /etc-sortie/one.cfg: {cfg}
run: |
  cat src/main.txt /data/d.txt /etc-sortie/one.cfg
  if [ -e debug.log ]; then echo "ignored file came along"; else echo "gitignore respected"; fi
"""


@pytest.mark.parametrize("two_hop", [False, True], ids=["temporary-bucket", "two-hop"])
def test_workdir_and_file_mounts_reach_the_node_and_are_removed_after(sortie_cli, tmp_path: Path,
                                                                     two_hop: bool) -> None:
    cli = sortie_cli(FAST + ("jobs:\n  force_disable_cloud_bucket: true\n" if two_hop else ""))
    work = _project(tmp_path)
    yaml = write(tmp_path, "w.yaml", LIST.format(work=work, data=tmp_path / "data", cfg=tmp_path / "one.cfg"))
    job_id = cli.launch(yaml)
    job = cli.wait(job_id, timeout=90)
    assert job["status"] == "SUCCEEDED", cli.logs(job_id, "--controller")
    log = cli.logs(job_id)
    assert "main-code" in log and "dataset" in log and "cfg-1" in log and "gitignore respected" in log
    wait_storage_cleaned(cli, job_id)
    assert not (cli.home / "jobs" / str(job_id) / "uploads").exists()  # the two-hop copy
    assert not (cli.home / "buckets").exists() or not list((cli.home / "buckets").iterdir())  # the temporary bucket


def test_upload_over_the_limit_is_refused_before_anything_is_submitted(sortie_cli, tmp_path: Path) -> None:
    cli = sortie_cli(FAST + "jobs:\n  max_upload_mb: 0.01\n")
    work = tmp_path / "big"
    work.mkdir()
    (work / "blob.bin").write_bytes(b"x" * 50_000)
    proc = cli.run("jobs", "launch", "-y", "-d", "--workdir", str(work), "echo hi", check=False)
    assert proc.returncode != 0
    assert "over the" in proc.stderr and "jobs.max_upload_mb" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert json.loads(cli.run("jobs", "queue", "-a", "--json").stdout) == []


@pytest.mark.parametrize(("mount", "expected"), [
    ("/data: {name: b-abc, store: foo}", 'file_mounts./data.store: "foo" is not a store'),
    ("/data: {name: b-abc, store: gcs}", "store gcs is not supported yet"),
    ("/data: gs://some-bucket/x", "gs:// buckets are not supported yet"),
    ("/data: {name: b-abc, source: ./no-such-dir}", 'file_mounts./data.source: local path "./no-such-dir" does not'),
    ("data: {name: b-abc}", "file_mounts.data: a bucket mount path must be absolute"),
    ("/data: local://no-such-bucket-x/p", "bucket no-such-bucket-x does not exist"),
])
def test_bad_storage_input_is_one_clear_line_and_nothing_is_made(cli: Sortie, tmp_path: Path, mount: str,
                                                                  expected: str) -> None:
    yaml = write(tmp_path, "bad.yaml", f"file_mounts:\n  {mount}\nrun: echo hi\n")
    proc = cli.run("jobs", "launch", "-y", "-d", yaml, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert json.loads(cli.run("jobs", "queue", "-a", "--json").stdout) == []
    assert not (cli.home / "buckets").exists() or not list((cli.home / "buckets").iterdir())


# --- S3 (moto's server on loopback) ----------------------------------------------------------------------------

def s3_config(endpoint: str) -> str:
    return f"storage:\n  s3:\n    endpoint_url: {endpoint}\n    region: us-east-1\n"


def test_s3_intermediate_bucket_copy_cached_and_cleanup(sortie_cli, s3_env: S3Config, tmp_path: Path) -> None:
    s3 = S3Store(s3_env)
    inter, data, kept, temp = (bucket_name(k) for k in ("inter", "data", "kept", "temp"))
    for name in (inter, data):
        s3.create_bucket(name)
    (tmp_path / "in.txt").write_text("s3-input\n")
    s3.put_file(data, "inputs/in.txt", tmp_path / "in.txt")
    cli = sortie_cli(FAST + s3_config(s3_env.endpoint_url or "") + f"jobs:\n  bucket: s3://{inter}/sortie\n")
    work = _project(tmp_path)
    yaml = write(tmp_path, "s3.yaml", f"""\
workdir: {work}
file_mounts:
  /inputs: s3://{data}/inputs
  /out:
    name: {kept}
    store: s3
    mode: MOUNT_CACHED
  /tmpout:
    name: {temp}
    store: s3
    mode: MOUNT_CACHED
    persistent: false
run: |
  cat src/main.txt /inputs/in.txt
  echo result-1 > /out/result.txt
  echo t > /tmpout/t.txt
""")
    job_id = cli.launch(yaml)
    job = cli.wait(job_id, timeout=120)
    assert job["status"] == "SUCCEEDED", cli.logs(job_id, "--controller")
    log = cli.logs(job_id)
    assert "main-code" in log and "s3-input" in log
    wait_storage_cleaned(cli, job_id)
    # MOUNT_CACHED writes reached the bucket before the task ended; the persistent bucket stays.
    assert s3.list_objects(kept) == {"result.txt": len("result-1\n")}
    assert not s3.bucket_exists(temp)                         # created by Sortie, persistent: false
    assert s3.bucket_exists(inter) and s3.list_objects(inter, f"sortie/job-{job_id}") == {}
    assert s3.bucket_exists(data) and s3.list_objects(data)   # it existed: used, never deleted


def test_s3_mount_without_fuse_fails_with_a_clear_reason(sortie_cli, s3_env: S3Config, tmp_path: Path) -> None:
    import shutil

    if shutil.which("rclone") or shutil.which("s3fs"):
        pytest.skip("this machine has a FUSE tool for S3; the error path needs none")
    s3 = S3Store(s3_env)
    bucket = bucket_name("mnt")
    s3.create_bucket(bucket)
    cli = sortie_cli(FAST + s3_config(s3_env.endpoint_url or ""))
    yaml = write(tmp_path, "m.yaml", f"file_mounts:\n  /mnt/b:\n    source: s3://{bucket}\n    mode: MOUNT\n"
                 "run: ls /mnt/b\n")
    job_id = cli.launch(yaml)
    job = cli.wait(job_id, timeout=90)
    assert job["status"] == "FAILED_SETUP"
    assert "needs a FUSE mount tool" in job["failure_reason"] and "MOUNT_CACHED" in job["failure_reason"]


@pytest.fixture
def fuse_s3(sortie_cli, s3_env: S3Config) -> tuple[S3Store, Sortie]:
    """The S3 store on moto and a CLI configured for it, where nodes can FUSE-mount it with rclone."""
    from tests.e2e.test_node_mounts import fuse_works

    why = fuse_works()
    if why:
        pytest.skip(why)
    return S3Store(s3_env), sortie_cli(FAST + s3_config(s3_env.endpoint_url or ""))


def test_s3_mount_reads_and_writes_through_rclone(fuse_s3: tuple[S3Store, Sortie], tmp_path: Path) -> None:
    """An S3 MOUNT on a local-cloud node is a real rclone FUSE mount: the run reads the bucket and writes to it at
    the mount's path, the write is in the bucket when the job ends, and the teardown leaves the bucket whole."""
    s3, cli = fuse_s3
    bucket = bucket_name("mnt")
    s3.create_bucket(bucket)
    (tmp_path / "in.txt").write_text("from-the-bucket\n")
    s3.put_file(bucket, "inputs/in.txt", tmp_path / "in.txt")
    yaml = write(tmp_path, "m.yaml", f"""\
file_mounts:
  /mnt/b:
    source: s3://{bucket}
    mode: MOUNT
run: |
  echo "read $(cat /mnt/b/inputs/in.txt)"
  echo written-on-the-node > /mnt/b/result.txt
  grep -q "fuse.rclone" /proc/self/mountinfo && echo "a FUSE mount"
""")
    job_id = cli.launch(yaml)
    job = cli.wait(job_id, timeout=120)
    assert job["status"] == "SUCCEEDED", (cli.logs(job_id), cli.logs(job_id, "--controller"))
    log = cli.logs(job_id)
    assert "read from-the-bucket" in log and "a FUSE mount" in log
    assert s3.list_objects(bucket) == {"inputs/in.txt": len("from-the-bucket\n"),
                                       "result.txt": len("written-on-the-node\n")}


def test_preempted_training_resumes_from_its_checkpoint_on_an_s3_mount(fuse_s3: tuple[S3Store, Sortie],
                                                                      tmp_path: Path) -> None:
    """The checkpoint story over a real FUSE mount: the preempted node's mount dies with it and is detached at its
    teardown; the new node mounts the bucket again and resumes from the step the first one wrote."""
    s3, cli = fuse_s3
    bucket = bucket_name("ckpt")
    s3.create_bucket(bucket)
    yaml = write(tmp_path, "train.yaml", TRAIN.format(bucket=bucket, mode="MOUNT", persistent="true",
                                                      marker=tmp_path / "first-attempt")
                 .replace(f"name: {bucket}", f"name: {bucket}\n    store: s3"))
    job_id = cli.launch(yaml)
    cli.wait_for_log(job_id, "step 3\n", timeout=90)
    cli.run("local", "preempt", "--job", str(job_id))
    job = cli.wait(job_id, timeout=150)
    assert job["status"] == "SUCCEEDED", cli.logs(job_id, "--controller")
    points = resume_points(cli.logs(job_id))
    assert points[0] == 0 and len(points) == 2 and points[1] >= 3
    assert "trained to step 8" in cli.logs(job_id)
    assert s3.list_objects(bucket) == {"step": 2}  # "8\n", and no step.tmp left behind


def test_pool_workers_mount_an_s3_bucket_that_their_jobs_write(fuse_s3: tuple[S3Store, Sortie],
                                                              tmp_path: Path) -> None:
    """A pool's S3 MOUNT is made once per worker, outside the path view: every job on the worker sees it at its
    path, and the pool's teardown detaches it and leaves the bucket whole."""
    from tests.e2e.test_pool_e2e import launch_on, take_down, wait_ready

    s3, cli = fuse_s3
    bucket = bucket_name("pool")
    s3.create_bucket(bucket)
    pool = write(tmp_path, "pool.yaml", f"pool:\n  workers: 1\nfile_mounts:\n  /results:\n    source: s3://{bucket}\n"
                 "    mode: MOUNT\nsetup: test -d /results\n")
    cli.run("jobs", "pool", "apply", "-y", "-p", "mnt", pool)
    wait_ready(cli, "mnt", 1)
    job = write(tmp_path, "job.yaml", "run: echo \"rank $SKYPILOT_JOB_RANK\" > /results/out-$SKYPILOT_JOB_RANK.txt\n")
    ids = launch_on(cli, "mnt", job, 2)
    for job_id in ids:
        assert cli.wait(job_id, timeout=90)["status"] == "SUCCEEDED", cli.logs(job_id)
    take_down(cli, "mnt")
    assert s3.list_objects(bucket) == {"out-0.txt": len("rank 0\n"), "out-1.txt": len("rank 1\n")}
