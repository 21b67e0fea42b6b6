"""Pools end to end: real CLI, controller, Pulumi engine and local-cloud workers."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from orchestrator.infra.local_cloud import LocalCloud
from tests.support.e2e import Sortie, write

pytestmark = pytest.mark.e2e
FAST = "controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  grace_misses: 2\n"


@pytest.fixture
def cli(sortie_cli) -> Sortie:
    return sortie_cli(FAST)


def pool_yaml(tmp_path: Path, workers: int, setup_tag: str = "v1", extra: str = "") -> str:
    return write(tmp_path, f"pool-{workers}-{setup_tag}.yaml", f"""\
pool:
  workers: {workers}
{extra}resources:
  cpus: 1+
setup: |
  echo "{setup_tag} $SORTIE_NODE_SANDBOX" >> {tmp_path}/setups.txt
run: echo ignored
""")


def status(cli: Sortie, name: str) -> dict:
    return json.loads(cli.run("jobs", "pool", "status", name, "--json").stdout)[0]


def wait_ready(cli: Sortie, name: str, count: int, timeout: float = 120, total: int | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = status(cli, name)
        if found["ready"] == count and (total is None or found["total"] == total):
            return found
        assert time.monotonic() < deadline, f"pool {name} never reached {count} READY: {found}"
        time.sleep(0.3)


def launch_on(cli: Sortie, pool: str, yaml: str, num_jobs: int = 1) -> list[int]:
    out = cli.run("jobs", "launch", "-y", "-p", pool, "--num-jobs", str(num_jobs), yaml).stdout
    match = re.search(r"ID (\d+)(?:-(\d+))?", out)
    assert match, out
    first = int(match.group(1))
    return list(range(first, int(match.group(2) or first) + 1))


def worker_stacks(found: dict) -> dict[str, str]:
    return {w["stack"]: w["status"] for w in found["workers"]}


def agents(cli: Sortie) -> dict[str, int]:
    return {n.node_id: n.pid for n in LocalCloud(cli.home / "local").nodes()}


def take_down(cli: Sortie, name: str) -> None:
    cli.run("jobs", "pool", "down", "-y", name)
    deadline = time.monotonic() + 90
    while json.loads(cli.run("jobs", "pool", "status", "--json").stdout):
        assert time.monotonic() < deadline, "the pool never went down"
        time.sleep(0.3)
    assert LocalCloud(cli.home / "local").nodes() == [] and LocalCloud(cli.home / "local").leftovers() == []


def test_pool_runs_jobs_scales_in_place_recreates_rolling_and_goes_down(cli: Sortie, tmp_path: Path) -> None:
    plan = cli.run("jobs", "pool", "apply", "-y", "-p", "p1", pool_yaml(tmp_path, 3)).stdout
    assert "create the pool" in plan and "workers: - -> 3" in plan and plan.count(": create (1 to create)") == 3
    wait_ready(cli, "p1", 3)
    job = write(tmp_path, "job.yaml", f"""\
name: work
setup: echo this-setup-is-ignored
run: |
  echo "rank=$SKYPILOT_JOB_RANK of $SKYPILOT_NUM_JOBS"
  echo "start $(date +%s.%N)" >> {tmp_path}/spans-$SKYPILOT_JOB_RANK
  sleep 1
  echo "end $(date +%s.%N)" >> {tmp_path}/spans-$SKYPILOT_JOB_RANK
