"""Benchmark: the API server (issue 23, section 6).

    .venv/bin/python bench/api.py [--clients 50] [--jobs-each 20] [--queue-jobs 10000]

1. Submits: `--clients` concurrent clients, each launching `--jobs-each` trivial jobs through a real server process
   (`sortie api start`, loopback, SQLite): p50 and p95 of the submit round trip, and a check that every job was
   submitted exactly once. The server is told not to start the controller (`api.start_controller: false`), so the
   figure is the server's, not the local cloud running a thousand jobs on this machine.
2. `jobs queue -a -u` with `--queue-jobs` jobs in the state: through the server against in-process (target <= 1.5x).
3. The server's RSS idle, and its peak under the submits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ROOT = Path(__file__).resolve().parent.parent


def cli(home: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env={**os.environ, "SORTIE_HOME": str(home)},
                          cwd=ROOT, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--jobs-each", type=int, default=20)
    parser.add_argument("--queue-jobs", type=int, default=10_000)
    args = parser.parse_args()
    from bench.jobs import rss_mib
    from orchestrator.api_client import RemoteJobService
    from orchestrator.config import ApiConfig
    from orchestrator.spec import load_entrypoint

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "server"
        home.mkdir()
        (home / "config.yaml").write_text("api: {start_controller: false, rate_limit_per_minute: 1000000}\n")
        cli(home, "api", "start", "--port", "0")
        try:
            info = json.loads((home / "api" / "server.json").read_text())
            token = (home / "secrets" / "admin.token").read_text().strip()
            api = ApiConfig(endpoint=info["url"], token=token)
            pid = int(info["pid"])
            pipeline = load_entrypoint("echo hi")
            RemoteJobService(api).identity  # noqa: B018 - warm
            idle = rss_mib(pid)
            times: list[float] = []
            ids: list[int] = []
            peak = [idle]
            lock = threading.Lock()
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.2):
                    peak[0] = max(peak[0], rss_mib(pid))

            def client() -> None:
                service = RemoteJobService(api)
                service.identity  # noqa: B018
                for _ in range(args.jobs_each):
                    started = time.perf_counter()
                    got = service.launch(pipeline)
                    took = time.perf_counter() - started
                    with lock:
                        times.append(took)
                        ids.extend(got)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            wall = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - wall
            stop.set()
            from state.store import StateStore

            store = StateStore(home)
            stored = [j.id for j in store.list_jobs()]
            total = args.clients * args.jobs_each
            once = len(ids) == total == len(set(ids)) and sorted(stored) == sorted(ids)
            cuts = statistics.quantiles(times, n=100)
            print(f"submits: {total} by {args.clients} clients in {wall:.1f}s; each job exactly once: {once}")
            print(f"submit round trip: p50 {cuts[49] * 1000:.0f} ms, p95 {cuts[94] * 1000:.0f} ms "
                  f"(target p95 <= 200 ms)")
            print(f"server RSS: idle {idle:.0f} MiB, peak under the submits {peak[0]:.0f} MiB")
            more = args.queue_jobs - len(stored)
            if more > 0:
                spec = {**pipeline.to_json(), "is_pipeline": False}
                store.submit(spec, [{}], user="admin", count=more, task_resources=["1x[CPU:1+]"], workspace="default")
            from orchestrator.service import JobService

            local = JobService(home)
            remote = RemoteJobService(api)
            for label, service in (("in-process", local), ("through the server", remote)):
                service.queue_rows(all_jobs=True, all_users=True)  # warm
                runs = []
                for _ in range(3):
                    started = time.perf_counter()
                    rows = service.queue_rows(all_jobs=True, all_users=True)
                    runs.append(time.perf_counter() - started)
                print(f"queue of {len(rows)} jobs, {label}: {min(runs) * 1000:.0f} ms (best of 3)")
                if label == "in-process":
                    base = min(runs)
            print(f"ratio: {min(runs) / base:.2f}x (target <= 1.5x)")
        finally:
            cli(home, "api", "stop")


if __name__ == "__main__":
    main()
