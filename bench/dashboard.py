"""Benchmark: the dashboard's page and API latency with 10,000 jobs in the state (in-process, TestClient).

    .venv/bin/python bench/dashboard.py [--jobs 10000] [--runs 20]

Runs in a throwaway Sortie home; starts no controller.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="sortie-bench-dashboard-"))
    os.environ["SORTIE_HOME"] = str(home)
    from fastapi.testclient import TestClient

    from orchestrator.dashboard import create_app
    from orchestrator.spec import load_yaml_text
    from state.store import StateStore

    store = StateStore(home)
    pipeline = load_yaml_text("run: echo hi\n")
    spec = {**pipeline.to_json(), "is_pipeline": False}
    t = time.perf_counter()
    per_user = args.jobs // 4
    for user in ("alice", "bob", "carol", "dave"):
        store.submit(spec, [{}], user=user, name=f"{user}-job", count=per_user, task_resources=["1x[CPU:1+]"],
                     pool="gpus" if user == "bob" else None)
    print(f"state: {per_user * 4} jobs submitted in {time.perf_counter() - t:.1f}s ({home})")
    client = TestClient(create_app(home), base_url="http://127.0.0.1:8765")
    middle = per_user * 2
    cases = [
        ("API page 1 (50)", "/api/jobs?limit=50"),
        ("API page 100 (50)", "/api/jobs?limit=50&offset=4950"),
        ("API filter user", "/api/jobs?user=carol&limit=50"),
        ("API filter status+pool", "/api/jobs?status=PENDING&pool=gpus&limit=50"),
        ("API search", "/api/jobs?q=dave&limit=50&offset=1000"),
        ("API page of 500", "/api/jobs?limit=500"),
        ("API job detail", f"/api/jobs/{middle}"),
        ("page /jobs", "/jobs"),
        ("fragment /fragments/jobs (poll)", "/fragments/jobs?user=alice&page=20"),
        ("page /jobs/ID", f"/jobs/{middle}"),
        ("API status", "/api/status"),
    ]
    print(f"{'request':<34} {'median':>9} {'p95':>9} {'max':>9}")
    for label, url in cases:
        client.get(url)  # warm
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - t) * 1000)
            assert response.status_code == 200, (url, response.status_code)
        times.sort()
        p95 = times[min(int(len(times) * 0.95), len(times) - 1)]
        print(f"{label:<34} {statistics.median(times):>7.1f}ms {p95:>7.1f}ms {max(times):>7.1f}ms")
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