""")
    out = cli.run("jobs", "launch", "-y", "-p", "p1", "--num-jobs", "10", job).stdout
    assert "setup of the job YAML is ignored" in out
    ids = [int(x) for x in re.search(r"ID (\d+)-(\d+)", out).groups()]  # type: ignore[union-attr]
    for job_id in range(ids[0], ids[1] + 1):
        assert cli.wait(job_id, timeout=120)["status"] == "SUCCEEDED"
    ranks = sorted(int(re.search(r"rank=(\d+) of 10", cli.logs(j)).group(1))  # type: ignore[union-attr]
                   for j in range(ids[0], ids[1] + 1))
    assert ranks == list(range(10))
    spans = []
    for rank in range(10):
        text = (tmp_path / f"spans-{rank}").read_text().split()
        spans.append((float(text[1]), float(text[3])))
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert 1 < most <= 3  # several at once, never more than the 3 workers
    setups = (tmp_path / "setups.txt").read_text().splitlines()
    assert len(setups) == 3 and len(set(setups)) == 3  # setup ran exactly once per worker

    # 3 -> 5: in place; the three workers are untouched (same stack, same agent).
    before = worker_stacks(status(cli, "p1"))
    pids = agents(cli)
    plan = cli.run("jobs", "pool", "apply", "-y", "-p", "p1", pool_yaml(tmp_path, 5)).stdout
    assert "update in place (scale)" in plan and "workers: 3 -> 5" in plan
    assert plan.count(": same (no changes)") == 3 and plan.count(": create (1 to create)") == 2
    after = worker_stacks(wait_ready(cli, "p1", 5))
    assert set(before) <= set(after) and len(after) == 5
    assert {k: v for k, v in agents(cli).items() if k in pids} == pids

    # The preview of a setup change shows the plan and changes nothing.
    changed = pool_yaml(tmp_path, 5, "v2")
    preview = cli.run("jobs", "pool", "diff", "-p", "p1", changed).stdout
    assert "recreate workers (rolling)" in preview and "changed: setup" in preview
    assert preview.count(": create (1 to create)") == 5 and preview.count(": delete (1 to delete)") == 5
    assert worker_stacks(status(cli, "p1")) == after and agents(cli) == {**pids, **{
        k: v for k, v in agents(cli).items() if k not in pids}}
    stacks_json = json.loads(cli.run("jobs", "pool", "apply", "--dry-run", "--json", "-p", "p1", changed).stdout)
    assert stacks_json["mode"] == "recreate" and len(stacks_json["previews"]) == 10

    # Recreate, rolling, with jobs waiting: never zero READY workers while they wait.
    slow = write(tmp_path, "slow.yaml", "run: sleep 2; echo slow-done\n")
    waiting = launch_on(cli, "p1", slow, 8)
    cli.run("jobs", "pool", "apply", "-y", "-p", "p1", changed)
    deadline = time.monotonic() + 180
    while True:
        found = status(cli, "p1")
        pending = [j for j in found["jobs"] if j["status"] in ("PENDING", "STARTING", "RUNNING")]
        busy_or_ready = [w for w in found["workers"] if w["status"] == "READY" or w["status"].startswith("BUSY")]
        assert busy_or_ready or not pending, found
        if not set(worker_stacks(found)) & set(after) and found["ready"] == 5:
            break
        assert time.monotonic() < deadline, found
        time.sleep(0.2)
    for job_id in waiting:
        assert cli.wait(job_id, timeout=120)["status"] == "SUCCEEDED"
    assert sum(1 for line in (tmp_path / "setups.txt").read_text().splitlines() if line.startswith("v2")) == 5
    take_down(cli, "p1")


def test_preempted_busy_worker_is_replaced_and_its_job_succeeds(cli: Sortie, tmp_path: Path) -> None:
    cli.run("jobs", "pool", "apply", "-y", "-p", "p2", pool_yaml(tmp_path, 1))
    first = wait_ready(cli, "p2", 1)["workers"][0]["stack"]
    job = write(tmp_path, "job.yaml", f"run: |\n  n=$(cat {tmp_path}/tries 2>/dev/null || echo 0)\n"
                f"  echo $((n+1)) > {tmp_path}/tries\n"  # the first try runs until it is preempted
                "  if [ $n = 0 ]; then echo started; sleep 120; fi; echo finished\n")
    (job_id,) = launch_on(cli, "p2", job)
    cli.wait_for_log(job_id, "started")
    cli.run("local", "preempt", first)
    try:
        final = cli.wait(job_id, timeout=150)
    except AssertionError as exc:  # say what the controller saw
        pool_log = cli.home / "logs" / "pools" / "p2.log"
        raise AssertionError(f"{exc}\n--- controller log of the job:\n{cli.logs(job_id, '--controller')[-3000:]}"
                             f"\n--- pool log:\n{pool_log.read_text()[-3000:] if pool_log.exists() else ''}"
                             f"\n--- daemon log:\n{cli.run('controller', 'logs', check=False).stdout[-3000:]}"
                             ) from None
    assert final["status"] == "SUCCEEDED" and final["tasks"][0]["recoveries"] == 1
    assert (tmp_path / "tries").read_text().strip() == "2"
    replaced = wait_ready(cli, "p2", 1, total=1)
    assert replaced["workers"][0]["stack"] != first
    take_down(cli, "p2")


def test_autoscaling_from_zero_to_two_and_back(cli: Sortie, tmp_path: Path) -> None:
    yaml = pool_yaml(tmp_path, 0, extra="  min_workers: 0\n  max_workers: 2\n  idle_timeout: 3s\n")
    plan = cli.run("jobs", "pool", "apply", "-y", "-p", "p3", yaml).stdout
    assert "autoscaling 0..2" in plan
    assert status(cli, "p3")["total"] == 0
    job = write(tmp_path, "job.yaml", "run: sleep 1; echo scaled\n")
    ids = launch_on(cli, "p3", job, 4)
    seen = 0
    deadline = time.monotonic() + 120
    while not all(cli.job(j)["status"] == "SUCCEEDED" for j in ids):
        seen = max(seen, status(cli, "p3")["total"])
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert seen == 2
    deadline = time.monotonic() + 60
    while status(cli, "p3")["total"] != 0:
        assert time.monotonic() < deadline, "the idle pool never scaled to zero"
        time.sleep(0.3)
    assert LocalCloud(cli.home / "local").nodes() == []
    take_down(cli, "p3")


def test_bad_pool_input_is_one_clear_line(cli: Sortie, tmp_path: Path) -> None:
    def fails(*args: str) -> str:
        proc = cli.run(*args, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        return proc.stderr

    assert "pool.workers: must be >= 0" in fails("jobs", "pool", "apply", "-y", "-p", "bad",
                                                  write(tmp_path, "neg.yaml", "pool:\n  workers: -1\n"))
    assert "no pool: section" in fails("jobs", "pool", "apply", "-y", "-p", "bad",
                                       write(tmp_path, "run.yaml", "run: echo hi\n"))
    assert "no pool named 'nope'" in fails("jobs", "launch", "-y", "-p", "nope", "echo hi")
    cli.run("jobs", "pool", "apply", "-y", "-p", "small", pool_yaml(tmp_path, 0))
    big = write(tmp_path, "big.yaml", "resources:\n  accelerators: H100:8\nrun: echo hi\n")
    assert "does not fit pool small" in fails("jobs", "launch", "-y", "-p", "small", big)
    other = write(tmp_path, "other.yaml", "file_mounts:\n  /data: s3://other-bucket/x\nrun: echo hi\n")
    assert "file_mounts: /data uses bucket other-bucket/x, which pool small does not mount" in \
        fails("jobs", "launch", "-y", "-p", "small", other)  # issue 17: the workers reach only the pool's buckets
    assert json.loads(cli.run("jobs", "queue", "-a", "--json").stdout) == []
    take_down(cli, "small")


def test_pool_workdir_reaches_workers_cancel_by_pool_and_files_are_removed(cli: Sortie, tmp_path: Path) -> None:
    work = tmp_path / "proj"
    work.mkdir()
    (work / "data.txt").write_text("pool-data-7\n")
    yaml = write(tmp_path, "wd.yaml", f"pool:\n  workers: 1\nworkdir: {work}\nsetup: test -e data.txt\n")
    cli.run("jobs", "pool", "apply", "-y", "-p", "p4", yaml)
    wait_ready(cli, "p4", 1)
    (job_id,) = launch_on(cli, "p4", write(tmp_path, "cat.yaml", "run: cat data.txt; echo in $PWD\n"))
    assert cli.wait(job_id, timeout=90)["status"] == "SUCCEEDED"
    assert "pool-data-7" in cli.logs(job_id)
    sleepers = launch_on(cli, "p4", write(tmp_path, "sleep.yaml", "run: sleep 300\n"), 2)
    cli.wait(sleepers[0], {"RUNNING"})
    assert "cancelling" in cli.run("jobs", "cancel", "-y", "-p", "p4").stdout
    assert {cli.wait(j, timeout=60)["status"] for j in sleepers} == {"CANCELLED"}
    assert status(cli, "p4")["ready"] == 1  # cancelling jobs leaves the worker
    take_down(cli, "p4")
    assert not list((cli.home / "buckets").glob("sortie-tmp-*"))


def test_several_jobs_per_worker_share_its_accelerators(sortie_cli, tmp_path: Path) -> None:
    cli = sortie_cli(FAST + "local:\n  regions:\n    - {name: gpu-a, accelerators: {H100: 8}}\n")
    yaml = write(tmp_path, "gpu-pool.yaml", "pool:\n  workers: 1\n  jobs_per_worker: 2\nresources:\n"
                 "  accelerators: H100:8\n")
    cli.run("jobs", "pool", "apply", "-y", "-p", "gpus", yaml)
    wait_ready(cli, "gpus", 1)
    job = write(tmp_path, "job.yaml", "resources:\n  accelerators: H100:4\nrun: |\n"
                f"  echo \"gpus=$SKYPILOT_NUM_GPUS_PER_NODE cuda=$CUDA_VISIBLE_DEVICES\"\n"
                f"  echo \"$(date +%s.%N) $(date +%s.%N)\" > /dev/null; touch {tmp_path}/in-$SKYPILOT_JOB_RANK\n"
                f"  sleep 2; ls {tmp_path} | grep -c '^in-' > {tmp_path}/seen-$SKYPILOT_JOB_RANK\n")
    ids = launch_on(cli, "gpus", job, 2)
    for job_id in ids:
        assert cli.wait(job_id, timeout=90)["status"] == "SUCCEEDED"
    logs = sorted(cli.logs(j) for j in ids)
    assert any("gpus=4 cuda=0,1,2,3" in log for log in logs) and any("gpus=4 cuda=4,5,6,7" in log for log in logs)
    assert {(tmp_path / f"seen-{r}").read_text().strip() for r in (0, 1)} == {"2"}  # both ran at once
    big = write(tmp_path, "big.yaml", "resources:\n  accelerators: H100:8\nrun: echo too-big\n")
    refused = cli.run("jobs", "launch", "-y", "-p", "gpus", big, check=False)
    assert refused.returncode != 0 and "offers H100:4 per job" in refused.stderr
    take_down(cli, "gpus")
