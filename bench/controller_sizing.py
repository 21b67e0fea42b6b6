"""Benchmark: how many jobs one controller holds per vCPU and per GiB, from the two costs that grow with jobs.

    .venv/bin/python bench/controller_sizing.py [--jobs 10000] [--polls 300]

1. The tick: one reconciler pass over N jobs in progress (loading their rows and attempts, deciding), measured
   with N jobs waiting in the state (backing off), plus the controller process's memory with them loaded.
2. The poll: one status-and-log poll of a node agent (what each running node costs every poll interval),
   measured against a real local agent.
From those: CPU-seconds per job per second (a share of every tick, one poll per poll interval), hence jobs per
vCPU, and MiB per job.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tick_cost(jobs: int) -> tuple[float, float, float]:
    from orchestrator.config import load_config
    from orchestrator.controller.daemon import Controller
    from orchestrator.spec import load_yaml_text
    from state.store import StateStore
    from tests.support.fake_driver import FakeStackDriver

    home = Path(tempfile.mkdtemp(prefix="sortie-bench-sizing-"))
    os.environ["SORTIE_HOME"] = str(home)
    store = StateStore(home)
    pipeline = load_yaml_text("run: echo hi\n")
    ids = store.submit({**pipeline.to_json(), "is_pipeline": False}, [{}], user="bench", count=jobs,
                       task_resources=["1x[CPU:1+]"])
    with store.session() as session, session.begin():  # every job backing off: the tick loads and skips them
        from state.apply import ANY, apply
        from state.models import JobRow

        apply(session, "wait_for_capacity", "job", [JobRow.id.in_(ids)], expect=["PENDING"], rows=ANY,
              next_attempt_at=time.time() + 3600)
    before = rss_mib()
    reconciler = Controller(store, FakeStackDriver(), load_config(home), home)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        reconciler.tick()
        times.append(time.perf_counter() - t)
    return statistics.median(times), before, rss_mib()


def poll_cost(polls: int) -> float:
    import subprocess

    from orchestrator.infra.agent_bundle import local_agent_command, local_agent_env
    from orchestrator.infra.agent_client import AgentClient

    sandbox = Path(tempfile.mkdtemp(prefix="sortie-bench-agent-"))
    proc = subprocess.Popen([*local_agent_command(), "--sandbox", str(sandbox), "--token-stdin"],
                            env=local_agent_env(dict(os.environ)),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdin is not None
    proc.stdin.write("bench-token\n")
    proc.stdin.close()
    try:
        info = sandbox / "agent.json"
        deadline = time.monotonic() + 20
        while not info.exists():
            assert time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.05)
        import json

        port = json.loads(info.read_text())["port"]
        client = AgentClient(f"http://127.0.0.1:{port}", "bench-token", timeout=10)
        run_id = client.run("echo hello; sleep 60")
        start = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(polls):
            client.status(run_id)
            client.log(run_id, 0)
        end = resource.getrusage(resource.RUSAGE_SELF)
        return ((end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)) / polls
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--polls", type=int, default=300)
    parser.add_argument("--poll-interval", type=float, default=5.0)
    parser.add_argument("--tick-seconds", type=float, default=1.0)
    args = parser.parse_args()
    tick, before, after = tick_cost(args.jobs)
    poll = poll_cost(args.polls)
    per_job_mib = (after - before) / args.jobs
    # CPU-seconds per job per second: its share of every tick, plus one node poll per poll interval.
    per_job_cpu = tick / args.jobs / args.tick_seconds + poll / args.poll_interval
    print(f"tick over {args.jobs} jobs in progress: {tick * 1000:.0f} ms; controller memory {before:.0f} -> "
          f"{after:.0f} MiB ({per_job_mib * 1024:.1f} KiB per job)")
    print(f"one node poll (status + log): {poll * 1000:.2f} ms of controller CPU")
    per_vcpu = 1 / per_job_cpu
    print(f"sizing at a {args.tick_seconds:g} s tick and a {args.poll_interval:g} s poll interval: about "
          f"{per_vcpu:,.0f} single-node running jobs per "
          f"vCPU (CPU-bound), {1024 / max(per_job_mib, 1e-9):,.0f} jobs per GiB of state; plus ~250 MiB per "
          "concurrent stack operation (pulumi.max_concurrent_operations)")


if __name__ == "__main__":
    main()
