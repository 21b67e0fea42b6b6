"""Benchmark: jobs per minute through a warm pool versus one managed job per temporary cluster, on the local cloud.

    .venv/bin/python bench/pools.py [--workers 4] [--jobs 40] [--cluster-jobs 8]

Both run a trivial job (`true`) in throwaway Sortie homes on this machine. The pool is created and made READY
first (not timed); then `--jobs` jobs go through it in one `launch -p --num-jobs`. The cluster side launches
`--cluster-jobs` jobs, each on its own stack. Per-job overhead = wall time x concurrency / jobs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SORTIE = str(Path(sys.executable).parent / "sortie")
CONFIG = "controller:\n  poll_interval_seconds: 0.5\n  tick_seconds: 0.2\n"


def fresh_home() -> dict[str, str]:
    home = Path(tempfile.mkdtemp(prefix="sortie-bench-pools-"))
    (home / "config.yaml").write_text(CONFIG)
    return {**os.environ, "SORTIE_HOME": str(home)}


def sortie(env: dict[str, str], *args: str) -> str:
    return subprocess.run([SORTIE, *args], env=env, capture_output=True, text=True, check=True).stdout


def wait_all_done(env: dict[str, str], timeout: float = 1800) -> None:
    from orchestrator.service import JobService

    service = JobService(Path(env["SORTIE_HOME"]))
    deadline = time.monotonic() + timeout
    while service.active_ids(None):
        if time.monotonic() > deadline:
            raise SystemExit("jobs did not finish in time")
        time.sleep(0.2)


def bench_pool(workers: int, jobs: int) -> float:
    env = fresh_home()
    pool_yaml = Path(env["SORTIE_HOME"]) / "pool.yaml"
    pool_yaml.write_text(f"pool:\n  workers: {workers}\nresources:\n  cpus: 1+\nsetup: echo ready\n")
    sortie(env, "jobs", "pool", "apply", "-y", "-p", "bench", str(pool_yaml))
    from orchestrator.pool_service import PoolService

    service = PoolService(Path(env["SORTIE_HOME"]))
    try:
        while service.status("bench")[0].ready() < workers:
            time.sleep(0.2)
        t = time.perf_counter()
        sortie(env, "jobs", "launch", "-y", "-p", "bench", "--num-jobs", str(jobs), "true")
        wait_all_done(env)
        wall = time.perf_counter() - t
        from orchestrator.spec import load_yaml_text

        t = time.perf_counter()
        ids, _ = service.launch_on_pool("bench", load_yaml_text("run: echo hi\n"), 1000)
        print(f"submitting 1000 jobs to a pool (one transaction): {time.perf_counter() - t:.2f}s")
        service.cancel(ids)
        wait_all_done(env)
    finally:  # whatever happened, nothing is left
        sortie(env, "jobs", "pool", "down", "-y", "bench")
        while service.status():
            time.sleep(0.2)
        sortie(env, "controller", "stop")
    return wall


def bench_clusters(jobs: int) -> float:
    env = fresh_home()
    sortie(env, "controller", "start")
    t = time.perf_counter()
    for _ in range(jobs):
        sortie(env, "jobs", "launch", "-y", "-d", "true")
    wait_all_done(env)
    wall = time.perf_counter() - t
    sortie(env, "controller", "stop")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--cluster-jobs", type=int, default=8)
    args = parser.parse_args()
    pool_wall = bench_pool(args.workers, args.jobs)
    cluster_wall = bench_clusters(args.cluster_jobs)
    pool_rate = args.jobs / pool_wall * 60
    cluster_rate = args.cluster_jobs / cluster_wall * 60
    print(f"warm pool of {args.workers} workers: {args.jobs} jobs in {pool_wall:.1f}s = {pool_rate:.1f} jobs/min; "
          f"per-job overhead {pool_wall * args.workers / args.jobs:.2f}s per worker slot")
    print(f"one cluster per job: {args.cluster_jobs} jobs in {cluster_wall:.1f}s = {cluster_rate:.1f} jobs/min; "
          f"per-job overhead {cluster_wall / args.cluster_jobs:.2f}s of wall time per job")
    print(f"ratio: the pool runs {pool_rate / cluster_rate:.1f}x as many jobs per minute")


if __name__ == "__main__":
    main()
