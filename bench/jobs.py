"""Benchmark: CLI start-up, launch-to-RUNNING latency and controller memory, on the local cloud.

    .venv/bin/python bench/jobs.py [--queue-jobs 10000] [--running-jobs 100] [--latency-runs 3]

Runs in throwaway Sortie homes and cancels everything it launched.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SORTIE = str(Path(sys.executable).parent / "sortie")


def timed(cmd: list[str], env: dict[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    return times


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fresh_home(config: str = "") -> tuple[Path, dict[str, str]]:
    home = Path(tempfile.mkdtemp(prefix="sortie-bench-jobs-"))
    (home / "config.yaml").write_text(config)
    return home, {**os.environ, "SORTIE_HOME": str(home)}


def bench_cli(queue_jobs: int) -> None:
    from orchestrator.spec import load_yaml_text
    from state.store import StateStore

    home, env = fresh_home()
    help_times = timed([SORTIE, "--help"], env, 10)
    print(f"sortie --help: median {statistics.median(help_times) * 1000:.0f} ms (min {min(help_times) * 1000:.0f})")
    pipeline = load_yaml_text("name: bench\nrun: echo hi\n")
    store = StateStore(home)
    t = time.perf_counter()
    store.submit({**pipeline.to_json(), "is_pipeline": False}, [{}], user=os.environ.get("USER", "root"),
                 name="bench", count=queue_jobs, task_resources=["1x[CPU:1+]"])
    print(f"submit {queue_jobs} jobs in one transaction: {time.perf_counter() - t:.2f}s")
    for args in (["jobs", "queue", "-a", "-l", "20"], ["jobs", "queue", "-a"], ["jobs", "queue", "-a", "--json"]):
        times = timed([SORTIE, *args], env, 3)
        print(f"sortie {' '.join(args)} ({queue_jobs} jobs in the state): median {statistics.median(times):.2f}s")


def bench_latency(runs: int) -> None:
    from orchestrator.service import JobService
    from orchestrator.spec import load_yaml_text

    home, env = fresh_home("controller:\n  poll_interval_seconds: 1\n  tick_seconds: 0.2\n")
    os.environ["SORTIE_HOME"] = str(home)
    service = JobService(home)
    pipeline = load_yaml_text("run: echo started; sleep 30\n")
    service.launch(pipeline)  # warm: the controller starts here
    results = []
    for _ in range(runs):
        t = time.perf_counter()
        (job_id,) = service.launch(pipeline)
        while service.resolve(job_id).status != "RUNNING":
            time.sleep(0.05)
        running = time.perf_counter() - t
        while not any("started" in line for line in service.log_lines(service.resolve(job_id), follow=False)):
            time.sleep(0.05)
        results.append((running, time.perf_counter() - t))
    service.cancel(service.active_ids(None))
    print("launch -> RUNNING: " + ", ".join(f"{r:.2f}s" for r, _ in results)
          + "; launch -> first output line: " + ", ".join(f"{o:.2f}s" for _, o in results))
    _drain(service)
    subprocess.run([SORTIE, "controller", "stop"], env=env, stdout=subprocess.DEVNULL, check=False)


def _drain(service, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while service.active_ids(None) and time.monotonic() < deadline:
        time.sleep(1)


def bench_controller_memory(running_jobs: int) -> None:
    from orchestrator.service import JobService
    from orchestrator.spec import load_yaml_text

    home, env = fresh_home("controller:\n  poll_interval_seconds: 5\n")
    os.environ["SORTIE_HOME"] = str(home)
    service = JobService(home)
    service.launch(load_yaml_text("run: sleep 3600\n"), count=running_jobs)
    pid = json.loads((home / "controller" / "controller.json").read_text())["pid"]
    idle_rss = rss_mib(pid)
    t = time.perf_counter()
    peak = idle_rss
    while True:
        running = service.store.count_by_status().get("RUNNING", 0)
        peak = max(peak, rss_mib(pid))
        if running >= running_jobs or time.perf_counter() - t > 1200:
            break
        time.sleep(1)
    ramp = time.perf_counter() - t
    samples = []
    for _ in range(10):
        samples.append(rss_mib(pid))
        time.sleep(1)
    print(f"controller with {running} RUNNING jobs: RSS {statistics.median(samples):.0f} MiB steady "
          f"(at start {idle_rss:.0f} MiB, peak while launching {max(peak, *samples):.0f} MiB); "
          f"all {running_jobs} RUNNING after {ramp:.0f}s")
    service.cancel(service.active_ids(None))
    _drain(service)
    subprocess.run([SORTIE, "controller", "stop"], env=env, stdout=subprocess.DEVNULL, check=False)
    left = service.store.live_stacks()
    print(f"left behind: {[s.name for s in left] or 'nothing'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue-jobs", type=int, default=10_000)
    parser.add_argument("--running-jobs", type=int, default=100)
    parser.add_argument("--latency-runs", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["cli", "latency", "memory"])
    args = parser.parse_args()
    if "cli" not in args.skip:
        bench_cli(args.queue_jobs)
    if "latency" not in args.skip:
        bench_latency(args.latency_runs)
    if "memory" not in args.skip:
        bench_controller_memory(args.running_jobs)


if __name__ == "__main__":
    main()
